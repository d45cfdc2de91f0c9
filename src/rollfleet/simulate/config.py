"""CLUSTER.yaml: the cluster, the model, the workload and the RLJob the simulator runs.

    from rollfleet.simulate.config import load_cluster
    cluster = load_cluster("examples/clusters/cluster-3000.yaml")          # the file as written
    cluster = load_cluster("examples/clusters/rollarc.yaml", variant="sync")  # with a variant applied

The job itself is an RLJob spec (embedded under `spec`, or a manifest named by `manifest`),
read with rollfleet.spec, so the simulator takes the fields the runtime takes: pools with
their replicas, gpuClass, maxBatch and prefers; routing, prefillRatio, saturatedBacklog;
async ratio, redundantGroups, replicatePrompts, rewardPerSample, envAsync, partialRollout;
groupSize and maxNewTokens; promptsPerStep, steps, workers, gpusPerWorker; the reward's
replicas, maxScale and targetConcurrency; env stepLatencyMs and latencyTail; the weights'
maxPausedFraction. What the RLJob has no field for (the GPU classes' spec-sheet figures,
efficiencies, the workload's distributions, GPUs per replica) is in the cluster file.
Unknown fields are errors, and every error names its field (ClusterError).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from rollfleet.spec import ManifestError, RLJobSpec, load_manifest, parse_manifest, read_yaml

CPU_CLASS = "cpu"  # where a pool without a gpuClass runs (the spec's "none = CPU")


class ClusterError(ManifestError):
    """A cluster file that does not validate; the message names every bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _number_is_constant(value: Any) -> Any:
    return {"dist": "const", "value": value} if isinstance(value, int | float) else value


class DistSpec(Strict):
    """A distribution: a number is a constant; otherwise `dist` and its parameters.
    `min`/`max` clip every draw (a response-length cap, say); `offset` is added first."""

    dist: Literal["const", "uniform", "lognormal", "normal", "pareto", "lomax"]
    value: float | None = None
    low: float | None = Field(None, description="uniform")
    high: float | None = Field(None, description="uniform")
    median: float | None = Field(None, gt=0, description="lognormal")
    sigma: float | None = Field(None, ge=0, description="lognormal: sd of the log")
    mean: float | None = Field(None, description="normal")
    sd: float | None = Field(None, ge=0, description="normal")
    scale: float | None = Field(None, gt=0, description="pareto: x_m; lomax: scale")
    shape: float | None = Field(None, gt=0, description="pareto, lomax: tail index")
    offset: float = 0.0
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_its_parameters(self):
        needs = {
            "const": ("value",),
            "uniform": ("low", "high"),
            "lognormal": ("median", "sigma"),
            "normal": ("mean", "sd"),
            "pareto": ("scale", "shape"),
            "lomax": ("scale", "shape"),
        }[self.dist]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"dist {self.dist} needs {', '.join(missing)}")
        return self


Dist = Annotated[DistSpec, BeforeValidator(_number_is_constant)]


class Efficiency(Strict):
    """Assumed shares of the spec-sheet peaks that the software reaches."""

    prefillMfu: float = Field(0.5, gt=0, le=1.5, description="prefill FLOP/s over peak")
    decodeMfu: float = Field(0.5, gt=0, le=1.5, description="compute part of a decode step")
    trainMfu: float = Field(0.35, gt=0, le=1.5, description="training FLOP/s over peak")
    bandwidthUtil: float = Field(0.7, gt=0, le=1, description="memory bandwidth over peak")
    memoryUtil: float = Field(0.9, gt=0, le=1, description="memory for weights + KV cache")
    stepOverheadS: float = Field(0.0, ge=0, description="fixed cost of one decode step")
    trainFlopsPerParamToken: float = Field(
        6.0, gt=0, description="6 = forward + backward; 8 adds a log-prob recompute"
    )


class EfficiencyOverride(Strict):
    """A class's own efficiencies, where they differ from the cluster's."""

    prefillMfu: float | None = Field(None, gt=0, le=1.5)
    decodeMfu: float | None = Field(None, gt=0, le=1.5)
    trainMfu: float | None = Field(None, gt=0, le=1.5)
    bandwidthUtil: float | None = Field(None, gt=0, le=1)
    memoryUtil: float | None = Field(None, gt=0, le=1)
    stepOverheadS: float | None = Field(None, ge=0)


