"""A nats-server killed (SIGKILL) and started again on its port and store: JetStream
recovers the job's streams from disk, clients reconnect, and a message published during
the outage is stored exactly once.

    .venv/bin/pytest -q tests/services/test_nats_restart.py
"""

from __future__ import annotations

import asyncio
import os
import signal

from rollfleet.bus import Bus
from rollfleet.protocol import GroupsCancelled
from tests.conftest import NATS_TOKEN

JOB = "restart-job"


async def test_a_publish_during_a_nats_restart_lands_once_and_queued_work_survives(nats_server):
    bus = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    try:
        await bus.ensure_streams()
        tasks = bus.subjects.tasks
        await bus.publish(tasks, GroupsCancelled(group_ids=["before"]))
        os.kill(nats_server.process.pid, signal.SIGKILL)
        await asyncio.to_thread(nats_server.process.wait)
        during = asyncio.create_task(bus.publish(tasks, GroupsCancelled(group_ids=["during"])))
        await asyncio.sleep(1.5)
        assert not during.done()  # waiting for the server, not failed
        await asyncio.to_thread(nats_server.start)
        await asyncio.wait_for(during, 30)
        consumer = await bus.task_consumer()
        got = []
        for _ in range(20):
            got += [m.group_ids[0] for m, _ in await bus.fetch(consumer, GroupsCancelled, 10, 0.5)]
            if len(got) >= 2:
                break
        got += [m.group_ids[0] for m, _ in await bus.fetch(consumer, GroupsCancelled, 10, 0.5)]
        assert sorted(got) == ["before", "during"]
        assert (await bus.js.stream_info(bus.subjects.task_stream)).state.last_seq == 2
        await bus.put_journal(0, b"{}")  # the KV buckets came back too
        assert await bus.get_journal(0) == b"{}"
    finally:
        await bus.close()
