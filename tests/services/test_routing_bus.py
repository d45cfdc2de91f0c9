"""Affinity routing against a real nats-server.

Trainer side (a real `Trainer` issuing a mixed job's tasks): each kind lands on the
queue of the pool preferring its profile, falls back once that pool is saturated, and
the routed/fallen-back counters say so. Worker side (a real RolloutWorker with a real
TorchEngine and reward service): a pool's worker pulls only its own pool's tasks and
counts the ones it completes.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import REGISTRY

from rollfleet.bus import Bus
from rollfleet.protocol import RolloutTask
from rollfleet.spec import RLJobSpec, parse_manifest
from rollfleet_trainer.loop import Trainer
from tests.conftest import NATS_TOKEN
from tests.services.test_scheduling import (  # noqa: F401
    countdown_task,
    running_worker,
    tiny_model,
    trajectory,
)

JOB = "route-job"
MIX = [{"name": "calculator", "params": {"observation_pad": 8}}, {"name": "countdown"}]


def manifest(saturated_backlog: float, wide_replicas: int = 1) -> dict:
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": JOB},
        "spec": {
            "task": {"name": "mixed", "params": {"tasks": MIX}},
            "trainer": {"promptsPerStep": 8},
            "async": {"ratio": 1},
            "rollout": {
                "routing": "affinity",
                "saturatedBacklog": saturated_backlog,
                "sampling": {"groupSize": 4},
                "pools": [
                    {"name": "fast", "prefers": "prefill", "replicas": 1, "maxBatch": 8},
                    {"name": "wide", "prefers": "decode", "replicas": wide_replicas, "maxBatch": 8},
                ],
            },
        },
    }


def routed(pool: str, profile: str, route: str) -> float:
    labels = {"pool": pool, "profile": profile, "route": route}
    return REGISTRY.get_sample_value("rollfleet_router_tasks_total", labels) or 0.0


async def queued(bus: Bus, pool: str) -> list[RolloutTask]:
    consumer = await bus.task_consumer(pool)
    tasks = []
    while got := await bus.fetch(consumer, RolloutTask, 64, timeout=0.5):
        for task, raw in got:
            tasks.append(task)
            await raw.ack()
    return tasks


@contextlib.asynccontextmanager
async def trainer_on_bus(nats_server, tmp_path, **settings):
    bus = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    await bus.ensure_streams()
    try:
        yield Trainer(parse_manifest(manifest(**settings)), bus, tmp_path)
    finally:
        await bus.close()


async def test_each_kind_goes_to_the_pool_preferring_its_profile(nats_server, tmp_path):
    async with trainer_on_bus(nats_server, tmp_path, saturated_backlog=100) as trainer:
        await trainer.issue_tasks()  # (1 + α) · 8 = 16 groups
        fast, wide = await queued(trainer.bus, "fast"), await queued(trainer.bus, "wide")
    assert len(fast) + len(wide) == 16
    assert {t.meta["kind"] for t in fast} == {"calculator"} and all(t.multi_turn for t in fast)
    assert {t.meta["kind"] for t in wide} == {"countdown"} and not any(t.multi_turn for t in wide)


async def test_a_saturated_pool_sends_its_work_elsewhere(nats_server, tmp_path):
    before = {
        (pool, route): routed(pool, "prefill", route)
        for pool in ("fast", "wide")
        for route in ("preferred", "fallback")
    }
    # No worker runs anything yet: a pool counts one task per replica as running. wide has
    # 16 replicas, so it takes every fallen-back task without saturating.
    async with trainer_on_bus(
        nats_server, tmp_path, saturated_backlog=2, wide_replicas=16
    ) as trainer:
        await trainer.issue_tasks()
        fast, wide = await queued(trainer.bus, "fast"), await queued(trainer.bus, "wide")
    calculator = [t for t in fast + wide if t.meta["kind"] == "calculator"]
    # fast (1 replica) is saturated with more than 2 waiting: 3 queue there (0, 1 and 2
    # waiting when they were routed), the rest fall back.
    assert len(fast) == 3 and {t.meta["kind"] for t in fast} == {"calculator"}
    assert len(calculator) > 3
    fell_back = routed("wide", "prefill", "fallback") - before["wide", "fallback"]
    assert fell_back == len(calculator) - 3
    assert routed("fast", "prefill", "preferred") - before["fast", "preferred"] == 3


async def test_a_pool_worker_takes_only_its_own_queue(nats_server, tiny_model):  # noqa: F811
    job = manifest(saturated_backlog=2)["spec"]
    job["task"] = {"name": "countdown"}
    job["rollout"]["sampling"].update(maxNewTokens=4, temperature=0.0)
    job["rollout"]["pools"][0]["prefers"] = "any"
    spec = RLJobSpec.model_validate(job)

    def completed() -> float:
        labels = {"pool": "fast"}
        return REGISTRY.get_sample_value("rollfleet_rollout_tasks_completed_total", labels) or 0.0

    before = completed()
    async with running_worker(nats_server, tiny_model, spec) as (trainer, worker):
        assert worker.pool.name == "fast"
        s = trainer.subjects
        await trainer.publish(s.tasks_for("wide"), countdown_task(1, 4, group_size=4))
        await trainer.publish(s.tasks_for("fast"), countdown_task(0, 4, group_size=4))
        for _ in range(200):
            if completed() - before == 1:
                break
            await asyncio.sleep(0.05)
        assert completed() - before == 1
        await asyncio.sleep(0.3)
        assert completed() - before == 1  # wide's task waits for wide's workers
        assert await trainer.task_backlog(["fast", "wide"]) == {"fast": 0, "wide": 1}


async def test_the_trainer_counts_each_pools_tasks_until_their_trajectories_are_back(
    nats_server, tmp_path
):
    async with trainer_on_bus(nats_server, tmp_path, saturated_backlog=100) as trainer:
        await trainer.issue_tasks()
        router = trainer.router
        assert sum(router.in_flight.values()) == 16
        g0 = trainer.groups["g0"]
        pool = router.waiting["t0"][0]
        before = router.in_flight[pool]
        consumer = await trainer.bus.trajectory_consumer(0)
        for sample in range(g0.size):
            await trainer.bus.publish(
                trainer.bus.subjects.trajectories_for(0), trajectory(g0, sample)
            )
        for _ in range(50):
            await trainer.collect(consumer)
            if g0.id not in trainer.groups:
                break
        assert router.in_flight[pool] == before - 1 and "t0" not in router.waiting
        # Cancelled groups are no longer in flight, whatever the workers do with them.
        batch = [trainer.groups.pop("g15")]
        trainer.redundant = 1
        await trainer.cancel_stragglers(batch)
        assert sum(router.in_flight.values()) == 1  # g15's own task, trained
