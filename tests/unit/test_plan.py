"""plan.py: an RLJob becomes the components both runtimes start, with their environment."""

from __future__ import annotations

import pytest

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
    assert "nvidia.com/gpu" not in components["rollout-default"].resources


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
    assert all(c.resources["nvidia.com/gpu"] == "1" for c in pools)


def test_trainer_workers_get_the_gpus_they_ask_for():
    cpu = next(c for c in plan(job(), ENDPOINTS) if c.role == "trainer")
    assert "nvidia.com/gpu" not in cpu.resources
    spec = {"trainer": {"workers": 4, "promptsPerStep": 16, "gpusPerWorker": 2}}
    gpu = next(c for c in plan(job(**spec), ENDPOINTS) if c.role == "trainer")
    assert (gpu.replicas, gpu.resources["nvidia.com/gpu"]) == (
        1,
        "2",
    )  # one driver, per-worker GPUs


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
    assert plain.resources == {"cpu": "500m", "memory": "512Mi"}
    spec = {"reward": {"models": {"judge": "/models/judge"}, "gpus": 1, "replicas": 2}}
    reward = next(c for c in plan(job(**spec), ENDPOINTS) if c.role == "reward")
    assert reward.replicas == 2
    assert reward.resources == {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}


def test_a_pools_torch_threads_reach_its_workers_and_its_cpu_request():
    pools = [{"name": "fast", "threads": 2}, {"name": "wide"}]
    components = {c.name: c for c in plan(job(rollout={"pools": pools}), ENDPOINTS)}
    fast, wide = components["rollout-fast"], components["rollout-wide"]
    assert (fast.env["ROLLFLEET_TORCH_THREADS"], fast.resources["cpu"]) == ("2", "2")
    assert (wide.env["ROLLFLEET_TORCH_THREADS"], wide.resources["cpu"]) == ("1", "1")


def test_the_env_service_has_memory_for_each_sandbox_and_its_step_allowance():
    default = next(c for c in plan(job(), ENDPOINTS) if c.role == "env")
    assert default.resources["memory"] == f"{256 + 2 * (128 + 512)}Mi"
    bigger = job(env={"sandboxes": 4, "stepMemoryMB": 1024})
    env = next(c for c in plan(bigger, ENDPOINTS) if c.role == "env")
    assert env.resources["memory"] == f"{256 + 4 * (128 + 1024)}Mi"
