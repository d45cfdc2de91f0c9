"""RLJob -> Kubernetes manifests: the children the operator keeps in the cluster.

A pure function of the job, the operator's settings and what the cluster serves, so the
same job always renders the same objects (the operator's reconciliation is idempotent
because of this) and tests can check every object without a cluster:

    children = render(job, namespace="team-a", config=OperatorConfig(), knative=True)

The components come from `rollfleet.plan`, as in the local runtime:

| component            | objects                                                       |
|----------------------|---------------------------------------------------------------|
| job config           | ConfigMap `<job>-config` (the resolved manifest), Secret `<job>-tokens` |
|                      | (service token; the job's NATS creds, mounted in trainer and rollout pods) |
| rollout pool         | Deployment `<job>-rollout-<pool>`, placement from the GPU class |
| trainer, 1 worker    | StatefulSet `<job>-trainer` + headless Service, checkpoints on its PVC |
| trainer, N workers   | KubeRay RayJob `<job>-trainer` + PVC `<job>-checkpoints`      |
| reward               | Knative Service `<job>-reward`, else Deployment + Service     |
| env sandboxes        | StatefulSet `<job>-env` + headless Service + NetworkPolicy denying egress |

Every pod runs non-root with a restricted security context and no service-account token
(the services talk to NATS and each other, never to the Kubernetes API).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

import yaml

from rollfleet.bus import NATS_CREDS_ENV
from rollfleet.nats_auth import BUS_ROLES
from rollfleet.plan import GPU, Component, Endpoints, plan
from rollfleet.service import TOKEN_ENV
from rollfleet.spec import RLJob, quantity_value
from rollfleet_operator.config import OperatorConfig

HTTP_PORT = 8080
RUN_DIR = "/var/lib/rollfleet"  # checkpoints and metrics: the trainer's PVC
JOB_DIR = "/etc/rollfleet"  # the ConfigMap with the resolved manifest
NATS_DIR = "/etc/rollfleet-nats"  # the job's NATS creds, from its Secret
UID = 10001  # the images' user

SERVICE_TOKEN_KEY = "service-token"
NATS_CREDS_KEY = "nats-creds"
NATS_CREDS_FILE = "nats.creds"


class RenderError(ValueError):
    """The job cannot run in this cluster as configured; names the field and the fix."""


def names(job: str) -> dict[str, str]:
    return {
        "config": f"{job}-config",
        "tokens": f"{job}-tokens",
        "trainer": f"{job}-trainer",
        "checkpoints": f"{job}-checkpoints",
        "reward": f"{job}-reward",
        "env": f"{job}-env",
        "env-egress": f"{job}-env-deny-egress",
    }


def labels(job: str, component: str, pool: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "rollfleet",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "rollfleet",
        "app.kubernetes.io/managed-by": "rollfleet-operator",
        "rollfleet.io/job": job,
    }
    if pool:
        out["rollfleet.io/pool"] = pool
    return out


def selector(job: str, component: str, pool: str | None = None) -> dict[str, str]:
    out = {"rollfleet.io/job": job, "app.kubernetes.io/component": component}
    if pool:
        out["rollfleet.io/pool"] = pool
    return out


def _meta(name: str, namespace: str, job: str, component: str, pool: str | None = None) -> dict:
    return {"name": name, "namespace": namespace, "labels": labels(job, component, pool)}


# --- pods -----------------------------------------------------------------------------------
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "runAsGroup": UID,
    "fsGroup": UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _env(component: Component, job: str) -> list[dict[str, Any]]:
    tokens = names(job)["tokens"]
    env = [{"name": k, "value": v} for k, v in sorted(component.env.items())]
    env += [
        {"name": "HOME", "value": "/tmp"},  # caches (HF, torch) on the writable emptyDir
        {
            "name": TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": tokens, "key": SERVICE_TOKEN_KEY}},
        },
    ]
    if component.role in BUS_ROLES:  # a path: the creds stay in the mounted Secret
        env.append({"name": NATS_CREDS_ENV, "value": f"{NATS_DIR}/{NATS_CREDS_FILE}"})
    return env


def _resources(component: Component, gpu_resource: str = GPU) -> dict:
    """The component's requests and limits, its GPUs under the GPU class's resource name."""
    return {
        part: {(gpu_resource if key == GPU else key): value for key, value in amounts.items()}
        for part, amounts in component.resources.items()
    }


def _container(
    component: Component, image: str, config: OperatorConfig, job: str, gpu_resource: str
) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/healthz", "port": "http"}}
    mounts = [
        {"name": "job", "mountPath": JOB_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if component.role in BUS_ROLES:
        mounts.append({"name": "nats-creds", "mountPath": NATS_DIR, "readOnly": True})
    if component.shared_memory:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return {
        "name": component.role,
        "image": image,
        "imagePullPolicy": config.images.pullPolicy,
        "command": component.command(),
        "ports": [{"name": "http", "containerPort": HTTP_PORT}],
        "env": _env(component, job) + list(component.pod.env),
        "resources": _resources(component, gpu_resource),
        "readinessProbe": {**probe, "periodSeconds": 5},
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 6},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }


def _pod(
    job: str,
    component: Component,
    containers: list[dict],
    extra_volumes: list[dict] = (),
    placement: dict | None = None,
) -> dict[str, Any]:
    """The pod spec: the platform's volumes and security context, the component's /dev/shm,
    then the manifest's pod overrides (spec.pod and the component's own `pod`)."""
    volumes = [
        {"name": "job", "configMap": {"name": names(job)["config"]}},
        {"name": "tmp", "emptyDir": {}},
        *extra_volumes,
    ]
    if any(m["name"] == "nats-creds" for c in containers for m in c["volumeMounts"]):
        creds = {"key": NATS_CREDS_KEY, "path": NATS_CREDS_FILE}
        secret = {"secretName": names(job)["tokens"], "items": [creds], "defaultMode": 0o440}
        volumes.append({"name": "nats-creds", "secret": secret})  # group: the pod's fsGroup
    if component.shared_memory:  # memory-backed; counted against the container's limit
        _check_shared_memory(component)
        shm = {"medium": "Memory", "sizeLimit": component.shared_memory}
        volumes.append({"name": "dshm", "emptyDir": shm})
    _add_user_volumes(component, containers[0], volumes)
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "containers": containers,
        "volumes": volumes,
    }
    overrides = component.pod
    for key in ("serviceAccountName", "priorityClassName", "runtimeClassName"):
        if value := getattr(overrides, key):
            pod[key] = value
    if overrides.imagePullSecrets:
        pod["imagePullSecrets"] = list(overrides.imagePullSecrets)
    placement = dict(placement or {})
    if overrides.nodeSelector:
        placement["nodeSelector"] = {**placement.get("nodeSelector", {}), **overrides.nodeSelector}
    if overrides.tolerations:
        placement["tolerations"] = [*placement.get("tolerations", []), *overrides.tolerations]
    return {**pod, **placement}


def _check_shared_memory(component: Component) -> None:
    limit = component.resources.get("limits", {}).get("memory")
    if limit and quantity_value(component.shared_memory) >= quantity_value(limit):
        raise RenderError(
            f"spec.{component.path}.sharedMemory: /dev/shm of {component.shared_memory} "
            f"(2Gi per GPU unless set) is not below resources.limits.memory ({limit}), which "
            "counts it: set sharedMemory, or raise the memory limit"
        )


def _add_user_volumes(component: Component, container: dict, volumes: list[dict]) -> None:
    """The manifest's volumes and mounts, refused where they would shadow the platform's."""
    where = f"spec.pod or spec.{component.path}.pod"
    taken = {v["name"] for v in volumes}
    for volume in component.pod.volumes:
        if volume["name"] in taken:
            raise RenderError(
                f"{where}.volumes: {volume['name']!r} is a volume the operator adds "
                f"({sorted(taken)}); give yours another name"
            )
    volumes += component.pod.volumes
    known = {v["name"] for v in volumes}
    paths = {m["mountPath"] for m in container["volumeMounts"]}
    for mount in component.pod.volumeMounts:
        if mount["name"] not in known:
            raise RenderError(
                f"{where}.volumeMounts: {mount['mountPath']} mounts volume {mount['name']!r}, "
                "which no volume of the pod is called: add it to volumes"
            )
        if mount["mountPath"] in paths:
            raise RenderError(
                f"{where}.volumeMounts: {mount['mountPath']} is where the operator mounts "
                f"its own volume ({sorted(paths)}); mount yours elsewhere"
            )
    container["volumeMounts"] += component.pod.volumeMounts


def _template_metadata(job: str, component: Component, role: str, pool: str | None = None):
    """A pod template's labels (the manifest's extra ones first: ours win) and annotations."""
    out: dict[str, Any] = {"labels": {**component.pod.labels, **labels(job, role, pool)}}
    if component.pod.annotations:
        out["annotations"] = dict(component.pod.annotations)
    return out


# --- children -------------------------------------------------------------------------------
def _job_config(rljob: RLJob, namespace: str) -> dict[str, Any]:
    job = rljob.metadata.name
    resolved = rljob.model_dump(mode="json", by_alias=True, exclude={"status"})
    resolved["metadata"] = {"name": job, "namespace": namespace}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(names(job)["config"], namespace, job, "config"),
        "data": {"job.yaml": yaml.safe_dump(resolved, sort_keys=False)},
    }


def job_secret(job: str, namespace: str, nats_creds: str) -> dict[str, Any]:
    """The job's service token and NATS creds, for the job's own NATS user
    (rollfleet.nats_auth). Fresh each call: the operator creates it once, never patches."""
    data = {SERVICE_TOKEN_KEY: secrets.token_urlsafe(32), NATS_CREDS_KEY: nats_creds}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(names(job)["tokens"], namespace, job, "config"),
        "type": "Opaque",
        "stringData": data,
    }


def _placement(pool_name: str, gpu_class: str | None, config: OperatorConfig, index: int):
    if not gpu_class:
        return {}, "nvidia.com/gpu"
    if gpu_class not in config.gpuClasses:
        known = sorted(config.gpuClasses) or ["none configured"]
        raise RenderError(
            f"spec.rollout.pools[{index}].gpuClass: {gpu_class!r} (pool {pool_name}) is not a GPU "
            f"class of this cluster; use one of {known}, or add it to the chart's gpuClasses"
        )
    cls = config.gpuClasses[gpu_class]
    placement = {
        key: value
        for key, value in (
            ("nodeSelector", cls.nodeSelector),
            ("tolerations", cls.tolerations),
            ("affinity", cls.affinity),
        )
        if value
    }
    return placement, cls.resourceName


def _rollout(rljob, component, index, namespace, config, stopped) -> dict[str, Any]:
    job = rljob.metadata.name
    pool = rljob.spec.rollout.pools[index]
    placement, gpu_resource = _placement(pool.name, pool.gpuClass, config, index)
    image = config.images.rolloutVllm if pool.engine == "vllm" else config.images.rollout
    container = _container(component, image, config, job, gpu_resource)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(f"{job}-{component.name}", namespace, job, "rollout", pool.name),
        "spec": {
            "replicas": 0 if stopped else component.replicas,
            "selector": {"matchLabels": selector(job, "rollout", pool.name)},
            "template": {
                "metadata": _template_metadata(job, component, "rollout", pool.name),
                "spec": _pod(job, component, [container], placement=placement),
            },
        },
    }


def _service(name, namespace, job, component, headless: bool = True) -> dict[str, Any]:
    """A headless Service (stable pod names for StatefulSets) or a ClusterIP one on port 80."""
    spec: dict[str, Any] = {"selector": selector(job, component)}
    if headless:
        spec["clusterIP"] = "None"
        spec["ports"] = [{"name": "http", "port": HTTP_PORT, "targetPort": "http"}]
    else:
        spec["ports"] = [{"name": "http", "port": 80, "targetPort": "http"}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, job, component),
        "spec": spec,
    }


def _checkpoint_mount() -> dict[str, str]:
    return {"name": "checkpoints", "mountPath": RUN_DIR}


def _task_files(rljob, container: dict) -> list[dict[str, Any]]:
    """Mount `task.volume` (a corpus, datasets) read-only in `container`, and give it the
    keys of `task.secret` (object-store credentials) as environment variables; returns
    the pod volume."""
    if secret := rljob.spec.task.secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    volume = rljob.spec.task.volume
    if volume is None:
        return []
    container["volumeMounts"].append(
        {"name": "task-files", "mountPath": volume.mountPath, "readOnly": True}
    )
    claim = {"claimName": volume.claimName, "readOnly": True}
    return [{"name": "task-files", "persistentVolumeClaim": claim}]


HF_CACHE_DIR = "/var/cache/huggingface"  # HF_HOME in the trainer's pods


def _model_cache(rljob, namespace: str, container: dict, shared: bool, config):
    """For `model.huggingface`: the Hugging Face cache on a claim (the job's `cacheClaim`,
    or `<job>-model-cache`, which this returns as a child to create) mounted as HF_HOME,
    and the token from `tokenSecret`. Returns (pod volumes, children)."""
    source = rljob.spec.model.huggingface
    if source is None:
        return [], []
    job = rljob.metadata.name
    container["env"].append({"name": "HF_HOME", "value": HF_CACHE_DIR})
    if source.tokenSecret:
        token = {"secretKeyRef": {"name": source.tokenSecret, "key": "token"}}
        container["env"].append({"name": "HF_TOKEN", "valueFrom": token})
    container["volumeMounts"].append({"name": "model-cache", "mountPath": HF_CACHE_DIR})
    claim = source.cacheClaim or f"{job}-model-cache"
    volumes = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": claim}}]
    if source.cacheClaim:
        return volumes, []
    spec: dict[str, Any] = {
        # every trainer pod of a RayJob mounts it; the leader rank, wherever Ray put it, fetches
        "accessModes": ["ReadWriteMany" if shared else "ReadWriteOnce"],
        "resources": {"requests": {"storage": source.cacheSize}},
    }
    if config.trainer.storageClassName:
        spec["storageClassName"] = config.trainer.storageClassName
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(claim, namespace, job, "trainer"),
        "spec": spec,
    }
    return volumes, [pvc]


def _tracking_secrets(rljob, container: dict) -> None:
    """The trackers' credentials, from the Secrets the job names, for the trainer."""
    tracking = rljob.spec.tracking
    for settings, secret_field, key, variable in (
        (tracking.wandb, "apiKeySecret", "apiKey", "WANDB_API_KEY"),
        (tracking.mlflow, "tokenSecret", "token", "MLFLOW_TRACKING_TOKEN"),
    ):
        if settings is not None and (secret := getattr(settings, secret_field)):
            ref = {"secretKeyRef": {"name": secret, "key": key}}
            container["env"].append({"name": variable, "valueFrom": ref})


