"""Reward functions registered by name, and their weighted composition.

Each function maps (response, answer, meta, **params) to a float. A function that also
wants more of the episode declares it as a keyword: `response_tokens` (tokens the model
generated) or `turns` (the transcript, each turn a {role, text, tokens, info} map), and
gets it from the scored item. The reward service serves them over HTTP; the trainer uses
the same functions for held-out evaluation.

    item = {"response": "3*5+7", "answer": "22", "meta": {"numbers": [3, 5, 7], "target": 22}}
    total, parts = compose([("countdown", 1.0, {})], item)
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

from rollfleet.tasks.countdown import verify

REWARDS: dict[str, Callable[..., float]] = {}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def register_reward(name: str):
    def wrap(fn):
        REWARDS[name] = fn
        return fn

    return wrap


@register_reward("exact_match")
def exact_match(response: str, answer: str, meta: dict[str, Any], strip: bool = True) -> float:
    """1 if the response equals the answer (whitespace-stripped by default)."""
    if strip:
        response, answer = response.strip(), answer.strip()
    return float(response == answer)


@register_reward("numeric")
def numeric(response: str, answer: str, meta: dict[str, Any], tolerance: float = 1e-6) -> float:
    """1 if the last number in the response equals the answer within `tolerance`."""
    found = _NUMBER.findall(response)
    if not found:
        return 0.0
    try:
        return float(abs(float(found[-1]) - float(answer)) <= tolerance)
    except ValueError:
        return 0.0


@register_reward("countdown")
def countdown(response: str, answer: str, meta: dict[str, Any]) -> float:
    """1 if the expression uses each given number once and reaches the target."""
    return float(verify(response, meta["numbers"], int(meta["target"])))


@register_reward("format")
def format_reward(
    response: str, answer: str, meta: dict[str, Any], pattern: str = r"^[0-9+\-*()]+$"
) -> float:
    """1 if the whole response matches `pattern` (a shaping term, usually weighted low)."""
    return float(re.fullmatch(pattern, response.strip()) is not None)


EPISODE_FIELDS = ("response_tokens", "turns")  # what a function may ask of the episode


@functools.cache
def _episode_fields(name: str) -> tuple[str, ...]:
    wanted = inspect.signature(REWARDS[name]).parameters
    return tuple(f for f in EPISODE_FIELDS if f in wanted)


def reward_item(task, episode) -> dict[str, Any]:
    """What the reward service scores for one episode by default: the last model turn's
    text, the reference answer and the task's meta, the model's token count and the
    transcript. (`task` is a RolloutTask, `episode` a rollfleet.episodes.Episode.)"""
    return {
        "response": episode.final_text,
        "answer": task.answer,
        "meta": task.meta,
        "response_tokens": episode.response_tokens,
        "turns": [
            {"role": t.role, "text": t.text, "tokens": t.tokens, "info": t.info}
            for t in episode.turns
        ],
    }


def score(name: str, item: dict[str, Any], params: dict[str, Any] | None = None) -> float:
    """One reward function on one item (a reward_item-shaped dict)."""
    extra = {f: item[f] for f in _episode_fields(name) if item.get(f) is not None}
    return REWARDS[name](
        item["response"], item["answer"], item.get("meta", {}), **(params or {}), **extra
    )


def compose(
    functions: list[tuple[str, float, dict[str, Any]]], item: dict[str, Any]
) -> tuple[float, dict[str, float]]:
    """Weighted sum of reward functions on one item; returns (total, {name: unweighted value}).

    A function listed twice (with other params) is reported as `name`, `name#2`, ...
    """
    total, parts = 0.0, {}
    for name, weight, params in functions:
        value = score(name, item, params)
        total += weight * value
        key, n = name, 1
        while key in parts:
            n += 1
            key = f"{name}#{n}"
        parts[key] = value
    return total, parts
