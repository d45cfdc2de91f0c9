"""The env-sandbox service: stateful multi-turn sessions of the job's task.

    POST   /sessions            {"meta": {...}}      -> {"session_id": "...", "turn": 0}
    POST   /sessions/{id}/step  {"action": "c12*34;"}
                                -> {"observation": "=408;", "done": false, "turn": 1, "info": {}}
    DELETE /sessions/{id}

A session holds the task's env of one episode (`Task.open_env`: the calculator tool, a
retrieval index's results). Its steps run one at a time in a worker thread, so an env
doing real work never stalls the other sessions; an optional latency with a Pareto tail
(`env.stepLatencyMs`, `env.latencyTail`) is added for benchmarks. Sessions idle longer
than `env.sessionTimeoutSeconds` are closed by a sweeper.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, HTTPException
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from rollfleet.service import heavy_tailed_delay, make_app, require_token
from rollfleet.tasks import Task, TaskEnv

SESSIONS = Gauge("rollfleet_env_sessions", "Open env sessions")
STEP_SECONDS = Histogram(
    "rollfleet_env_step_seconds",
    "Env step latency",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
EXPIRED = Counter("rollfleet_env_sessions_expired_total", "Sessions closed by the idle timeout")
CREATED = Counter("rollfleet_env_sessions_created_total", "Sessions created")


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    meta: dict[str, Any] = Field(default_factory=dict)


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str = Field(max_length=4096)


@dataclass
class Session:
    env: TaskEnv
    turn: int = 0
    done: bool = False
    last_used: float = field(default_factory=time.monotonic)
    stepping: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time


def create_app(
    task: Task,
    *,
    session_timeout: float,
    step_latency_ms: float = 0.0,
    latency_tail: float = 0.0,
    seed: int = 0,
):
    sessions: dict[str, Session] = {}
    rng = random.Random(seed)

    def latency() -> float:
        return heavy_tailed_delay(step_latency_ms, latency_tail, rng)

    async def sweep():
        while True:
            await asyncio.sleep(min(1.0, session_timeout / 4))
            now = time.monotonic()
            for sid in [s for s, v in sessions.items() if now - v.last_used > session_timeout]:
                sessions.pop(sid, None)
                EXPIRED.inc()
            SESSIONS.set(len(sessions))

    @asynccontextmanager
    async def lifespan(_app):
        sweeper = asyncio.create_task(sweep())
        yield
        sweeper.cancel()

    app = make_app("env", health=lambda: {"task": task.name, "sessions": len(sessions)})
    app.router.lifespan_context = lifespan
    auth = [Depends(require_token)]

    def get(session_id: str) -> Session:
        session = sessions.get(session_id)
        if session is not None and time.monotonic() - session.last_used > session_timeout:
            sessions.pop(session_id, None)  # expired; the sweeper just has not run yet
            EXPIRED.inc()
            session = None
        if session is None:
            raise HTTPException(
                404, f"no session {session_id!r} (closed, expired or never created)"
            )
        session.last_used = time.monotonic()
        return session

    @app.post("/sessions", dependencies=auth)
    async def create(body: CreateSession):
        session_id = uuid.uuid4().hex
        sessions[session_id] = Session(env=task.open_env(body.meta))
        CREATED.inc()
        SESSIONS.set(len(sessions))
        return {"session_id": session_id, "turn": 0}

    @app.post("/sessions/{session_id}/step", dependencies=auth)
    async def step(session_id: str, body: StepRequest):
        session = get(session_id)
        if not task.multi_turn:
            raise HTTPException(400, f"task {task.name!r} is single-turn: it has no env steps")
        async with session.stepping:
            if session.done:
                raise HTTPException(409, f"session {session_id!r} has ended; create a new one")
            started = time.perf_counter()
            delay = latency()
            if delay > 0:
                await asyncio.sleep(delay)
            observation, done, info = await asyncio.to_thread(session.env.step, body.action)
            session.turn += 1
            session.done = done
            STEP_SECONDS.observe(time.perf_counter() - started)
        return {"observation": observation, "done": done, "turn": session.turn, "info": info}

    @app.delete("/sessions/{session_id}", dependencies=auth)
    async def close(session_id: str):
        sessions.pop(session_id, None)
        SESSIONS.set(len(sessions))
        return {"closed": session_id}

    return app
