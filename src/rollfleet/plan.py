"""RLJob -> components: what runs, how many, with which command, environment and placement.

The local runtime starts each component's replicas as processes; the operator renders
the same components as Kubernetes objects. Services learn their job and peers from the
environment variables in `ServiceEnv`, so the two runtimes differ only in addresses.

    for c in plan(job, Endpoints(nats_url=..., reward_url=..., env_url=..., run_dir=...)):
        print(c.name, c.replicas, c.command())
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field, replace
from typing import Literal

from rollfleet.spec import RLJob

Role = Literal["trainer", "rollout", "reward", "env"]


@dataclass(frozen=True)
class Endpoints:
    nats_url: str
    reward_url: str
    env_url: str
    run_dir: str  # the trainer's checkpoints and metrics (a PVC in a cluster)
    job_file: str  # the resolved manifest (a ConfigMap in a cluster)
    http_host: str = "127.0.0.1"  # where services listen: every interface in a pod


@dataclass(frozen=True)
class Component:
    name: str
    role: Role
    replicas: int
    module: str  # run as `python -m <module>`
    env: dict[str, str]
    resources: dict[str, str] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module]


@dataclass(frozen=True)
class ServiceEnv:
    """The environment variables a service reads; written by `plan`, read by each service."""

    job_file: str
    nats_url: str
    reward_url: str
    env_url: str  # one URL, or one per env replica separated by commas (sessions are stateful)
    run_dir: str
    http_port: int
    http_host: str = "127.0.0.1"  # 0.0.0.0 in a pod
    pool: str = ""
    replica: int = 0

    def to_env(self) -> dict[str, str]:
        return {
            "ROLLFLEET_JOB_FILE": self.job_file,
            "ROLLFLEET_NATS_URL": self.nats_url,
            "ROLLFLEET_REWARD_URL": self.reward_url,
            "ROLLFLEET_ENV_URL": self.env_url,
            "ROLLFLEET_RUN_DIR": self.run_dir,
            "ROLLFLEET_HTTP_PORT": str(self.http_port),
            "ROLLFLEET_HTTP_HOST": self.http_host,
            "ROLLFLEET_POOL": self.pool,
            "ROLLFLEET_REPLICA": str(self.replica),
        }

    def env_replica_url(self, key: str) -> str:
        """The env replica that holds the session for `key` (the same one every time)."""
        urls = [u.strip() for u in self.env_url.split(",") if u.strip()]
        return urls[zlib.crc32(key.encode()) % len(urls)]

    @classmethod
    def from_environ(cls) -> ServiceEnv:
        missing = [k for k in ("ROLLFLEET_JOB_FILE", "ROLLFLEET_NATS_URL") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"missing environment variables {missing}: services are started by `rollfleet run` or the operator"
            )
        get = os.environ.get
        return cls(
            job_file=get("ROLLFLEET_JOB_FILE", ""),
            nats_url=get("ROLLFLEET_NATS_URL", ""),
            reward_url=get("ROLLFLEET_REWARD_URL", ""),
            env_url=get("ROLLFLEET_ENV_URL", ""),
            run_dir=get("ROLLFLEET_RUN_DIR", "."),
            http_port=int(get("ROLLFLEET_HTTP_PORT", "8080")),
            http_host=get("ROLLFLEET_HTTP_HOST", "127.0.0.1"),
            pool=get("ROLLFLEET_POOL", ""),
            replica=int(get("ROLLFLEET_REPLICA", "0")),
        )


def plan(job: RLJob, endpoints: Endpoints) -> list[Component]:
    spec = job.spec
    base = ServiceEnv(
        job_file=endpoints.job_file,
        nats_url=endpoints.nats_url,
        reward_url=endpoints.reward_url,
        env_url=endpoints.env_url,
        run_dir=endpoints.run_dir,
        http_port=8080,
        http_host=endpoints.http_host,
    )
    # A reward service with models holds them in memory (and may train a builtin one).
    reward_resources = (
        {"cpu": "1", "memory": "2Gi"} if spec.reward.models else {"cpu": "500m", "memory": "512Mi"}
    )
    if spec.reward.gpus:
        reward_resources["nvidia.com/gpu"] = str(spec.reward.gpus)
    components = [
        Component(
            "reward",
            "reward",
            spec.reward.replicas,
            "rollfleet_reward",
            base.to_env(),
            resources=reward_resources,
        ),
        Component(
            "env",
            "env",
            spec.env.replicas,
            "rollfleet_env",
            base.to_env(),
            # The service, and each sandbox's task env with room for one step's allowance:
            # the per-step limit, not the kernel's OOM killer, stops a runaway action.
            resources={
                "cpu": "500m",
                "memory": f"{256 + spec.env.sandboxes * (128 + round(spec.env.stepMemoryMB))}Mi",
            },
        ),
    ]
    for pool in spec.rollout.pools:
        env = {
            **replace(base, pool=pool.name).to_env(),
            "ROLLFLEET_TORCH_THREADS": str(pool.threads),
        }
        resources = {"cpu": str(pool.threads), "memory": "2Gi"}
        placement = {}
        if pool.gpuClass:
            resources["nvidia.com/gpu"] = "1"
            placement["gpuClass"] = pool.gpuClass
        components.append(
            Component(
                f"rollout-{pool.name}",
                "rollout",
                pool.replicas,
                "rollfleet_rollout",
                env,
                resources=resources,
                placement=placement,
            )
        )
    # One trainer process; with trainer.workers > 1 it drives that many Ray Train workers,
    # each with these resources (a KubeRay RayJob in a cluster).
    trainer_resources = {"cpu": "1", "memory": "4Gi"}
    if spec.trainer.gpusPerWorker:
        trainer_resources["nvidia.com/gpu"] = str(spec.trainer.gpusPerWorker)
    components.append(
        Component(
            "trainer",
            "trainer",
            1,
            "rollfleet_trainer",
            base.to_env(),
            resources=trainer_resources,
        )
    )
    return components
