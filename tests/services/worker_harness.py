"""A real rollout worker on a test's nats-server; the test plays the trainer on the bus.

    async with running_worker(nats_server, "job", folder, export_state(model), spec,
                              reward_url=url, env_url=url) as (trainer, worker):
        await trainer.publish(trainer.subjects.tasks, task)

The trainer's part is done first (model files, weights v0 in 1 MB buckets); the block
starts once the worker listens for tasks, and every task, engine and connection is
ended after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import torch
from nats.js.errors import NotFoundError

from rollfleet.bus import Bus, task_consumer_name
from rollfleet.methods import Stages
from rollfleet.models.files import publish_model_files
from rollfleet.plan import ServiceEnv
from rollfleet.spec import RLJobSpec
from rollfleet.weight_transport import NatsWeightStore, publish_version
from rollfleet_rollout.__main__ import engine_factory
from rollfleet_rollout.worker import RolloutWorker
from tests.conftest import NATS_TOKEN

BUCKET_BYTES = 1 << 20  # the tiny model (~4 MB) goes out in several buckets
NOWHERE = "http://127.0.0.1:9"  # for a service a test never makes the worker call


async def publish_weights(trainer: Bus, version: int, weights: dict[str, torch.Tensor]) -> None:
    """The trainer's part: store the version's buckets in the object store, then announce it."""
    await publish_version(
        trainer, NatsWeightStore(trainer), version, version, weights, BUCKET_BYTES
    )


@contextlib.asynccontextmanager
async def running_worker(
    nats_server,
    job: str,
    model_folder: Path,
    weights: dict[str, torch.Tensor],
    spec: RLJobSpec,
    *,
    reward_url: str = NOWHERE,
    env_url: str = NOWHERE,
    run_dir: str = "",
):
    trainer = await Bus.connect(nats_server.url, job, token=NATS_TOKEN)
    await trainer.ensure_streams()
    await publish_model_files(trainer, model_folder, Stages.for_spec(spec).model_files)
    await publish_weights(trainer, 0, weights)
    env = ServiceEnv("", nats_server.url, reward_url, env_url, run_dir, http_port=0)
    worker_bus = await Bus.connect(nats_server.url, job, token=NATS_TOKEN)
    pool = spec.rollout.pools[0]
    worker = RolloutWorker(spec, pool, env, worker_bus, f"{pool.name}-0")
    running = asyncio.create_task(worker.run(engine_factory(pool, spec, seed=0)))
    try:
        # The worker makes its task consumer last (after its weights and cancel
        # subscriptions): once the consumer exists, the worker hears everything.
        deadline = time.monotonic() + 30
        while True:
            assert not running.done(), running.exception()
            assert time.monotonic() < deadline, "the worker did not start"
            with contextlib.suppress(NotFoundError):
                routed = spec.rollout.routing == "affinity"
                consumer = task_consumer_name(pool.name if routed else None)
                await trainer.js.consumer_info(trainer.subjects.task_stream, consumer)
                break
            await asyncio.sleep(0.02)
        yield trainer, worker
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        leftovers = list(worker._tasks)
        for leftover in leftovers:
            leftover.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        if worker.engine:
            await worker.engine.stop()
        await worker.http.aclose()
        await worker_bus.close()
        await trainer.close()