class DeviceClass(Strict):
    count: int = Field(ge=1, description="devices of this class")
    flops: float = Field(gt=0, description="dense BF16 FLOP/s per device (spec sheet)")
    bandwidth: float = Field(gt=0, description="memory bandwidth, bytes/s per device")
    memoryGB: float = Field(gt=0, description="memory per device, GB (1e9 bytes)")
    sharedCores: bool = Field(
        False,
        description="the class is `count` CPU cores that every process placed on it shares "
        "(processor sharing, each process using at most one core)",
    )
    efficiency: EfficiencyOverride = EfficiencyOverride()


class Network(Strict):
    weightSyncGBps: float = Field(gt=0, description="a replica's fetch bandwidth, GB/s")
    storeGBps: float | None = Field(
        None, gt=0, description="the weight store's total bandwidth, shared by fetching replicas"
    )
    publishGBps: float = Field(25.0, gt=0, description="trainer -> weight store, GB/s")
    hostToDeviceGBps: float = Field(25.0, gt=0, description="swap into device memory, GB/s")
    publishS: float | None = Field(None, ge=0, description="measured publish time (overrides)")
    swapS: float | None = Field(None, ge=0, description="measured fetch+swap time (overrides)")


class ModelCfg(Strict):
    params: float = Field(gt=0, description="parameters (all experts of an MoE)")
    activeParams: float | None = Field(None, gt=0, description="MoE: parameters per token")
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    heads: int = Field(ge=1)
    kvHeads: int = Field(ge=1)
    headDim: int | None = Field(None, ge=1, description="default hidden / heads")
    bytesPerParam: float = Field(2.0, gt=0, description="2 = BF16")
    kvBytesPerElement: float = Field(2.0, gt=0)


class TaskType(Strict):
    """One kind of task in the mix; token counts per turn, latencies in seconds."""

    name: str
    share: float = Field(1.0, gt=0, description="relative frequency in the task stream")
    promptTokens: Dist
    turns: Dist = Field(default_factory=lambda: DistSpec(dist="const", value=1))
    responseTokens: Dist = Field(description="per turn, capped at spec maxNewTokens")
    obsTokens: Dist = Field(default_factory=lambda: DistSpec(dist="const", value=0))
    envLatencyS: Dist | None = Field(
        None, description="per env step; default spec.env stepLatencyMs / latencyTail"
    )
    rewardS: Dist = Field(
        default_factory=lambda: DistSpec(dist="const", value=0), description="per reward call"
    )


class Workload(Strict):
    tasks: list[TaskType] = Field(min_length=1)
    prefixCache: bool = Field(True, description="a turn prefills only its new tokens")
    lockstep: Literal["group", "batch"] = Field(
        "group",
        description="with spec async.envAsync false: a task's sessions take turns together "
        "(group, as the runtime) or a whole batch's on a replica (batch)",
    )
    padToLongest: bool = Field(False, description="the trainer pads samples to the longest")


class PoolPlacement(Strict):
    gpusPerReplica: int = Field(1, ge=1, description="devices one engine replica spans (TP)")
    deviceClass: str | None = Field(None, description="default the pool's gpuClass, else cpu")


class Placement(Strict):
    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="colocated: rollout and training take turns on the pools' devices "
        "(synchronous only)",
    )
    trainerClass: str | None = Field(None, description="the trainer's device class")
    oneStepOff: bool = Field(
        False, description="batch-level asynchrony: a whole batch is generated one step ahead"
    )
    colocateSwitchS: float = Field(0.0, ge=0, description="colocated: offload/reload per step")
    pools: dict[str, PoolPlacement] = Field(default_factory=dict)


class HostCosts(Strict):
    """CPU seconds the local services spend per event, charged to the rollout process (on
    shared cores they contend with everything else; on GPU clusters leave them 0)."""

    perSampleS: float = Field(0.0, ge=0, description="env open/close, publish, reward share")
    perEnvStepS: float = Field(0.0, ge=0)
    trainerPerSampleS: float = Field(0.0, ge=0, description="the trainer's per-sample handling")
    collectWindowS: float = Field(
        0.0,
        ge=0,
        description="the local trainer's trajectory fetch: when nothing is pending it lingers "
        "this long (bus.fetch timeout) before it sees what arrived; 0 = at once",
    )


class RewardCfg(Strict):
    mode: Literal["fixed", "serverless"] = Field(
        "fixed",
        description="fixed: spec.reward.replicas always up; serverless: scaled between 0 and "
        "spec.reward.maxScale at spec.reward.targetConcurrency requests per replica",
    )
    slotsPerReplica: int | None = Field(
        None, ge=1, description="requests one replica serves at once; default targetConcurrency"
    )
    coldStartS: float = Field(10.0, ge=0)
    scaleDownAfterS: float = Field(60.0, ge=0, description="Knative's stable window")
    gpuClass: str | None = Field(None, description="reward replicas' class (for utilisation)")


