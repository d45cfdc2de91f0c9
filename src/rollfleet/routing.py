"""Affinity routing (RollArc): each task goes to a rollout pool suited to its profile.

A task is prefill-heavy (many turns, long contexts: agentic envs, compute-bound) or
decode-heavy (few turns, long generations: reasoning, bandwidth-bound). Pools say what
they prefer (`rollout.pools[].prefers`: prefill, decode or any); with `rollout.routing:
affinity` the trainer publishes each task on its chosen pool's own task subject, and
each pool's workers pull only from theirs, so every pool has its own backlog.

The router runs in the trainer (each rank routes the tasks it issues): the trainer
already publishes every task and receives every finished trajectory, so it has both the
decision and the statistics at hand without another hop, process or failure mode on the
bus.

- Profile: from the running mean of finished episodes of the same kind (`meta["kind"]`,
  else the task's name): context tokens (prompt and env observations, which the engine
  prefills) per generated token against `rollout.prefillRatio`; before any episode of
  that kind has finished, from the task: a multi-turn task is prefill-heavy.
- Pool: the least loaded (backlog per concurrent task) of the pools preferring the
  profile, else of those preferring `any`, else of all. A pool is saturated while its
  backlog exceeds `rollout.saturatedBacklog` times the tasks it runs at once; a task
  whose preferred pools are all saturated falls back to the least loaded other pool that
  is not (every pool serves the same policy). When every pool is saturated it stays.

    router = Router(spec)
    choice = router.route(router.profile("countdown", multi_turn=False), backlog)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rollfleet.protocol import Trajectory
from rollfleet.spec import PoolSpec, RLJobSpec

Profile = Literal["prefill", "decode"]
PROFILES: tuple[Profile, ...] = ("prefill", "decode")
STATS_DECAY = 0.9  # running means follow the policy as RL changes its lengths


def token_profile(trajectory: Trajectory) -> tuple[int, int]:
    """(context tokens, generated tokens) of a finished episode: what the engine prefilled
    (prompts and env observations, loss mask 0) and what it decoded (loss mask 1)."""
    parts = trajectory.segments or [trajectory]
    context = generated = 0
    for part in parts:
        masked = sum(part.loss_mask)
        context += len(part.prompt_ids) + len(part.response_ids) - masked
        generated += masked
    return context, generated


@dataclass
class RunningRatio:
    context: float = 0.0
    generated: float = 0.0

    def add(self, context: int, generated: int) -> None:
        self.context = STATS_DECAY * self.context + (1 - STATS_DECAY) * context
        self.generated = STATS_DECAY * self.generated + (1 - STATS_DECAY) * generated

    @property
    def ratio(self) -> float:
        return self.context / max(self.generated, 1e-9)


@dataclass(frozen=True)
class Route:
    pool: str
    profile: Profile
    fallback: bool  # the preferred pools were saturated


class Router:
    def __init__(self, spec: RLJobSpec):
        self.pools: list[PoolSpec] = spec.rollout.pools
        self.prefill_ratio = spec.rollout.prefillRatio
        self.saturated_backlog = spec.rollout.saturatedBacklog
        task_size = 1 if spec.async_.replicatePrompts else spec.rollout.sampling.groupSize
        # Tasks a pool runs at once: its engine slots over the samples of one task.
        self.concurrency = {
            p.name: max(1.0, p.replicas * p.maxBatch / task_size) for p in self.pools
        }
        self.stats: dict[str, RunningRatio] = {}

    def observe(self, kind: str, trajectory: Trajectory) -> None:
        """Learn from one finished episode of `kind`."""
        context, generated = token_profile(trajectory)
        if context or generated:
            self.stats.setdefault(kind, RunningRatio()).add(context, generated)

    def profile(self, kind: str, multi_turn: bool) -> Profile:
        stats = self.stats.get(kind)
        if stats is None:  # nothing finished yet: agentic work is prefill-heavy
            return "prefill" if multi_turn else "decode"
        return "prefill" if stats.ratio > self.prefill_ratio else "decode"

    def load(self, pool: str, backlog: dict[str, int]) -> float:
        return backlog.get(pool, 0) / self.concurrency[pool]

    def route(self, profile: Profile, backlog: dict[str, int]) -> Route:
        """The pool for a task of `profile`, given each pool's waiting tasks."""
        preferred = [p.name for p in self.pools if p.prefers == profile]
        preferred = preferred or [p.name for p in self.pools if p.prefers == "any"]
        preferred = preferred or [p.name for p in self.pools]
        best = min(preferred, key=lambda name: self.load(name, backlog))
        if self.load(best, backlog) <= self.saturated_backlog:
            return Route(best, profile, fallback=False)
        others = [
            p.name
            for p in self.pools
            if p.name not in preferred and self.load(p.name, backlog) <= self.saturated_backlog
        ]
        if not others:  # everyone is saturated: wait where the work runs best
            return Route(best, profile, fallback=False)
        return Route(min(others, key=lambda n: self.load(n, backlog)), profile, fallback=True)
