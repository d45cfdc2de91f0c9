"""The model registry (rollfleet.models.architectures): the builtin Llama found from a saved
folder, its FSDP units and engine runner, and clear errors for what is not registered."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoModelForCausalLM

from rollfleet.models.architectures import ARCHITECTURES, architecture_of, load_slot_runner
from rollfleet.spec import ManifestError, parse_manifest


def test_the_builtin_llama_round_trips_through_its_folder(tmp_path):
    folder = ARCHITECTURES["llama"].create(tmp_path / "m", seed=0, hidden=32, layers=2, heads=2)
    model = AutoModelForCausalLM.from_pretrained(folder)
    arch = architecture_of(model)
    assert arch.name == "llama" and architecture_of(model.config) is arch
    blocks = arch.blocks(model)
    assert len(blocks) == 2 and all(
        b is layer for b, layer in zip(blocks, model.model.layers, strict=True)
    )


def test_the_torch_engine_runs_the_architectures_slot_runner(tmp_path):
    from rollfleet_rollout.torch_engine import SlotLlama

    assert load_slot_runner(ARCHITECTURES["llama"]) is SlotLlama


def test_an_unregistered_model_type_is_named():
    with pytest.raises(
        ValueError,
        match=r"model type 'mamba' has no registered architecture; registered: "
        r"\['llama', 'rollfleet_fusedkv', 'rollfleet_nezha'\]",
    ):
        architecture_of(SimpleNamespace(config=SimpleNamespace(model_type="mamba")))


def test_the_manifest_refuses_an_unknown_architecture():
    manifest = {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "a"},
        "spec": {"model": {"architecture": "mamba"}},
    }
    with pytest.raises(
        ManifestError,
        match=r"spec\.model\.architecture.*unknown architecture 'mamba'; choose one of "
        r"\['fusedkv', 'fusedkv_lite', 'fusedkv_lite_rev', 'llama', 'nezha'\]",
    ):
        parse_manifest(manifest)
    del manifest["spec"]["model"]
    assert parse_manifest(manifest).spec.model.architecture == "llama"
