"""Task registry: generators and loaders of prompts with verifiable answers.

A task turns an index into an `Example` (prompt, reference answer, metadata and a
demonstration for warm-up SFT). Tasks are deterministic in (seed, split, index), so the
trainer's dataset cursor is just an integer and a resumed run sees the same prompts.

    from rollfleet.tasks import make_task
    task = make_task("countdown", {"numbers": 3}, seed=0)
    task.example("train", 0).prompt   # '3 5 7>22:'
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Example:
    """One prompt. `demonstration` is a list of (speaker, text) turns, speaker 'model' or 'env'."""

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    demonstration: tuple[tuple[str, str], ...] = ()


class Task:
    """Base class of a task: subclasses set the class attributes and implement `example`."""

    name: str = ""
    multi_turn: bool = False
    default_reward: str = "exact_match"
    # Strings that end a model turn in a multi-turn episode (besides end-of-sequence), one
    # token (`;`) or several (`</search>`).
    turn_stop: tuple[str, ...] = ()

    def example(self, split: Split, index: int) -> Example:
        raise NotImplementedError

    def size(self, split: Split) -> int | None:
        """Number of examples in a split; None for an endless generated train split."""
        return None

    def is_multi_turn(self, example: Example) -> bool:
        """Whether an example's episode talks to the env (a mix has both kinds)."""
        return self.multi_turn

    def sft_examples(self, example: Example) -> list[Example]:
        """What warm-up SFT trains on for one example: the example and its demonstration,
        or, for a task of several agents, one example per agent turn (its own prompt)."""
        return [example]

    def env_step(self, meta: dict[str, Any], turn: int, action: str) -> tuple[str, bool]:
        """Multi-turn tasks: the env's observation after the model's `action` in turn `turn`
        (0-based), and whether the episode has ended (the default `TaskEnv` calls this)."""
        raise NotImplementedError(f"task {self.name!r} is single-turn")

    def open_env(self, meta: dict[str, Any]) -> TaskEnv:
        """The env of one episode (one env-service session). A task whose env keeps more
        state than the turn (retrieved passages, other agents) returns its own TaskEnv."""
        return TaskEnv(self, meta)


class TaskEnv:
    """One episode's env: `step(action)` -> (observation, done, info). `info` (JSON) goes
    into the step reply and the transcript the reward sees. `step` may block on real work
    (a retrieval index): the env service runs it off its event loop, one step of a session
    at a time. The default plays the task's `env_step` turn by turn."""

    def __init__(self, task: Task, meta: dict[str, Any]):
        self.task, self.meta, self.turn = task, meta, 0

    def step(self, action: str) -> tuple[str, bool, dict[str, Any]]:
        observation, done = self.task.env_step(self.meta, self.turn, action)
        self.turn += 1
        return observation, done, {}


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    def wrap(factory):
        TASKS[name] = factory
        return factory

    return wrap


# Task parameters as a manifest gives them: typed as the constructor declares them, no
# coercion (YAML already types its values), and never NaN or infinite.
_PARAM_CONFIG = ConfigDict(strict=True, allow_inf_nan=False)


def check_task_params(
    name: str, params: dict[str, Any], where: str = "task.params"
) -> dict[str, Any]:
    """`params` checked against the constructor of task `name`: each must be one of its
    parameters (the seed is the job's, never a parameter) and of its declared type.
    Returns them validated; ValueError names the first bad one, `where` being the path of
    `params` in the manifest."""
    factory = TASKS[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "seed"]
    hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    checked = {}
    for key, value in params.items():
        if key not in accepted:
            hint = " (the seed is spec.seed)" if key == "seed" else ""
            raise ValueError(
                f"{where}.{key} is not a parameter of task {name}{hint}; it takes: "
                + (", ".join(accepted) or "none")
            )
        try:
            checked[key] = TypeAdapter(hints.get(key, Any), config=_PARAM_CONFIG).validate_python(
                value
            )
        except ValidationError as e:
            raise ValueError(f"{where}.{key}: {e.errors()[0]['msg']}, got {value!r}") from None
    return checked


def make_task(
    name: str, params: dict[str, Any] | None = None, seed: int = 0, where: str = "task.params"
) -> Task:
    """The task `name` with `params` (checked by `check_task_params`; `where`: their path
    in the manifest, for the error messages)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name](seed=seed, **check_task_params(name, params or {}, where))


# Registration happens on import of the task modules.
from rollfleet.tasks import (  # noqa: E402, F401
    calculator,
    chain_sum,
    countdown,
    jsonl,
    mixed,
    qagent,
    recgpt,
    recommend,
    solve,
)
