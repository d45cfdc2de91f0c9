"""ROLL-Flash scheduling switches (`spec.async`) against a real nats-server.

Trainer side (a real `Trainer` on a real Bus, `issue_tasks` and `cancel_stragglers` called
directly): prompt replication splits a group into single-sample tasks; at most
(1+α)·promptsPerStep + redundantGroups groups are in flight; once a later group has been
trained, the groups still in flight below it are dropped and cancelled on the bus.

Worker side (a real RolloutWorker with a real TorchEngine and a real reward service; the
test plays the trainer on the bus): a cancel aborts a group mid-generation and frees its
slots; a queued task of a cancelled group is acked without sampling; rewardPerSample
scores each sample on its own; replicated single-sample tasks are taken one slot each.

`TurnGate` (env lockstep, `envAsync: false`) is checked in plain asyncio.

The worker tests use the builtin tiny model untrained: greedy decoding never emits
end-of-sequence, so every sample runs for exactly maxNewTokens tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch
import transformers
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from rollfleet.bus import Bus
from rollfleet.models.tiny import create_tiny_model
from rollfleet.models.weights import export_state
from rollfleet.protocol import GroupsCancelled, RolloutTask, Trajectory, TrajectoryStatus
from rollfleet.spec import RLJobSpec, parse_manifest
from rollfleet.tasks import make_task
from rollfleet_reward.app import create_app as create_reward_app
from rollfleet_rollout.worker import TurnGate
from rollfleet_trainer.loop import Group, Trainer
from rollfleet_trainer.parallel import DataParallel
from tests.conftest import (
    NATS_TOKEN,
    serving,
    task_stream_messages,
    until_ack_pending,
    until_tasks_acked,
)
from tests.services import worker_harness as harness
from tests.services.test_rollout_worker import collect, collect_nowait

JOB = "sched-job"
POOL = "p"
NOTHING_DROPPED = dict.fromkeys(
    ("stale", "cancelled", "failed", "duplicate", "unknown_group", "regenerated"), 0
)


# --- helpers -------------------------------------------------------------------------------
def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def cancelled_samples() -> float:
    return metric("rollfleet_rollout_samples_cancelled_total", {"pool": POOL})


def reward_requests() -> float:
    """/score requests the (in-process) reward service answered."""
    return metric("rollfleet_reward_request_seconds_count")


def dropped(reason: str) -> float:
    return metric("rollfleet_trainer_samples_dropped_total", {"reason": reason})


async def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def read_tasks(bus: Bus, count: int, timeout: float = 10.0) -> list[RolloutTask]:
    """Pull `count` tasks off the task stream (as a worker would) and ack them."""
    consumer = await bus.task_consumer()
    got: list[RolloutTask] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} tasks arrived"
        for task, raw in await bus.fetch(consumer, RolloutTask, count - len(got), timeout=0.5):
            got.append(task)
            await raw.ack()
    return got


def countdown_task(index: int, group: int, **update) -> RolloutTask:
    example = make_task("countdown").example("train", index)
    task = RolloutTask.for_example(example, index=index, group_id=f"g{index}", samples=group)
    return task.model_copy(update=update)


# --- trainer side -------------------------------------------------------------------------
def trainer_manifest(
    *,
    group: int = 3,
    prompts: int = 2,
    alpha: int = 1,
    redundant: int = 0,
    replicate: bool = False,
) -> dict:
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": JOB},
        "spec": {
            "task": {"name": "countdown"},
            "trainer": {"promptsPerStep": prompts},
            "rollout": {"sampling": {"groupSize": group}},
            "async": {
                "ratio": alpha,
                "redundantGroups": redundant,
                "replicatePrompts": replicate,
            },
        },
    }


@contextlib.asynccontextmanager
async def trainer_on_bus(nats_server, tmp_path, **manifest):
    bus = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    await bus.ensure_streams()
    try:
        yield Trainer(parse_manifest(trainer_manifest(**manifest)), bus, tmp_path)
    finally:
        await bus.close()


def trajectory(group: Group, sample: int, status=TrajectoryStatus.COMPLETED) -> Trajectory:
    return Trajectory(
        task_id=f"t{group.index}",
        group_id=group.id,
        sample_index=sample,
        group_size=group.size,
        worker="w",
        status=status,
        prompt_ids=[1, 5],
        response_ids=[6, 2],
        behaviour_logprobs=[-1.0, -1.0],
        token_versions=[0, 0],
        loss_mask=[1.0, 1.0],
    )


async def test_replicated_prompts_become_single_sample_tasks(nats_server, tmp_path):
    async with trainer_on_bus(
        nats_server, tmp_path, group=3, prompts=2, alpha=0, replicate=True
    ) as trainer:
        await trainer.issue_tasks()
        tasks = await read_tasks(trainer.bus, 6)
        extra = await trainer.bus.fetch(
            await trainer.bus.task_consumer(), RolloutTask, 10, timeout=0.3
        )
    assert extra == []  # exactly groupSize tasks per group, no whole-group task besides
    assert sorted(trainer.groups) == ["g0", "g1"]
    by_group: dict[str, list[RolloutTask]] = {}
    for t in tasks:
        by_group.setdefault(t.group_id, []).append(t)
    assert sorted(by_group) == ["g0", "g1"]
    for group_id, parts in by_group.items():
        index = int(group_id[1:])
        parts.sort(key=lambda t: t.sample_offset)
        assert [t.sample_offset for t in parts] == [0, 1, 2]
        assert [t.task_id for t in parts] == [f"t{index}.{i}" for i in range(3)]
        assert all(t.samples == 1 and t.group_size == 3 and t.index == index for t in parts)
        assert len({t.prompt for t in parts}) == 1  # the same prompt, replicated
    assert len({t.task_id for t in tasks}) == 6


async def test_without_replication_a_group_is_one_task(nats_server, tmp_path):
    async with trainer_on_bus(
        nats_server, tmp_path, group=3, prompts=2, alpha=0, replicate=False
    ) as trainer:
        await trainer.issue_tasks()
        tasks = await read_tasks(trainer.bus, 2)
        extra = await trainer.bus.fetch(
            await trainer.bus.task_consumer(), RolloutTask, 10, timeout=0.3
        )
    assert extra == []
    assert sorted((t.task_id, t.group_id, t.samples, t.sample_offset) for t in tasks) == [
        ("t0", "g0", 3, 0),
        ("t1", "g1", 3, 0),
    ]


@pytest.mark.parametrize(
    ("alpha", "prompts", "redundant"), [(0, 2, 0), (1, 2, 0), (1, 2, 3), (0, 3, 2)]
)
async def test_in_flight_bound_counts_redundant_groups(
    nats_server, tmp_path, alpha, prompts, redundant
):
    limit = (1 + alpha) * prompts + redundant
    async with trainer_on_bus(
        nats_server, tmp_path, group=2, prompts=prompts, alpha=alpha, redundant=redundant
    ) as trainer:
        await trainer.issue_tasks()
        await trainer.issue_tasks()  # already full: issues nothing
        assert len(trainer.groups) == limit
        assert await task_stream_messages(trainer.bus) == limit
        # A group that completed and waits in `ready` still counts as in flight ...
        trainer.ready.append(trainer.groups.pop("g0"))
        await trainer.issue_tasks()
        assert await task_stream_messages(trainer.bus) == limit
        # ... one consumed by a step makes room for exactly one more.
        trainer.ready.popleft()
        await trainer.issue_tasks()
        assert await task_stream_messages(trainer.bus) == limit + 1
        assert sorted(g.index for g in trainer.groups.values()) == list(range(1, limit + 1))


async def test_a_sample_aborted_as_stale_drops_its_group_as_stale(nats_server, tmp_path):
    """Workers abort a sample whose oldest token fell more than α behind (status `stale`):
    its group is dropped and counted as stale, not as failed."""
    group = 3
    async with trainer_on_bus(nats_server, tmp_path, group=group, prompts=2) as trainer:
        bus = trainer.bus
        await trainer.issue_tasks()
        consumer = await bus.trajectory_consumer(0)
        before = {reason: dropped(reason) for reason in ("stale", "failed")}
        g0 = trainer.groups["g0"]
        await bus.publish(bus.subjects.trajectories_for(0), trajectory(g0, 0))
        await bus.publish(
            bus.subjects.trajectories_for(0), trajectory(g0, 1, TrajectoryStatus.STALE)
        )
        deadline = time.monotonic() + 15
        while "g0" not in trainer.discarded and time.monotonic() < deadline:
            await trainer.collect(consumer)
        assert trainer.dropped_here == {**NOTHING_DROPPED, "stale": group}
        assert dropped("stale") - before["stale"] == group
        assert dropped("failed") == before["failed"]
        await until_ack_pending(consumer, 0)  # both samples acked


async def test_a_sample_that_arrives_twice_is_kept_once(nats_server, tmp_path):
    """A redelivered task (its worker died after publishing) brings its samples again: the
    trainer keeps the first copy, acks and counts the second, and the group completes."""
    group = 3
    async with trainer_on_bus(nats_server, tmp_path, group=group, prompts=2) as trainer:
        bus = trainer.bus
        await trainer.issue_tasks()
        consumer = await bus.trajectory_consumer(0)
        before = metric("rollfleet_trainer_duplicate_samples_total")
        g0 = trainer.groups["g0"]
        first = trajectory(g0, 0)
        again = first.model_copy(update={"worker": "w-after-restart", "reward": 0.5})
        for t in (first, again, trajectory(g0, 1), trajectory(g0, 2)):
            await bus.publish(bus.subjects.trajectories_for(0), t)
        deadline = time.monotonic() + 15
        while not trainer.ready and time.monotonic() < deadline:
            await trainer.collect(consumer)
        (ready,) = trainer.ready
        assert ready.id == "g0" and len(ready.samples) == group
        assert ready.samples[0][0].worker == "w"  # the first copy
        assert metric("rollfleet_trainer_duplicate_samples_total") - before == 1
        await until_ack_pending(consumer, group)  # the kept ones wait; the copy is acked


async def test_cancel_stragglers_drops_lower_groups_and_tells_the_workers(nats_server, tmp_path):
    group = 3
    async with trainer_on_bus(
        nats_server, tmp_path, group=group, prompts=2, alpha=1, redundant=2
    ) as trainer:
        bus = trainer.bus
        listener = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
        received: asyncio.Queue[GroupsCancelled] = asyncio.Queue()
        await listener.on_cancel(received.put)
        await listener.nc.flush()  # the subscription is registered before anything is sent
        try:
            await trainer.issue_tasks()  # g0 .. g5: (1+1)·2 + 2
            assert sorted(trainer.groups) == [f"g{i}" for i in range(6)]
            # g0 has one sample in already: dropping it must ack that message.
            consumer = await bus.trajectory_consumer(0)
            await bus.publish(bus.subjects.trajectories_for(0), trajectory(trainer.groups["g0"], 1))
            for _ in range(20):
                await trainer.collect(consumer)
                if trainer.groups["g0"].samples:
                    break
            assert list(trainer.groups["g0"].samples) == [1]
            # g2 and g4 completed and were trained; g0, g1 and g3 are still running.
            batch = [trainer.groups.pop("g2"), trainer.groups.pop("g4")]
            before = dropped("cancelled")
            await trainer.cancel_stragglers(batch)
            message = await asyncio.wait_for(received.get(), timeout=5)
            assert sorted(message.group_ids) == ["g0", "g1", "g3"]
            assert sorted(trainer.groups) == ["g5"]  # above the newest trained group: kept
            assert set(trainer.discarded) == {"g0", "g1", "g3"}
            assert trainer.dropped_here == {**NOTHING_DROPPED, "cancelled": 3 * group}
            assert dropped("cancelled") - before == 3 * group
            await until_ack_pending(consumer, 0)  # g0's sample was acked when g0 was dropped
            # A late (aborted) sample of a cancelled group is acked and not counted again.
            unknown = dropped("unknown_group")
            await bus.publish(
                bus.subjects.trajectories_for(0),
                trajectory(Group(3, group), 0, TrajectoryStatus.ABORTED),
            )
            for _ in range(20):
                await trainer.collect(consumer)
                info = await consumer.consumer_info()
                if info.delivered.stream_seq >= 2 and info.num_ack_pending == 0:
                    break
            assert info.delivered.stream_seq >= 2 and info.num_ack_pending == 0
            assert trainer.dropped_here["cancelled"] == 3 * group
            assert dropped("cancelled") - before == 3 * group
            assert dropped("unknown_group") == unknown
            assert sorted(trainer.groups) == ["g5"]
            assert received.empty()
        finally:
            await listener.close()


def test_redundant_groups_are_shared_out_over_trainer_ranks(tmp_path):
    manifest = trainer_manifest(prompts=4, redundant=3)
    manifest["spec"]["trainer"]["workers"] = 2
    job = parse_manifest(manifest)
    shares = [Trainer(job, None, tmp_path, DataParallel(rank, 2)).redundant for rank in (0, 1)]
    assert shares == [2, 1]  # the job's 3 extra groups, not 3 per rank


async def test_no_redundant_groups_cancels_nothing(nats_server, tmp_path):
    async with trainer_on_bus(nats_server, tmp_path, group=2, prompts=2, alpha=1) as trainer:
        listener = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
        received: asyncio.Queue[GroupsCancelled] = asyncio.Queue()
        await listener.on_cancel(received.put)
        await listener.nc.flush()
        try:
            await trainer.issue_tasks()  # g0 .. g3
            batch = [trainer.groups.pop("g2"), trainer.groups.pop("g3")]
            await trainer.cancel_stragglers(batch)
            await trainer.bus.nc.flush()
            await asyncio.sleep(0.3)
            assert received.empty()
            assert sorted(trainer.groups) == ["g0", "g1"]
            assert not trainer.discarded
            assert trainer.dropped_here["cancelled"] == 0
        finally:
            await listener.close()


# --- worker side --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The builtin tiny model, untrained: greedy decoding never reaches end-of-sequence."""
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    folder = create_tiny_model(tmp_path_factory.mktemp("model"), seed=0)
    return folder, AutoModelForCausalLM.from_pretrained(folder)


