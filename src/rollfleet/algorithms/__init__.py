"""RL algorithms as pure functions registered by name (verl's core_algos style).

- advantages.py: rewards of a group of samples -> advantages (ADVANTAGES registry)
- losses.py: per-token log-probs, behaviour log-probs, advantages, mask -> loss (POLICY_LOSSES)

The trainer looks functions up by the names in `spec.algorithm`; new methods register
more functions here without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}


def register_advantage(name: str):
    def wrap(fn):
        ADVANTAGES[name] = fn
        return fn

    return wrap


def register_policy_loss(name: str):
    def wrap(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


from rollfleet.algorithms import advantages, losses  # noqa: E402, F401
