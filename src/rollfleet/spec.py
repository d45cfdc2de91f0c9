"""The RLJob resource: spec and status as pydantic models, the one source of truth.

`crds/rljob.yaml` is generated from these models (`make crds`, see crd.py); the local
runtime and the operator both read manifests through `load_manifest`. Every section has
defaults, so a manifest with just a name and a task runs:

    apiVersion: rollfleet.io/v1alpha1
    kind: RLJob
    metadata: {name: countdown}
    spec: {task: {name: countdown}}
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from rollfleet.cel import Cel
from rollfleet.methods import METHODS, MethodParams

API_VERSION = "rollfleet.io/v1alpha1"
KIND = "RLJob"


def _registered(kind: str, registry: Callable[[], dict]) -> AfterValidator:
    """Validator: the name must be in a registry (looked up late: algorithms import torch)."""

    def check(name: str) -> str:
        names = registry()
        if name not in names:
            raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(names)}")
        return name

    return AfterValidator(check)


def _tasks():
    from rollfleet.tasks import TASKS

    return TASKS


def _advantages():
    from rollfleet.algorithms import ADVANTAGES

    return ADVANTAGES


def _policy_losses():
    from rollfleet.algorithms import POLICY_LOSSES

    return POLICY_LOSSES


def _aggregations():
    from rollfleet.algorithms import AGGREGATIONS

    return AGGREGATIONS


def _rewards():
    from rollfleet.rewards import REWARDS

    return REWARDS


def _architectures():
    from rollfleet.models.architectures import ARCHITECTURES

    return ARCHITECTURES


TaskName = Annotated[str, _registered("task", _tasks)]
AdvantageName = Annotated[str, _registered("advantage", _advantages)]
PolicyLossName = Annotated[str, _registered("policy loss", _policy_losses)]
RewardName = Annotated[str, _registered("reward function", _rewards)]
AggregationName = Annotated[str, _registered("loss aggregation", _aggregations)]
ArchitectureName = Annotated[str, _registered("architecture", _architectures)]


class Strict(BaseModel):
    """Unknown fields are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# Seeds go to torch (which takes up to 2**64) after the services scale them (a worker's
# is its seed x 100 + its replica), so they stay well below.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# A count Kubernetes keeps as an int32 (a Deployment's replicas).
MAX_REPLICAS = 2**31 - 1


# --- Kubernetes: resources, shared memory and pod overrides ----------------------------------
# Each component (a rollout pool, the trainer workers, reward, env) takes what a Kubernetes
# user writes in a pod spec; the operator applies it (rollfleet_operator.render) and
# `rollfleet run`, which starts processes, not pods, leaves it aside. A field holding a
# Kubernetes API object carries KUBE_SCHEMA: the CRD embeds Kubernetes' own schema for it
# (rollfleet.crd), and pydantic checks what the renderer relies on.
KUBE_SCHEMA = "x-rollfleet-kubernetes"
KUBE_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # an object's name (DNS subdomain)
# resource.Quantity's grammar (k8s.io/apimachinery): 500m, 2, 1.5Gi, 64Mi, 1e3
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_SUFFIXES = {
    **{s: 1024**i for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)},
    **{s: 1000**i for i, s in enumerate(("k", "M", "G", "T", "P", "E"), 1)},
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
}


def quantity_value(quantity: str) -> float:
    """A Kubernetes quantity as a number: "1.5Gi" -> 1610612736.0, "500m" -> 0.5."""
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * _QUANTITY_SUFFIXES[suffix]
    return float(quantity)  # plain, or with an exponent (1e3)


