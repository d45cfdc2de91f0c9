"""FusedKV (rollfleet.models.fusedkv and the torch engine's SlotFusedKV): half the cache
bytes, no key/value projections on top, cached decoding equal to the full forward, relative
positions kept by tied key weights only, and the folder and weight round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollfleet.models.architectures import ARCHITECTURES, architecture_of, load_slot_runner
from rollfleet.models.fusedkv import FusedKVConfig, FusedKVForCausalLM, KVFusion, rope
from rollfleet.models.tiny import tiny_config
from rollfleet.models.weights import export_state
from rollfleet.weight_transport import check_tensors
from rollfleet_rollout.torch_engine import SlotFusedKV, SlotLlama

SIZE = {"hidden": 32, "layers": 4, "heads": 4, "max_len": 64}


def fusedkv(kind: str = "fused", tied: bool = True, seed: int = 0) -> FusedKVForCausalLM:
    """A small FusedKV model; the fusion weights moved off their Lite start."""
    llama = tiny_config(64, **SIZE).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        llama.pop(key, None)
    torch.manual_seed(seed)
    model = FusedKVForCausalLM(FusedKVConfig(kv_fusion=kind, fusion_tied=tied, **llama)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "fusion" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def test_the_cache_holds_half_the_bytes_of_vanilla():
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    vanilla = SlotLlama(LlamaForCausalLM(tiny_config(64, **SIZE)), slots=3, max_len=48)
    fused = SlotFusedKV(fusedkv(), slots=3, max_len=48)
    assert fused.cache_bytes * 2 == vanilla.cache_bytes


@pytest.mark.parametrize("kind", ["fused", "lite", "lite_rev"])
def test_top_layers_have_no_key_or_value_projections(kind):
    model = fusedkv(kind)
    names = list(model.state_dict())
    top = [n for n in names if any(f"layers.{i}." in n for i in (2, 3))]
    bottom = [n for n in names if any(f"layers.{i}." in n for i in (0, 1))]
    assert not [n for n in top if "k_proj" in n or "v_proj" in n]
    assert sum("k_proj" in n or "v_proj" in n for n in bottom) == 4
    assert any("fusion" in n for n in top) == (kind == "fused")


@pytest.mark.parametrize("kind", ["fused", "lite", "lite_rev"])
def test_cached_decoding_equals_the_full_forward(kind):
    model = fusedkv(kind)
    runner = SlotFusedKV(model, slots=3, max_len=32)
    prompts = [[1, 5, 9, 12, 7], [1, 30, 4]]
    tokens = [[8, 3, 22, 17], [40, 11, 6, 2]]
    logits = [runner.prefill([2, 0], prompts)]
    positions = torch.tensor([len(p) for p in prompts])
    for step in range(4):
        next_tokens = torch.tensor([tokens[0][step], tokens[1][step]])
        logits.append(runner.decode(torch.tensor([2, 0]), next_tokens, positions + step))
    for row in range(2):
        sequence = torch.tensor([prompts[row] + tokens[row]])
        with torch.no_grad():
            full = model(input_ids=sequence).logits[0].float()
        expected = full[len(prompts[row]) - 1 : len(prompts[row]) + 4]
        got = torch.stack([step_logits[row] for step_logits in logits])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["fused", "lite"])
def test_extending_a_cached_slot_equals_the_full_forward(kind):
    """A kept session's next turn: several tokens fed at once behind what a slot caches."""
    model = fusedkv(kind)
    runner = SlotFusedKV(model, slots=2, max_len=32)
    prompt, added = [1, 5, 9, 12, 7], [8, 3, 22]
    runner.prefill([1], [prompt])
    got = runner.extend([1], [added], [len(prompt)])[0]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + added])).logits[0, -1].float()
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def rotary(positions: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin [1, positions, dim] in HF's rotate_half layout."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[None]
    return angles.cos(), angles.sin()


@torch.no_grad()
def scores_at(fusion: KVFusion, start: int) -> torch.Tensor:
    """q·k of one head over the fused keys of 6 tokens placed at positions start.. ."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 6, 8, generator=gen)
    k_bottom, k_middle = torch.randn(2, 1, 1, 6, 8, generator=gen)
    v = torch.zeros(1, 1, 6, 8)
    cos, sin = (c[:, None, start : start + 6] for c in rotary(40))
    keys, _ = fusion(rope(k_bottom, cos, sin), v, rope(k_middle, cos, sin), v)
    return rope(q, cos, sin) @ keys.transpose(-1, -2)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_key_weights_keep_attention_relative_to_position(tied):
    torch.manual_seed(2)
    fusion = KVFusion("fused", kv_heads=1, head_dim=8, tied=tied)
    with torch.no_grad():
        fusion.key_weights.copy_(torch.randn_like(fusion.key_weights))
    shift = float((scores_at(fusion, 0) - scores_at(fusion, 17)).abs().max())
    if tied:  # the same scores when every token moves 17 positions on
        assert shift < 1e-4
    else:  # untied weights within a rotary pair leak absolute position
        assert shift > 1e-2


def test_the_folder_and_the_published_weights_round_trip(tmp_path):
    folder = ARCHITECTURES["fusedkv"].create(tmp_path / "m", seed=0, **SIZE)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(model, FusedKVForCausalLM) and model.config.kv_fusion == "fused"
    arch = architecture_of(model)
    assert arch.model_type == "rollfleet_fusedkv" and load_slot_runner(arch) is SlotFusedKV
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # what a worker does: build from the published config, load the published tensors
    worker = AutoModelForCausalLM.from_config(model.config).eval()
    tensors = export_state(model)
    assert "lm_head.weight" not in tensors  # tied to the embedding
    check_tensors(1, tensors, {n: tuple(t.shape) for n, t in export_state(worker).items()})
    worker.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(worker(input_ids=ids).logits, expected, atol=0, rtol=0)
    lite = AutoModelForCausalLM.from_pretrained(
        ARCHITECTURES["fusedkv_lite"].create(tmp_path / "lite", seed=0, **SIZE)
    )
    assert lite.config.kv_fusion == "lite"


def test_a_vllm_pool_refuses_an_architecture_vllm_cannot_serve():
    from rollfleet.spec import RLJobSpec
    from rollfleet_rollout.__main__ import engine_factory

    spec = RLJobSpec.model_validate(
        {"rollout": {"pools": [{"name": "gpu", "replicas": 1, "engine": "vllm"}]}}
    )
    make = engine_factory(spec.rollout.pools[0], spec, seed=0)
    with pytest.raises(ValueError, match=r"pools\[gpu\]\.engine: vllm cannot serve the fusedkv"):
        make(fusedkv(), None, 0)