def worker_spec(
    *,
    group: int = 4,
    max_batch: int = 8,
    max_new_tokens: int = 8,
    max_length: int = 64,
    **async_,
) -> RLJobSpec:
    return RLJobSpec.model_validate(
        {
            "task": {"name": "countdown"},
            "async": {"ratio": 1, **async_},
            "rollout": {
                "pools": [{"name": POOL, "replicas": 1, "maxBatch": max_batch}],
                "sampling": {
                    "groupSize": group,
                    "maxNewTokens": max_new_tokens,
                    "temperature": 0.0,
                },
            },
            "model": {"maxLength": max_length},
        }
    )


@contextlib.asynccontextmanager
async def running_worker(nats_server, tiny_model, spec: RLJobSpec):
    """A real worker (TorchEngine) and a real reward service; yields (trainer bus, worker)
    once the worker is listening for tasks and cancels."""
    folder, model = tiny_model
    with serving(create_reward_app(spec.reward_functions())) as reward_url:
        async with harness.running_worker(
            nats_server, JOB, folder, export_state(model), spec, reward_url=reward_url
        ) as (trainer, worker):
            yield trainer, worker


async def test_cancel_aborts_a_generating_group_and_frees_its_slots(nats_server, tiny_model):
    max_new = 3000  # several seconds of decoding on a CPU: the cancel lands mid-generation
    spec = worker_spec(group=2, max_batch=4, max_new_tokens=max_new, max_length=max_new + 64)
    async with running_worker(nats_server, tiny_model, spec) as (trainer, worker):
        await trainer.publish(trainer.subjects.tasks, countdown_task(0, 2))
        await wait_until(
            lambda: (
                len(worker._requests.get("g0", ())) == 2 and worker.engine.tokens_generated >= 20
            ),
            what="both samples generating",
        )
        assert worker.reserved == 2 and worker.engine.free_capacity() == 2
        before = cancelled_samples()
        started = time.monotonic()
        await trainer.cancel_groups(["g0"])
        trajectories = await collect(trainer, 2, timeout=10)
        elapsed = time.monotonic() - started
        await wait_until(lambda: worker.reserved == 0, timeout=5, what="reserved slots freed")
        tokens = worker.engine.tokens_generated
        await asyncio.sleep(0.3)
        assert worker.engine.tokens_generated == tokens  # the engine stopped decoding them
        assert worker.engine.free_capacity() == 4
        assert worker._requests == {}
        assert "g0" in worker.cancelled
        await until_tasks_acked(trainer)  # the task was acked
        assert await collect_nowait(trainer) == []
    assert sorted((t.group_id, t.sample_index) for t in trajectories) == [("g0", 0), ("g0", 1)]
    assert [t.status for t in trajectories] == [TrajectoryStatus.ABORTED] * 2
    assert tokens < 2 * max_new  # neither sample ran to its token limit
    assert elapsed < 5.0, f"aborted samples took {elapsed:.1f}s to come out"
    assert cancelled_samples() - before == 2
    assert all(t.reward == 0.0 and t.reward_parts == {} for t in trajectories)  # not scored


