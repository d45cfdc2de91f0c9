"""The trainer's NATS backlog gauge against a real nats-server: pending tasks, pending
trajectories of every trainer rank, stored dead letters (the NATS dashboard's numbers)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from rollfleet.bus import Bus
from rollfleet_trainer.backlog import watch_backlog

TOKEN = "test-token-3f9a"  # the nats_server fixture's token (tests/conftest.py)


@pytest.fixture
async def bus(nats_server):
    bus = await Bus.connect(nats_server.url, "job-backlog", token=TOKEN)
    yield bus
    await bus.close()


def gauge(stream: str) -> float | None:
    return REGISTRY.get_sample_value("rollfleet_nats_pending_messages", {"stream": stream})


async def test_backlog_counts_what_waits_in_each_stream(bus):
    assert await bus.pending() == {}  # no streams yet: nothing to read, no error
    await bus.ensure_streams()
    assert await bus.pending() == {"tasks": 0, "deadletter": 0}  # no consumers yet
    s = bus.subjects
    tasks = await bus.task_consumer()
    await bus.trajectory_consumer(0)
    await bus.trajectory_consumer(1)
    for _ in range(3):
        await bus.js.publish(s.tasks, b"task")
    for rank in (0, 0, 1):
        await bus.js.publish(s.trajectories_for(rank), b"trajectory")
    await bus.dead_letter(s.tasks, b"not msgpack", "test")
    assert await bus.pending(ranks=2) == {"tasks": 3, "trajectories": 3, "deadletter": 1}
    assert (await bus.pending(ranks=1))["trajectories"] == 2  # rank 0's consumer only

    (pulled,) = await tasks.fetch(1, timeout=5)
    await pulled.ack()
    watcher = asyncio.create_task(watch_backlog(bus, ranks=2, every_s=0.05))
    try:
        for _ in range(100):
            if gauge("tasks") == 2:
                break
            await asyncio.sleep(0.05)
        assert (gauge("tasks"), gauge("trajectories"), gauge("deadletter")) == (2, 3, 1)
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


async def test_each_pool_has_its_own_task_queue(bus):
    """Affinity routing: a pool's tasks wait on its own subject, counted before its
    workers subscribe and after, and only its consumer receives them."""
    await bus.ensure_streams()
    s = bus.subjects
    for pool, count in (("fast", 2), ("wide", 3)):
        for _ in range(count):
            await bus.js.publish(s.tasks_for(pool), pool.encode())
    assert await bus.task_backlog(["fast", "wide"]) == {"fast": 2, "wide": 3}
    fast = await bus.task_consumer("fast")
    wide = await bus.task_consumer("wide")
    (pulled,) = await fast.fetch(1, timeout=5)
    assert pulled.data == b"fast"
    await pulled.ack()
    assert await bus.task_backlog(["fast", "wide"]) == {"fast": 1, "wide": 3}
    assert (await bus.pending(pools=["fast", "wide"]))["tasks"] == 4
    pulled = await wide.fetch(3, timeout=5)
    assert [m.data for m in pulled] == [b"wide"] * 3
