"""plan.py: an RLJob becomes the components both runtimes start, with their environment."""

from __future__ import annotations

import pytest
import yaml

from rollfleet.plan import Endpoints, ServiceEnv, plan
from rollfleet.spec import parse_manifest

ENDPOINTS = Endpoints(
    nats_url="nats://nats:4222",
    reward_url="http://reward",
    env_url="http://env",
    run_dir="/var/lib/rollfleet",
    job_file="/etc/rollfleet/job.yaml",
)


def job(**spec):
    return parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "j"},
            "spec": spec,
        }
    )


def test_default_job_plans_reward_env_one_pool_and_a_trainer():
    components = {c.name: c for c in plan(job(), ENDPOINTS)}
    assert list(components) == ["reward", "env", "rollout-default", "trainer"]
    assert [components[n].replicas for n in components] == [1, 1, 2, 1]
    assert components["rollout-default"].command("py") == ["py", "-m", "rollfleet_rollout"]
    assert components["trainer"].module == "rollfleet_trainer"
    assert "nvidia.com/gpu" not in components["rollout-default"].resources["limits"]
    assert components["rollout-default"].shared_memory is None  # on CPU: the default /dev/shm


def test_every_component_learns_the_endpoints_and_pools_learn_their_name():
    for component in plan(job(), ENDPOINTS):
        env = component.env
        assert env["ROLLFLEET_NATS_URL"] == "nats://nats:4222"
        assert env["ROLLFLEET_REWARD_URL"] == "http://reward"
        assert env["ROLLFLEET_ENV_URL"] == "http://env"
        assert env["ROLLFLEET_JOB_FILE"] == "/etc/rollfleet/job.yaml"
        assert env["ROLLFLEET_POOL"] == ("default" if component.role == "rollout" else "")


def test_gpu_pools_request_a_gpu_and_carry_their_class():
    spec = {
        "rollout": {
            "pools": [
                {"name": "prefill", "replicas": 2, "engine": "vllm", "gpuClass": "H800"},
                {"name": "decode", "replicas": 3, "engine": "vllm", "gpuClass": "H20"},
            ]
        }
    }
    pools = [c for c in plan(job(**spec), ENDPOINTS) if c.role == "rollout"]
    assert [(c.name, c.replicas, c.placement) for c in pools] == [
        ("rollout-prefill", 2, {"gpuClass": "H800"}),
        ("rollout-decode", 3, {"gpuClass": "H20"}),
    ]
    assert all(c.resources["limits"]["nvidia.com/gpu"] == "1" for c in pools)
    # a vLLM engine's defaults: 4 CPUs, 16 GiB and 2 GiB of /dev/shm per GPU
    assert pools[0].resources["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert pools[0].shared_memory == "2Gi"


def test_trainer_workers_get_the_gpus_they_ask_for():
    cpu = next(c for c in plan(job(), ENDPOINTS) if c.role == "trainer")
    assert "nvidia.com/gpu" not in cpu.resources["limits"]
    spec = {"trainer": {"workers": 4, "promptsPerStep": 16, "gpusPerWorker": 2}}
    gpu = next(c for c in plan(job(**spec), ENDPOINTS) if c.role == "trainer")
    # one driver, per-worker GPUs
    assert (gpu.replicas, gpu.resources["limits"]["nvidia.com/gpu"]) == (1, "2")
    assert gpu.resources["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert gpu.shared_memory == "4Gi"


def test_service_env_round_trips_through_the_environment(monkeypatch):
    original = ServiceEnv(
        job_file="/j.yaml",
        nats_url="nats://x:1",
        reward_url="http://r",
        env_url="http://e",
        run_dir="/run",
        http_port=9123,
        http_host="0.0.0.0",
        pool="p",
        replica=3,
    )
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert ServiceEnv.from_environ() == original


def test_service_env_without_the_job_says_who_starts_services(monkeypatch):
    monkeypatch.delenv("ROLLFLEET_JOB_FILE", raising=False)
    monkeypatch.delenv("ROLLFLEET_NATS_URL", raising=False)
    with pytest.raises(RuntimeError, match="rollfleet run"):
        ServiceEnv.from_environ()


def test_a_reward_service_with_models_gets_memory_and_its_gpus():
    plain = next(c for c in plan(job(), ENDPOINTS) if c.role == "reward")
    assert plain.resources == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    spec = {"reward": {"models": {"judge": "/models/judge"}, "gpus": 1, "replicas": 2}}
    reward = next(c for c in plan(job(**spec), ENDPOINTS) if c.role == "reward")
    assert reward.replicas == 2
    assert reward.resources == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    cpu_models = next(
        c for c in plan(job(reward={"models": {"judge": "/m"}}), ENDPOINTS) if c.role == "reward"
    )
    assert cpu_models.resources["requests"] == {"cpu": "1", "memory": "2Gi"}


def test_a_pools_torch_threads_reach_its_workers_and_its_cpu_request():
    pools = [{"name": "fast", "threads": 2}, {"name": "wide"}]
    components = {c.name: c for c in plan(job(rollout={"pools": pools}), ENDPOINTS)}
    fast, wide = components["rollout-fast"], components["rollout-wide"]
    assert (fast.env["ROLLFLEET_TORCH_THREADS"], fast.resources["requests"]["cpu"]) == ("2", "2")
    assert (wide.env["ROLLFLEET_TORCH_THREADS"], wide.resources["requests"]["cpu"]) == ("1", "1")


def test_the_env_service_has_memory_for_each_sandbox_and_its_step_allowance():
    default = next(c for c in plan(job(), ENDPOINTS) if c.role == "env")
    assert default.resources["limits"]["memory"] == f"{256 + 2 * (128 + 512)}Mi"
    bigger = job(env={"sandboxes": 4, "stepMemoryMB": 1024})
    env = next(c for c in plan(bigger, ENDPOINTS) if c.role == "env")
    assert env.resources["limits"]["memory"] == f"{256 + 4 * (128 + 1024)}Mi"


def test_a_components_own_resources_replace_the_defaults_and_keep_its_gpus():
    resources = {"requests": {"cpu": 16, "memory": "96Gi"}, "limits": {"memory": "96Gi"}}
    pool = {"name": "h20", "engine": "vllm", "gpuClass": "H20", "gpusPerReplica": 2}
    spec = {"rollout": {"pools": [{**pool, "resources": resources, "sharedMemory": "16Gi"}]}}
    (rollout,) = [c for c in plan(job(**spec), ENDPOINTS) if c.role == "rollout"]
    assert rollout.resources == {
        "requests": {"cpu": "16", "memory": "96Gi"},  # YAML's 16 as Kubernetes writes it
        "limits": {"memory": "96Gi", "nvidia.com/gpu": "2"},  # tensor parallel over two
    }
    assert rollout.shared_memory == "16Gi"


def test_pod_overrides_merge_the_components_over_the_jobs():
    spec = {
        "pod": {
            "imagePullSecrets": [{"name": "regcred"}],
            "serviceAccountName": "rl-jobs",
            "labels": {"team": "rl", "tier": "batch"},
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "A", "value": "job"}],
        },
        "trainer": {
            "pod": {
                "priorityClassName": "training",
                "labels": {"tier": "train"},
                "env": [{"name": "A", "value": "trainer"}],
            }
        },
    }
    components = {c.name: c for c in plan(job(**spec), ENDPOINTS)}
    trainer, reward = components["trainer"].pod, components["reward"].pod
    assert trainer.imagePullSecrets == [{"name": "regcred"}]
    assert (trainer.serviceAccountName, trainer.priorityClassName) == ("rl-jobs", "training")
    assert trainer.labels == {"team": "rl", "tier": "train"}
    assert trainer.env == [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "A", "value": "trainer"},
    ]
    assert reward.priorityClassName is None and reward.labels == {"team": "rl", "tier": "batch"}


