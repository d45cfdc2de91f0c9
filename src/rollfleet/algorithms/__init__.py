"""RL algorithms as pure functions registered by name (verl's core_algos style).

- advantages.py: rewards of a group of samples -> advantages (ADVANTAGES registry)
- losses.py: per-token log-probs, behaviour log-probs, advantages, mask -> per-token
  losses (POLICY_LOSSES)
- aggregation.py: per-token losses -> the scalar loss's numerator and denominator
  (AGGREGATIONS)

The trainer looks functions up by the names in `spec.algorithm`; new methods register
more functions here without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}


def _registrar(registry: dict[str, Callable]):
    def register(name: str):
        def wrap(fn):
            registry[name] = fn
            return fn

        return wrap

    return register


register_advantage = _registrar(ADVANTAGES)
register_policy_loss = _registrar(POLICY_LOSSES)
register_aggregation = _registrar(AGGREGATIONS)

from rollfleet.algorithms import advantages, aggregation, losses  # noqa: E402, F401
