"""Every child the operator renders is a valid object of its kind, placed and secured as
the job and the cluster's GPU classes say.

Built-in kinds go through kubernetes-validate in strict mode (unknown fields are errors)
for Kubernetes 1.30 and 1.37; the Knative Service and the RayJob through their published
CRD schemas (tests/operator/data, see its README).
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest

from rollfleet.spec import load_manifest, parse_manifest
from rollfleet_operator.config import OperatorConfig
from rollfleet_operator.render import RenderError, job_secret, names, render
from tests.operator.schemas import validate_custom_resource

EXAMPLES = sorted(Path("examples").glob("*.yaml"))
CUSTOM = {"ray.io/v1", "serving.knative.dev/v1"}
GPU_CLASSES = {
    "H800": {"nodeSelector": {"rollfleet.io/node-profile": "compute-optimised"}},
    "H20": {
        "nodeSelector": {"rollfleet.io/node-profile": "bandwidth-optimised"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}
CONFIG = OperatorConfig.model_validate({"gpuClasses": GPU_CLASSES})


def pod_specs(child: dict) -> list[dict]:
    """Every pod template's spec inside a child."""
    spec = child.get("spec", {})
    if child["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [g["template"]["spec"] for g in groups]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def by_name(children: list[dict]) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("knative", [True, False], ids=["knative", "no-knative"])
@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_every_child_validates(path, knative, stopped):
    job = load_manifest(path)
    children = render(job, "team-a", CONFIG, knative=knative, stopped=stopped)
    children.append(job_secret(job.metadata.name, "team-a", "creds"))
    for child in children:
        if child["apiVersion"] in CUSTOM:
            validate_custom_resource(child)
            continue
        for version in ("1.30", "1.37"):
            try:
                kubernetes_validate.validate(child, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(
                    f"{child['kind']} {child['metadata']['name']} ({version}): {where}: {e.message}"
                )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_pods_run_restricted(path):
    job = load_manifest(path)
    for child in render(job, "team-a", CONFIG, knative=False):
        for pod in pod_specs(child):
            assert pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for container in pod["containers"]:
                ctx = container["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False
                assert ctx["readOnlyRootFilesystem"] is True
                assert ctx["capabilities"] == {"drop": ["ALL"]}
                secret_env = {e["name"] for e in container["env"] if "valueFrom" in e}
                assert "ROLLFLEET_SERVICE_TOKEN" in secret_env
                plain_env = {e["name"]: e.get("value") for e in container["env"]}
                assert plain_env["ROLLFLEET_HTTP_HOST"] == "0.0.0.0"  # reachable in the pod


def test_gpu_pools_are_placed_by_their_class():
    job = load_manifest("examples/countdown-gpu-pools.yaml")
    children = by_name(render(job, "team-a", CONFIG, knative=True))
    compute = children["Deployment", "countdown-gpu-pools-rollout-compute"]
    bandwidth = children["Deployment", "countdown-gpu-pools-rollout-bandwidth"]
    assert compute["spec"]["replicas"] == 2 and bandwidth["spec"]["replicas"] == 4
    compute_pod = compute["spec"]["template"]["spec"]
    bandwidth_pod = bandwidth["spec"]["template"]["spec"]
    assert compute_pod["nodeSelector"] == {"rollfleet.io/node-profile": "compute-optimised"}
    assert "tolerations" not in compute_pod
    assert bandwidth_pod["nodeSelector"] == {"rollfleet.io/node-profile": "bandwidth-optimised"}
    assert bandwidth_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    for pod in (compute_pod, bandwidth_pod):
        container = pod["containers"][0]
        assert container["image"] == CONFIG.images.rolloutVllm
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ROLLFLEET_POOL"] in ("compute", "bandwidth")
    # Two trainer workers: a RayJob whose worker group has one GPU per worker.
    rayjob = children["RayJob", "countdown-gpu-pools-trainer"]
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert rayjob["spec"]["entrypoint"] == "python -m rollfleet_trainer"
    # The reward service's autoscaling comes from the job's reward section.
    reward = children["Service", "countdown-gpu-pools-reward"]
    annotations = reward["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert annotations["autoscaling.knative.dev/max-scale"] == str(job.spec.reward.maxScale)
    assert annotations["autoscaling.knative.dev/target"] == str(job.spec.reward.targetConcurrency)


def test_a_gpu_class_the_cluster_lacks_names_the_field():
    job = load_manifest("examples/countdown-gpu-pools.yaml")
    with pytest.raises(
        RenderError, match=r"spec\.rollout\.pools\[1\]\.gpuClass: 'H20'.*\['H800'\]"
    ):
        render(job, "ns", OperatorConfig.model_validate({"gpuClasses": {"H800": {}}}), knative=True)


def test_several_workers_without_kuberay_names_the_field():
    job = load_manifest("examples/countdown-2-trainers.yaml")
    config = OperatorConfig.model_validate({"trainer": {"ray": False}})
    with pytest.raises(RenderError, match=r"spec\.trainer\.workers: 2 workers .*ray\.enabled"):
        render(job, "ns", config, knative=True)


def test_stopped_scales_everything_to_zero():
    job = load_manifest("examples/countdown-gpu-pools.yaml")
    for knative in (True, False):
        for child in render(job, "ns", CONFIG, knative=knative, stopped=True):
            if child["kind"] in ("Deployment", "StatefulSet"):
                assert child["spec"]["replicas"] == 0, child["metadata"]["name"]
            if child["kind"] == "RayJob":
                assert child["spec"]["suspend"] is True
            if child["apiVersion"] == "serving.knative.dev/v1":
                annotations = child["spec"]["template"]["metadata"]["annotations"]
                assert annotations["autoscaling.knative.dev/initial-scale"] == "0"
    suspended = parse_manifest(
        {
            **load_manifest("examples/countdown.yaml").model_dump(by_alias=True),
            "spec": {"suspend": True},
        }
    )
    deployments = [
        c for c in render(suspended, "ns", CONFIG, knative=False) if c["kind"] == "Deployment"
    ]
    assert deployments and all(d["spec"]["replicas"] == 0 for d in deployments)


def test_env_sessions_address_every_replica_and_deny_egress():
    job = parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "calc"},
            "spec": {"task": {"name": "calculator"}, "env": {"replicas": 3}},
        }
    )
    children = by_name(render(job, "ns", CONFIG, knative=True))
    rollout = children["Deployment", "calc-rollout-default"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in rollout["containers"][0]["env"]}
    urls = env["ROLLFLEET_ENV_URL"].split(",")
    assert urls == [f"http://calc-env-{i}.calc-env.ns.svc.cluster.local:8080" for i in range(3)]
    assert children["Service", "calc-env"]["spec"]["clusterIP"] == "None"
    policy = children["NetworkPolicy", names("calc")["env-egress"]]["spec"]
    assert policy["policyTypes"] == ["Egress"] and policy["egress"] == []
    assert policy["podSelector"]["matchLabels"] == {
        "rollfleet.io/job": "calc",
        "app.kubernetes.io/component": "env",
    }


def test_rendering_is_deterministic_but_tokens_are_not():
    job = load_manifest("examples/countdown.yaml")
    assert render(job, "ns", CONFIG, knative=True) == render(job, "ns", CONFIG, knative=True)
    first, second = (job_secret("countdown", "ns", "creds") for _ in range(2))
    assert first["stringData"]["service-token"] != second["stringData"]["service-token"]
    assert first["stringData"]["nats-creds"] == "creds"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_search_corpus_on_a_volume_reaches_the_trainer_and_env(workers):
    """QAgent on a user corpus: the task's volume is mounted read-only where the task's
    files are read (trainer pods, env sandboxes) and nowhere else; the reward pod (a
    Knative Service with the GPU of `reward.gpus`) gets a scratch run directory for its
    builtin reader."""
    job = parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "search"},
            "spec": {
                "task": {
                    "name": "qagent",
                    "params": {
                        "corpus": "/corpus/passages.jsonl",
                        "questions": "/corpus/train.jsonl",
                        "heldout": "/corpus/test.jsonl",
                    },
                    "volume": {"claimName": "wiki-passages", "mountPath": "/corpus"},
                },
                "trainer": {"workers": workers, "promptsPerStep": 8},
                "methods": {"qagent": {"stage": 2}},
                "reward": {"models": {"reader": "builtin:qagent-reader"}, "gpus": 1},
            },
        }
    )
    children = render(job, "ns", CONFIG, knative=True)
    reward = by_name(children)["Service", names("search")["reward"]]
    [container] = reward["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    with_files = set()
    for child in children:
        if child["apiVersion"] in CUSTOM:
            validate_custom_resource(child)
        else:
            kubernetes_validate.validate(child, "1.37", strict=True)
        for pod in pod_specs(child):
            mounts = [m for c in pod["containers"] for m in c["volumeMounts"]]
            if {"name": "task-files", "mountPath": "/corpus", "readOnly": True} in mounts:
                claim = {"claimName": "wiki-passages", "readOnly": True}
                assert {"name": "task-files", "persistentVolumeClaim": claim} in pod["volumes"]
                with_files.add(child["metadata"]["name"])
            if child["metadata"]["name"] == names("search")["reward"]:
                assert {"name": "run", "emptyDir": {}} in pod["volumes"]
                assert {"name": "run", "mountPath": "/var/lib/rollfleet"} in mounts
    assert with_files == {names("search")["trainer"], names("search")["env"]}


# --- a real model on a GPU cluster: resources, /dev/shm, tensor parallelism, overrides ------
def qwen_children() -> dict[tuple[str, str], dict]:
    job = load_manifest("examples/qwen-7b-h800-h20.yaml")
    return by_name(render(job, "team-a", CONFIG, knative=True))


def test_the_7b_example_gets_its_resources_shared_memory_and_tensor_parallel_gpus():
    children = qwen_children()
    compute = children["Deployment", "qwen-7b-rollout-compute"]["spec"]["template"]["spec"]
    bandwidth = children["Deployment", "qwen-7b-rollout-bandwidth"]["spec"]["template"]["spec"]
    assert compute["containers"][0]["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
    }
    # two GPUs per H20 worker: vLLM's tensor-parallel size comes from the same field
    assert bandwidth["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    for pod, size in ((compute, "8Gi"), (bandwidth, "16Gi")):
        shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}
        assert shm in pod["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    rayjob = children["RayJob", "qwen-7b-trainer"]["spec"]["rayClusterSpec"]
    head = rayjob["headGroupSpec"]["template"]["spec"]
    worker = rayjob["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"] == {
        "requests": {"cpu": "16", "memory": "256Gi"},
        "limits": {"memory": "256Gi", "nvidia.com/gpu": "2"},
    }
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in worker[
        "volumes"
    ]
    # the head runs the driver only: no GPU, no /dev/shm of its own
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert all(v["name"] != "dshm" for v in head["volumes"])


def test_the_7b_examples_pod_overrides_reach_the_pods_they_name():
    children = qwen_children()
    pods = {name: pod_specs(child) for (_, name), child in children.items() if pod_specs(child)}
    assert set(pods) == {
        "qwen-7b-rollout-compute",
        "qwen-7b-rollout-bandwidth",
        "qwen-7b-trainer",
        "qwen-7b-reward",
        "qwen-7b-env",
    }
    for name, specs in pods.items():
        trainer = name == "qwen-7b-trainer"
        for pod in specs:
            # spec.pod: every pod pulls with the secret
            assert pod["imagePullSecrets"] == [{"name": "regcred"}]
            volumes = {v["name"]: v for v in pod["volumes"]}
            # the components' own: the weights volume where versions are written and read
            assert ("weights" in volumes) == (name not in ("qwen-7b-reward", "qwen-7b-env"))
            assert (pod.get("priorityClassName") == "rl-training") == trainer
            # the Hugging Face cache: the trainer fetches the model, the pools get it from it
            assert ("model-cache" in volumes) == trainer
    cache = children["PersistentVolumeClaim", "qwen-7b-model-cache"]["spec"]
    assert cache["accessModes"] == ["ReadWriteMany"]  # four Ray trainer pods mount it
    assert cache["resources"]["requests"]["storage"] == "50Gi"


def test_labels_annotations_and_scheduling_overrides_add_to_the_operators():
    job = parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "tagged"},
            "spec": {
                "pod": {
                    "labels": {"team": "rl"},
                    "annotations": {"cost-center": "42"},
                    "serviceAccountName": "rl-jobs",
                    "runtimeClassName": "nvidia",
                    "nodeSelector": {"zone": "a"},
                    "tolerations": [{"key": "spot", "operator": "Exists"}],
                },
                "rollout": {
                    "pools": [{"name": "h20", "engine": "vllm", "gpuClass": "H20"}],
                },
            },
        }
    )
    children = by_name(render(job, "ns", CONFIG, knative=False))
    template = children["Deployment", "tagged-rollout-h20"]["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "rl"
    assert template["metadata"]["labels"]["rollfleet.io/pool"] == "h20"  # ours stay
    assert template["metadata"]["annotations"] == {"cost-center": "42"}
    pod = template["spec"]
    assert (pod["serviceAccountName"], pod["runtimeClassName"]) == ("rl-jobs", "nvidia")
    assert pod["automountServiceAccountToken"] is False  # the services never call the API
    # the GPU class's placement, and the job's on top
    assert pod["nodeSelector"] == {"rollfleet.io/node-profile": "bandwidth-optimised", "zone": "a"}
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "spot"]
    for child in children.values():
        kubernetes_validate.validate(child, "1.30", strict=True)