def _quantity_text(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # YAML reads `cpu: 2` as a number; Kubernetes takes both
    return value


Quantity = Annotated[
    str, BeforeValidator(_quantity_text), Field(pattern=QUANTITY_PATTERN, max_length=64)
]


def kube_field(definition: str, description: str, default: Any = None, **kwargs) -> Any:
    """A field holding Kubernetes API objects (`definition`, a name from its OpenAPI)."""
    extra = {KUBE_SCHEMA: definition}
    if isinstance(default, list) or kwargs.get("default_factory") is list:
        kwargs.setdefault("default_factory", list)
        return Field(description=description, json_schema_extra=extra, **kwargs)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def _named(kind: str, items: list[dict[str, Any]], *required: str) -> list[dict[str, Any]]:
    """Objects the renderer reads by name: each has its required keys, and names are unique."""
    names = []
    for i, item in enumerate(items):
        for key in ("name", *required):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ValueError(f"{kind}[{i}] has no {key}: give each one a {key}")
        names.append(item["name"])
    if len(set(names)) != len(names):
        raise ValueError(f"{kind}: names must be unique, got {names}")
    return items


class Resources(Strict):
    """Compute resources of one container (Kubernetes' ResourceRequirements). GPUs are not
    listed here: each component has one field for its GPU count, which sets the limit."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_gpus_and_requests_within_limits(self):
        for part in ("requests", "limits"):
            for name in getattr(self, part):
                if name.endswith("/gpu"):
                    raise ValueError(
                        f"{part}.{name}: GPUs are set by the component's GPU count "
                        "(rollout.pools[].gpusPerReplica, trainer.gpusPerWorker, reward.gpus), "
                        "not in resources"
                    )
        for name, request in self.requests.items():
            limit = self.limits.get(name)
            if limit is not None and quantity_value(request) > quantity_value(limit):
                raise ValueError(
                    f"requests.{name} ({request}) is above limits.{name} ({limit}): "
                    "a request cannot exceed its limit"
                )
        return self

    def as_kubernetes(self) -> dict[str, dict[str, str]]:
        return {
            part: dict(values) for part in ("requests", "limits") if (values := getattr(self, part))
        }


# Labels and environment variables the platform sets itself; an override may not change them.
RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", "rollfleet.io/")
RESERVED_ENV_PREFIX = "ROLLFLEET_"


class PodOverrides(Strict):
    """What a cluster needs and the operator cannot guess, for the pods of the whole job
    (spec.pod) or of one component (its `pod`, merged over the job's: names in maps and
    lists replace the job's, everything else adds to it)."""

    imagePullSecrets: list[dict[str, Any]] = kube_field(
        "io.k8s.api.core.v1.LocalObjectReference",
        "Secrets to pull the images from a private registry: [{name: regcred}]",
        default=[],
    )
    serviceAccountName: str | None = Field(
        None,
        pattern=KUBE_NAME,
        max_length=253,
        description="the pods' service account (the token is still not mounted: the "
        "services never call the Kubernetes API; cloud workload identity works without it)",
    )
    priorityClassName: str | None = Field(None, max_length=253)
    runtimeClassName: str | None = Field(
        None, max_length=253, description="e.g. nvidia, where GPU nodes need that runtime"
    )
    labels: dict[str, str] = Field(default_factory=dict, description="extra pod labels")
    annotations: dict[str, str] = Field(default_factory=dict, description="extra pod annotations")
    nodeSelector: dict[str, str] = Field(
        default_factory=dict, description="beyond the GPU class's (rollout pools)"
    )
    tolerations: list[dict[str, Any]] = kube_field(
        "io.k8s.api.core.v1.Toleration", "beyond the GPU class's", default=[]
    )
    env: list[dict[str, Any]] = kube_field(
        "io.k8s.api.core.v1.EnvVar",
        "extra environment variables of the main container (value or valueFrom)",
        default=[],
    )
    volumes: list[dict[str, Any]] = kube_field(
        "io.k8s.api.core.v1.Volume", "extra pod volumes", default=[]
    )
    volumeMounts: list[dict[str, Any]] = kube_field(
        "io.k8s.api.core.v1.VolumeMount",
        "mounts of those volumes in the main container",
        default=[],
    )

    @field_validator("labels")
    @classmethod
    def _platform_labels_stay(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(
                    f"{key}: labels under {list(RESERVED_LABEL_PREFIXES)} select the job's "
                    "pods and are set by the operator; use a label of your own"
                )
        return labels

    @field_validator("env")
    @classmethod
    def _platform_env_stays(cls, env: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for var in _named("env", env):
            if var["name"].startswith(RESERVED_ENV_PREFIX):
                raise ValueError(
                    f"env {var['name']}: {RESERVED_ENV_PREFIX}* variables wire the services "
                    "together and are set by the operator; set the manifest field instead"
                )
        return env

    @field_validator("imagePullSecrets", "volumes")
    @classmethod
    def _named_items(cls, items: list[dict[str, Any]], info) -> list[dict[str, Any]]:
        return _named(info.field_name, items)

    @field_validator("volumeMounts")
    @classmethod
    def _mounts_name_a_path(cls, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, mount in enumerate(mounts):
            for key in ("name", "mountPath"):
                if not isinstance(mount.get(key), str) or not mount[key]:
                    raise ValueError(f"volumeMounts[{i}] has no {key}")
        return mounts

    def over(self, base: PodOverrides | None) -> PodOverrides:
        """These overrides merged over `base` (the job's): this one wins on each name."""
        if base is None:
            return self

        def by(key: str, first: list[dict], second: list[dict]) -> list[dict]:
            merged = {item[key]: item for item in first}
            merged.update({item[key]: item for item in second})
            return list(merged.values())

        return PodOverrides.model_construct(
            imagePullSecrets=by("name", base.imagePullSecrets, self.imagePullSecrets),
            serviceAccountName=self.serviceAccountName or base.serviceAccountName,
            priorityClassName=self.priorityClassName or base.priorityClassName,
            runtimeClassName=self.runtimeClassName or base.runtimeClassName,
            labels={**base.labels, **self.labels},
            annotations={**base.annotations, **self.annotations},
            nodeSelector={**base.nodeSelector, **self.nodeSelector},
            tolerations=[*base.tolerations, *self.tolerations],
            env=by("name", base.env, self.env),
            volumes=by("name", base.volumes, self.volumes),
            volumeMounts=by("mountPath", base.volumeMounts, self.volumeMounts),
        )


class PodSettings(Strict):
    """A component's container resources, shared memory and pod overrides (mixed in)."""

    resources: Resources | None = kube_field(
        "io.k8s.api.core.v1.ResourceRequirements",
        "the container's requests and limits, as in a pod spec; default: what the builtin "
        "model needs (README: Resources)",
    )
    sharedMemory: Quantity | None = Field(
        None,
        description="size of a memory-backed /dev/shm (vLLM, NCCL); it counts against the "
        "memory limit. Default: 2Gi per GPU, none on CPU",
    )
    pod: PodOverrides | None = Field(None, description="over spec.pod, for these pods only")

    @model_validator(mode="after")
    def _shared_memory_fits(self):
        limit = self.resources.limits.get("memory") if self.resources else None
        if (
            self.sharedMemory
            and limit
            and quantity_value(self.sharedMemory) >= quantity_value(limit)
        ):
            raise ValueError(
                f"sharedMemory ({self.sharedMemory}) must be below resources.limits.memory "
                f"({limit}): /dev/shm is memory the container's limit counts"
            )
        return self


class WarmupSpec(Strict):
    """Supervised warm-up on the task's demonstrations before RL (builtin model only)."""

    steps: int = Field(300, ge=0, description="SFT steps; 0 skips the warm-up")
    batchSize: int = Field(64, ge=1)
    learningRate: float = Field(3e-3, gt=0, description="peak rate, decayed linearly to 0")
    examples: int | None = Field(
        1024, ge=1, description="distinct train examples to learn from; null = the whole split"
    )


class HuggingFaceSource(Strict):
    """A model on the Hugging Face Hub, fetched once into the job's cache
    (rollfleet.models.source)."""

    id: str = Field(
        pattern=r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$",
        max_length=96,
        description="the model's id: org/name",
    )
    revision: str = Field(
        "main",
        pattern=r"^[\w][\w./-]*$",
        max_length=255,
        description="a commit, tag or branch; a commit pins the run (a resume must resolve "
        "the same commit)",
    )
    tokenSecret: str | None = Field(
        None,
        pattern=KUBE_NAME,
        max_length=253,
        description="a Secret whose key `token` is a Hugging Face token, for gated or "
        "private models (locally: the HF_TOKEN variable)",
    )
    cacheClaim: str | None = Field(
        None,
        pattern=KUBE_NAME,
        max_length=253,
        description="a PersistentVolumeClaim holding the Hugging Face cache, shared by jobs; "
        "default: the operator creates <job>-model-cache for this job",
    )
    cacheSize: Quantity = Field("100Gi", description="size of the claim the operator creates")


class ModelSpec(Strict):
    path: str | None = Field(
        None,
        description="Hugging Face model folder (locally, or on a volume the pods mount); "
        "empty (and no huggingface) means the builtin tiny Llama",
    )
    huggingface: HuggingFaceSource | None = Field(
        None, description="or a model id on the Hugging Face Hub at a revision"
    )
    architecture: ArchitectureName = Field(
        "llama",
        description="builtin model: registered architecture (rollfleet.models.architectures)",
    )
    hidden: int = Field(128, ge=8, description="builtin model: hidden size")
    layers: int = Field(4, ge=1, description="builtin model: transformer layers")
    heads: int = Field(4, ge=1, description="builtin model: attention heads")
    maxLength: int = Field(64, ge=8, description="longest sequence (prompt + response), tokens")
    warmup: WarmupSpec = WarmupSpec()

    __cel__ = (
        Cel(
            "{self.hidden} % {self.heads} == 0",
            "model.heads must divide model.hidden",
            field_path=".heads",
        ),
        Cel(
            "!has(self.path) || !has(self.huggingface)",
            "model.path and model.huggingface name two models: keep one",
            field_path=".huggingface",
            reason="FieldValueForbidden",
        ),
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.path and self.huggingface:
            raise ValueError("model.path and model.huggingface name two models: keep one")
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden % self.heads:
            raise ValueError(f"model.heads ({self.heads}) must divide model.hidden ({self.hidden})")
        return self


class TaskVolume(Strict):
    """Where a cluster keeps the task's files (a corpus, datasets): a PersistentVolumeClaim
    the operator mounts read-only in the trainer and env pods; `task.params` paths then
    point below `mountPath`. `rollfleet run` reads local paths and ignores it."""

    claimName: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="the PersistentVolumeClaim in the job's namespace",
    )
    mountPath: str = Field("/data", pattern=r"^/", description="where the pods see it")


class TaskSpec(Strict):
    name: TaskName = Field(
        "countdown",
        description="registered task: countdown, chain_sum, jsonl, calculator, solve, recommend, qagent, recgpt, mixed",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="task-specific parameters")
    heldoutLimit: int | None = Field(
        None, ge=1, description="evaluate on at most this many held-out prompts"
    )
    volume: TaskVolume | None = Field(
        None, description="a cluster's volume holding the task's files (mounted read-only)"
    )
    secret: str | None = Field(
        None,
        pattern=KUBE_NAME,
        max_length=253,
        description="a Secret whose keys become environment variables of the pods that read "
        "the task's files (trainer, env): object-store credentials for s3:// or gs:// paths, "
        "such as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    )

    @model_validator(mode="after")
    def _params_fit_the_task(self):
        from rollfleet.tasks import check_task_params

        check_task_params(self.name, self.params)  # names the parameter; files are read later
        return self


class AlgorithmSpec(Strict):
    advantage: AdvantageName = Field("grpo", description="registered advantage estimator")
    policyLoss: PolicyLossName = Field(
        "ppo_clip",
        description="registered policy loss: vanilla_pg, ppo_clip, dual_clip_ppo, tis, topr, cispo, decoupled_ppo, gspo, kimi",
    )
    advantageEpsilon: float = Field(
        1e-4,
        ge=0,
        description="added to the std that grpo and reinforce++ divide by (TRL's GRPOTrainer uses 1e-4)",
    )
    lossAggregation: AggregationName = Field(
        "token-mean", description="token-mean, seq-mean-token-mean or seq-mean-token-sum"
    )
    clipEpsilon: float = Field(0.2, gt=0, lt=1, description="ratio clip: 1 - eps (and 1 + eps)")
    clipEpsilonHigh: float | None = Field(
        None,
        gt=0,
        description="upper ratio clip 1 + this (asymmetric clipping); default clipEpsilon",
    )
    dualClip: float = Field(3.0, gt=1, description="dual_clip_ppo: bound c on negative advantages")
    importanceCap: float = Field(2.0, gt=0, description="tis: importance weights truncated here")
    klCoef: float = Field(0.1, ge=0, description="kimi: weight τ of the squared log-ratio")
    learningRate: float = Field(5e-4, gt=0)
    learningRateSchedule: Literal["constant", "linear"] = Field(
        "constant", description="linear decays to 0 at the last step"
    )
    maxGradNorm: float = Field(1.0, gt=0)
    miniBatches: int = Field(
        1,
        ge=1,
        description="optimizer updates per epoch over a batch, each on an equal share of its prompt groups",
    )
    epochs: int = Field(
        1, ge=1, description="passes over each batch (the PPO inner loop); one version per batch"
    )

    def loss_config(self):
        from rollfleet.algorithms.losses import LossConfig

        return LossConfig(
            clip_low=self.clipEpsilon,
            clip_high=self.clipEpsilonHigh,
            dual_clip=self.dualClip,
            is_cap=self.importanceCap,
            kl_coef=self.klCoef,
        )


class AsyncSpec(Strict):
    """How rollouts overlap training (ROLL Flash's fine-grained scheduling switches)."""

    ratio: int = Field(
        1,
        ge=0,
        description="staleness bound α: samples may be at most α policy versions old; 0 is synchronous",
    )
    rewardPerSample: bool = Field(
        False,
        description="score each sample as soon as it finishes (queue scheduling); false: a task's samples together",
    )
    replicatePrompts: bool = Field(
        False,
        description="split a group of n samples into n single-sample tasks spread over workers",
    )
    envAsync: bool = Field(
        True,
        description="each env session advances on its own; false: a group's sessions take turns in lockstep",
    )
    redundantGroups: int = Field(
        0,
        ge=0,
        description="prompt groups started beyond what the batches need; stragglers are cancelled once a later group is trained",
    )
    partialRollout: Literal["continue", "reprefill"] = Field(
        "continue",
        description="on a weight swap, in-flight samples keep their tokens and versions and continue on the old KV cache, or re-prefill it under the new weights (vllm pools: reprefill also turns prefix caching on, cleared at every swap)",
    )


class SamplingSpec(Strict):
    groupSize: int = Field(8, ge=1, description="responses sampled per prompt (the GRPO group)")
    temperature: float = Field(1.0, ge=0)
    topP: float = Field(1.0, gt=0, le=1)
    maxNewTokens: int = Field(12, ge=1, description="tokens per model turn")
    seed: Seed | None = Field(
        None,
        description="seed of the rollout engines' sampling (and of methods' random draws); "
        "default spec.seed. Vary it alone to repeat a run from the same task and warm-up",
    )


class PoolSpec(PodSettings):
    name: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    replicas: int = Field(2, ge=1, le=MAX_REPLICAS, description="rollout workers in this pool")
    engine: Literal["torch", "vllm"] = "torch"
    gpuClass: str | None = Field(
        None, description="GPU class for placement (e.g. H800, H20); none = CPU"
    )
    maxBatch: int = Field(64, ge=1, description="sequences decoded together (engine slots)")
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch engine: CPU threads per worker (the pod requests as many CPUs); "
        "default: 1 in a cluster, and locally a share of the machine's cores "
        "(rollfleet.local.runtime.torch_threads)",
    )
    gpusPerReplica: int = Field(
        1,
        ge=1,
        le=16,
        description="GPUs per worker of a GPU pool: vLLM's tensor-parallel size (the "
        "model's attention heads must divide by it) and the pod's GPU limit",
    )
    prefers: Literal["prefill", "decode", "any"] = Field(
        "any",
        description="affinity routing: the work this pool is best at; prefill = many turns and "
        "long contexts (compute-bound: compute-optimised GPUs such as H800), decode = long "
        "generations (bandwidth-bound: H20), any = no preference",
    )

    __cel__ = (
        Cel(
            '{self.gpusPerReplica} == 1 || (has(self.gpuClass) && {self.engine} == "vllm")',
            "gpusPerReplica above 1 shards a vLLM engine over a replica's GPUs: set gpuClass "
            "and engine: vllm, or gpusPerReplica: 1",
            field_path=".gpusPerReplica",
        ),
    )

    @model_validator(mode="after")
    def _tensor_parallel_needs_vllm_on_gpus(self):
        if self.gpusPerReplica > 1 and (self.engine != "vllm" or not self.gpuClass):
            raise ValueError(
                f"gpusPerReplica ({self.gpusPerReplica}) above 1 shards a vLLM engine over a "
                "replica's GPUs: set gpuClass and engine: vllm, or gpusPerReplica: 1"
            )
        return self


MAX_POOLS = 16  # bounds the cost of the CRD's CEL rules that iterate over the pools


class RolloutSpec(Strict):
    pools: list[PoolSpec] = Field(
        default_factory=lambda: [PoolSpec()], min_length=1, max_length=MAX_POOLS
    )
    sampling: SamplingSpec = SamplingSpec()
    routing: Literal["shared", "affinity"] = Field(
        "shared",
        description="shared: every pool pulls from one task queue; affinity: the trainer sends "
        "each task to a pool that prefers its profile (prefill- or decode-heavy), or to another "
        "pool while that one is saturated",
    )
    prefillRatio: float = Field(
        4.0,
        gt=0,
        description="affinity routing: a task is prefill-heavy when its episodes hold more "
        "than this many prompt and observation tokens per generated token",
    )
    taskAckWaitSeconds: float = Field(
        30,
        ge=1,
        le=3600,
        description="a task whose worker died goes to another worker after this long; "
        "workers report progress on their tasks three times as often. Shorter recovers "
        "faster from a dead worker; a worker stalled longer than this has its task "
        "generated twice (the trainer keeps one copy of each sample)",
    )
    saturatedBacklog: float = Field(
        2.0,
        gt=0,
        description="affinity routing: a pool is saturated while its queue holds more than this "
        "many times the tasks its workers run at once; its tasks then fall back",
    )

    __cel__ = (
        Cel(
            "!has(self.pools) || self.pools.all(p, self.pools.exists_one(q, {q.name} == {p.name}))",
            "pool names must be unique",
            field_path=".pools",
            reason="FieldValueDuplicate",
        ),
        Cel(
            '{self.routing} == "affinity" || !has(self.pools) || '
            'self.pools.all(p, {p.prefers} == "any")',
            "a pool that prefers prefill or decode work needs routing: affinity (with routing: "
            "shared every pool pulls from one queue)",
            field_path=".routing",
            reason="FieldValueForbidden",
        ),
    )

    @field_validator("pools")
    @classmethod
    def _unique_names(cls, pools: list[PoolSpec]) -> list[PoolSpec]:
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        return pools

    @model_validator(mode="after")
    def _preferences_need_affinity_routing(self):
        preferring = [p.name for p in self.pools if p.prefers != "any"]
        if preferring and self.routing != "affinity":
            raise ValueError(
                f"pools {preferring} prefer prefill or decode work, which needs routing: "
                "affinity (with routing: shared every pool pulls from one queue)"
            )
        return self


class TrainerSpec(PodSettings):
    steps: int = Field(200, ge=1, description="RL steps (policy versions) to train")
    promptsPerStep: int = Field(16, ge=1, description="prompts (groups) per training batch")
    workers: int = Field(1, ge=1, description="data-parallel trainer workers (>1 uses Ray Train)")
    gpusPerWorker: int = Field(
        0, ge=0, description="GPUs per trainer worker; 0 trains on CPU (gloo instead of NCCL)"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with several workers: ddp replicates the model, fsdp (FSDP2) shards it",
    )
    evalSamples: int = Field(
        4, ge=1, description="answers sampled per held-out prompt; accuracy is their mean (avg@k)"
    )
    sharePrefix: bool = Field(
        True,
        description="compute the tokens a group's samples share from the start (the prompt, "
        "and the turns they share in multi-turn episodes) once in the forward and backward "
        "(exact); false: every sample whole",
    )
    skipZeroAdvantage: bool = Field(
        True,
        description="leave the groups whose every token has advantage 0 (GRPO: all samples "
        "scored alike) out of the forward and backward, where the policy loss gives such "
        "tokens no gradient and no method computes the log-probs or adds a loss term; they "
        "still count in the loss's denominator, so the update is the same (exact); false: "
        "every group computed",
    )
    evalEvery: int = Field(
        0, ge=0, description="held-out evaluation every N steps; 0 = only at start and end"
    )

    __cel__ = (
        Cel(
            "{self.promptsPerStep} % {self.workers} == 0",
            "promptsPerStep must be a multiple of workers: each trainer worker trains an equal share",
            field_path=".promptsPerStep",
        ),
    )

    @model_validator(mode="after")
    def _workers_divide_batch(self):
        if self.promptsPerStep % self.workers:
            raise ValueError(
                f"promptsPerStep ({self.promptsPerStep}) must be a multiple of "
                f"workers ({self.workers}): each trainer worker trains an equal share"
            )
        return self


class RewardFunctionSpec(Strict):
    name: RewardName
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)


class RewardClientSpec(Strict):
    """How rollout workers call the reward service (rollfleet_rollout.reward_client)."""

    timeoutSeconds: float = Field(
        30, gt=0, description="per call; a model-based reward on a cold replica needs the most"
    )
    attempts: int = Field(4, ge=1, le=20, description="tries per call before its samples fail")
    backoffSeconds: float = Field(
        0.2, gt=0, description="first wait between tries; doubles each time, fully jittered"
    )
    maxBackoffSeconds: float = Field(5, gt=0, description="longest wait between tries")
    breakerFailures: int = Field(
        5,
        ge=1,
        description="failed calls in a row that open the circuit: samples then fail at once",
    )
    breakerOpenSeconds: float = Field(
        10, gt=0, description="how long the circuit stays open before one trial call"
    )
    outageWaitSeconds: float = Field(
        300,
        ge=0,
        description="how long a worker keeps samples the reward service could not score "
        "(unreachable, timing out, 502-504, circuit open) and tries again before they fail; "
        "the trainer waits with them, so a shorter outage skips no prompt. 0: fail at once",
    )


class RewardSpec(PodSettings):
    functions: list[RewardFunctionSpec] = Field(
        default_factory=list, description="weighted reward functions; empty = the task's verifier"
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="models the reward service loads for model-based functions (a reader, a "
        "judge): name -> Hugging Face model folder, or builtin:<name> (a builtin task's model, "
        "e.g. builtin:qagent-reader, trained where it is served); a function's params.model "
        "names one",
    )
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    gpus: int = Field(
        0, ge=0, le=8, description="GPUs per reward replica; its models run on the first"
    )
    maxScale: int = Field(4, ge=1, le=MAX_REPLICAS, description="Knative max scale")
    targetConcurrency: int = Field(16, ge=1, description="Knative target concurrency")
    client: RewardClientSpec = RewardClientSpec()
    latencyMs: float = Field(
        0,
        ge=0,
        description="emulated device time per scoring request (benchmarks): requests on a "
        "replica take turns, as on one GPU",
    )
    latencyTail: float = Field(0, ge=0, description="Pareto tail of that time; 0 = constant")

    @field_validator("models")
    @classmethod
    def _builtin_models_exist(cls, models: dict[str, str]) -> dict[str, str]:
        from rollfleet.rewards import builtin_model_error

        for name, source in models.items():
            if (error := builtin_model_error(source)) is not None:
                raise ValueError(f"models.{name}: {error}")
        return models


class EnvSpec(PodSettings):
    replicas: int = Field(1, ge=1)
    sessionTimeoutSeconds: float = Field(
        300, gt=0, description="idle sessions are closed after this"
    )
    stepLatencyMs: float = Field(0, ge=0, description="added latency per env step (benchmarks)")
    latencyTail: float = Field(0, ge=0, description="Pareto tail of the latency; 0 = constant")
    stepTimeoutSeconds: float = Field(
        10,
        gt=0,
        le=3600,
        description="a step (or session open) running longer is stopped: its sandbox process is killed and restarted, its sample fails (step_timeout) and the other sessions of that sandbox are lost",
    )
    stepMemoryMB: float = Field(
        512,
        ge=16,
        le=65536,
        description="address space a step may map beyond what its sandbox maps before it (RLIMIT_AS); past it the step fails (step_memory)",
    )
    sandboxes: int = Field(
        2,
        ge=1,
        le=64,
        description="sandbox processes per env replica, each running one step at a time for the sessions pinned to it",
    )


class WeightsSpec(Strict):
    transport: Literal["nats", "filesystem"] = Field(
        "nats",
        description="where versions are stored: the NATS object store, or a shared folder (a PVC) for large models; `rollfleet run` uses filesystem unless this is set",
    )
    path: str | None = Field(
        None,
        description="filesystem transport: the shared folder; default <run dir>/weights",
    )
    bucketMB: float = Field(
        64, gt=0, description="weights are published in buckets of about this many MB"
    )
    maxPausedFraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of a pool's workers that may pause for a weight swap at once (at least one, never all of several)",
    )

    def swap_slots(self, replicas: int) -> int:
        """How many of a pool's `replicas` workers may swap weights at the same time."""
        if replicas == 1:
            return 1
        return min(max(1, int(replicas * self.maxPausedFraction)), replicas - 1)


class CheckpointSpec(Strict):
    every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    keep: int = Field(2, ge=1, description="checkpoints kept on disk")
    exportTo: str | None = Field(
        "export",
        min_length=1,
        description="where the final policy goes as a Hugging Face model folder when the job "
        "ends: a folder (relative: in the run directory) or an fsspec URL (s3://, gs://; "
        "credentials from the environment); null: no export (rollfleet export does it later)",
    )


class WandbSpec(Strict):
    project: str = Field(min_length=1, max_length=128, description="the W&B project")
    entity: str | None = Field(None, description="team or user; default: the API key's")
    mode: Literal["online", "offline"] = Field(
        "online",
        description="offline writes the run's files into the run directory (`wandb sync` "
        "uploads them later); online needs WANDB_API_KEY",
    )
    apiKeySecret: str | None = Field(
        None,
        pattern=KUBE_NAME,
        max_length=253,
        description="a Secret whose key `apiKey` is the W&B API key, given to the trainer as "
        "WANDB_API_KEY (locally: set the variable)",
    )


class MlflowSpec(Strict):
    trackingUri: str = Field(
        min_length=1,
        max_length=2048,
        description="the MLflow tracking server (http://mlflow.mlflow:5000) or store",
    )
    experiment: str | None = Field(None, max_length=500, description="default: the job's name")
    tokenSecret: str | None = Field(
        None,
        pattern=KUBE_NAME,
        max_length=253,
        description="a Secret whose key `token` is the server's bearer token, given to the "
        "trainer as MLFLOW_TRACKING_TOKEN (locally: set the variable)",
    )


class TrackingSpec(Strict):
    """Step metrics to experiment trackers, beside metrics.jsonl and Prometheus
    (rollfleet_trainer.tracking)."""

    wandb: WandbSpec | None = Field(None, description="Weights & Biases")
    mlflow: MlflowSpec | None = Field(None, description="MLflow")


def _methods_spec() -> type[BaseModel]:
    """`spec.methods`: one optional field per registered method, typed by its parameters."""
    fields: dict[str, Any] = {
        name: (info.params | None, Field(None, description=info.summary))
        for name, info in sorted(METHODS.items())
    }
    return create_model(
        "MethodsSpec", __base__=Strict, __doc__="Method modules switched on, by name.", **fields
    )


MethodsSpec = _methods_spec()


class RLJobSpec(Strict):
    seed: Seed = 0
    model: ModelSpec = ModelSpec()
    task: TaskSpec = TaskSpec()
    algorithm: AlgorithmSpec = AlgorithmSpec()
    async_: AsyncSpec = Field(AsyncSpec(), alias="async")
    rollout: RolloutSpec = RolloutSpec()
    trainer: TrainerSpec = TrainerSpec()
    reward: RewardSpec = RewardSpec()
    env: EnvSpec = EnvSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    weights: WeightsSpec = WeightsSpec()
    suspend: bool = False
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="experiment trackers: W&B, MLflow"
    )
    pod: PodOverrides = Field(
        default_factory=PodOverrides,
        description="every pod of the job: image pull secrets, service account, labels, "
        "extra env and volumes... (a component's own `pod` adds to these)",
    )
    methods: MethodsSpec = Field(
        default_factory=MethodsSpec,
        description="method modules switched on, each with its own parameters (README: Method modules)",
    )

    __cel__ = (
        Cel(  # _generation_fits_the_context
            "{self.rollout.sampling.maxNewTokens} < {self.model.maxLength}",
            "rollout.sampling.maxNewTokens must be below model.maxLength (the model's context, "
            "prompt and response together), leaving room for the prompt",
            field_path=".rollout.sampling.maxNewTokens",
        ),
        Cel(  # _mini_batches_divide_each_share (TrainerSpec checks workers itself)
            "{self.trainer.promptsPerStep} % {self.trainer.workers} != 0 || "
            "({self.trainer.promptsPerStep} / {self.trainer.workers}) % {self.algorithm.miniBatches} == 0",
            "each trainer worker's share of trainer.promptsPerStep must be a multiple of "
            "algorithm.miniBatches: every update trains an equal number of prompt groups",
            field_path=".algorithm.miniBatches",
        ),
        Cel(  # _lockstep_needs_whole_groups
            "{self.async.envAsync} || !{self.async.replicatePrompts}",
            "async.envAsync: false keeps a group's env sessions in lockstep, which needs the "
            "group in one task: set replicatePrompts: false (or envAsync: true)",
            field_path=".async.replicatePrompts",
            reason="FieldValueForbidden",
        ),
        # _methods_fit_the_job: each method's job-level rules, and the methods that run alone
        *(rule for _, info in sorted(METHODS.items()) for rule in info.params.__job_cel__),
        *(
            Cel(
                f"!has(self.methods) || !has(self.methods.{name}) || "
                + " && ".join(
                    f"!has(self.methods.{other})" for other in sorted(METHODS) if other != name
                ),
                f"methods.{name} runs alone: {info.params.__alone__}",
                field_path=".methods",
            )
            for name, info in sorted(METHODS.items())
            if info.params.__alone__
        ),
    )

    @model_validator(mode="after")
    def _generation_fits_the_context(self):
        # `rollfleet run` checks the task's own prompts too (cli._check_context)
        new, context = self.rollout.sampling.maxNewTokens, self.model.maxLength
        if new >= context:
            raise ValueError(
                f"rollout.sampling.maxNewTokens ({new}) must be below model.maxLength "
                f"({context}, the model's context, prompt and response together), leaving "
                "room for the prompt: lower maxNewTokens or raise maxLength"
            )
        return self

    @model_validator(mode="after")
    def _mini_batches_divide_each_share(self):
        share = self.trainer.promptsPerStep // self.trainer.workers
        if share % self.algorithm.miniBatches:
            raise ValueError(
                f"each trainer worker's share of trainer.promptsPerStep ({share}) must be a "
                f"multiple of algorithm.miniBatches ({self.algorithm.miniBatches}): every "
                "update trains an equal number of prompt groups"
            )
        return self

    @model_validator(mode="after")
    def _lockstep_needs_whole_groups(self):
        if not self.async_.envAsync and self.async_.replicatePrompts:
            raise ValueError(
                "async.envAsync: false keeps a group's env sessions in lockstep, which needs "
                "the group in one task: set replicatePrompts: false (or envAsync: true)"
            )
        return self

    @model_validator(mode="after")
    def _methods_fit_the_job(self):
        enabled = self.enabled_methods()
        for name, params in enabled:
            if params.__alone__ and len(enabled) > 1:
                others = [other for other, _ in enabled if other != name]
                raise ValueError(
                    f"methods.{name} runs alone: {params.__alone__}; {others} enabled beside it"
                )
            params.check_job(self)
        return self

    def sampling_seed(self) -> int:
        """The seed sampling starts from: rollout.sampling.seed, else the job's seed."""
        seed = self.rollout.sampling.seed
        return self.seed if seed is None else seed

    def enabled_methods(self) -> list[tuple[str, MethodParams]]:
        """(name, parameters) of each method switched on, in name order."""
        return [
            (name, params)
            for name in type(self.methods).model_fields
            if (params := getattr(self.methods, name)) is not None
        ]

    def reward_functions(self) -> list[tuple[str, float, dict[str, Any]]]:
        """The weighted reward functions: the manifest's, else a method's (BARD's), else
        the task's own verifier."""
        if self.reward.functions:
            return [(f.name, f.weight, f.params) for f in self.reward.functions]
        from rollfleet.tasks import TASKS

        verifier = TASKS[self.task.name].default_reward
        for _, params in self.enabled_methods():
            if (functions := params.reward_functions(verifier)) is not None:
                return functions
        return [(verifier, 1.0, {})]

    def verifier(self) -> str:
        """The reward function that decides held-out accuracy (the first one listed)."""
        return self.reward_functions()[0][0]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=50)
    namespace: str | None = None


class Condition(BaseModel):
    type: Literal["Ready", "Progressing", "Complete", "Failed", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class RLJobStatus(BaseModel):
    phase: Literal["Pending", "WarmingUp", "Running", "Suspended", "Succeeded", "Failed"] | None = (
        None
    )
    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    step: int | None = None
    policyVersion: int | None = None
    meanReward: float | None = None
    samplesPerSecond: float | None = None
    staleness: float | None = None
    heldoutAccuracy: float | None = None


class RLJob(Strict):
    apiVersion: Literal["rollfleet.io/v1alpha1"]
    kind: Literal["RLJob"]
    metadata: Metadata
    spec: RLJobSpec = RLJobSpec()
    status: RLJobStatus | None = None

    @property
    def bus_name(self) -> str:
        return bus_name(self.metadata.name, self.metadata.namespace)


def bus_name(name: str, namespace: str | None) -> str:
    """A job's name on the bus: namespaced in a cluster, where two namespaces may each run
    a job of the same name on one NATS."""
    return f"{namespace}.{name}" if namespace else name


class ManifestError(ValueError):
    """A manifest that does not validate; the message names every bad field."""


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class that holds the field at `loc` (for listing the allowed names)."""
    model: Any = RLJob
    for part in loc:
        if isinstance(part, int):
            continue
        by_alias = {f.alias or name: f for name, f in model.model_fields.items()}
        annotation = by_alias[part].annotation
        for arg in (*typing.get_args(annotation), annotation):
            inner = typing.get_args(arg)[0] if typing.get_origin(arg) is list else arg
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                model = inner
                break
        else:
            return None
    return model


def _format_errors(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            model = _model_at(e["loc"][:-1])
            allowed = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
            msg = "unknown field; allowed: " + ", ".join(allowed) if allowed else "unknown field"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def _non_finite(data: Any, path: str = ""):
    """(path, value) of every NaN or infinite number in a manifest's data, open maps
    (task.params) included: YAML writes them `.nan` and `.inf`, JSON cannot."""
    if isinstance(data, float) and not math.isfinite(data):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _non_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _non_finite(value, f"{path}.{i}")


def parse_manifest(data: Any, source: str = "manifest") -> RLJob:
    if bad := [f"  {path}: {value} is not a finite number" for path, value in _non_finite(data)]:
        raise ManifestError(f"{source} is not a valid RLJob:\n" + "\n".join(bad))
    try:
        return RLJob.model_validate(data)
    except ValidationError as e:
        raise ManifestError(f"{source} is not a valid RLJob:\n{_format_errors(e)}") from None


def read_yaml(path: str | Path, what: str, error: type[ManifestError] = ManifestError) -> Any:
    """A YAML file's data; `error` says the file (`what`: manifest, cluster file) is missing
    or is not YAML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {e}") from None


def load_manifest(path: str | Path) -> RLJob:
    """Read and validate an RLJob YAML file; ManifestError names each bad field."""
    return parse_manifest(read_yaml(path, "manifest"), str(path))
