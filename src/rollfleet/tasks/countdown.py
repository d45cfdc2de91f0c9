"""Countdown: combine the given numbers with + - * to reach a target.

Prompt `3 5 7>22:`; any expression that uses each number exactly once and evaluates to the
target is correct (`3*5+7`), so the reward is a verifier rather than an exact match. The
held-out split is a slice of the problem space that the train split never generates.

`few_shot` > 0 starts every prompt with that many solved train problems
(`1 4 6>10:4+6*1;...`), the same ones for every prompt: a long prompt before a short
answer, the long-prompt workload of the performance benchmarks.

`pad_tail` > 0 ends the demonstrations with a run of dots after the expression
(`3*5+7.....`), its length drawn from a Pareto distribution with that shape (scaled by
`pad_scale`, capped at `pad_max`): a model warmed up on them answers with long-tailed
lengths, the RLVR workload of the asynchrony benchmarks. Dots around the expression are
ignored when verifying. (Dots before the answer, a "scratchpad", were tried first: after
40 of them the tiny model had lost the prompt and solved nothing.)
"""

from __future__ import annotations

import random
import zlib

from rollfleet.tasks import Example, Split, Task, register_task

OPS = "+-*"


def _problem(rng: random.Random, numbers: int, max_number: int, max_target: int):
    while True:
        nums = [rng.randint(1, max_number) for _ in range(numbers)]
        ops = [rng.choice(OPS) for _ in range(numbers - 1)]
        expr = str(nums[0]) + "".join(op + str(n) for op, n in zip(ops, nums[1:], strict=True))
        target = eval_expression(expr)
        if 0 <= target <= max_target:
            shown = sorted(nums)
            return shown, target, expr


def eval_expression(expr: str) -> int:
    """Evaluate digits, + - * and parentheses with the usual precedence; ValueError if malformed."""
    pos = 0

    def peek():
        return expr[pos] if pos < len(expr) else ""

    def number():
        nonlocal pos
        if peek() == "(":
            pos += 1
            value = sum_()
            if peek() != ")":
                raise ValueError("missing )")
            pos += 1
            return value
        start = pos
        while peek().isdigit():
            pos += 1
        if start == pos:
            raise ValueError(f"number expected at {pos}")
        return int(expr[start:pos])

    def product():
        nonlocal pos
        value = number()
        while peek() == "*":
            pos += 1
            value *= number()
        return value

    def sum_():
        nonlocal pos
        value = product()
        while peek() in ("+", "-"):
            op = peek()
            pos += 1
            value = value + product() if op == "+" else value - product()
        return value

    if len(expr) > 64:
        raise ValueError("expression too long")
    value = sum_()
    if pos != len(expr):
        raise ValueError(f"unexpected {expr[pos]!r} at {pos}")
    return value


def verify(response: str, numbers: list[int], target: int) -> bool:
    """True if `response` uses exactly `numbers` (each once) and evaluates to `target`."""
    expr = response.strip().strip(".")
    try:
        value = eval_expression(expr)
    except ValueError:
        return False
    used = sorted(int(tok) for tok in "".join(c if c.isdigit() else " " for c in expr).split())
    return value == target and used == sorted(numbers)


def strategy(response: str) -> str | None:
    """The operator pattern of a well-formed answer (`3*5+7` and `5*3+7` -> `*+`,
    `7+3*5` -> `+*`): the strategy it uses; None when the answer does not parse."""
    expr = response.strip().strip(".")
    try:
        eval_expression(expr)
    except ValueError:
        return None
    return "".join(c for c in expr if c in "+-*()")


@register_task("countdown")
class Countdown(Task):
    """Problems are split by a hash of (numbers, target): `heldout_percent` of the problem
    space is held out, so both splits follow the same distribution and never overlap."""

    name = "countdown"
    default_reward = "countdown"

    def __init__(
        self,
        seed: int = 0,
        numbers: int = 3,
        max_number: int = 9,
        max_target: int = 99,
        heldout_size: int = 500,
        heldout_percent: int = 10,
        pad_tail: float = 0.0,
        pad_scale: float = 4.0,
        pad_max: int = 40,
        few_shot: int = 0,
    ):
        if numbers < 2:
            raise ValueError("task.params.numbers must be at least 2")
        if max_number < 1 or max_target < 0:
            # no problem could be drawn: the generator would search forever
            raise ValueError(
                "task.params.max_number must be at least 1 and max_target not negative"
            )
        if pad_tail < 0 or pad_max < 0:
            raise ValueError("task.params.pad_tail and pad_max must not be negative")
        self.pad_tail, self.pad_scale, self.pad_max = pad_tail, pad_scale, pad_max
        if not 0 < heldout_percent < 100:
            raise ValueError("task.params.heldout_percent must be between 1 and 99")
        self.seed, self.numbers, self.max_number, self.max_target = (
            seed,
            numbers,
            max_number,
            max_target,
        )
        self.heldout_size, self.heldout_percent = heldout_size, heldout_percent
        if not 0 <= few_shot <= 64:
            raise ValueError("task.params.few_shot must be between 0 and 64")
        self.shots = "".join(f"{p}{e};" for p, e in self._solved(few_shot))

    def _solved(self, count: int) -> list[tuple[str, str]]:
        """`count` train problems with a solution each: (prompt, expression)."""
        rng = random.Random(f"countdown/{self.seed}/shots")
        solved = []
        while len(solved) < count:
            shown, target, expr = _problem(rng, self.numbers, self.max_number, self.max_target)
            if self.split_of(shown, target) == "train":
                solved.append((" ".join(map(str, shown)) + f">{target}:", expr))
        return solved

    def split_of(self, shown: list[int], target: int) -> Split:
        key = f"{self.seed}:{','.join(map(str, shown))}>{target}".encode()
        return "heldout" if zlib.crc32(key) % 100 < self.heldout_percent else "train"

    def size(self, split: Split) -> int | None:
        return self.heldout_size if split == "heldout" else None

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(f"countdown/{self.seed}/{split}/{index}")
        while True:
            shown, target, expr = _problem(rng, self.numbers, self.max_number, self.max_target)
            if self.split_of(shown, target) == split:
                break
        prompt = self.shots + " ".join(map(str, shown)) + f">{target}:"
        return Example(
            id=f"countdown-{split}-{index}",
            prompt=prompt,
            answer=str(target),
            meta={"numbers": shown, "target": target},
            demonstration=(("model", expr + "." * self._padding(rng)),),
        )

    def _padding(self, rng: random.Random) -> int:
        if not self.pad_tail:
            return 0
        return min(self.pad_max, int(self.pad_scale * (rng.paretovariate(self.pad_tail) - 1)))