@pytest.mark.parametrize(
    ("cores", "spec", "expected"),
    [
        (2, {}, {"trainer": 1, "rollout-default": 1}),
        (16, {}, {"trainer": 8, "rollout-default": 4}),
        (
            16,
            {"trainer": {"workers": 2, "promptsPerStep": 16}},
            {"trainer": 4, "rollout-default": 4},
        ),
        (
            16,
            {
                "rollout": {
                    "pools": [
                        {"name": "a", "replicas": 3},
                        {"name": "b", "replicas": 1, "threads": 2},
                    ]
                }
            },
            {"trainer": 8, "rollout-a": 2, "rollout-b": 2},
        ),
        (1, {}, {"trainer": 1, "rollout-default": 1}),
    ],
)
def test_the_local_runtime_shares_the_cores_between_trainer_and_workers(cores, spec, expected):
    from rollfleet.local.runtime import torch_threads

    assert torch_threads(job(**spec), cores) == expected


@pytest.mark.parametrize(
    "weights, expected",
    [({}, "filesystem"), ({"transport": "nats"}, "nats"), ({"bucketMB": 8}, "filesystem")],
)
def test_the_local_runtime_sends_weights_through_the_run_folder_unless_the_manifest_chose(
    weights, expected, tmp_path
):
    from rollfleet.local.runtime import with_local_defaults, write_job_file

    given = job(weights=weights)
    local = with_local_defaults(given)
    assert local.spec.weights.transport == expected
    assert given.spec.weights.transport == "nats"  # the cluster's default, and not mutated
    reread = parse_manifest(yaml.safe_load(write_job_file(local, tmp_path).read_text()))
    assert reread.spec.weights.transport == expected
    assert reread.spec.weights.bucketMB == weights.get("bucketMB", 64)
