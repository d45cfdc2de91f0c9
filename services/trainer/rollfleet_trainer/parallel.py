"""Data parallelism for the trainer: one process, or one rank of a torch.distributed group.

Ray Train (ray_train.py) starts the ranks and their process group (gloo on CPU, NCCL on
GPU); this module is what the training loop calls, the same way on every rank and in
the same order. With `world == 1` every collective is a plain local call.

- `wrap`: the module to train: DDP (the model replicated, gradients averaged), or FSDP2
  (`fully_shard`: parameters, gradients and optimizer state sharded across ranks).
- `all_reduce`: sums of a few floats (token counts, counters, metrics) across ranks.
- `full_state` / `load_full_state`: the unsharded model and optimizer state on rank 0,
  for publishing weights and checkpoints; loading broadcasts rank 0's copy to every rank,
  so a checkpoint written by any number of ranks resumes on any other number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    strategy: str = "ddp"  # or "fsdp"

    @classmethod
    def from_process_group(cls, strategy: str) -> DataParallel:
        if not dist.is_initialized():
            return cls(strategy=strategy)
        return cls(dist.get_rank(), dist.get_world_size(), strategy)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.strategy == "fsdp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward/backward on; `model` stays the plain module. DDP copies
        rank 0's parameters and buffers to every rank as it wraps."""
        if self.world == 1:
            return model
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            from rollfleet.models.architectures import architecture_of

            for block in architecture_of(model).blocks(model):
                fully_shard(block)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def _tensor(self, values, dtype) -> torch.Tensor:
        tensor = torch.as_tensor(values, dtype=dtype)
        return tensor.cuda() if dist.get_backend() == "nccl" else tensor

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sums (or maxima) across ranks, in float64 so counts stay exact."""
        if self.world == 1:
            return list(values)
        tensor = self._tensor(values, torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def broadcast_json(self, value):
        """Rank 0's JSON-able value on every rank (as bytes in a tensor: nothing pickled)."""
        if self.world == 1:
            return value
        data = json.dumps(value).encode() if self.is_leader else b""
        size = self._tensor([len(data)], torch.int64)
        dist.broadcast(size, src=0)
        buffer = (
            self._tensor(list(data), torch.uint8)
            if self.is_leader
            else self._tensor([0] * int(size.item()), torch.uint8)
        )
        dist.broadcast(buffer, src=0)
        return json.loads(buffer.cpu().numpy().tobytes())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # --- full (unsharded) state, for weights and checkpoints ------------------------------
    _FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def full_state(self, model, optimizer=None) -> tuple[dict, dict | None]:
        """(model state, optimizer state keyed by parameter name); complete on rank 0.

        Under FSDP every rank must call it (it gathers the shards)."""
        model_state = get_model_state_dict(model, options=self._FULL)
        optim_state = (
            get_optimizer_state_dict(model, optimizer, options=self._FULL)
            if optimizer is not None
            else None
        )
        return model_state, optim_state

    def _load_options(self) -> StateDictOptions:
        return StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=self.world > 1, strict=False
        )

    def load_model_state(self, model, model_state: dict) -> None:
        """Load a full model state held by rank 0 (others pass {}) into every rank."""
        set_model_state_dict(model, model_state, options=self._load_options())

    def load_full_state(self, model, optimizer, model_state: dict, optim_state: dict) -> None:
        """Load a full model and optimizer state read on rank 0 (others pass {})."""
        self.load_model_state(model, model_state)
        set_optimizer_state_dict(model, optimizer, optim_state, options=self._load_options())