async def test_a_task_longer_than_its_ack_wait_is_not_redelivered(nats_server, tiny_model):
    """The worker reports progress on a running task (`in_progress`), so a short ack wait
    (fast recovery from a dead worker) does not hand a long task out a second time."""
    # several seconds of decoding, several times the 1 s ack wait (1,500 tokens took 1.9 s
    # once decoding read the slot cache in place)
    max_new = 3000
    spec = worker_spec(group=2, max_batch=4, max_new_tokens=max_new, max_length=max_new + 64)
    spec.rollout = spec.rollout.model_copy(update={"taskAckWaitSeconds": 1})
    async with running_worker(nats_server, tiny_model, spec) as (trainer, _):
        started = time.monotonic()
        await trainer.publish(trainer.subjects.tasks, countdown_task(0, 2))
        trajectories = await collect(trainer, 2, timeout=60)
        took = time.monotonic() - started
        await asyncio.sleep(1.5)
        info = await trainer.js.consumer_info(trainer.subjects.task_stream, "rollout")
    assert took > 2  # the task outlived its ack wait...
    assert [len(t.response_ids) for t in trajectories] == [max_new, max_new]
    assert info.delivered.consumer_seq == 1  # ...and was delivered once (each redelivery counts)


async def test_a_sample_older_than_alpha_is_published_as_stale(nats_server, tiny_model):
    """The worker re-checks staleness when a sample ends: its tokens come from version 0
    while version 2 has been announced, more than α = 1 behind, so it comes out `stale`."""
    spec = worker_spec(group=2, max_batch=4)
    async with running_worker(nats_server, tiny_model, spec) as (trainer, worker):
        worker.latest_announced = 2  # as if versions 1 and 2 were announced, not yet loaded
        await trainer.publish(trainer.subjects.tasks, countdown_task(0, 2))
        trajectories = await collect(trainer, 2, timeout=30)
    assert [t.status for t in trajectories] == [TrajectoryStatus.STALE] * 2
    assert all(t.reward_parts == {} for t in trajectories)  # not scored


