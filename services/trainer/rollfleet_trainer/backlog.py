"""What waits in the job's JetStream streams, as one gauge on the trainer's /metrics.

The trainer leader reads, every few seconds (`watch_backlog`):

    rollfleet_nats_pending_messages{stream="tasks"}         tasks no rollout worker has pulled yet
    rollfleet_nats_pending_messages{stream="trajectories"}  trajectories no trainer rank has pulled yet
    rollfleet_nats_pending_messages{stream="deadletter"}    dead letters stored for the job

so the NATS dashboard needs no NATS exporter. A stream or consumer that does not exist yet
(before the streams are created, before the first worker subscribes) is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from prometheus_client import Gauge

from rollfleet.bus import Bus

log = logging.getLogger("trainer")

NATS_PENDING = Gauge(
    "rollfleet_nats_pending_messages",
    "Messages waiting in the job's JetStream streams (tasks and trajectories not yet "
    "pulled, dead letters stored)",
    ["stream"],
)


async def read_backlog(bus: Bus, ranks: int = 1) -> dict[str, int]:
    """Pending messages per stream, from the consumers' and streams' info."""
    js, s = bus.js, bus.subjects
    backlog: dict[str, int] = {}
    with contextlib.suppress(NotFoundError):
        backlog["tasks"] = (await js.consumer_info(s.task_stream, "rollout")).num_pending
    for rank in range(ranks):
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(s.trajectory_stream, f"trainer-{rank}")
            backlog["trajectories"] = backlog.get("trajectories", 0) + info.num_pending
    with contextlib.suppress(NotFoundError):
        backlog["deadletter"] = (await js.stream_info(s.deadletter_stream)).state.messages
    return backlog


async def watch_backlog(bus: Bus, ranks: int = 1, every_s: float = 2.0) -> None:
    """Keep NATS_PENDING current until cancelled; a failed reading is skipped, not fatal."""
    while True:
        try:
            for stream, pending in (await read_backlog(bus, ranks)).items():
                NATS_PENDING.labels(stream=stream).set(pending)
        except (NatsError, TimeoutError) as e:
            log.debug("reading the NATS backlog failed: %s", e)
        await asyncio.sleep(every_s)
