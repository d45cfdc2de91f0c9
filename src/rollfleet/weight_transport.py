"""Weight transport: a policy version as buckets of safetensors, described by a manifest.

The trainer splits the model's tensors into buckets of about `spec.weights.bucketMB`, stores
each bucket (in the NATS object store, or in a shared folder such as a PVC for models too
large for NATS), and only then announces the manifest: a `WeightVersion` listing every
bucket's tensors (name, dtype, shape) and sha256. A rollout worker fetches every bucket and
checks it against the manifest before its engine sees a tensor; a missing, partial or
corrupted bucket rejects the whole version (`WeightsRejected`) and the worker keeps the
version it has.

    store = make_weight_store(spec.weights, bus, run_dir)
    announcement = await publish_version(bus, store, version, step, tensors, bucket_bytes)
    tensors = await fetch_version(store, announcement)      # or WeightsRejected
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import torch
from nats.errors import Error as NatsError
from safetensors import SafetensorError
from safetensors.torch import load, save

from rollfleet.bus import Bus
from rollfleet.protocol import ProtocolError, TensorEntry, WeightBucket, WeightVersion
from rollfleet.spec import WeightsSpec

# safetensors' names for the dtypes a policy is trained in
_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class WeightsRejected(ProtocolError):
    """A version that does not match its manifest; the worker keeps its current weights."""


def _entry(name: str, tensor: torch.Tensor) -> TensorEntry:
    return TensorEntry(name=name, dtype=_DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape))


def check_tensors(
    version: int, tensors: dict[str, torch.Tensor], expected: dict[str, tuple]
) -> None:
    """A version must carry exactly the tensors the receiving model has, by name and shape
    (`expected`: name -> shape, from `models.weights.export_state` of that model); a
    missing, unknown or misshapen tensor rejects it, naming the first few of each."""
    missing = sorted(expected.keys() - tensors.keys())
    unknown = sorted(tensors.keys() - expected.keys())
    misshapen = sorted(
        f"{name} {list(tensors[name].shape)} (model: {list(expected[name])})"
        for name in expected.keys() & tensors.keys()
        if tuple(tensors[name].shape) != tuple(expected[name])
    )
    problems = [
        f"{len(names)} {kind}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
        for kind, names in (("missing", missing), ("unknown", unknown), ("misshapen", misshapen))
        if names
    ]
    if problems:
        raise WeightsRejected(
            f"v{version} does not fit this worker's model ({'; '.join(problems)}): the "
            "trainer and the workers must build the same architecture (spec.model)"
        )


def pack_buckets(
    tensors: dict[str, torch.Tensor], bucket_bytes: int
) -> list[tuple[WeightBucket, bytes]]:
    """Group tensors (in name order) into safetensors blobs of at most `bucket_bytes` each;
    a tensor larger than that gets a bucket of its own."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + n > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    packed = []
    for i, names in enumerate(groups):
        data = save({name: tensors[name].detach().contiguous().cpu() for name in names})
        bucket = WeightBucket(
            name=f"bucket-{i:04d}.safetensors",
            sha256=hashlib.sha256(data).hexdigest(),
            num_bytes=len(data),
            tensors=[_entry(name, tensors[name]) for name in names],
        )
        packed.append((bucket, data))
    return packed


def _described(entry: TensorEntry) -> str:
    return f"{entry.name} {entry.dtype} {entry.shape}"


def unpack_bucket(version: int, bucket: WeightBucket, data: bytes) -> dict[str, torch.Tensor]:
    """The bucket's tensors, after checking its bytes and contents against the manifest."""
    where = f"weights v{version} {bucket.name}"
    if len(data) != bucket.num_bytes:
        raise WeightsRejected(f"{where}: {len(data)} bytes, manifest says {bucket.num_bytes}")
    if hashlib.sha256(data).hexdigest() != bucket.sha256:
        raise WeightsRejected(f"{where}: checksum mismatch")
    try:
        tensors = load(data)
    except SafetensorError as e:
        raise WeightsRejected(f"{where}: not safetensors: {e}") from None
    found = {_described(_entry(name, t)) for name, t in tensors.items()}
    listed = {_described(e) for e in bucket.tensors}
    if found != listed:
        raise WeightsRejected(
            f"{where}: tensors differ from the manifest (in the bytes only: "
            f"{sorted(found - listed)[:3]}; in the manifest only: {sorted(listed - found)[:3]})"
        )
    return tensors