def _trainer(rljob, component, namespace, config, stopped) -> list[dict[str, Any]]:
    job, spec = rljob.metadata.name, rljob.spec
    name = names(job)["trainer"]
    container = _container(component, config.images.trainer, config, job, "nvidia.com/gpu")
    container["volumeMounts"].append(_checkpoint_mount())
    task_files = _task_files(rljob, container)  # held-out evaluation and warm-up read them
    _tracking_secrets(rljob, container)
    cache, cache_claims = _model_cache(
        rljob, namespace, container, spec.trainer.workers > 1, config
    )
    task_files += cache
    storage = {"requests": {"storage": config.trainer.checkpointStorage}}
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": storage}
    if config.trainer.storageClassName:
        claim_spec["storageClassName"] = config.trainer.storageClassName
    if spec.trainer.workers == 1:
        return [
            *cache_claims,
            _service(name, namespace, job, "trainer"),
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": _meta(name, namespace, job, "trainer"),
                "spec": {
                    "replicas": 0 if stopped else 1,
                    "serviceName": name,
                    "selector": {"matchLabels": selector(job, "trainer")},
                    "template": {
                        "metadata": _template_metadata(job, component, "trainer"),
                        "spec": _pod(job, component, [container], task_files),
                    },
                    "volumeClaimTemplates": [
                        {"metadata": {"name": "checkpoints"}, "spec": claim_spec}
                    ],
                },
            },
        ]
    if not config.trainer.ray:
        raise RenderError(
            f"spec.trainer.workers: {spec.trainer.workers} workers run as a KubeRay RayJob, and "
            "this installation has KubeRay off (chart value ray.enabled=false): set workers: 1, "
            "or install KubeRay and set ray.enabled=true"
        )
    # Several workers: KubeRay runs the same entrypoint as the driver on the head; Ray Train
    # places one rank per worker pod. Every pod mounts the checkpoint volume (rank 0 writes,
    # wherever Ray placed it), so it must be ReadWriteMany.
    claim_spec["accessModes"] = ["ReadWriteMany"]
    checkpoints = names(job)["checkpoints"]
    volume = {"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoints}}
    ray_container = {**container, "name": "ray", "command": None}
    ray_container = {k: v for k, v in ray_container.items() if v is not None}
    ray_container["ports"] = [
        {"name": "http", "containerPort": HTTP_PORT},
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
    ]
    for probe in ("readinessProbe", "livenessProbe"):  # KubeRay probes Ray itself
        ray_container.pop(probe)
    driver = {"cpu": "1", "memory": "2Gi"}
    head = {**ray_container, "resources": {"requests": driver, "limits": driver}}
    # The head runs the driver only: no GPUs, no /dev/shm beyond the default.
    head["volumeMounts"] = [m for m in head["volumeMounts"] if m["name"] != "dshm"]
    head_component = replace(component, shared_memory=None)
    pod_metadata = _template_metadata(job, component, "trainer")
    return [
        *cache_claims,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(checkpoints, namespace, job, "trainer"),
            "spec": claim_spec,
        },
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": _meta(name, namespace, job, "trainer"),
            "spec": {
                "entrypoint": " ".join(component.command()),
                "suspend": stopped,
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 3600,
                "rayClusterSpec": {
                    "rayVersion": config.trainer.rayVersion,
                    "headGroupSpec": {
                        # The head runs the driver only; ranks go to the workers.
                        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                        "template": {
                            "metadata": pod_metadata,
                            "spec": _pod(job, head_component, [head], [volume, *task_files]),
                        },
                    },
                    "workerGroupSpecs": [
                        {
                            "groupName": "trainer",
                            "replicas": spec.trainer.workers,
                            "minReplicas": spec.trainer.workers,
                            "maxReplicas": spec.trainer.workers,
                            "rayStartParams": {},
                            "template": {
                                "metadata": pod_metadata,
                                "spec": _pod(
                                    job, component, [ray_container], [volume, *task_files]
                                ),
                            },
                        }
                    ],
                },
            },
        },
    ]


