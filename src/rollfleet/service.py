"""What every rollfleet service shares: /healthz, Prometheus /metrics and caller authentication.

    app = make_app("reward")                 # FastAPI app with /healthz and /metrics
    @app.post("/score", dependencies=[Depends(require_token)]) ...
    await serve_in_background(app, port)     # for services whose main loop is not HTTP

Callers authenticate with `Authorization: Bearer <token>`; the token comes from the
ROLLFLEET_SERVICE_TOKEN environment variable (a Kubernetes Secret in a cluster, a random
value per run locally). /healthz and /metrics stay open for probes and Prometheus.

Bad requests are refused where they arrive, each with a message saying what is wrong and
counted in `rollfleet_http_rejected_total{service,reason}`: a body over the size limit
(413, too_large) or not UTF-8 (400, not_utf8) before the app reads it, a missing or wrong
token (401, auth), a payload that does not validate (422, invalid, naming the field), and
any other 4xx the app answers (not_found, conflict, bad_request, ...).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_ENV = "ROLLFLEET_SERVICE_TOKEN"
MAX_BODY_BYTES = 8 * 2**20  # far above a reward batch or an env step; a bigger body is refused

REJECTED = Counter(
    "rollfleet_http_rejected_total",
    "Requests refused instead of handled (4xx), by the reason",
    ["service", "reason"],
)
# The reason label of each refusal; another 4xx counts as "refused".
_REASONS = {
    400: "bad_request",
    401: "auth",
    404: "not_found",
    405: "method",
    409: "conflict",
    413: "too_large",
    422: "invalid",
}


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


class RefuseBadBodies:
    """ASGI middleware: a request body over `max_bytes` gets 413 (by its Content-Length, or
    once that many bytes have arrived), one that is not UTF-8 gets 400, both before the
    app sees them; the rest is passed on whole."""

    def __init__(self, app: ASGIApp, service: str, max_bytes: int):
        self.app, self.service, self.max_bytes = app, service, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else 0
        body, received, more = bytearray(), 0, True
        # An oversized body is read on (up to 4 times the limit) but not kept: a client
        # still sending when the connection closes may never see the 413.
        while more and received <= 4 * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if max(size, received) <= self.max_bytes:
                body += chunk
            more = message.get("more_body", False)
        if max(size, received) > self.max_bytes:
            detail = self._too_large(max(size, received), "at least " if more else "")
            await self._refuse(scope, receive, send, 413, detail, close=more)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            detail = (
                f"the request body is not UTF-8 (byte {body[e.start]:#04x} at offset "
                f"{e.start}): send JSON encoded as UTF-8"
            )
            await self._refuse(scope, receive, send, 400, detail, "not_utf8")
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, for the app to notice
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int, bound: str = "") -> str:
        return (
            f"the request body has {bound}{size} bytes, over this service's limit of "
            f"{self.max_bytes}: send fewer or smaller items per request"
        )

    async def _refuse(self, scope, receive, send, status, detail, reason=None, close=False):
        """Answer `status` with `detail`, counted; `close`: the body was not read to its
        end, so the connection cannot carry another request."""
        REJECTED.labels(self.service, reason or _REASONS[status]).inc()
        headers = {"Connection": "close"} if close else None
        await JSONResponse({"detail": detail}, status, headers=headers)(scope, receive, send)


def _json_safe(value: Any) -> Any:
    """`value` with NaN and infinities (a request's JSON may hold them, and a 422 repeats
    the input) as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def make_app(name: str, health=None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """A FastAPI app with /healthz (calling `health()` for extra detail) and /metrics,
    which refuses bad requests as the module docstring says, counting each."""
    app = FastAPI(title=f"rollfleet {name}")
    for reason in (*_REASONS.values(), "not_utf8", "refused"):
        REJECTED.labels(name, reason)  # exported as 0 from the start

    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        if 400 <= exc.status_code < 500:
            REJECTED.labels(name, _REASONS.get(exc.status_code, "refused")).inc()
        return await http_exception_handler(request, exc)

    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        REJECTED.labels(name, "invalid").inc()
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, 422)

    app.add_exception_handler(StarletteHTTPException, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_middleware(RefuseBadBodies, service=name, max_bytes=max_body_bytes)

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
