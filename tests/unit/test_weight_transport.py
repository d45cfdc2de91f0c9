"""Weight buckets without NATS: packing a policy into safetensors buckets, checking each one
against its manifest entry, and how many workers of a pool may swap weights at once."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import LlamaForCausalLM

from rollfleet.models.tiny import tiny_config
from rollfleet.models.tokenizer import build_char_tokenizer
from rollfleet.models.weights import export_state
from rollfleet.protocol import ProtocolError, TensorEntry
from rollfleet.spec import WeightsSpec
from rollfleet.weight_transport import WeightsRejected, pack_buckets, unpack_bucket

torch.set_num_threads(1)

KB = 1024


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    """The tiny policy's tensors as the trainer publishes them, plus a bf16 and an int one."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(build_char_tokenizer())))
    state = export_state(model)
    assert "lm_head.weight" not in state  # tied: published once, as the embedding
    gen = torch.Generator().manual_seed(1)
    state["extra.bf16"] = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    state["extra.steps"] = torch.arange(7, dtype=torch.int64)
    return state


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def unpack_all(version: int, packed) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for bucket, data in packed:
        got = unpack_bucket(version, bucket, data)
        assert not set(got) & set(out), "a tensor came back from two buckets"
        out.update(got)
    return out


@pytest.mark.parametrize(
    "bucket_bytes, min_buckets",
    [
        (64 * 1024 * KB, 1),  # everything fits one bucket
        (300 * KB, 12),  # many buckets, several tensors each
        (100 * KB, 16),  # the 256 KB MLP matrices are each bigger than a bucket
    ],
)
def test_pack_unpack_round_trip(tensors, bucket_bytes, min_buckets):
    packed = pack_buckets(tensors, bucket_bytes)
    if min_buckets == 1:
        assert len(packed) == 1
    else:
        assert len(packed) >= min_buckets

    # every tensor in exactly one bucket's manifest, with its dtype and shape
    listed = [entry.name for bucket, _ in packed for entry in bucket.tensors]
    assert sorted(listed) == sorted(tensors)
    assert len(listed) == len(set(listed))
    for bucket, data in packed:
        assert bucket.num_bytes == len(data)
        assert bucket.sha256 == hashlib.sha256(data).hexdigest()
        for entry in bucket.tensors:
            assert entry.shape == list(tensors[entry.name].shape)
        # the bucket size holds, except for a tensor too big for any bucket: it is alone
        contents = sum(nbytes(tensors[e.name]) for e in bucket.tensors)
        if len(bucket.tensors) > 1:
            assert contents <= bucket_bytes, (bucket.name, contents)
        else:
            assert contents <= bucket_bytes or nbytes(tensors[bucket.tensors[0].name]) > (
                bucket_bytes
            )
    dtypes = {e.name: e.dtype for bucket, _ in packed for e in bucket.tensors}
    assert dtypes["extra.bf16"] == "BF16"
    assert dtypes["extra.steps"] == "I64"
    assert dtypes["model.embed_tokens.weight"] == "F32"
    assert len({bucket.name for bucket, _ in packed}) == len(packed)  # distinct object names

    # every tensor comes back bit for bit, with its dtype
    back = unpack_all(7, packed)
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_a_tensor_bigger_than_the_bucket_gets_its_own(tensors):
    bucket_bytes = 100 * KB
    big = {name for name, t in tensors.items() if nbytes(t) > bucket_bytes}
    assert len(big) == 12  # gate, up and down of each of the 4 layers: 256 KB each
    packed = pack_buckets(tensors, bucket_bytes)
    for bucket, _ in packed:
        names = {e.name for e in bucket.tensors}
        if names & big:
            assert len(names) == 1, f"{bucket.name} shares a bucket with an oversized tensor"
    assert sum(1 for bucket, _ in packed if len(bucket.tensors) == 1) >= len(big)


def test_buckets_are_filled_in_name_order_and_packing_is_deterministic(tensors):
    first = pack_buckets(tensors, 300 * KB)
    again = pack_buckets(dict(reversed(list(tensors.items()))), 300 * KB)
    assert [b for b, _ in first] == [b for b, _ in again]  # same manifest, same checksums
    order = [entry.name for bucket, _ in first for entry in bucket.tensors]
    assert order == sorted(tensors)


def test_non_contiguous_tensors_are_packed(tensors):
    weight = tensors["model.embed_tokens.weight"]
    packed = pack_buckets({"t": weight.t()}, 1 * KB)
    (bucket, data), *_ = packed
    assert bucket.tensors == [TensorEntry(name="t", dtype="F32", shape=[128, 64])]
    assert torch.equal(unpack_bucket(1, bucket, data)["t"], weight.t())