def _reward(rljob, component, namespace, config, knative, stopped) -> list[dict[str, Any]]:
    job = rljob.metadata.name
    name = names(job)["reward"]
    container = _container(component, config.images.reward, config, job, "nvidia.com/gpu")
    # The run directory is scratch here: builtin reward models (`builtin:qagent-reader`)
    # are trained into it when the pod starts; model folders are read from where they are.
    container["volumeMounts"].append({"name": "run", "mountPath": RUN_DIR})
    run_volume = [{"name": "run", "emptyDir": {}}]
    pod_metadata = _template_metadata(job, component, "reward")
    if knative:
        # Knative names the serving port itself and probes it; it scales the revision on
        # in-flight requests per pod (the concurrency target), down to zero when idle.
        container["ports"] = [{"name": "http1", "containerPort": HTTP_PORT}]
        for probe in ("readinessProbe", "livenessProbe"):
            container[probe] = {"httpGet": {"path": "/healthz"}}
        reward = rljob.spec.reward
        max_scale = max(reward.maxScale, reward.replicas)
        return [
            {
                "apiVersion": "serving.knative.dev/v1",
                "kind": "Service",
                "metadata": _meta(name, namespace, job, "reward"),
                "spec": {
                    "template": {
                        "metadata": {
                            **pod_metadata,
                            "annotations": {
                                **pod_metadata.get("annotations", {}),
                                "autoscaling.knative.dev/metric": "concurrency",
                                "autoscaling.knative.dev/target": str(reward.targetConcurrency),
                                "autoscaling.knative.dev/min-scale": "0",
                                "autoscaling.knative.dev/max-scale": str(max_scale),
                                # Scale to zero now on suspend; else start with spec replicas.
                                "autoscaling.knative.dev/initial-scale": str(
                                    0 if stopped else component.replicas
                                ),
                            },
                        },
                        "spec": _pod(job, component, [container], run_volume),
                    }
                },
            }
        ]
    return [
        _service(name, namespace, job, "reward", headless=False),  # port 80, as Knative's
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(name, namespace, job, "reward"),
            "spec": {
                "replicas": 0 if stopped else component.replicas,
                "selector": {"matchLabels": selector(job, "reward")},
                "template": {
                    "metadata": pod_metadata,
                    "spec": _pod(job, component, [container], run_volume),
                },
            },
        },
    ]


