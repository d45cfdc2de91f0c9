"""Seeded draws from the workload's distributions, cheap enough for millions of samples.

    streams = Draws(cluster, seed=0)
    kind = streams.task_type()            # index into workload.tasks, by share
    turns = streams.turns(kind)           # episode shape of one sample ...

Each (task type, quantity) pair has its own numpy generator spawned from the seed, so one
quantity's draws never shift another's, and draws come out of numpy in blocks of Python
floats (a numpy call per draw would cost more than the simulation step it feeds).
"""

from __future__ import annotations

import numpy as np

BLOCK = 8192


def draw(spec, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` draws of a DistSpec, offset and clipped."""
    d = spec.dist
    if d == "const":
        x = np.full(n, spec.value, dtype=float)
    elif d == "uniform":
        x = rng.uniform(spec.low, spec.high, n)
    elif d == "lognormal":
        x = spec.median * np.exp(spec.sigma * rng.standard_normal(n))
    elif d == "normal":
        x = rng.normal(spec.mean, spec.sd, n)
    elif d == "pareto":  # x_m · U^(-1/shape), as random.paretovariate scaled
        x = spec.scale * (1.0 - rng.random(n)) ** (-1.0 / spec.shape)
    else:  # lomax: a Pareto shifted to start at 0
        x = spec.scale * ((1.0 - rng.random(n)) ** (-1.0 / spec.shape) - 1.0)
    x = x + spec.offset
    if spec.min is not None or spec.max is not None:
        x = np.clip(x, spec.min, spec.max)
    return x


def mean_of(spec, seed: int = 12345, n: int = 200_000) -> float:
    """A distribution's mean, by a fixed-seed estimate (clipping leaves no closed form)."""
    return float(draw(spec, np.random.default_rng(seed), n).mean())


class Stream:
    """Endless draws of one DistSpec; `whole` rounds down to whole tokens (at least `floor`)."""

    __slots__ = ("buf", "floor", "i", "rng", "spec", "whole")

    def __init__(self, spec, rng: np.random.Generator, whole: bool = False, floor: float = 0):
        self.spec, self.rng, self.whole, self.floor = spec, rng, whole, floor
        self.buf: list = []
        self.i = 0

    def _refill(self, n: int) -> None:
        x = np.maximum(draw(self.spec, self.rng, max(BLOCK, n)), self.floor)
        fresh = (np.floor(x).astype(np.int64) if self.whole else x).tolist()
        self.buf, self.i = self.buf[self.i :] + fresh, 0

    def next(self) -> float:
        if self.i >= len(self.buf):
            self._refill(1)
        self.i += 1
        return self.buf[self.i - 1]

    def take(self, n: int) -> list:
        if self.i + n > len(self.buf):
            self._refill(n)
        self.i += n
        return self.buf[self.i - n : self.i]


class Draws:
    """The streams of a cluster's workload, each task type with its own."""

    def __init__(self, cluster, seed: int):
        spec, wl = cluster.spec, cluster.file.workload
        cap = spec.rollout.sampling.maxNewTokens
        seeds = np.random.SeedSequence(seed).spawn(1 + 6 * len(wl.tasks))
        self.rngs = [np.random.default_rng(s) for s in seeds]
        shares = np.array([t.share for t in wl.tasks], dtype=float)
        self.kind = Stream(None, self.rngs[0])
        self.cum = np.cumsum(shares / shares.sum()).tolist()
        self.streams = []
        for k, t in enumerate(wl.tasks):
            r = self.rngs[1 + 6 * k : 7 + 6 * k]
            response = t.responseTokens.model_copy(
                update={"max": min(cap, t.responseTokens.max or cap)}
            )
            self.streams.append(
                (
                    Stream(t.promptTokens, r[0], whole=True, floor=1),
                    Stream(t.turns, r[1], whole=True, floor=1),
                    Stream(response, r[2], whole=True, floor=1),
                    Stream(t.obsTokens, r[3], whole=True),
                    Stream(env_latency(spec, t), r[4]),
                    Stream(t.rewardS, r[5]),
                )
            )
        self._uniform: list = []
        self._u = 0

    def task_type(self) -> int:
        if len(self.cum) == 1:
            return 0
        if self._u >= len(self._uniform):
            self._uniform, self._u = self.rngs[0].random(BLOCK).tolist(), 0
        u = self._uniform[self._u]
        self._u += 1
        for k, edge in enumerate(self.cum):
            if u < edge:
                return k
        return len(self.cum) - 1


def env_latency(spec, task_type):
    """The task's env-step latency: its own, else the RLJob's env.stepLatencyMs with the
    runtime's Pareto multiplier of mean 1 (services/env: base · Pareto(tail)·(tail-1)/tail)."""
    from rollfleet.simulate.config import DistSpec

    if task_type.envLatencyS is not None:
        return task_type.envLatencyS
    base, tail = spec.env.stepLatencyMs / 1000, spec.env.latencyTail
    if tail > 1 and base > 0:
        return DistSpec(dist="pareto", scale=base * (tail - 1) / tail, shape=tail)
    return DistSpec(dist="const", value=base)
