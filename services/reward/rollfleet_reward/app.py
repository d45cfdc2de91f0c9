"""The reward service: scores batches of responses with the job's weighted reward functions.

    POST /score  {"items": [{"response": "3*5+7", "answer": "22", "meta": {...}}]}
              -> {"rewards": [{"reward": 1.0, "parts": {"countdown": 1.0}}]}

An item may also carry the episode (`response_tokens`, `turns`: what the rollout worker's
`reward_input` stage sends), for reward functions that score more than the final answer.
Model-based functions (`model_exact_match`: a reader, a judge) score the whole batch with
models the service loads at start from `reward.models` (Hugging Face folders by name, or
builtin models such as QAgent's reader, trained into the run directory on first start).

Runs as a Knative Service in a cluster (stateless, scales on concurrency) and as local
uvicorn processes under `rollfleet run`. For benchmarks, `reward.latencyMs` (with a
Pareto tail, `reward.latencyTail`) emulates a reward model's device time: each request
holds the replica's one device for that long, so requests on a replica take turns as on
one GPU, and only more replicas serve more of them at once. A payload that does not validate gets a 422 that
names the field; a reward that is not a finite number scores 0 with an error, as a failing
function does.
"""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from rollfleet.rewards import REWARDS, RewardModels, compose_batch, models_needed
from rollfleet.service import heavy_tailed_delay, make_app, require_token

SCORED = Counter("rollfleet_reward_items_total", "Responses scored")
ERRORS = Counter(
    "rollfleet_reward_errors_total", "Reward function errors (scored as 0)", ["function"]
)
LATENCY = Histogram(
    "rollfleet_reward_request_seconds",
    "Time to score one /score request",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
REWARD = Histogram(
    "rollfleet_reward_value", "Rewards handed out", buckets=(-1, 0, 0.25, 0.5, 0.75, 1, 2)
)
IN_FLIGHT = Gauge("rollfleet_reward_requests_in_flight", "/score requests being scored now")
BUSY = Counter(
    "rollfleet_reward_busy_seconds_total",
    "Time this replica spent with at least one /score request in progress; its rate is the "
    "replica's utilisation",
)


class BusyClock:
    """Counts in-flight requests (the threads FastAPI scores them in) and adds the time
    with any in flight to BUSY at every request's start and end (so a replica that is
    never idle is counted too)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = 0
        self.since = time.perf_counter()

    def _change(self, delta: int) -> None:
        with self.lock:
            now = time.perf_counter()
            if self.in_flight:
                BUSY.inc(now - self.since)
            self.since = now
            self.in_flight += delta
            IN_FLIGHT.set(self.in_flight)

    def __enter__(self):
        self._change(+1)

    def __exit__(self, *exc):
        self._change(-1)


class TurnItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["model", "env"]
    text: str
    tokens: int = Field(ge=0)
    info: dict[str, Any] = Field(default_factory=dict)


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response: str
    answer: str
    meta: dict[str, Any] = Field(default_factory=dict)
    response_tokens: int | None = Field(None, ge=0)
    turns: list[TurnItem] = Field(default_factory=list)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ScoreItem] = Field(min_length=1, max_length=4096)


class ScoredItem(BaseModel):
    reward: float
    parts: dict[str, float]
    error: str | None = None


class ScoreResponse(BaseModel):
    rewards: list[ScoredItem]


def create_app(
    functions: list[tuple[str, float, dict[str, Any]]],
    models: dict[str, str] | None = None,
    cache: str | Path = "reward-models",
    *,
    latency_ms: float = 0.0,
    latency_tail: float = 0.0,
    seed: int = 0,
):
    """The service for the job's reward `functions`, with `models` (name -> model folder
    or builtin model, trained into `cache` if missing) loaded for the model-based ones;
    `latency_ms`/`latency_tail`: emulated device time per request (benchmarks)."""
    unknown = [name for name, _, _ in functions if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward functions {unknown}; registered: {sorted(REWARDS)}")
    loaded = RewardModels(models or {}, cache)
    for i, (name, _, params) in enumerate(functions):
        for model in models_needed(name, params):
            if model not in loaded:
                raise ValueError(
                    f"reward.functions[{i}] ({name}): params.model {model!r} must "
                    f"name one of reward.models {loaded.names}"
                )
    app = make_app(
        "reward",
        health=lambda: {
            "functions": [f[0] for f in functions],
            "models": loaded.names,
            "models_ready": loaded.ready,
        },
    )
    label = "+".join(f[0] for f in functions)
    ERRORS.labels(function=label)  # exported as 0 from the start, not only after an error
    busy = BusyClock()
    device, rng = threading.Lock(), random.Random(seed)

    @app.post("/score", response_model=ScoreResponse, dependencies=[Depends(require_token)])
    def score(request: ScoreRequest) -> ScoreResponse:
        started = time.perf_counter()
        results = []
        items = [item.model_dump() for item in request.items]
        with busy:
            if latency_ms:
                with device:
                    time.sleep(heavy_tailed_delay(latency_ms, latency_tail, rng))
            scored = compose_batch(functions, items, loaded)
        for total, parts, error in scored:
            if error is None and not all(map(math.isfinite, (total, *parts.values()))):
                # JSON has no NaN or infinity, and a trainer must never see one
                total, parts, error = 0.0, {}, f"reward is not a finite number: {total}, {parts}"
            if error is not None:  # scored 0; the other items keep theirs
                ERRORS.labels(function=label).inc()
            results.append(ScoredItem(reward=total, parts=parts, error=error))
            REWARD.observe(total)
        SCORED.inc(len(results))
        LATENCY.observe(time.perf_counter() - started)
        return ScoreResponse(rewards=results)

    return app