async def test_queued_task_of_a_cancelled_group_is_acked_without_sampling(nats_server, tiny_model):
    spec = worker_spec(group=4, max_batch=8)
    async with running_worker(nats_server, tiny_model, spec) as (trainer, worker):
        await trainer.cancel_groups(["g7"])
        await wait_until(lambda: "g7" in worker.cancelled, timeout=5, what="the cancel")
        before, scored_before = cancelled_samples(), reward_requests()
        tokens = worker.engine.tokens_generated
        await trainer.publish(trainer.subjects.tasks, countdown_task(7, 4))
        await trainer.publish(trainer.subjects.tasks, countdown_task(8, 4))
        trajectories = await collect(trainer, 4, timeout=20)
        await wait_until(lambda: worker.reserved == 0, timeout=5, what="reserved slots freed")
        await until_tasks_acked(trainer)  # both tasks acked
        assert await collect_nowait(trainer) == []
        generated = worker.engine.tokens_generated - tokens
    assert sorted((t.group_id, t.sample_index) for t in trajectories) == [
        ("g8", i) for i in range(4)
    ]
    assert cancelled_samples() - before == 4
    assert generated == 4 * spec.rollout.sampling.maxNewTokens  # g8's samples only
    assert reward_requests() - scored_before == 1  # g8 scored as one batch