# --- a bucket that does not match its manifest ------------------------------------------


@pytest.fixture(scope="module")
def packed(tensors):
    packed = pack_buckets(tensors, 300 * KB)
    assert len(packed) > 2
    return packed


def several(packed):
    """A bucket holding more than one tensor."""
    return next((b, d) for b, d in packed if len(b.tensors) > 1)


def test_a_corrupted_byte_is_rejected_naming_the_bucket(packed):
    bucket, data = packed[1]
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0x01  # one bit, in the tensor data
    with pytest.raises(WeightsRejected, match=rf"v5 {bucket.name}: checksum mismatch"):
        unpack_bucket(5, bucket, bytes(corrupt))
    unpack_bucket(5, bucket, data)  # the original still passes


def test_a_corrupted_header_byte_is_rejected(packed):
    bucket, data = packed[0]
    corrupt = bytearray(data)
    corrupt[10] ^= 0xFF  # inside the JSON header
    with pytest.raises(WeightsRejected, match=bucket.name):
        unpack_bucket(5, bucket, bytes(corrupt))


@pytest.mark.parametrize("keep", [0, 8, -1])
def test_a_truncated_blob_is_rejected_naming_the_bucket(packed, keep):
    bucket, data = packed[2]
    short = data[:keep]
    with pytest.raises(WeightsRejected, match=rf"v5 {bucket.name}: {len(short)} bytes") as err:
        unpack_bucket(5, bucket, short)
    assert str(bucket.num_bytes) in str(err.value)


def test_extra_bytes_are_rejected(packed):
    bucket, data = packed[0]
    with pytest.raises(WeightsRejected, match=bucket.name):
        unpack_bucket(5, bucket, data + b"\0")


def _with_entry(bucket, index: int, **changes):
    entries = list(bucket.tensors)
    entries[index] = entries[index].model_copy(update=changes)
    return bucket.model_copy(update={"tensors": entries})


@pytest.mark.parametrize(
    "changes",
    [
        {"shape": [1, 2, 3]},
        {"dtype": "F16"},
        {"name": "model.layers.0.not_this_one"},
    ],
    ids=["shape", "dtype", "name"],
)
def test_a_manifest_entry_that_does_not_match_the_bytes_is_rejected(packed, changes):
    bucket, data = several(packed)  # bytes and checksum intact: only an entry differs
    wrong = _with_entry(bucket, len(bucket.tensors) - 1, **changes)
    with pytest.raises(WeightsRejected, match=rf"v5 {bucket.name}: tensors differ"):
        unpack_bucket(5, wrong, data)


def test_a_manifest_missing_or_adding_a_tensor_is_rejected(packed):
    bucket, data = several(packed)
    fewer = bucket.model_copy(update={"tensors": bucket.tensors[1:]})
    with pytest.raises(WeightsRejected, match=bucket.name):
        unpack_bucket(5, fewer, data)
    extra = TensorEntry(name="zzz", dtype="F32", shape=[1])
    more = bucket.model_copy(update={"tensors": [*bucket.tensors, extra]})
    with pytest.raises(WeightsRejected, match=bucket.name):
        unpack_bucket(5, more, data)


def test_bytes_that_match_the_checksum_but_are_not_safetensors_are_rejected(packed):
    bucket, _ = packed[0]
    junk = b"\xff" * 64
    forged = bucket.model_copy(
        update={"num_bytes": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    )
    with pytest.raises(WeightsRejected, match=rf"{bucket.name}: not safetensors"):
        unpack_bucket(5, forged, junk)


def test_weights_rejected_is_a_protocol_error():
    # callers that handle ProtocolError (the worker's initial load) also handle rejections
    assert issubclass(WeightsRejected, ProtocolError)


# --- rolling updates: swap slots per pool -----------------------------------------------


@pytest.mark.parametrize(
    "replicas, fraction, slots",
    [
        (1, 0.5, 1),  # a lone worker must be allowed to swap
        (1, 1.0, 1),
        (2, 0.5, 1),
        (2, 1.0, 1),  # never all of several
        (3, 0.5, 1),
        (4, 0.5, 2),
        (4, 1.0, 3),
        (4, 0.1, 1),  # at least one
        (10, 0.25, 2),
    ],
)
def test_swap_slots(replicas, fraction, slots):
    assert WeightsSpec(maxPausedFraction=fraction).swap_slots(replicas) == slots


def test_swap_slots_default_fraction_is_a_half():
    assert WeightsSpec().swap_slots(4) == 2
    assert WeightsSpec().swap_slots(1) == 1


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_max_paused_fraction_out_of_range_is_refused(fraction):
    with pytest.raises(ValueError, match="maxPausedFraction"):
        WeightsSpec(maxPausedFraction=fraction)
