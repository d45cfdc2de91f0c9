"""`solve`: find x from an equation built by applying a few operations to it — an inverse
problem whose answer pins down every step of its solution (RAVR's kind of task).

Prompt `(x+4)*3=39:`, answer `9`. The teacher's solution undoes the operations last to
first, writing each intermediate value: `39/3=13,13-4=9`; the answer is the final number.
Knowing x, every intermediate value is a forward partial result (9+4=13, 13*3=39), so a
solution can be reconstructed from the answer, while without it each undo step must be
computed: with more `steps` a small model solves few equations on its own.

Operations apply left to right (`x+4` first, then `*3`); the prompt brackets the left side
where usual precedence would read it otherwise. Division is never needed going forward, and
undoing `*k` divides exactly. The held-out split is a hash slice of the problems the train
split never generates.
"""

from __future__ import annotations

import random
import zlib

from rollfleet.tasks import Example, Split, Task, register_task

UNDO = {"+": "-", "-": "+", "*": "/"}


def equation(x_name: str, ops: list[tuple[str, int]], result: int) -> str:
    """`(x+4)*3=39`: the left side applied left to right, bracketed for usual precedence."""
    text = x_name
    for i, (op, k) in enumerate(ops):
        if op == "*" and i > 0 and ops[i - 1][0] in "+-":
            text = f"({text})"
        text += f"{op}{k}"
    return f"{text}={result}"


def solution(x: int, ops: list[tuple[str, int]]) -> str:
    """The undo chain from the result back to x: `39/3=13,13-4=9`."""
    values = [x]
    for op, k in ops:
        values.append(
            values[-1] + k if op == "+" else values[-1] - k if op == "-" else values[-1] * k
        )
    steps = []
    for (op, k), before, after in zip(
        reversed(ops), reversed(values[:-1]), reversed(values[1:]), strict=True
    ):
        steps.append(f"{after}{UNDO[op]}{k}={before}")
    return ",".join(steps)


@register_task("solve")
class Solve(Task):
    name = "solve"
    default_reward = "solve"

    def __init__(
        self,
        seed: int = 0,
        steps: int = 2,
        max_x: int = 20,
        max_constant: int = 9,
        max_value: int = 200,
        heldout_size: int = 500,
        heldout_percent: int = 10,
    ):
        if steps < 1:
            raise ValueError("task.params.steps must be at least 1")
        self.seed, self.steps, self.max_x = seed, steps, max_x
        self.max_constant, self.max_value = max_constant, max_value
        self.heldout_size, self.heldout_percent = heldout_size, heldout_percent

    def size(self, split: Split) -> int | None:
        return self.heldout_size if split == "heldout" else None

    def _problem(self, rng: random.Random) -> tuple[int, list[tuple[str, int]], int]:
        while True:
            x = rng.randint(1, self.max_x)
            ops = [
                (rng.choice("+-*"), rng.randint(2, self.max_constant)) for _ in range(self.steps)
            ]
            value, ok = x, True
            for op, k in ops:
                value = value + k if op == "+" else value - k if op == "-" else value * k
                ok = ok and 0 <= value <= self.max_value
            if ok:
                return x, ops, value

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(f"solve/{self.seed}/{self.steps}/{split}/{index}")
        while True:
            x, ops, result = self._problem(rng)
            key = f"{self.seed}:{x}:{ops}".encode()
            if (zlib.crc32(key) % 100 < self.heldout_percent) == (split == "heldout"):
                break
        return Example(
            id=f"solve-{split}-{index}",
            prompt=equation("x", ops, result) + ":",
            answer=str(x),
            meta={"ops": [list(op) for op in ops], "result": result},
            demonstration=(("model", solution(x, ops)),),
        )