@pytest.mark.parametrize(("per_sample", "requests"), [(False, 1), (True, 4)])
async def test_reward_per_sample_scores_each_sample_on_its_own(
    nats_server, tiny_model, per_sample, requests
):
    spec = worker_spec(group=4, max_batch=8, rewardPerSample=per_sample)
    task = countdown_task(3, 4)
    async with running_worker(nats_server, tiny_model, spec) as (trainer, worker):
        before = reward_requests()
        await trainer.publish(trainer.subjects.tasks, task)
        trajectories = await collect(trainer, 4, timeout=20)
        await wait_until(lambda: worker.reserved == 0, timeout=5, what="task done")
        await until_tasks_acked(trainer)
    assert reward_requests() - before == requests
    assert sorted(t.sample_index for t in trajectories) == [0, 1, 2, 3]
    for t in trajectories:
        assert t.group_id == "g3" and t.status == TrajectoryStatus.TRUNCATED
        assert list(t.reward_parts) == ["countdown"]  # scored by the reward service
        assert t.reward == t.reward_parts["countdown"]
        assert len(t.response_ids) == spec.rollout.sampling.maxNewTokens


async def test_replicated_single_sample_tasks_fill_slots_one_by_one(
    nats_server, tiny_model, tmp_path
):
    # maxBatch 2 < groupSize 4: counted in whole groups the worker would never take a task.
    spec = worker_spec(group=4, max_batch=2, replicatePrompts=True)
    async with running_worker(nats_server, tiny_model, spec) as (trainer_bus, worker):
        # The trainer issues the tasks, and collects the samples back into their group.
        trainer = Trainer(
            parse_manifest(
                trainer_manifest(group=4, prompts=1, alpha=0, redundant=0, replicate=True)
            ),
            trainer_bus,
            tmp_path,
        )
        await trainer.issue_tasks()  # g0 as t0.0 .. t0.3
        consumer = await trainer_bus.trajectory_consumer(0)
        peak = 0
        deadline = time.monotonic() + 30
        while not trainer.ready:
            assert time.monotonic() < deadline, "the group never completed"
            peak = max(peak, worker.reserved)
            await trainer.collect(consumer)
        assert peak <= 2
        await wait_until(lambda: worker.reserved == 0, timeout=5, what="tasks done")
        await until_tasks_acked(trainer_bus)
    (group,) = trainer.ready
    assert group.id == "g0" and sorted(group.samples) == [0, 1, 2, 3]
    for offset, (t, _raw) in group.samples.items():
        assert t.sample_index == offset and t.task_id == f"t0.{offset}"
        assert t.group_size == 4 and t.status == TrajectoryStatus.TRUNCATED
        assert list(t.reward_parts) == ["countdown"]