class NatsWeightStore:
    """Buckets as objects `weights/v<version>/<bucket>` in the job's NATS object store."""

    transport = "nats"

    def __init__(self, bus: Bus):
        self.bus = bus
        self._deleted_below = 0
        self._stored: dict[int, set[str]] = {}  # what this store put, by version
        self._listed = False

    @staticmethod
    def _name(version: int, bucket: str = "") -> str:
        return f"weights/v{version:08d}/{bucket}"

    async def put(self, version: int, bucket: str, data: bytes) -> None:
        name = self._name(version, bucket)
        await self.bus.put_object(name, data)
        self._stored.setdefault(version, set()).add(name)

    async def get(self, version: int, bucket: str) -> bytes:
        return await self.bus.get_object(self._name(version, bucket))

    async def delete_before(self, version: int) -> None:
        """Delete the buckets of older versions, each once. The store is listed only the
        first time (what an earlier life of the trainer left); after that the buckets this
        store put are known. Listing replays one entry per object ever stored, deleted
        ones included, so listing every step grew with the job's length."""
        if version <= self._deleted_below:
            return
        if not self._listed:
            for name in await self.bus.object_names("weights/v"):
                self._stored.setdefault(int(name.split("/")[1][1:]), set()).add(name)
            self._listed = True
        for old in sorted(v for v in self._stored if v < version):
            for name in sorted(self._stored.pop(old)):
                await self.bus.delete_object(name)
        self._deleted_below = version


class FilesystemWeightStore:
    """Buckets as files `<root>/v<version>/<bucket>` on a folder every pod mounts (a PVC)."""

    transport = "filesystem"

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, version: int, bucket: str = "") -> Path:
        return self.root / f"v{version:08d}" / bucket

    def _write_once(self, path: Path, data: bytes) -> None:
        if path.is_file() and path.read_bytes() == data:
            return  # immutable, as in the object store: never rewritten under a reader
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        os.replace(partial, path)  # readers see the whole file or none

    async def put(self, version: int, bucket: str, data: bytes) -> None:
        await asyncio.to_thread(self._write_once, self._path(version, bucket), data)

    async def get(self, version: int, bucket: str) -> bytes:
        path = self._path(version, bucket)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise WeightsRejected(f"weights v{version}: {path} is missing") from None

    async def delete_before(self, version: int) -> None:
        for folder in self.root.glob("v*"):
            with contextlib.suppress(ValueError):
                if int(folder.name[1:]) < version:
                    await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)


WeightStore = NatsWeightStore | FilesystemWeightStore


def make_weight_store(spec: WeightsSpec, bus: Bus, run_dir: str | Path) -> WeightStore:
    if spec.transport == "filesystem":
        return FilesystemWeightStore(Path(spec.path) if spec.path else Path(run_dir) / "weights")
    return NatsWeightStore(bus)


async def publish_version(
    bus: Bus,
    store: WeightStore,
    version: int,
    step: int,
    tensors: dict[str, torch.Tensor],
    bucket_bytes: int,
) -> WeightVersion:
    """Store every bucket, then announce the manifest: workers never see a partial version."""
    packed = await asyncio.to_thread(pack_buckets, tensors, bucket_bytes)
    for bucket, data in packed:
        await store.put(version, bucket.name, data)
    announcement = WeightVersion(
        version=version,
        step=step,
        transport=store.transport,
        buckets=[bucket for bucket, _ in packed],
    )
    await bus.announce_weights(announcement)
    return announcement


async def fetch_version(store: WeightStore, announcement: WeightVersion) -> dict[str, torch.Tensor]:
    """Every tensor of a version, each bucket checked; WeightsRejected if any is not right."""
    if announcement.transport != store.transport:
        raise WeightsRejected(
            f"weights v{announcement.version} were published to {announcement.transport}, "
            f"this worker reads {store.transport}: spec.weights.transport must match"
        )
    tensors: dict[str, torch.Tensor] = {}
    for bucket in announcement.buckets:
        try:
            data = await store.get(announcement.version, bucket.name)
        except (ProtocolError, NatsError, OSError) as e:  # gone, stalled, or unreadable
            raise WeightsRejected(f"weights v{announcement.version} {bucket.name}: {e}") from None
        tensors.update(await asyncio.to_thread(unpack_bucket, announcement.version, bucket, data))
    return tensors