def cluster_job(**spec) -> dict:
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "j"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"pod": {"volumes": [{"name": "tmp", "emptyDir": {}}]}},
            r"spec\.pod or spec\.\w+\.pod\.volumes: 'tmp' is a volume the operator adds",
        ),
        (
            {"trainer": {"pod": {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}}},
            r"spec\.pod or spec\.trainer\.pod\.volumeMounts: /data mounts volume 'data', which no volume",
        ),
        (
            {
                "pod": {
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}],
                }
            },
            r"volumeMounts: /tmp is where the operator mounts its own volume",
        ),
        (
            {"trainer": {"gpusPerWorker": 4, "resources": {"limits": {"memory": "8Gi"}}}},
            r"spec\.trainer\.sharedMemory: /dev/shm of 8Gi \(2Gi per GPU unless set\) is not below resources\.limits\.memory \(8Gi\)",
        ),
    ],
)
def test_overrides_that_would_break_the_pod_name_the_field(spec, message):
    with pytest.raises(RenderError, match=message):
        render(parse_manifest(cluster_job(**spec)), "ns", CONFIG, knative=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"trainer": {"resources": {"requests": {"cpu": "two"}}}}, "requests.cpu"),
        (
            {"trainer": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
            "GPUs are set by the component's GPU count",
        ),
        (
            {"env": {"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}},
            r"requests.memory \(2Gi\) is above limits.memory \(1Gi\)",
        ),
        (
            {"reward": {"sharedMemory": "4Gi", "resources": {"limits": {"memory": "2Gi"}}}},
            r"sharedMemory \(4Gi\) must be below resources.limits.memory",
        ),
        ({"pod": {"labels": {"app.kubernetes.io/instance": "x"}}}, "select the job's pods"),
        (
            {"pod": {"env": [{"name": "ROLLFLEET_NATS_URL", "value": "nats://elsewhere"}]}},
            "wire the services together",
        ),
        ({"pod": {"env": [{"value": "1"}]}}, r"env\[0\] has no name"),
        (
            {"pod": {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}},
            "names must be unique",
        ),
        (
            {"rollout": {"pools": [{"name": "p", "gpusPerReplica": 2}]}},
            "set gpuClass and engine: vllm",
        ),
    ],
)
def test_bad_cluster_settings_are_refused_naming_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_manifest(cluster_job(**spec))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hugging_face_model_gets_a_cache_claim_and_its_token(workers):
    huggingface = {"id": "Qwen/Qwen2.5-7B-Instruct", "revision": "a09a3545", "tokenSecret": "hf"}
    job = parse_manifest(
        cluster_job(
            model={"huggingface": huggingface},
            trainer={"workers": workers, "promptsPerStep": 16},
        )
    )
    children = by_name(render(job, "ns", CONFIG, knative=False))
    claim = children["PersistentVolumeClaim", "j-model-cache"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    # a RayJob's pods all mount it, wherever Ray puts the leader rank that fetches
    assert claim["spec"]["accessModes"] == ["ReadWriteMany" if workers > 1 else "ReadWriteOnce"]
    trainer = children["RayJob" if workers > 1 else "StatefulSet", "j-trainer"]
    for pod in pod_specs(trainer):
        volume = {"name": "model-cache", "persistentVolumeClaim": {"claimName": "j-model-cache"}}
        assert volume in pod["volumes"]
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_HOME"]["value"] == "/var/cache/huggingface"
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
        assert {"name": "model-cache", "mountPath": "/var/cache/huggingface"} in container[
            "volumeMounts"
        ]
    # only the trainer loads the model: the pools take it from the trainer over NATS
    pool = children["Deployment", "j-rollout-default"]["spec"]["template"]["spec"]
    assert all(v["name"] != "model-cache" for v in pool["volumes"])
    for child in children.values():
        if child["apiVersion"] not in CUSTOM:
            kubernetes_validate.validate(child, "1.30", strict=True)
    # a claim the job names is used as it is, not created
    shared = parse_manifest(
        cluster_job(model={"huggingface": {**huggingface, "cacheClaim": "hf-cache"}})
    )
    kinds = {kind for kind, _ in by_name(render(shared, "ns", CONFIG, knative=False))}
    assert "PersistentVolumeClaim" not in kinds


def test_trackers_get_their_credentials_from_secrets_in_the_trainer_only():
    tracking = {
        "wandb": {"project": "rl", "apiKeySecret": "wandb"},
        "mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "tokenSecret": "mlflow"},
    }
    children = by_name(
        render(parse_manifest(cluster_job(tracking=tracking)), "ns", CONFIG, knative=False)
    )
    [trainer] = pod_specs(children["StatefulSet", "j-trainer"])
    env = {e["name"]: e for e in trainer["containers"][0]["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "apiKey"}}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlflow", "key": "token"}
    }
    [pool] = pod_specs(children["Deployment", "j-rollout-default"])
    assert not {"WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN"} & {
        e["name"] for e in pool["containers"][0]["env"]
    }
