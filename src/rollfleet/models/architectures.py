"""Model architectures by name: what each process needs to build, shard and run one.

    arch = architecture_of(model)                     # by the HF config's model_type
    arch.blocks(model)                                # the trainer's FSDP units
    runner = load_slot_runner(arch)(model, slots=8, max_len=64)   # the torch engine's forward
    ARCHITECTURES["llama"].create(folder, seed=0, hidden=128, layers=4, heads=4, max_len=64)

The builtin tiny model is `llama` (`spec.model.architecture`). An architecture brings:
- `create`: a fresh builtin model saved as a Hugging Face folder (config, weights and the
  character tokenizer), which `model.path` and every worker load back. An architecture
  with config and model classes of its own registers them with transformers' Auto classes
  when its module is imported, so `AutoModelForCausalLM` builds it from a saved config;
- `blocks`: the repeated layers, each sharded as one FSDP unit;
- `slot_runner`: "module:Class" of the torch engine's forward over its slot KV cache (its
  own cache layout), imported only by the rollout service.

Light on purpose: the operator and the CRD generator read the names without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str  # `config.model_type` of its Hugging Face folders
    create: Callable[..., Path]  # (folder, seed, hidden, layers, heads, max_len) -> folder
    blocks: Callable  # model -> its repeated layers (FSDP units)
    slot_runner: str  # "module:Class" of the torch engine's runner
    summary: str


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


def architecture_of(model) -> Architecture:
    """The registered architecture of a model (or of its config), by `model_type`."""
    config = getattr(model, "config", model)
    for arch in ARCHITECTURES.values():
        if arch.model_type == config.model_type:
            return arch
    raise ValueError(
        f"model type {config.model_type!r} has no registered architecture; registered: "
        f"{sorted(a.model_type for a in ARCHITECTURES.values())} (rollfleet.models.architectures)"
    )


def load_slot_runner(arch: Architecture):
    module, _, cls = arch.slot_runner.partition(":")
    return getattr(importlib.import_module(module), cls)


def _create_llama(folder, seed: int = 0, **config) -> Path:
    from rollfleet.models.tiny import create_tiny_model

    return create_tiny_model(folder, seed=seed, **config)


register_architecture(
    Architecture(
        name="llama",
        model_type="llama",
        create=_create_llama,
        blocks=lambda model: list(model.model.layers),
        slot_runner="rollfleet_rollout.torch_engine:SlotLlama",
        summary="the builtin tiny Llama (Hugging Face LlamaForCausalLM)",
    )
)
