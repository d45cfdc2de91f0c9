"""What things cost on a device: pure functions of the spec-sheet figures and efficiencies.

    from rollfleet.simulate.costs import replica_costs, decode_time, decode_steps_in
    rc = replica_costs(cluster, pool)
    seconds = decode_time(rc, batch=64, context=64 * 2000, steps=100)

- Prefill is compute-bound: (2·active params·tokens + attention 4·layers·heads·headDim·
  tokens·context) / (FLOP/s · prefill MFU).
- A decode step moves every sequence one token: overhead + max(compute 2·active params·
  batch / (FLOP/s · decode MFU), memory (weights + KV cache of every sequence) / (bandwidth ·
  utilisation)). The KV read grows by `batch` tokens a step, so the time of n steps is the
  integral of a piecewise linear function: closed form here, both ways (steps -> seconds,
  seconds -> steps), which lets the simulator advance a replica between events in O(1).
- KV capacity: (memory · utilisation − weights) / KV bytes per token.
- Training: trainFlopsPerParamToken · active params · tokens / (FLOP/s · devices · train MFU).
- Weights: publish to the store, fetch per replica (its bandwidth, or the store's shared),
  swap into device memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class ReplicaCosts:
    devices: int
    step_overhead_s: float
    compute_per_seq_s: float  # a decode step's compute, per sequence in the batch
    weights_full_s: float  # reading every weight once
    weights_active_s: float  # reading one token's (MoE) active weights
    kv_per_token_s: float  # reading one token of KV cache
    prefill_per_token_s: float
    attention_per_pair_s: float  # prefill attention, per (new token, context token) pair
    kv_capacity_tokens: float
    swap_s: float
    weight_bytes: float


def kv_bytes_per_token(model) -> float:
    head_dim = model.headDim or model.hidden // model.heads
    return 2 * model.layers * model.kvHeads * head_dim * model.kvBytesPerElement


def active_params(model) -> float:
    return model.activeParams or model.params


def replica_costs(cluster, pool) -> ReplicaCosts:
    cls_name = cluster.pool_class(pool)
    cls, eff, model = cluster.file.classes[cls_name], cluster.efficiency(cls_name), cluster.model
    devices = cluster.gpus_per_replica(pool)
    bandwidth = cls.bandwidth * devices * eff.bandwidthUtil
    prefill_flops = cls.flops * devices * eff.prefillMfu
    head_dim = model.headDim or model.hidden // model.heads
    weight_bytes = model.params * model.bytesPerParam
    memory = cls.memoryGB * GB * devices * eff.memoryUtil
    network = cluster.file.network
    swap = (
        network.swapS
        if network.swapS is not None
        else weight_bytes / devices / (network.hostToDeviceGBps * GB)
    )
    return ReplicaCosts(
        devices=devices,
        step_overhead_s=eff.stepOverheadS,
        compute_per_seq_s=2 * active_params(model) / (cls.flops * devices * eff.decodeMfu),
        weights_full_s=weight_bytes / bandwidth,
        weights_active_s=active_params(model) * model.bytesPerParam / bandwidth,
        kv_per_token_s=kv_bytes_per_token(model) / bandwidth,
        prefill_per_token_s=2 * active_params(model) / prefill_flops,
        attention_per_pair_s=4 * model.layers * model.heads * head_dim / prefill_flops,
        kv_capacity_tokens=(memory - weight_bytes) / kv_bytes_per_token(model),
        swap_s=swap,
        weight_bytes=weight_bytes,
    )


def prefill_time(rc: ReplicaCosts, new_tokens: float, context: float) -> float:
    """Prefill `new_tokens` behind `context` tokens already in the cache."""
    pairs = new_tokens * context + new_tokens * new_tokens / 2
    return new_tokens * rc.prefill_per_token_s + pairs * rc.attention_per_pair_s


def step_time(rc: ReplicaCosts, batch: int, context: float) -> float:
    """One decode step of `batch` sequences holding `context` tokens of KV cache in all."""
    weights = min(rc.weights_full_s, rc.weights_active_s * batch)
    memory = weights + rc.kv_per_token_s * context
    return rc.step_overhead_s + max(rc.compute_per_seq_s * batch, memory)


# A step k after now costs o + max(c, m0 + m1·k) with c the compute, m0 + m1·k the memory
# read (weights, and the KV cache growing by `batch` tokens a step); m0 is shifted by -m1/2
# so that the integral over [0, n] equals the sum over the n whole steps. The simulator
# calls both directions at every event: conditionals rather than min/max calls.
def decode_time(rc: ReplicaCosts, batch: int, context: float, steps: float) -> float:
    """Seconds for `steps` decode steps of a constant batch (context grows by batch a step)."""
    o, c = rc.step_overhead_s, rc.compute_per_seq_s * batch
    m1 = rc.kv_per_token_s * batch
    weights = rc.weights_active_s * batch
    if weights > rc.weights_full_s:
        weights = rc.weights_full_s
    m0 = weights + rc.kv_per_token_s * context - m1 / 2
    if m0 >= c or m1 <= 0:
        if m1 <= 0 and c > m0:
            return steps * (o + c)
        return (o + m0) * steps + m1 * steps * steps / 2
    # Compute-bound up to the step where the growing KV read overtakes the compute.
    flat = (c - m0) / m1
    if steps <= flat:
        return (o + c) * steps
    rest = steps - flat
    return (o + c) * flat + (o + c) * rest + m1 * rest * rest / 2


def decode_steps_in(rc: ReplicaCosts, batch: int, context: float, seconds: float) -> float:
    """The inverse of decode_time: steps done in `seconds`."""
    o, c = rc.step_overhead_s, rc.compute_per_seq_s * batch
    m1 = rc.kv_per_token_s * batch
    weights = rc.weights_active_s * batch
    if weights > rc.weights_full_s:
        weights = rc.weights_full_s
    m0 = weights + rc.kv_per_token_s * context - m1 / 2
    if m1 <= 0:
        return seconds / (o + (c if c > m0 else m0))
    flat = (c - m0) / m1 if c > m0 else 0.0
    flat_time = flat * (o + c)
    if seconds <= flat_time:
        return seconds / (o + c)
    t = seconds - flat_time
    b = o + m0 + m1 * flat
    return flat + 2 * t / (b + math.sqrt(b * b + 2 * m1 * t))


def train_time(cluster, tokens: float) -> float:
    """One optimizer step over `tokens` on the trainer's devices."""
    cls_name = cluster.trainer_class()
    cls, eff = cluster.file.classes[cls_name], cluster.efficiency(cls_name)
    flops = eff.trainFlopsPerParamToken * active_params(cluster.model) * tokens
    return flops / (cls.flops * cluster.trainer_devices() * eff.trainMfu)


def publish_time(cluster) -> float:
    network = cluster.file.network
    if network.publishS is not None:
        return network.publishS
    return cluster.model.params * cluster.model.bytesPerParam / (network.publishGBps * GB)


def fetch_time(cluster, replicas_fetching: int) -> float:
    """Every replica fetches a whole copy; the store's bandwidth is shared by all at once."""
    network = cluster.file.network
    if network.swapS is not None:  # measured swaps include the fetch
        return 0.0
    bandwidth = network.weightSyncGBps
    if network.storeGBps is not None:
        bandwidth = min(bandwidth, network.storeGBps / max(replicas_fetching, 1))
    return cluster.model.params * cluster.model.bytesPerParam / (bandwidth * GB)
