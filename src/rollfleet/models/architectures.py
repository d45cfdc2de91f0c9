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
  own cache layout), imported only by the rollout service;
- `vllm`: whether `engine: vllm` can serve it (FusedKV cannot: torch engine only).

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
    module: str | None = None  # imported to register its classes with transformers' Auto
    vllm: bool = False  # whether `engine: vllm` serves it (vLLM knows the model class)


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


def architecture_of(model) -> Architecture:
    """The registered architecture of a model (or of its config), by `model_type`: the
    first registered for it (variants of one model type share their blocks and runner)."""
    config = getattr(model, "config", model)
    for arch in ARCHITECTURES.values():
        if arch.model_type == config.model_type:
            return arch
    raise ValueError(
        f"model type {config.model_type!r} has no registered architecture; registered: "
        f"{sorted({a.model_type for a in ARCHITECTURES.values()})} "
        "(rollfleet.models.architectures)"
    )


def load_slot_runner(arch: Architecture):
    module, _, cls = arch.slot_runner.partition(":")
    return getattr(importlib.import_module(module), cls)


def import_architectures() -> None:
    """Import the modules that register architectures' own classes with transformers'
    Auto classes; call it before loading a model folder (AutoModelForCausalLM)."""
    for arch in ARCHITECTURES.values():
        if arch.module:
            importlib.import_module(arch.module)


def _create_llama(folder, seed: int = 0, **config) -> Path:
    from rollfleet.models.tiny import create_tiny_model

    return create_tiny_model(folder, seed=seed, **config)


def _llama_fields(vocab_size: int, config: dict) -> dict:
    """The tiny Llama's configuration as keyword arguments of a LlamaConfig subclass."""
    from rollfleet.models.tiny import tiny_config

    fields = tiny_config(vocab_size, **config).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    return fields


def _create_fusedkv(kv_fusion: str):
    def create(folder, seed: int = 0, **config) -> Path:
        from rollfleet.models.fusedkv import FusedKVConfig, FusedKVForCausalLM
        from rollfleet.models.tiny import create_tiny_model

        def build(vocab_size: int):
            return FusedKVForCausalLM(
                FusedKVConfig(kv_fusion=kv_fusion, **_llama_fields(vocab_size, config))
            )

        return create_tiny_model(folder, seed=seed, build=build)

    return create


register_architecture(
    Architecture(
        name="llama",
        model_type="llama",
        create=_create_llama,
        blocks=lambda model: list(model.model.layers),
        slot_runner="rollfleet_rollout.torch_engine:SlotLlama",
        summary="the builtin tiny Llama (Hugging Face LlamaForCausalLM)",
        vllm=True,
    )
)

for _name, _fusion, _what in (
    (
        "fusedkv",
        "fused",
        "keys and values a learned per-channel fusion of layer 0's and the middle layer's",
    ),
    ("fusedkv_lite", "lite", "keys from the middle layer, values from layer 0"),
    ("fusedkv_lite_rev", "lite_rev", "keys from layer 0, values from the middle layer (ablation)"),
):
    register_architecture(
        Architecture(
            name=_name,
            model_type="rollfleet_fusedkv",
            create=_create_fusedkv(_fusion),
            blocks=lambda model: list(model.model.layers),
            slot_runner="rollfleet_rollout.torch_engine:SlotFusedKV",
            summary=f"FusedKV (arXiv 2512.03870), the top half without key/value projections: {_what}",
            module="rollfleet.models.fusedkv",
        )
    )


def _create_nezha(folder, seed: int = 0, **config) -> Path:
    from rollfleet.models.nezha import NezhaConfig, NezhaForCausalLM
    from rollfleet.models.tiny import create_tiny_model
    from rollfleet.models.tokenizer import build_char_tokenizer
    from rollfleet.tasks.recommend import CODE_CHARS, LEVELS

    def build(vocab_size: int):
        llama = _llama_fields(vocab_size, config)
        codes = build_char_tokenizer().convert_tokens_to_ids(list(CODE_CHARS))
        return NezhaForCausalLM(
            NezhaConfig(draft_levels=LEVELS, draft_code_token_ids=codes, **llama)
        )

    return create_tiny_model(folder, seed=seed, build=build)


register_architecture(
    Architecture(
        name="nezha",
        model_type="rollfleet_nezha",
        create=_create_nezha,
        blocks=lambda model: list(model.model.layers),
        slot_runner="rollfleet_rollout.torch_engine:SlotLlama",
        summary="the builtin Llama with NEZHA's draft head (arXiv 2511.18793): one backbone "
        "forward and a small RNN head decode a semantic-ID item",
        module="rollfleet.models.nezha",
    )
)
