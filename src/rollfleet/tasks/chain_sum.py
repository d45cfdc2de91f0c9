"""`chain_sum`: add up a list of digits, writing running totals: a task where the length of
the reasoning matters (BARD's budget-aware reasoning).

Prompt `7 3 9 4 6:`; the teacher's full chain writes every running total, `10,19,23,29`,
and the answer is the last number (29). A shorter chain skips totals (`19,29`, or just
`29`) and so adds several digits in one step, which a small model gets wrong more often:
accuracy rises with the length it may spend. `budgeted_demonstration` compresses the full
chain to a token budget, keeping evenly spread totals and always the final one.
The held-out split is a hash slice of the digit lists the train split never generates.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from itertools import accumulate

from rollfleet.tasks import Example, Split, Task, register_task


def chain(totals: list[int], keep: int) -> str:
    """The chain writing `keep` of the running totals, evenly spread, the last always."""
    n = len(totals)
    keep = max(1, min(keep, n))
    picks = [round((j + 1) * n / keep) - 1 for j in range(keep)]  # distinct: steps of n/keep >= 1
    return ",".join(str(totals[i]) for i in picks)


def final_number(response: str) -> str | None:
    """The chain's last number (the answer), or None if the response is no chain."""
    parts = response.strip().split(",")
    last = parts[-1].strip()
    return last if last.isdigit() and all(p.strip().isdigit() for p in parts) else None


@register_task("chain_sum")
class ChainSum(Task):
    name = "chain_sum"
    default_reward = "chain_sum"

    def __init__(
        self,
        seed: int = 0,
        numbers: int = 6,
        max_digit: int = 9,
        heldout_size: int = 500,
        heldout_percent: int = 10,
    ):
        if numbers < 2:
            raise ValueError("task.params.numbers must be at least 2")
        self.seed, self.numbers, self.max_digit = seed, numbers, max_digit
        self.heldout_size, self.heldout_percent = heldout_size, heldout_percent

    def size(self, split: Split) -> int | None:
        return self.heldout_size if split == "heldout" else None

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(f"chain_sum/{self.seed}/{split}/{index}")
        while True:
            digits = [rng.randint(1, self.max_digit) for _ in range(self.numbers)]
            key = f"{self.seed}:{digits}".encode()
            held_out = zlib.crc32(key) % 100 < self.heldout_percent
            if held_out == (split == "heldout"):
                break
        totals = list(accumulate(digits))[1:]  # the first total is the first digit itself
        return Example(
            id=f"chain_sum-{split}-{index}",
            prompt=" ".join(map(str, digits)) + ":",
            answer=str(totals[-1]),
            meta={"totals": totals},
            demonstration=(("model", chain(totals, len(totals))),),
        )

    def budgeted_demonstration(
        self, example: Example, budget: int, count: Callable[[str], int]
    ) -> str:
        """The longest chain (most totals kept) whose `count` (tokens, with the end token)
        fits `budget`; the bare answer when nothing longer does."""
        totals = example.meta["totals"]
        for keep in range(len(totals), 0, -1):
            text = chain(totals, keep)
            if count(text) <= budget:
                return text
        return chain(totals, 1)
