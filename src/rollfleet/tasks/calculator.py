"""`calculator`: a multi-turn task served by the env service.

The model sees `12*34+5?`, calls the calculator tool with `c12*34;`, the env answers
`=408;`, and the model ends with `a413`. The product is out of reach of a tiny model's
arithmetic, so using the tool pays. `step_latency_ms` (with an optional long tail) makes
the env slow on purpose, for the agentic benchmarks; `observation_pad` prefixes each
tool answer with that many characters of tool log (`#`), so episodes carry long
contexts: prefill-heavy work, for the routing benchmark.
"""

from __future__ import annotations

import random

from rollfleet.tasks import Example, Split, Task, TaskEnv, register_task
from rollfleet.tasks.countdown import eval_expression


@register_task("calculator")
class Calculator(Task):
    name = "calculator"
    multi_turn = True
    default_reward = "numeric"
    turn_stop = (";",)

    def __init__(
        self, seed: int = 0, heldout_size: int = 200, max_turns: int = 3, observation_pad: int = 0
    ):
        if observation_pad < 0:
            raise ValueError("task.params.observation_pad must not be negative")
        self.seed, self.heldout_size, self.max_turns = seed, heldout_size, max_turns
        self.pad = "#" * observation_pad

    def size(self, split: Split) -> int | None:
        return self.heldout_size if split == "heldout" else None

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(f"calculator/{self.seed}/{split}/{index}")
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 9)
        if split == "train":
            # Held-out questions have even a; train questions odd a: the splits never overlap.
            a |= 1
        else:
            a &= ~1
        product = a * b
        answer = product + c
        return Example(
            id=f"calculator-{split}-{index}",
            prompt=f"{a}*{b}+{c}?",
            answer=str(answer),
            meta={"max_turns": self.max_turns},
            demonstration=(
                ("model", f"c{a}*{b};"),
                ("env", f"{self.pad}={product};"),
                ("model", f"a{answer}"),
            ),
        )

    def open_env(self, meta: dict) -> TaskEnv:
        turns = meta.get("max_turns", self.max_turns)
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
            raise ValueError(f"meta.max_turns: a number of turns, at least 1; got {turns!r}")
        return super().open_env(meta)

    def env_step(self, meta: dict, turn: int, action: str) -> tuple[str, bool]:
        """`c<expr>;` gets `=<value>;` back; anything else is the final answer."""
        if not (action.startswith("c") and action.endswith(";")):
            return "", True
        try:
            observation = f"{self.pad}={eval_expression(action[1:-1])};"
        except ValueError:
            observation = f"{self.pad}=error;"
        return observation, turn + 1 >= int(meta.get("max_turns", self.max_turns))
