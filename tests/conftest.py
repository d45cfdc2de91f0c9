"""Shared test helpers.

`nats_server` is a real nats-server with token auth; `secure_nats` one in operator mode
(per-job users, `nats_keys`). `tiny_model_dir` is the builtin tiny model, made once per
session. `serve_app` runs a real ASGI app under a real uvicorn server on a free 127.0.0.1 port in a
background thread and hands back an httpx client pointed at it; the server stops when the
test ends. The service token variable is cleared first, so a test that wants
authentication sets it itself (the services read it at request time).
`until_ack_pending` waits for a JetStream consumer to show a count of unacked messages,
`until_tasks_acked` for a job's task work queue (`task_stream_messages`) to empty.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
import uvicorn

from rollfleet.local.nats import EmbeddedNats
from rollfleet.nats_auth import NatsKeys
from rollfleet.service import TOKEN_ENV

NATS_TOKEN = "test-token-3f9a"


async def until_ack_pending(consumer, pending: int, timeout: float = 10.0) -> None:
    """Wait for `consumer` (a pull subscription) to show `pending` unacked messages. The
    server takes acks in asynchronously (a flush does not wait for them), so reading the
    count once right after an ack can see the old one."""
    deadline = time.monotonic() + timeout
    while (now := (await consumer.consumer_info()).num_ack_pending) != pending:
        assert time.monotonic() < deadline, f"{now} messages still unacked, expected {pending}"
        await asyncio.sleep(0.02)


async def task_stream_messages(bus) -> int:
    """The messages in `bus`'s task stream (a work queue: the tasks not yet acked)."""
    return (await bus.js.stream_info(bus.subjects.task_stream)).state.messages


async def until_tasks_acked(bus, timeout: float = 10.0) -> None:
    """Wait for `bus`'s task stream, a work queue, to empty: it does once the server has
    taken the workers' acks in."""
    deadline = time.monotonic() + timeout
    while await task_stream_messages(bus):
        assert time.monotonic() < deadline, "timed out waiting for the task stream to empty"
        await asyncio.sleep(0.02)


@pytest.fixture
def nats_server(tmp_path):
    """A real nats-server with JetStream on a free port, its own store and an auth token."""
    server = EmbeddedNats(store_dir=tmp_path / "nats", auth_token=NATS_TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def nats_keys() -> NatsKeys:
    """Fresh operator, system account and rollfleet account keys (rollfleet.nats_auth)."""
    return NatsKeys.create()


@pytest.fixture
def secure_nats(tmp_path, nats_keys):
    """A real nats-server in operator mode: only users minted with `nats_keys.signer()`
    get in, each limited to its own job."""
    server = EmbeddedNats(store_dir=tmp_path / "secure-nats", keys=nats_keys).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The builtin tiny Llama (seed 0, default size) as a Hugging Face folder."""
    from rollfleet.models.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@contextmanager
def serving(app, start_timeout: float = 10.0, port: int = 0) -> Iterator[str]:
    """Serve `app` on a free local port (or `port`, to bring a service back where it was)
    in a thread; yields the base URL."""
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every request waits out delayed ACKs (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))  # bound before the server starts: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("uvicorn server thread exited before it started")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            sock.close()
            raise RuntimeError(f"uvicorn server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def serve_app(monkeypatch) -> Iterator[Callable[..., httpx.Client]]:
    """`client = serve_app(app)`: start `app` for real and get an httpx client for it."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with ExitStack() as stack:

        def serve(app) -> httpx.Client:
            base_url = stack.enter_context(serving(app))
            return stack.enter_context(httpx.Client(base_url=base_url, timeout=10.0))

        yield serve


def _metric_value(text: str, name: str, labels: str = "") -> float:
    selector = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    match = re.search(rf"^{selector} (\S+)$", text, flags=re.MULTILINE)
    if match is None:
        raise AssertionError(f"metric {name}{{{labels}}} not found in /metrics")
    return float(match.group(1))


@pytest.fixture
def metric_value() -> Callable[..., float]:
    """`metric_value(text, name, labels="")`: one sample's value in Prometheus exposition text."""
    return _metric_value
