"""Weight transport against a real nats-server: versions stored as buckets in the NATS object
store or a shared folder, checked on the way in; a worker that keeps its weights when a
version is bad; and the swap leases that keep a pool from pausing all at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path

import pytest
import torch
import transformers
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from rollfleet.bus import Bus
from rollfleet.models.tiny import create_tiny_model
from rollfleet.models.weights import export_state
from rollfleet.protocol import WeightVersion
from rollfleet.spec import RLJobSpec, WeightsSpec
from rollfleet.weight_transport import (
    FilesystemWeightStore,
    NatsWeightStore,
    WeightsRejected,
    check_tensors,
    fetch_version,
    make_weight_store,
    pack_buckets,
    publish_version,
)
from tests.conftest import NATS_TOKEN
from tests.services import worker_harness as harness

JOB = "weights-job"
BUCKET_BYTES = 20_000  # the test tensors below (16 KB each, and two small) make 5 buckets


@pytest.fixture
async def bus(nats_server):
    bus = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    await bus.ensure_streams()
    yield bus
    await bus.close()


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 64, generator=gen),
        "b.weight": torch.randn(64, 64, generator=gen),
        "c.weight": torch.randn(64, 64, generator=gen).to(torch.bfloat16).repeat(2, 1),
        "d.weight": torch.randn(64, 64, generator=gen),
        "e.bias": torch.randn(64, generator=gen),
        "f.steps": torch.arange(seed, seed + 8, dtype=torch.int64),
        "g.weight": torch.randn(64, 64, generator=gen),
    }


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


class Stores:
    """One kind of weight store plus the means to tamper with what it holds."""

    def __init__(self, kind: str, bus: Bus, root: Path):
        self.kind, self.bus, self.root = kind, bus, root
        self.store = NatsWeightStore(bus) if kind == "nats" else FilesystemWeightStore(root)

    async def names(self) -> list[tuple[int, str]]:
        """(version, bucket) for everything stored."""
        if self.kind == "nats":
            names = await self.bus.object_names("weights/")
            return sorted((int(n.split("/")[1][1:]), n.split("/")[2]) for n in names)
        return sorted((int(p.parent.name[1:]), p.name) for p in self.root.glob("v*/*"))

    async def _where(self, version: int, bucket: str) -> str | Path:
        if self.kind == "nats":
            names = await self.bus.object_names("weights/")
            (found,) = [
                n for n in names if n.endswith(f"/{bucket}") and int(n.split("/")[1][1:]) == version
            ]
            return found
        (found,) = [p for p in self.root.glob(f"v*/{bucket}") if int(p.parent.name[1:]) == version]
        return found

    async def overwrite(self, version: int, bucket: str, data: bytes) -> None:
        where = await self._where(version, bucket)
        if self.kind == "nats":
            await self.bus.put_object(where, data)
        else:
            where.write_bytes(data)

    async def read(self, version: int, bucket: str) -> bytes:
        where = await self._where(version, bucket)
        if self.kind == "nats":
            return await self.bus.get_object(where)
        return where.read_bytes()

    async def remove(self, version: int, bucket: str) -> None:
        where = await self._where(version, bucket)
        if self.kind == "nats":
            await self.bus.delete_object(where)
        else:
            where.unlink()


@pytest.fixture(params=["nats", "filesystem"])
def stores(request, bus, tmp_path) -> Stores:
    return Stores(request.param, bus, tmp_path / "shared" / "weights")


# --- round trip ----------------------------------------------------------------------------


async def test_round_trip_in_several_buckets(bus, stores):
    tensors = make_tensors(1)
    announcement = await publish_version(bus, stores.store, 1, 10, tensors, BUCKET_BYTES)

    assert announcement.transport == stores.kind
    assert (announcement.version, announcement.step) == (1, 10)
    assert len(announcement.buckets) == 5
    assert await bus.latest_weights() == announcement  # announced after storing
    assert await stores.names() == [(1, b.name) for b in announcement.buckets]
    assert_same(await fetch_version(stores.store, announcement), tensors)
    # the announcement a worker receives (decoded from the bus) is enough to fetch it
    assert_same(await fetch_version(stores.store, await bus.latest_weights()), tensors)


async def test_a_worker_that_hears_the_announcement_can_fetch_every_bucket(bus, stores):
    fetched: list[dict] = []
    done = asyncio.Event()

    async def on_weights(announcement: WeightVersion) -> None:
        fetched.append(await fetch_version(stores.store, announcement))
        done.set()

    await bus.on_weights(on_weights)
    await bus.nc.flush()
    tensors = make_tensors(2)
    await publish_version(bus, stores.store, 2, 2, tensors, BUCKET_BYTES)
    await asyncio.wait_for(done.wait(), timeout=5)
    assert len(fetched) == 1
    assert_same(fetched[0], tensors)


async def test_storing_a_version_again_keeps_it_readable(bus, stores):
    # a resumed trainer publishes its checkpoint's version again, same bytes
    tensors = make_tensors(3)
    first = await publish_version(bus, stores.store, 3, 3, tensors, BUCKET_BYTES)
    again = await publish_version(bus, stores.store, 3, 3, tensors, BUCKET_BYTES)
    assert [b.sha256 for b in again.buckets] == [b.sha256 for b in first.buckets]
    assert await stores.names() == [(3, b.name) for b in first.buckets]
    assert_same(await fetch_version(stores.store, first), tensors)


async def test_delete_before_removes_only_older_versions(bus, stores):
    announcements = [
        await publish_version(bus, stores.store, v, v, make_tensors(v), BUCKET_BYTES)
        for v in range(1, 5)
    ]
    await stores.store.delete_before(3)

    assert {v for v, _ in await stores.names()} == {3, 4}
    for old in announcements[:2]:
        with pytest.raises(WeightsRejected, match=old.buckets[0].name):  # the first one read
            await fetch_version(stores.store, old)
    for kept in announcements[2:]:
        assert_same(await fetch_version(stores.store, kept), make_tensors(kept.version))

    await stores.store.delete_before(3)  # again, and an older bound: nothing more goes
    await stores.store.delete_before(2)
    assert len(await stores.names()) == 2 * 5
    await stores.store.delete_before(5)
    assert await stores.names() == []
    assert await bus.latest_weights() == announcements[-1]  # the announcement stays


async def test_a_new_nats_store_deletes_what_an_earlier_trainer_left(bus):
    earlier = NatsWeightStore(bus)
    for v in range(1, 4):
        await publish_version(bus, earlier, v, v, make_tensors(v), BUCKET_BYTES)
    resumed = NatsWeightStore(bus)  # a restarted trainer's store knows nothing yet
    await publish_version(bus, resumed, 4, 4, make_tensors(4), BUCKET_BYTES)
    await resumed.delete_before(3)
    assert {int(n.split("/")[1][1:]) for n in await bus.object_names("weights/v")} == {3, 4}
    await resumed.delete_before(5)
    assert await bus.object_names("weights/v") == []


# --- versions that do not match their manifest ---------------------------------------------


async def test_a_bucket_corrupted_in_the_store_rejects_the_version(bus, stores):
    announcement = await publish_version(bus, stores.store, 1, 1, make_tensors(1), BUCKET_BYTES)
    bucket = announcement.buckets[2]
    data = bytearray(await stores.read(1, bucket.name))
    data[-5] ^= 0x40  # one bit in the last tensor's data; the size is unchanged
    await stores.overwrite(1, bucket.name, bytes(data))
    with pytest.raises(WeightsRejected, match=rf"v1 {bucket.name}: checksum mismatch"):
        await fetch_version(stores.store, announcement)


async def test_a_partially_written_bucket_rejects_the_version(bus, stores):
    announcement = await publish_version(bus, stores.store, 1, 1, make_tensors(1), BUCKET_BYTES)
    bucket = announcement.buckets[1]
    data = await stores.read(1, bucket.name)
    await stores.overwrite(1, bucket.name, data[: len(data) // 2])
    with pytest.raises(WeightsRejected, match=rf"v1 {bucket.name}: {len(data) // 2} bytes"):
        await fetch_version(stores.store, announcement)


async def test_a_missing_bucket_rejects_the_version(bus, stores):
    announcement = await publish_version(bus, stores.store, 1, 1, make_tensors(1), BUCKET_BYTES)
    bucket = announcement.buckets[-1]
    await stores.remove(1, bucket.name)
    with pytest.raises(WeightsRejected, match=bucket.name):
        await fetch_version(stores.store, announcement)


async def test_a_bucket_from_another_version_is_rejected(bus, stores):
    # same bucket name, same tensor names and shapes, other values: only the checksum differs
    announcement = await publish_version(bus, stores.store, 1, 1, make_tensors(1), BUCKET_BYTES)
    other = pack_buckets(make_tensors(2), BUCKET_BYTES)
    bucket, stale = other[0]
    assert bucket.name == announcement.buckets[0].name
    assert bucket.tensors == announcement.buckets[0].tensors
    await stores.overwrite(1, bucket.name, stale)
    with pytest.raises(WeightsRejected, match="checksum mismatch"):
        await fetch_version(stores.store, announcement)


async def test_a_transport_mismatch_is_rejected_naming_the_setting(bus, tmp_path):
    nats_store, fs_store = NatsWeightStore(bus), FilesystemWeightStore(tmp_path / "weights")
    to_nats = await publish_version(bus, nats_store, 1, 1, make_tensors(1), BUCKET_BYTES)
    to_fs = await publish_version(bus, fs_store, 2, 2, make_tensors(2), BUCKET_BYTES)
    with pytest.raises(WeightsRejected, match=r"spec\.weights\.transport") as err:
        await fetch_version(fs_store, to_nats)
    assert "nats" in str(err.value) and "filesystem" in str(err.value)
    with pytest.raises(WeightsRejected, match=r"spec\.weights\.transport"):
        await fetch_version(nats_store, to_fs)


def test_make_weight_store_follows_spec_weights(tmp_path):
    bus = object()  # only the NATS store keeps it
    nats_store = make_weight_store(WeightsSpec(), bus, tmp_path)
    assert isinstance(nats_store, NatsWeightStore) and nats_store.bus is bus
    default = make_weight_store(WeightsSpec(transport="filesystem"), bus, tmp_path / "run")
    assert isinstance(default, FilesystemWeightStore)
    assert default.root == tmp_path / "run" / "weights"
    pvc = make_weight_store(
        WeightsSpec(transport="filesystem", path=str(tmp_path / "pvc")), bus, tmp_path / "run"
    )
    assert pvc.root == tmp_path / "pvc"


# --- a worker keeps its weights when a version is bad --------------------------------------

POOL = "guarded"


def rejections() -> float:
    value = REGISTRY.get_sample_value("rollfleet_rollout_weight_rejections_total", {"pool": POOL})
    return value or 0.0


async def poll(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


async def test_worker_rejects_a_corrupt_version_and_loads_the_next_good_one(nats_server, tmp_path):
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    folder = create_tiny_model(tmp_path / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    v0 = export_state(model)
    bucket_bytes = harness.BUCKET_BYTES  # the ~4 MB tiny model in several buckets
    spec = RLJobSpec.model_validate(
        {
            "task": {"name": "calculator"},
            "rollout": {"pools": [{"name": POOL, "replicas": 1, "maxBatch": 4}]},
            "model": {"maxLength": 64},
        }
    )
    run_dir = str(tmp_path / "run")
    async with harness.running_worker(nats_server, JOB, folder, v0, spec, run_dir=run_dir) as (
        trainer,
        worker,
    ):
        store = NatsWeightStore(trainer)
        assert worker.engine.policy_version == 0
        before = rejections()

        # v1: every bucket stored, but one of them is not what the manifest says
        v1 = perturbed(v0, seed=1)
        packed = pack_buckets(v1, bucket_bytes)
        assert len(packed) >= 3
        for i, (bucket, data) in enumerate(packed):
            if i == 1:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            await store.put(1, bucket.name, data)
        await trainer.announce_weights(
            WeightVersion(version=1, step=1, buckets=[b for b, _ in packed])
        )

        async def rejected() -> bool:
            return rejections() > before

        await poll(rejected, 10, "the corrupt version to be rejected")
        await asyncio.sleep(0.1)  # nothing is swapped in late either
        assert rejections() == before + 1
        assert worker.engine.policy_version == 0
        first_bucket = packed[0][0].tensors[0].name  # a good bucket of the bad version
        loaded = worker.engine.model.state_dict()
        assert torch.equal(loaded[first_bucket], v0[first_bucket])  # not partially applied

        # v2: a good version after the bad one is loaded
        v2 = perturbed(v0, seed=2)
        await publish_version(trainer, store, 2, 2, v2, bucket_bytes)

        async def swapped() -> bool:
            return worker.engine.policy_version == 2

        await poll(swapped, 10, "the engine to load v2")
        loaded = worker.engine.model.state_dict()
        for name, tensor in v2.items():
            assert torch.equal(loaded[name], tensor), name
        assert rejections() == before + 1
        # the swap lease is given back right after the swap (the version shows first)
        kv = await trainer.js.key_value(trainer.subjects.swap_bucket)

        async def released() -> bool:
            try:
                await kv.get(f"{POOL}.0")
            except KeyNotFoundError:
                return True
            return False

        await poll(released, 5, "the swap lease to be released")

        # v3: intact, but from another architecture (a tensor missing, one unknown)
        v3 = perturbed(v2, seed=3)
        dropped = next(iter(v3))
        v3.pop(dropped)
        v3["model.layers.0.self_attn.k_fuse"] = torch.ones(4)
        await publish_version(trainer, store, 3, 3, v3, bucket_bytes)
        await poll(lambda: rejected_since(before + 1), 10, "the foreign version to be rejected")
        assert worker.engine.policy_version == 2


def test_a_version_must_carry_exactly_the_models_tensors():
    expected = {"a": (2, 3), "b": (4,)}
    check_tensors(1, {"a": torch.zeros(2, 3), "b": torch.zeros(4)}, expected)
    with pytest.raises(WeightsRejected, match=r"v7 does not fit .*1 missing: b; 1 unknown: c"):
        check_tensors(7, {"a": torch.zeros(2, 3), "c": torch.zeros(1)}, expected)
    with pytest.raises(WeightsRejected, match=r"1 misshapen: b \[5\] \(model: \[4\]\)"):
        check_tensors(7, {"a": torch.zeros(2, 3), "b": torch.zeros(5)}, expected)


async def rejected_since(count: float) -> bool:
    return rejections() > count


# --- rolling updates: swap leases ----------------------------------------------------------


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end at t comes before a start at t)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    inside = most = 0
    for _, step in events:
        inside += step
        most = max(most, inside)
    return most


async def hold_repeatedly(
    nats_url: str, pool: str, slots: int, holder: str, rounds: int, seed: int
) -> list[tuple[float, float, int]]:
    """A worker on its own connection taking a lease `rounds` times: (entered, left, slot)."""
    rng = random.Random(seed)
    bus = await Bus.connect(nats_url, JOB, token=NATS_TOKEN)
    held = []
    try:
        for _ in range(rounds):
            async with bus.swap_lease(pool, slots, holder) as slot:
                entered = time.monotonic()
                await asyncio.sleep(rng.uniform(0.02, 0.05))
                held.append((entered, time.monotonic(), slot))
    finally:
        await bus.close()
    return held


@pytest.mark.parametrize("slots", [1, 2])
async def test_swap_leases_let_at_most_slots_workers_swap_at_once(nats_server, slots):
    holders = await asyncio.gather(
        *(
            hold_repeatedly(nats_server.url, "default", slots, f"default-{i}", 6, seed=i)
            for i in range(3)
        )
    )
    intervals = [(a, b) for held in holders for a, b, _ in held]
    assert len(intervals) == 18  # every holder got its turns: nobody starved
    # never all three at once; with two slots two did swap together (the slots are used)
    assert max_overlap(intervals) == slots
    assert {slot for held in holders for _, _, slot in held} == set(range(slots))
    for slot in range(slots):  # one holder per slot at any moment
        one_slot = [(a, b) for held in holders for a, b, s in held if s == slot]
        assert max_overlap(one_slot) == 1


async def test_pools_have_their_own_leases(bus):
    async with bus.swap_lease("pool-a", 1, "a-0"):
        # another pool's only slot is free while pool-a's is taken
        async with asyncio.timeout(2):
            async with bus.swap_lease("pool-b", 1, "b-0") as slot:
                assert slot == 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async with bus.swap_lease("pool-a", 1, "a-1"):
                    pytest.fail("pool-a's single lease was handed out twice")


async def test_a_lease_is_released_when_the_block_raises(nats_server, bus):
    other = await Bus.connect(nats_server.url, JOB, token=NATS_TOKEN)
    try:
        with pytest.raises(RuntimeError, match="engine failed"):
            async with bus.swap_lease("default", 1, "w-0"):
                # while held, the other worker waits for it
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        async with other.swap_lease("default", 1, "w-1"):
                            pytest.fail("the lease was handed out twice")
                raise RuntimeError("engine failed mid-swap")
        kv = await bus.js.key_value(bus.subjects.swap_bucket)
        with pytest.raises(KeyNotFoundError):
            await kv.get("default.0")
        async with asyncio.timeout(2):  # free again: the other worker gets it at once
            async with other.swap_lease("default", 1, "w-1") as slot:
                assert slot == 0
                assert (await kv.get("default.0")).value == b"w-1"
    finally:
        await other.close()


class SwallowingLeases:
    """A lease bucket whose slot is always taken and which, as nats-py's flush does, swallows
    a CancelledError that lands while it waits."""

    async def create(self, key: str, value: bytes) -> int:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.5)  # long enough that the waiter's deadline lands in here
        raise KeyWrongLastSequenceError("wrong last sequence")


async def test_a_lease_waiter_stops_at_its_deadline_even_when_nats_swallows_the_cancel(bus):
    bus._swap_kv = SwallowingLeases()

    async def wait_briefly():
        async with asyncio.timeout(0.2):
            async with bus.swap_lease("default", 1, "w-1"):
                pytest.fail("the taken lease was handed out")

    waiter = asyncio.create_task(wait_briefly())
    # not wait_for: its own cancel would be swallowed the same way
    done, _ = await asyncio.wait({waiter}, timeout=5)
    assert waiter in done, "the waiter kept polling past its deadline"
    with pytest.raises(TimeoutError):
        waiter.result()
