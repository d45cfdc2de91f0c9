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
- Pool: the least loaded of the pools preferring the profile, else of those preferring
  `any`, else of all; a pool's load is its queue (tasks waiting) per task it runs now
  (at least one per replica). What a pool runs is measured, not taken from its slots: a
  vLLM replica bound by its KV cache runs far fewer tasks than `maxBatch` allows. The
  router counts the tasks it sent to each pool until their last trajectory is back
  (`sent`, `arrived`, `forget` for cancelled ones); running = in flight - queued.
- A pool is saturated while its load exceeds `rollout.saturatedBacklog`; a task whose
  preferred pools are all saturated falls back to the least loaded other pool that is
  not (every pool serves the same policy). When every pool is saturated it stays.

    router = Router(spec)
    choice = router.route(router.profile("countdown", multi_turn=False), backlog)
    router.sent("t7", choice.pool, samples=8)   # ... router.arrived("t7") per trajectory
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
        self.stats: dict[str, RunningRatio] = {}
        self.in_flight = {p.name: 0 for p in self.pools}  # tasks sent, not all back yet
        self.waiting: dict[str, list] = {}  # task id -> [pool, samples not back yet]

    def sent(self, task_id: str, pool: str, samples: int) -> None:
        self.waiting[task_id] = [pool, samples]
        self.in_flight[pool] += 1

    def arrived(self, task_id: str) -> None:
        """One trajectory of `task_id` is back (its last one ends the task)."""
        entry = self.waiting.get(task_id)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                self.forget(task_id)

    def forget(self, task_id: str) -> None:
        """The task is over (its last trajectory is back, or its group was cancelled)."""
        if (entry := self.waiting.pop(task_id, None)) is not None:
            self.in_flight[entry[0]] -= 1

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

    def route(
        self, profile: Profile, backlog: dict[str, int], running: dict[str, int] | None = None
    ) -> Route:
        """The pool for a task of `profile`, given each pool's waiting tasks and the tasks
        it runs now (default: what this router sent there and is not back, less the
        waiting ones)."""
        if running is None:
            running = {name: n - backlog.get(name, 0) for name, n in self.in_flight.items()}
        replicas = {p.name: p.replicas for p in self.pools}

        def load(name: str) -> float:
            return backlog.get(name, 0) / max(running.get(name, 0), replicas[name])

        preferred = [p.name for p in self.pools if p.prefers == profile]
        preferred = preferred or [p.name for p in self.pools if p.prefers == "any"]
        preferred = preferred or [p.name for p in self.pools]
        best = min(preferred, key=load)
        if load(best) <= self.saturated_backlog:
            return Route(best, profile, fallback=False)
        others = [
            p.name
            for p in self.pools
            if p.name not in preferred and load(p.name) <= self.saturated_backlog
        ]
        if not others:  # everyone is saturated: wait where the work runs best
            return Route(best, profile, fallback=False)
        return Route(min(others, key=load), profile, fallback=True)
