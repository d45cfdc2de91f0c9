from __future__ import annotations

import copy
from pathlib import Path

import pytest
from huggingface_hub import constants

from rollfleet.spec import ManifestError, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "apiVersion": "rollfleet.io/v1alpha1",
    "kind": "RLJob",
    "metadata": {"name": "countdown"},
    "spec": {"task": {"name": "countdown"}},
}


def manifest(**spec) -> dict:
    data = copy.deepcopy(MINIMAL)
    data["spec"].update(spec)
    return data


def error_of(data) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    return str(info.value)


def test_minimal_manifest_gets_defaults():
    job = parse_manifest(copy.deepcopy(MINIMAL))
    assert job.metadata.name == "countdown"
    assert job.spec.task.name == "countdown"
    assert job.spec.async_.ratio == 1
    assert len(job.spec.rollout.pools) == 1
    pool = job.spec.rollout.pools[0]
    assert (pool.name, pool.replicas, pool.engine) == ("default", 2, "torch")
    assert job.spec.algorithm.advantage == "grpo"
    assert job.spec.algorithm.policyLoss == "ppo_clip"
    assert job.spec.model.hidden % job.spec.model.heads == 0
    assert job.status is None


def test_defaults_are_not_shared_between_jobs():
    a = parse_manifest(copy.deepcopy(MINIMAL))
    b = parse_manifest(copy.deepcopy(MINIMAL))
    a.spec.rollout.pools[0].replicas = 7
    assert b.spec.rollout.pools[0].replicas == 2


def test_async_alias_sets_ratio():
    job = parse_manifest(manifest(**{"async": {"ratio": 3}}))
    assert job.spec.async_.ratio == 3
    assert parse_manifest(manifest(**{"async": {"ratio": 0}})).spec.async_.ratio == 0


def test_reward_functions_default_to_task_verifier():
    job = parse_manifest(copy.deepcopy(MINIMAL))
    assert job.spec.reward_functions() == [("countdown", 1.0, {})]
    assert job.spec.verifier() == "countdown"
    calc = parse_manifest(manifest(task={"name": "calculator"}))
    assert calc.spec.reward_functions() == [("numeric", 1.0, {})]


def test_explicit_reward_functions_keep_order_weights_and_params():
    job = parse_manifest(
        manifest(
            reward={
                "functions": [
                    {"name": "exact_match", "weight": 0.5, "params": {"strip": False}},
                    {"name": "format"},
                ]
            }
        )
    )
    assert job.spec.reward_functions() == [
        ("exact_match", 0.5, {"strip": False}),
        ("format", 1.0, {}),
    ]
    assert job.spec.verifier() == "exact_match"


def test_unknown_field_is_named():
    message = error_of(manifest(trainer={"stepz": 10}))
    assert (
        "spec.trainer.stepz: unknown field; allowed: evalEvery, evalSamples, gpusPerWorker, pod, promptsPerStep, resources, sharePrefix, sharedMemory, skipZeroAdvantage, steps, strategy, workers"
        in message
    )


def test_unknown_field_in_a_list_item_lists_that_items_fields():
    message = error_of(manifest(rollout={"pools": [{"name": "a", "gpu": "H20"}]}))
    assert (
        "spec.rollout.pools.0.gpu: unknown field; allowed: engine, gpuClass, gpusPerReplica, maxBatch, name, pod, prefers, replicas, resources, sharedMemory, threads"
        in message
    )


def test_unknown_top_level_field_is_named():
    data = copy.deepcopy(MINIMAL)
    data["specs"] = {}
    assert "specs: unknown field" in error_of(data)


def test_wrong_type_is_named():
    message = error_of(manifest(trainer={"steps": "many"}))
    assert "spec.trainer.steps" in message
    assert "integer" in message


def test_negative_async_ratio_is_named_by_its_alias():
    message = error_of(manifest(**{"async": {"ratio": -1}}))
    assert "spec.async.ratio" in message
    assert "greater than or equal to 0" in message


def test_pool_with_zero_replicas_is_named():
    message = error_of(manifest(rollout={"pools": [{"name": "a", "replicas": 0}]}))
    assert "spec.rollout.pools.0.replicas" in message


def test_unknown_task_lists_allowed_names():
    message = error_of(manifest(task={"name": "chess"}))
    assert "spec.task.name" in message
    assert "'chess'" in message
    assert (
        "['calculator', 'chain_sum', 'countdown', 'jsonl', 'mixed', 'qagent', 'recgpt', 'recommend', 'solve']"
        in message
    )


def test_unknown_reward_function_is_named():
    message = error_of(manifest(reward={"functions": [{"name": "exact_match"}, {"name": "vibes"}]}))
    assert "spec.reward.functions.1.name" in message
    assert "'vibes'" in message
    assert "exact_match" in message  # the allowed names are listed


def test_duplicate_pool_names_are_rejected():
    pools = [{"name": "fast"}, {"name": "slow"}, {"name": "fast"}]
    message = error_of(manifest(rollout={"pools": pools}))
    assert "spec.rollout.pools" in message
    assert "unique" in message
    assert "['fast', 'slow', 'fast']" in message