class SimCfg(Strict):
    steps: int | None = Field(None, ge=1, description="default spec.trainer.steps")
    trajectories: int | None = Field(None, ge=1, description="trained samples; sets steps")
    warmupSteps: int = Field(0, ge=0, description="steps left out of the throughput")
    seed: int = 0
    utilisationBins: int = Field(120, ge=10)


class Claim(Strict):
    """A measured or published ratio the simulator is checked against."""

    key: str = Field(description="name in the final line, e.g. rollflash.rlvr")
    what: str
    variant: str
    baseline: str
    paper: list[float] = Field(min_length=1, description="the figure, or a range [low, high]")
    kind: Literal["paper", "calibration", "sensitivity"] = Field(
        "paper", description="sensitivity: reported beside the paper's figure, not scored"
    )
    source: str = ""


class Sweep(Strict):
    gpuScales: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    alphas: list[int] = Field(default_factory=lambda: [0, 1, 2, 4])
    steps: int | None = Field(None, ge=1, description="steps per sweep run")


class ClusterFile(Strict):
    classes: dict[str, DeviceClass] = Field(min_length=1)
    network: Network
    efficiency: Efficiency = Efficiency()
    model: ModelCfg | None = Field(None, description="default: spec.model (builtin Llama)")
    workload: Workload
    placement: Placement = Placement()
    hostCosts: HostCosts = HostCosts()
    reward: RewardCfg = RewardCfg()
    simulate: SimCfg = SimCfg()
    spec: dict[str, Any] | None = Field(None, description="an RLJob spec")
    manifest: str | None = Field(None, description="or an RLJob manifest (relative to this file)")
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    claims: list[Claim] = Field(default_factory=list)
    sweep: Sweep | None = None
    validate_: list[str] = Field(
        default_factory=list, alias="validate", description="cluster files whose claims to run"
    )


