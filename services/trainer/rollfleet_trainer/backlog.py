"""What waits in the job's JetStream streams, as one gauge on the trainer's /metrics.

The trainer leader reads, every few seconds (`watch_backlog`, from `Bus.pending`):

    rollfleet_nats_pending_messages{stream="tasks"}         tasks no rollout worker has pulled yet
                                                            (all pools; each pool's own queue is
                                                            its workers' rollfleet_rollout_queue_depth)
    rollfleet_nats_pending_messages{stream="trajectories"}  trajectories no trainer rank has pulled yet
    rollfleet_nats_pending_messages{stream="deadletter"}    dead letters stored for the job

so the NATS dashboard needs no NATS exporter. A stream or consumer that does not exist yet
(before the streams are created, before the first worker subscribes) is left out.
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import Error as NatsError
from prometheus_client import Gauge

from rollfleet.bus import Bus

log = logging.getLogger("trainer")

NATS_PENDING = Gauge(
    "rollfleet_nats_pending_messages",
    "Messages waiting in the job's JetStream streams (tasks and trajectories not yet "
    "pulled, dead letters stored)",
    ["stream"],
)


async def watch_backlog(
    bus: Bus, ranks: int = 1, pools: list[str] | None = None, every_s: float = 2.0
) -> None:
    """Keep NATS_PENDING current until cancelled; a failed reading is skipped, not fatal.
    `pools`: with affinity routing, the pools whose own task queues to add up."""
    while True:
        try:
            for stream, pending in (await bus.pending(ranks, pools)).items():
                NATS_PENDING.labels(stream=stream).set(pending)
        except (NatsError, TimeoutError) as e:
            log.debug("reading the NATS backlog failed: %s", e)
        await asyncio.sleep(every_s)