def test_heads_must_divide_hidden():
    message = error_of(manifest(model={"hidden": 128, "heads": 3}))
    assert "spec.model" in message
    assert "model.heads (3) must divide model.hidden (128)" in message
    # 4 heads of 32 is fine
    assert parse_manifest(manifest(model={"hidden": 128, "heads": 4})).spec.model.heads == 4


def test_trainer_workers_must_divide_prompts_per_step():
    message = error_of(manifest(trainer={"workers": 3, "promptsPerStep": 8}))
    assert "spec.trainer: promptsPerStep (8) must be a multiple of workers (3)" in message
    job = parse_manifest(manifest(trainer={"workers": 2, "promptsPerStep": 8, "strategy": "fsdp"}))
    assert (job.spec.trainer.workers, job.spec.trainer.strategy) == (2, "fsdp")
    assert "spec.trainer.strategy" in error_of(manifest(trainer={"strategy": "zero3"}))


def test_weights_settings_are_checked():
    job = parse_manifest(manifest(weights={"transport": "filesystem", "bucketMB": 0.5}))
    assert (job.spec.weights.transport, job.spec.weights.path) == ("filesystem", None)
    message = error_of(manifest(weights={"transport": "s3", "bucketMB": 0, "maxPausedFraction": 2}))
    for where in (
        "spec.weights.transport",
        "spec.weights.bucketMB",
        "spec.weights.maxPausedFraction",
    ):
        assert where in message


def test_algorithm_names_and_loss_settings():
    algo = parse_manifest(
        manifest(
            algorithm={
                "advantage": "rloo",
                "policyLoss": "cispo",
                "lossAggregation": "seq-mean-token-sum",
                "clipEpsilonHigh": 0.28,
                "importanceCap": 5.0,
            }
        )
    ).spec.algorithm
    config = algo.loss_config()
    assert (config.clip_low, config.high, config.is_cap, config.dual_clip) == (0.2, 0.28, 5.0, 3.0)
    message = error_of(manifest(algorithm={"lossAggregation": "mean", "dualClip": 1.0}))
    assert "spec.algorithm.lossAggregation: unknown loss aggregation 'mean'" in message
    assert "seq-mean-token-mean" in message  # the allowed names are listed
    assert "spec.algorithm.dualClip" in message


def test_scheduling_switches_that_cannot_combine_are_refused():
    message = error_of(manifest(**{"async": {"envAsync": False, "replicatePrompts": True}}))
    assert "async.envAsync: false keeps a group's env sessions in lockstep" in message


def test_every_bad_field_is_reported_at_once():
    message = error_of(manifest(trainer={"stepz": 1, "steps": 0}, **{"async": {"ratio": -1}}))
    for where in ("spec.trainer.stepz", "spec.trainer.steps", "spec.async.ratio"):
        assert where in message


def test_wrong_api_version_and_bad_name():
    data = copy.deepcopy(MINIMAL)
    data["apiVersion"] = "rollfleet.io/v2"
    data["metadata"]["name"] = "Not_A_DNS_Name"
    message = error_of(data)
    assert "apiVersion" in message
    assert "metadata.name" in message


def test_parse_manifest_names_its_source():
    with pytest.raises(ManifestError, match=r"^jobs/x\.yaml is not a valid RLJob"):
        parse_manifest(manifest(trainer={"stepz": 1}), source="jobs/x.yaml")


def test_load_manifest_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "job.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_load_manifest_reads_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: rollfleet.io/v1alpha1\n"
        "kind: RLJob\n"
        "metadata: {name: my-job}\n"
        "spec:\n"
        "  task: {name: calculator}\n"
        "  async: {ratio: 2}\n"
    )
    job = load_manifest(path)
    assert job.metadata.name == "my-job"
    assert job.spec.task.name == "calculator"
    assert job.spec.async_.ratio == 2


def test_load_manifest_bad_yaml_and_bad_field_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML") as info:
        load_manifest(broken)
    assert str(broken) in str(info.value)

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: rollfleet.io/v1alpha1\nkind: RLJob\nmetadata: {name: a}\n"
        "spec: {trainer: {stepz: 3}}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(bad)
    assert str(bad) in str(info.value)
    assert "spec.trainer.stepz" in str(info.value)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_manifest_is_valid_and_its_inputs_exist(path, monkeypatch, tmp_path):
    from rollfleet.cli import _check_inputs

    monkeypatch.chdir(ROOT)  # examples name their data relative to the repository root
    job = load_manifest(path)  # raises ManifestError naming the field
    if job.spec.model.huggingface:
        # a cluster's example: its model is on the Hub, which this machine cannot reach
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
        with pytest.raises(ManifestError, match=r"spec\.model\.huggingface: .* not in the"):
            _check_inputs(job)
        return
    _check_inputs(job)  # raises ManifestError for a missing data file or model folder


def test_a_pool_preference_needs_affinity_routing():
    pools = [{"name": "fast", "prefers": "prefill"}, {"name": "wide"}]
    message = error_of(manifest(rollout={"pools": pools}))
    assert "pools ['fast'] prefer prefill or decode work" in message
    assert "routing: affinity" in message
    job = parse_manifest(manifest(rollout={"pools": pools, "routing": "affinity"}))
    assert [p.prefers for p in job.spec.rollout.pools] == ["prefill", "any"]