class Cluster:
    """A validated cluster file with its RLJob spec and derived figures."""

    def __init__(self, file: ClusterFile, spec: RLJobSpec, path: Path, variant: str):
        self.file, self.spec, self.path, self.variant = file, spec, path, variant
        self.model = file.model or builtin_model(spec)

    def efficiency(self, cls: str) -> Efficiency:
        own = self.file.classes[cls].efficiency.model_dump(exclude_none=True)
        return self.file.efficiency.model_copy(update=own)

    def pool_class(self, pool) -> str:
        placed = self.file.placement.pools.get(pool.name, PoolPlacement())
        return placed.deviceClass or pool.gpuClass or CPU_CLASS

    def gpus_per_replica(self, pool) -> int:
        return self.file.placement.pools.get(pool.name, PoolPlacement()).gpusPerReplica

    def trainer_class(self) -> str:
        placement = self.file.placement
        if placement.mode == "colocated":
            return self.pool_class(self.spec.rollout.pools[0])
        return placement.trainerClass or CPU_CLASS

    def trainer_devices(self) -> int:
        """Devices training runs on (colocated: every pool's)."""
        if self.file.placement.mode == "colocated":
            return sum(p.replicas * self.gpus_per_replica(p) for p in self.spec.rollout.pools)
        t = self.spec.trainer
        return t.workers * max(t.gpusPerWorker, 1)

    def steps(self) -> int:
        sim = self.file.simulate
        if sim.trajectories:
            per_step = self.spec.trainer.promptsPerStep * self.spec.rollout.sampling.groupSize
            return max(1, -(-sim.trajectories // per_step))
        return sim.steps or self.spec.trainer.steps


def builtin_model(spec: RLJobSpec) -> ModelCfg:
    """The builtin Llama of spec.model (character vocabulary, MLP 4x, float32 on CPU)."""
    m, vocab = spec.model, 64
    per_layer = 4 * m.hidden**2 + 3 * m.hidden * 4 * m.hidden
    return ModelCfg(
        params=m.layers * per_layer + vocab * m.hidden,
        layers=m.layers,
        hidden=m.hidden,
        heads=m.heads,
        kvHeads=m.heads,
        bytesPerParam=4,
        kvBytesPerElement=4,
    )


def deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`; dicts merge key by key, null removes a key, anything
    else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in error.errors():
        where = prefix + ".".join(str(p) for p in e["loc"] if p != "function-after[...]")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {where or '(top level)'}: {msg}")
    return "\n".join(lines)


def _spec_of(file: ClusterFile, path: Path) -> RLJobSpec:
    if (file.spec is None) == (file.manifest is None):
        raise ClusterError(f"{path}: give exactly one of spec (an RLJob spec) or manifest (a file)")
    if file.manifest is not None:
        return load_manifest(path.parent / file.manifest).spec
    data = {"apiVersion": "rollfleet.io/v1alpha1", "kind": "RLJob"}
    try:
        job = parse_manifest({**data, "metadata": {"name": "simulate"}, "spec": file.spec})
    except ManifestError as e:
        raise ClusterError(
            f"{path}: {e}".replace("manifest is not a valid RLJob", "spec")
        ) from None
    return job.spec


def check_cluster(c: Cluster) -> None:
    """Cross-field checks: classes exist, devices suffice, policies fit the placement."""
    f, spec, errors = c.file, c.spec, []
    used: dict[str, int] = {}
    for i, pool in enumerate(spec.rollout.pools):
        cls = c.pool_class(pool)
        if cls not in f.classes:
            errors.append(
                f"spec.rollout.pools[{i}].gpuClass: {cls!r} is not in classes "
                f"(have {sorted(f.classes)})"
            )
            continue
        used[cls] = used.get(cls, 0) + pool.replicas * c.gpus_per_replica(pool)
    for name in f.placement.pools:
        if name not in {p.name for p in spec.rollout.pools}:
            errors.append(f"placement.pools.{name}: no pool of that name in spec.rollout.pools")
    trainer_cls = c.trainer_class()
    if trainer_cls not in f.classes:
        errors.append(f"placement.trainerClass: {trainer_cls!r} is not in classes")
    elif f.placement.mode == "disaggregated":
        used[trainer_cls] = used.get(trainer_cls, 0) + c.trainer_devices()
    if f.placement.mode == "colocated":
        if spec.async_.ratio != 0:
            errors.append("spec.async.ratio: colocated placement is synchronous: set it to 0")
        if len({c.pool_class(p) for p in spec.rollout.pools}) > 1:
            errors.append("placement.mode: colocated training needs every pool on one class")
    if f.placement.oneStepOff and spec.async_.ratio != 1:
        errors.append("placement.oneStepOff: one-step-off needs spec.async.ratio 1")
    if f.reward.gpuClass is not None and f.reward.gpuClass not in f.classes:
        errors.append(f"reward.gpuClass: {f.reward.gpuClass!r} is not in classes")
    for cls, n in used.items():
        if cls in f.classes and not f.classes[cls].sharedCores and n > f.classes[cls].count:
            errors.append(
                f"classes.{cls}.count: {f.classes[cls].count} devices, the job places {n} there"
            )
    names = {"main", *f.variants}
    for i, claim in enumerate(f.claims):
        for field in ("variant", "baseline"):
            if getattr(claim, field) not in names:
                errors.append(f"claims[{i}].{field}: no variant {getattr(claim, field)!r}")
    if not errors:
        from rollfleet.simulate.costs import replica_costs

        for i, pool in enumerate(spec.rollout.pools):
            if replica_costs(c, pool).kv_capacity_tokens <= 0:
                errors.append(
                    f"placement.pools.{pool.name}.gpusPerReplica: the model's weights do not "
                    f"fit in {c.gpus_per_replica(pool)} x {c.pool_class(pool)} "
                    f"(spec.rollout.pools[{i}])"
                )
    if errors:
        raise ClusterError(f"{c.path}: not a valid cluster file:\n" + "\n".join(errors))


def read_raw(path: str | Path) -> dict:
    data = read_yaml(path, "cluster file", ClusterError)
    if not isinstance(data, dict):
        raise ClusterError(f"{path}: expected a mapping at the top level")
    return data


def parse_cluster(
    data: dict, path: str | Path = "cluster", variant: str = "main", overrides: dict | None = None
) -> Cluster:
    """Validate a cluster file's data, with `variant`'s overrides and then `overrides` applied."""
    path = Path(path)
    if variant != "main":
        variants = data.get("variants") or {}
        if variant not in variants:
            raise ClusterError(f"{path}: variants.{variant}: no such variant")
        data = deep_merge(data, variants[variant])
    if overrides:
        data = deep_merge(data, overrides)
    try:
        file = ClusterFile.model_validate(data)
    except ValidationError as e:
        where = f" (variant {variant})" if variant != "main" else ""
        raise ClusterError(f"{path}{where} is not a valid cluster file:\n{_format(e)}") from None
    cluster = Cluster(file, _spec_of(file, path), path, variant)
    check_cluster(cluster)
    return cluster


def load_cluster(path: str | Path, variant: str = "main", overrides: dict | None = None) -> Cluster:
    return parse_cluster(read_raw(path), path, variant, overrides)
