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

from rollfleet.spec import PodOverrides, PodSettings, RLJob

Role = Literal["trainer", "rollout", "reward", "env"]


@dataclass(frozen=True)
class Endpoints:
    nats_url: str
    reward_url: str
    env_url: str
    run_dir: str  # the trainer's checkpoints and metrics (a PVC in a cluster)
    job_file: str  # the resolved manifest (a ConfigMap in a cluster)
    http_host: str = "127.0.0.1"  # where services listen: every interface in a pod


GPU = "nvidia.com/gpu"  # the renderer puts the GPU class's resource name in its place
SHARED_MEMORY_PER_GPU_GI = 2  # default /dev/shm of a GPU pod: NCCL and vLLM's workers use it


@dataclass(frozen=True)
class Component:
    name: str
    role: Role
    replicas: int
    module: str  # run as `python -m <module>`
    env: dict[str, str]
    # The container's Kubernetes resource requirements ({"requests": {...}, "limits": {...}}),
    # GPUs in limits under GPU; the manifest's `resources`, else the defaults below.
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)
    shared_memory: str | None = None  # a memory-backed /dev/shm of this size
    pod: PodOverrides = field(default_factory=PodOverrides)  # spec.pod, then the component's
    path: str = ""  # its settings in the manifest, for errors: "trainer", "rollout.pools[1]"

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


def pod_settings(job: RLJob, settings: PodSettings, cpu: str, memory: str, gpus: int = 0) -> dict:
    """A component's resources, /dev/shm and pod overrides: the manifest's where it has
    them, else requests and limits of `cpu` and `memory`; `gpus` always sets the GPU limit."""
    if settings.resources is not None:
        resources = settings.resources.as_kubernetes()
    else:
        amounts = {"cpu": cpu, "memory": memory}
        resources = {"requests": dict(amounts), "limits": dict(amounts)}
    if gpus:
        resources.setdefault("limits", {})[GPU] = str(gpus)
    shared_memory = settings.sharedMemory
    if shared_memory is None and gpus:
        shared_memory = f"{SHARED_MEMORY_PER_GPU_GI * gpus}Gi"
    pod = settings.pod.over(job.spec.pod) if settings.pod else job.spec.pod
    return {"resources": resources, "shared_memory": shared_memory, "pod": pod}


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
    reward_cpu, reward_memory = ("1", "2Gi") if spec.reward.models else ("500m", "512Mi")
    if spec.reward.gpus:  # a model server
        reward_cpu, reward_memory = str(4 * spec.reward.gpus), f"{16 * spec.reward.gpus}Gi"
    # The env service, and each sandbox's task env with room for one step's allowance: the
    # per-step limit, not the kernel's OOM killer, stops a runaway action.
    env_memory = f"{256 + spec.env.sandboxes * (128 + round(spec.env.stepMemoryMB))}Mi"
    components = [
        Component(
            "reward",
            "reward",
            spec.reward.replicas,
            "rollfleet_reward",
            base.to_env(),
            path="reward",
            **pod_settings(job, spec.reward, reward_cpu, reward_memory, spec.reward.gpus),
        ),
        Component(
            "env",
            "env",
            spec.env.replicas,
            "rollfleet_env",
            base.to_env(),
            path="env",
            **pod_settings(job, spec.env, "500m", env_memory),
        ),
    ]
    for index, pool in enumerate(spec.rollout.pools):
        env = {
            **replace(base, pool=pool.name).to_env(),
            "ROLLFLEET_TORCH_THREADS": str(pool.threads or 1),
        }
        gpus = pool.gpusPerReplica if pool.gpuClass else 0
        if gpus:  # a vLLM engine: the model, its CUDA graphs, and its CPU swap space
            cpu, memory = str(4 * gpus), f"{16 * gpus}Gi"
        else:
            cpu, memory = str(pool.threads or 1), "2Gi"
        components.append(
            Component(
                f"rollout-{pool.name}",
                "rollout",
                pool.replicas,
                "rollfleet_rollout",
                env,
                placement={"gpuClass": pool.gpuClass} if pool.gpuClass else {},
                path=f"rollout.pools[{index}]",
                **pod_settings(job, pool, cpu, memory, gpus),
            )
        )
    # One trainer process; with trainer.workers > 1 it drives that many Ray Train workers,
    # each with these resources (a KubeRay RayJob in a cluster).
    gpus = spec.trainer.gpusPerWorker
    cpu, memory = (str(4 * gpus), f"{32 * gpus}Gi") if gpus else ("1", "4Gi")
    components.append(
        Component(
            "trainer",
            "trainer",
            1,
            "rollfleet_trainer",
            base.to_env(),
            path="trainer",
            **pod_settings(job, spec.trainer, cpu, memory, gpus),
        )
    )
    return components