# --- TurnGate (env lockstep) --------------------------------------------------------------
async def run_sessions(gate: TurnGate, durations: dict[str, list[float]], log: list) -> None:
    """Each session runs its turns like RolloutWorker._sample: from turn 1 on, it waits at
    the gate first; it leaves the gate when it ends."""

    async def session(name: str, turns: list[float]) -> None:
        try:
            for turn, seconds in enumerate(turns):
                if turn:
                    await gate.arrive(turn)
                log.append(("start", name, turn, time.monotonic()))
                await asyncio.sleep(seconds)
                log.append(("end", name, turn, time.monotonic()))
        finally:
            await gate.leave()
            log.append(("leave", name, len(turns), time.monotonic()))

    await asyncio.wait_for(
        asyncio.gather(*(session(n, d) for n, d in durations.items())), timeout=5
    )


def positions(log: list) -> dict[tuple[str, str, int], int]:
    return {(kind, name, turn): i for i, (kind, name, turn, _) in enumerate(log)}


async def test_turn_gate_keeps_sessions_in_lockstep():
    durations = {  # who is slowest changes from turn to turn
        "a": [0.05, 0.00, 0.02],
        "b": [0.00, 0.06, 0.00],
        "c": [0.02, 0.03, 0.07],
    }
    log: list = []
    await run_sessions(TurnGate(3), durations, log)
    at = positions(log)
    for turn in (1, 2):
        last_end = max(at[("end", n, turn - 1)] for n in durations)
        first_start = min(at[("start", n, turn)] for n in durations)
        assert first_start > last_end, f"a session started turn {turn} before all ended {turn - 1}"
    # Nobody started turn 1 before a's 0.05 s turn 0 was over, though b's took no time.
    first_turn_1 = min(t for kind, _, turn, t in log if kind == "start" and turn == 1)
    assert first_turn_1 - log[0][3] >= 0.045


async def test_turn_gate_a_session_that_ends_releases_the_others():
    durations = {
        "a": [0.00, 0.00, 0.00],
        "b": [0.00, 0.00, 0.00],
        "c": [0.10],  # one slow turn, then its episode is over: it never arrives at turn 1
    }
    log: list = []
    await run_sessions(TurnGate(3), durations, log)
    at = positions(log)
    c_left = at[("leave", "c", 1)]
    assert at[("start", "a", 1)] > c_left and at[("start", "b", 1)] > c_left
    assert ("end", "a", 2) in at and ("end", "b", 2) in at  # the rest finished without c
    assert (
        at[("start", "a", 2)] > at[("end", "b", 1)] and at[("start", "b", 2)] > at[("end", "a", 1)]
    )


async def test_turn_gate_leaving_mid_episode_while_others_wait():
    durations = {
        "a": [0.00, 0.00, 0.00, 0.00],
        "b": [0.00, 0.00, 0.00, 0.00],
        "c": [0.00, 0.08],  # ends after turn 1 while a and b already wait at turn 2
    }
    log: list = []
    await run_sessions(TurnGate(3), durations, log)
    at = positions(log)
    assert at[("start", "a", 2)] > at[("leave", "c", 2)]
    assert at[("start", "b", 2)] > at[("leave", "c", 2)]
    for turn in (1, 2, 3):
        assert ("start", "a", turn) in at and ("start", "b", turn) in at
