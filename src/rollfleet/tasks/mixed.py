"""`mixed`: several registered tasks in one job, each example drawn from one of them.

Mixed workloads are what RollArc routes: agentic episodes (many turns, long contexts)
beside reasoning ones (one turn, long generations). Each example keeps its own task's
prompt, answer, demonstration, env, turn stops and verifier; its meta says which (`kind`),
so the router keeps running statistics per kind and the `mixed` reward scores it with its
own task's verifier.

    task:
      name: mixed
      params:
        tasks:
          - {name: calculator, params: {observation_pad: 48}, weight: 1}
          - {name: countdown, params: {pad_tail: 1.2}, weight: 1}
"""

from __future__ import annotations

import random
from typing import Any

from rollfleet.tasks import TASKS, Example, Split, Task, TaskEnv, make_task, register_task


@register_task("mixed")
class Mixed(Task):
    name = "mixed"
    multi_turn = True  # some kinds may be; each example says whether it is
    default_reward = "mixed"

    def __init__(self, seed: int = 0, tasks: list[dict[str, Any]] | None = None):
        if not tasks or not isinstance(tasks, list):
            raise ValueError(
                "task.params.tasks: list the tasks to mix, e.g. "
                "[{name: calculator, weight: 1}, {name: countdown, weight: 1}]"
            )
        self.seed = seed
        self.kinds: list[str] = []
        self.tasks: dict[str, Task] = {}
        self.weights: list[float] = []
        for i, entry in enumerate(tasks):
            where = f"task.params.tasks[{i}]"
            if not isinstance(entry, dict) or set(entry) - {"name", "params", "weight"}:
                raise ValueError(f"{where}: expected {{name, params, weight}}, got {entry!r}")
            name = entry.get("name")
            if name not in TASKS or name == "mixed":
                raise ValueError(
                    f"{where}.name: {name!r} is not a task to mix; choose one of "
                    f"{sorted(set(TASKS) - {'mixed'})}"
                )
            if name in self.tasks:
                raise ValueError(f"{where}.name: {name!r} is listed twice")
            weight = entry.get("weight", 1)
            if not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"{where}.weight: must be a positive number, got {weight!r}")
            params = entry.get("params") or {}
            if not isinstance(params, dict):
                raise ValueError(f"{where}.params: expected a map of {name}'s parameters")
            task = make_task(name, params, seed, where=f"{where}.params")
            self.kinds.append(name)
            self.tasks[name] = task
            self.weights.append(float(weight))
        self.turn_stop = tuple(dict.fromkeys(s for t in self.tasks.values() for s in t.turn_stop))

    def size(self, split: Split) -> int | None:
        sizes = [t.size(split) for t in self.tasks.values()]
        return None if None in sizes else min(sizes)

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(f"mixed/{self.seed}/{split}/{index}")
        kind = rng.choices(self.kinds, self.weights)[0]
        task = self.tasks[kind]
        inner = task.example(split, index)
        meta = {
            **inner.meta,
            "kind": kind,
            "verifier": task.default_reward,
            "multi_turn": task.multi_turn,
            "turn_stop": list(task.turn_stop),  # the workers end this example's turns on them
        }
        return Example(inner.id, inner.prompt, inner.answer, meta, inner.demonstration)

    def is_multi_turn(self, example: Example) -> bool:
        return bool(example.meta["multi_turn"])

    def open_env(self, meta: dict[str, Any]) -> TaskEnv:
        kind = meta.get("kind")
        if kind not in self.tasks or not self.tasks[kind].multi_turn:
            raise ValueError(f"meta.kind {kind!r} names no multi-turn task of this mix")
        return self.tasks[kind].open_env(meta)
