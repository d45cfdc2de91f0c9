"""What every rollfleet service shares: /healthz, Prometheus /metrics and caller authentication.

    app = make_app("reward")                 # FastAPI app with /healthz and /metrics
    @app.post("/score", dependencies=[Depends(require_token)]) ...
    await serve_in_background(app, port)     # for services whose main loop is not HTTP

Callers authenticate with `Authorization: Bearer <token>`; the token comes from the
ROLLFLEET_SERVICE_TOKEN environment variable (a Kubernetes Secret in a cluster, a random
value per run locally). /healthz and /metrics stay open for probes and Prometheus.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

TOKEN_ENV = "ROLLFLEET_SERVICE_TOKEN"


def service_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def auth_headers() -> dict[str, str]:
    token = service_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


async def require_token(authorization: str | None = Header(default=None)) -> None:
    expected = service_token()
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong bearer token")


def make_app(name: str, health=None) -> FastAPI:
    """A FastAPI app with /healthz (calling `health()` for extra detail) and /metrics."""
    app = FastAPI(title=f"rollfleet {name}")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "service": name, **(health() if health else {})}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def uvicorn_config(app: FastAPI, port: int, host: str = "127.0.0.1") -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)


class BackgroundServer:
    """A uvicorn server running as a task of the service's own event loop.

    uvicorn captures SIGTERM/SIGINT while it serves: it shuts the HTTP server down and
    then re-raises the signal, so the process still ends the usual way.
    """

    def __init__(self, server: uvicorn.Server, task: asyncio.Task):
        self.server, self.task = server, task

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def serve_in_background(app: FastAPI, port: int, host: str = "127.0.0.1") -> BackgroundServer:
    """Start serving `app` inside the running event loop; returns once it accepts requests."""
    server = uvicorn.Server(uvicorn_config(app, port, host))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"HTTP server on {host}:{port} did not start")
        await asyncio.sleep(0.02)
    return BackgroundServer(server, task)


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("ROLLFLEET_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
    )
    return logging.getLogger(name)


def heavy_tailed_delay(mean_ms: float, tail: float, rng) -> float:
    """Seconds of added latency (benchmarks): `mean_ms`, times a Pareto-distributed
    multiplier with mean 1 when `tail` > 1 (most calls fast, a few very slow)."""
    base = mean_ms / 1000
    if tail > 1:
        return base * rng.paretovariate(tail) * (tail - 1) / tail
    return base


class IdleMeter:
    """Share of wall time a service spent idle (the bubble), between two reads.

    meter.set_busy(True) ... meter.set_busy(False); IDLE.set(meter.read())
    """

    def __init__(self):
        self._since = time.monotonic()
        self._busy_seconds = 0.0
        self._busy_from: float | None = None

    def set_busy(self, busy: bool) -> None:
        now = time.monotonic()
        if busy and self._busy_from is None:
            self._busy_from = now
        elif not busy and self._busy_from is not None:
            self._busy_seconds += now - self._busy_from
            self._busy_from = None

    def read(self) -> float:
        """The idle share since the previous read (0 when no time has passed)."""
        now = time.monotonic()
        busy = self._busy_seconds + (now - self._busy_from if self._busy_from is not None else 0)
        elapsed = now - self._since
        self._since, self._busy_seconds = now, 0.0
        if self._busy_from is not None:
            self._busy_from = now
        return max(0.0, 1.0 - busy / elapsed) if elapsed > 0 else 0.0