def _env_sandboxes(rljob, component, namespace, config, stopped) -> list[dict[str, Any]]:
    job = rljob.metadata.name
    name = names(job)["env"]
    container = _container(component, config.images.env, config, job, "nvidia.com/gpu")
    task_files = _task_files(rljob, container)  # a search env's corpus
    return [
        _service(name, namespace, job, "env"),
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _meta(name, namespace, job, "env"),
            "spec": {
                "replicas": 0 if stopped else component.replicas,
                "serviceName": name,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": selector(job, "env")},
                "template": {
                    "metadata": _template_metadata(job, component, "env"),
                    "spec": _pod(job, component, [container], task_files),
                },
            },
        },
        {
            # Sandboxes run model-written actions: they may answer, never call out.
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(names(job)["env-egress"], namespace, job, "env"),
            "spec": {
                "podSelector": {"matchLabels": selector(job, "env")},
                "policyTypes": ["Egress"],
                "egress": [],
            },
        },
    ]


def endpoints(rljob: RLJob, namespace: str, config: OperatorConfig) -> Endpoints:
    job = rljob.metadata.name
    env = names(job)["env"]
    domain = f"{namespace}.svc.cluster.local"
    env_urls = [
        f"http://{env}-{i}.{env}.{domain}:{HTTP_PORT}" for i in range(rljob.spec.env.replicas)
    ]
    return Endpoints(
        nats_url=config.nats.url,
        reward_url=f"http://{names(job)['reward']}.{domain}",
        env_url=",".join(env_urls),
        run_dir=RUN_DIR,
        job_file=f"{JOB_DIR}/job.yaml",
        http_host="0.0.0.0",
    )


def render(
    rljob: RLJob,
    namespace: str,
    config: OperatorConfig,
    knative: bool,
    stopped: bool = False,
) -> list[dict[str, Any]]:
    """Every child of the job but its Secret (see `job_secret`); `stopped` scales to zero."""
    stopped = stopped or rljob.spec.suspend
    children = [_job_config(rljob, namespace)]
    pool_index = {f"rollout-{p.name}": i for i, p in enumerate(rljob.spec.rollout.pools)}
    for component in plan(rljob, endpoints(rljob, namespace, config)):
        if component.role == "rollout":
            index = pool_index[component.name]
            children.append(_rollout(rljob, component, index, namespace, config, stopped))
        elif component.role == "trainer":
            children += _trainer(rljob, component, namespace, config, stopped)
        elif component.role == "reward":
            children += _reward(rljob, component, namespace, config, knative, stopped)
        else:
            children += _env_sandboxes(rljob, component, namespace, config, stopped)
    return children
