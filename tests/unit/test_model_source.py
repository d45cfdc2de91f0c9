"""A model named by its Hugging Face id and revision (`model.huggingface`): resolved from
a real Hugging Face cache folder (there is no network here, so the cache is all there is),
refused early and by field when the id or revision is not there, pinned across a resume."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import constants

from rollfleet.cli import _check_inputs
from rollfleet.models.source import ModelSourceError, model_folder, record_source
from rollfleet.models.tiny import create_tiny_model
from rollfleet.spec import HuggingFaceSource, ManifestError, ModelSpec, parse_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding `rollfleet/tiny` at two commits, `main` at the
    first and tag `v2` at the second, laid out as huggingface_hub writes it; offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--rollfleet--tiny"
    model = create_tiny_model(tmp_path / "model", seed=0, hidden=32, layers=1, heads=2, max_len=64)
    for commit in (COMMIT, OTHER):
        shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v2").write_text(OTHER)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def source(**fields) -> HuggingFaceSource:
    return HuggingFaceSource(**{"id": "rollfleet/tiny", **fields})


@pytest.mark.parametrize(
    ("revision", "commit"), [("main", COMMIT), ("v2", OTHER), (COMMIT, COMMIT)]
)
def test_an_id_resolves_to_its_revisions_snapshot_in_the_cache(hf_cache, revision, commit):
    folder = model_folder(ModelSpec(huggingface=source(revision=revision)))
    assert folder == hf_cache / "models--rollfleet--tiny" / "snapshots" / commit
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"id": "rollfleet/missing"},
            "rollfleet/missing at revision 'main': not in the Hugging Face cache",
        ),
        ({"revision": "v9"}, "rollfleet/tiny at revision 'v9': not in the Hugging Face cache"),
    ],
)
def test_an_id_or_revision_not_there_is_refused_naming_the_field(hf_cache, fields, message):
    with pytest.raises(ModelSourceError, match="spec.model.huggingface: " + message):
        model_folder(ModelSpec(huggingface=source(**fields)))


def test_rollfleet_run_checks_the_source_before_starting_anything(hf_cache):
    job = {"apiVersion": "rollfleet.io/v1alpha1", "kind": "RLJob", "metadata": {"name": "hf"}}
    good = parse_manifest({**job, "spec": {"model": {"huggingface": {"id": "rollfleet/tiny"}}}})
    _check_inputs(good)  # resolves, and checks the folder like a model.path
    bad = parse_manifest({**job, "spec": {"model": {"huggingface": {"id": "rollfleet/tinny"}}}})
    with pytest.raises(ManifestError, match=r"spec\.model\.huggingface: rollfleet/tinny"):
        _check_inputs(bad)


def test_a_resume_must_resolve_the_commit_the_run_started_from(hf_cache, tmp_path):
    run_dir = tmp_path / "run"
    model_folder(ModelSpec(huggingface=source()), run_dir)  # main -> COMMIT, recorded
    recorded = json.loads((run_dir / "model" / "source.json").read_text())
    assert recorded == {"id": "rollfleet/tiny", "revision": "main", "commit": COMMIT}
    model_folder(ModelSpec(huggingface=source(revision=COMMIT)), run_dir)  # the same commit
    # main moved to another commit since (here: the run names v2)
    with pytest.raises(ModelSourceError, match=f"set revision: {COMMIT} to resume it"):
        record_source(
            run_dir,
            source(revision="v2"),
            hf_cache / "models--rollfleet--tiny" / "snapshots" / OTHER,
        )


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"path": "/m", "huggingface": {"id": "a/b"}}, "name two models: keep one"),
        ({"huggingface": {"id": "a b/c"}}, "huggingface.id"),
        ({"huggingface": {"id": "a/b", "revision": "--x"}}, "huggingface.revision"),
        ({"huggingface": {"id": "a/b", "tokenSecret": "Not_A_Name"}}, "huggingface.tokenSecret"),
    ],
)
def test_bad_sources_are_refused_by_field(model, message):
    job = {"apiVersion": "rollfleet.io/v1alpha1", "kind": "RLJob", "metadata": {"name": "hf"}}
    with pytest.raises(ValueError, match=message):
        parse_manifest({**job, "spec": {"model": model}})
