"""The env-sandbox service: stateful multi-turn sessions of the job's task.

    POST   /sessions            {"meta": {...}}      -> {"session_id": "...", "turn": 0}
    POST   /sessions/{id}/step  {"action": "c12*34;"}
                                -> {"observation": "=408;", "done": false, "turn": 1, "info": {}}
    DELETE /sessions/{id}

A session holds the task's env of one episode (`Task.open_env`: the calculator tool, a
retrieval index's results). The envs live in a pool of sandbox processes
(rollfleet_env.sandbox, `env.sandboxes` of them), each session pinned to the one with the
fewest sessions; a sandbox runs one request at a time, so an env doing real work never
stalls the service, only the sessions of its own sandbox. Each step runs under a time
limit (`env.stepTimeoutSeconds`) and a memory limit (`env.stepMemoryMB`). A step that
fails answers `{"detail": ..., "reason": ...}`, counted in
`rollfleet_env_steps_failed_total{reason}`, and ends its session:

    408 step_timeout   ran past the time limit: its sandbox was killed (and is started again)
    422 step_memory    allocated past the memory limit (or its sandbox died during it)
    422 step_error     the env raised (a bad action the task does not handle)
    410 session_lost   the session's sandbox was killed since (another session's step ran
                       past the time limit, or it died): open a new session

An optional latency with a Pareto tail (`env.stepLatencyMs`, `env.latencyTail`) is added
for benchmarks. Sessions idle longer than `env.sessionTimeoutSeconds` are closed by a
sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, HTTPException
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from rollfleet.service import heavy_tailed_delay, make_app, require_token
from rollfleet_env.sandbox import Sandbox, SandboxFailed, SessionLost, TaskSource

SESSIONS = Gauge("rollfleet_env_sessions", "Open env sessions")
STEP_SECONDS = Histogram(
    "rollfleet_env_step_seconds",
    "Env step latency",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
EXPIRED = Counter("rollfleet_env_sessions_expired_total", "Sessions closed by the idle timeout")
CREATED = Counter("rollfleet_env_sessions_created_total", "Sessions created")
STEPS_FAILED = Counter(
    "rollfleet_env_steps_failed_total",
    "Env steps (and session opens) that failed, each ending its session, by reason",
    ["reason"],
)
STATUS = {"step_timeout": 408, "step_memory": 422, "step_error": 422, "session_lost": 410}
for _reason in STATUS:
    STEPS_FAILED.labels(_reason)  # exported as 0 from the start


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    meta: dict[str, Any] = Field(default_factory=dict)


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str = Field(max_length=4096)


@dataclass
class Session:
    sandbox: Sandbox
    generation: int  # of the sandbox process that holds its env
    turn: int = 0
    done: bool = False
    last_used: float = field(default_factory=time.monotonic)
    stepping: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time


def failed(reason: str, detail: str) -> JSONResponse:
    STEPS_FAILED.labels(reason).inc()
    return JSONResponse({"detail": detail, "reason": reason}, STATUS[reason])


def create_app(
    task: TaskSource,
    *,
    session_timeout: float,
    step_timeout: float = 10.0,
    step_memory_mb: float = 512,
    sandboxes: int = 2,
    step_latency_ms: float = 0.0,
    latency_tail: float = 0.0,
    seed: int = 0,
):
    """`task`: the job's task, or a zero-argument factory of it (a module-level callable or
    a functools.partial of one, such as `partial(make_task, name, params, seed)`) for a task
    that does not pickle or is costly to copy. Each sandbox receives it as it starts."""
    sessions: dict[str, Session] = {}
    pool = [Sandbox(i, task, step_timeout, step_memory_mb) for i in range(sandboxes)]
    described: dict[str, Any] = {}  # the task's name and whether it is multi-turn
    closing: set[asyncio.Task] = set()
    rng = random.Random(seed)

    def latency() -> float:
        return heavy_tailed_delay(step_latency_ms, latency_tail, rng)

    def drop(session_id: str) -> Session | None:
        session = sessions.pop(session_id, None)
        if session is not None:
            session.sandbox.sessions.discard(session_id)
        SESSIONS.set(len(sessions))
        return session

    async def close_env(session_id: str, session: Session) -> None:
        with contextlib.suppress(SessionLost, SandboxFailed):  # restarted: the env is gone
            await session.sandbox.call({"op": "close", "session": session_id}, session.generation)

    def close(session_id: str) -> None:
        """Drop the session here at once; its env in the sandbox in the background (the
        sandbox may be busy with another session's step)."""
        session = drop(session_id)
        if session is not None and session.generation == session.sandbox.generation:
            job = asyncio.create_task(close_env(session_id, session))
            closing.add(job)
            job.add_done_callback(closing.discard)

    async def sweep():
        while True:
            await asyncio.sleep(min(1.0, session_timeout / 4))
            now = time.monotonic()
            for sid in [s for s, v in sessions.items() if now - v.last_used > session_timeout]:
                close(sid)
                EXPIRED.inc()

    @asynccontextmanager
    async def lifespan(_app):
        hellos = await asyncio.gather(*(sandbox.start() for sandbox in pool))
        described.update(hellos[0])
        sweeper = asyncio.create_task(sweep())
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.gather(*(sandbox.stop() for sandbox in pool))

    app = make_app("env", health=lambda: {"task": described["task"], "sessions": len(sessions)})
    app.router.lifespan_context = lifespan
    auth = [Depends(require_token)]

    def get(session_id: str) -> Session:
        session = sessions.get(session_id)
        if session is not None and time.monotonic() - session.last_used > session_timeout:
            close(session_id)  # expired; the sweeper just has not run yet
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
        # Opens in flight count too, so that concurrent ones spread over the pool.
        sandbox = min(pool, key=lambda s: len(s.sessions) + s.opening)
        sandbox.opening += 1
        try:
            _, generation = await sandbox.call(
                {"op": "open", "session": session_id, "meta": body.meta}, None
            )
        except SandboxFailed as e:
            return failed(e.reason, f"opening a session failed: {e.detail}")
        finally:
            sandbox.opening -= 1
        sandbox.sessions.add(session_id)
        sessions[session_id] = Session(sandbox, generation)
        CREATED.inc()
        SESSIONS.set(len(sessions))
        return {"session_id": session_id, "turn": 0}

    @app.post("/sessions/{session_id}/step", dependencies=auth)
    async def step(session_id: str, body: StepRequest):
        session = get(session_id)
        if not described["multi_turn"]:
            raise HTTPException(
                400, f"task {described['task']!r} is single-turn: it has no env steps"
            )
        async with session.stepping:
            if session.done:
                raise HTTPException(409, f"session {session_id!r} has ended; create a new one")
            started = time.perf_counter()
            delay = latency()
            if delay > 0:
                await asyncio.sleep(delay)
            request = {"op": "step", "session": session_id, "action": body.action}
            try:
                reply, _ = await session.sandbox.call(request, session.generation)
            except SessionLost:
                drop(session_id)
                return failed(
                    "session_lost",
                    f"session {session_id!r} lost: its sandbox was restarted (another "
                    "session's step ran past a limit, or it died); open a new session",
                )
            except SandboxFailed as e:
                drop(session_id)  # the sandbox dropped its env, or lost it with a restart
                return failed(e.reason, f"session {session_id!r} ended: {e.detail}")
            session.turn += 1
            session.done = reply["done"]
            STEP_SECONDS.observe(time.perf_counter() - started)
        return {**reply, "turn": session.turn}

    @app.delete("/sessions/{session_id}", dependencies=auth)
    async def delete(session_id: str):
        close(session_id)
        return {"closed": session_id}

    return app
