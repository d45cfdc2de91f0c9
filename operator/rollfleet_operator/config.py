"""The operator's own settings: images, NATS, GPU classes, reward autoscaling, storage.

The Helm chart writes them from its values into a ConfigMap mounted at
`ROLLFLEET_OPERATOR_CONFIG` (default /etc/rollfleet-operator/config.yaml); every field has a
default, so the operator also starts without the file (tests build `OperatorConfig()` in code).

    images:
      rollout: ghcr.io/rollfleet/rollout:0.1.0        # torch engine (CPU or CUDA)
      rolloutVllm: ghcr.io/rollfleet/rollout-vllm:0.1.0
      trainer: ghcr.io/rollfleet/trainer:0.1.0
      reward: ghcr.io/rollfleet/reward:0.1.0
      env: ghcr.io/rollfleet/env:0.1.0
    nats: {url: "nats://rollfleet-nats:4222"}          # keys: $ROLLFLEET_NATS_SIGNER_DIR
    gpuClasses:                                         # a pool's gpuClass -> placement
      H800: {nodeSelector: {rollfleet.io/node-profile: compute-optimised}}
      H20:
        nodeSelector: {rollfleet.io/node-profile: bandwidth-optimised}
        tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    reward: {knative: auto}                             # auto | always | never
    trainer: {checkpointStorage: 20Gi, storageClassName: null, rayVersion: "2.60.0"}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONFIG_ENV = "ROLLFLEET_OPERATOR_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/rollfleet-operator/config.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Images(_Strict):
    rollout: str = "ghcr.io/rollfleet/rollout:0.1.0"
    rolloutVllm: str = "ghcr.io/rollfleet/rollout-vllm:0.1.0"
    trainer: str = "ghcr.io/rollfleet/trainer:0.1.0"
    reward: str = "ghcr.io/rollfleet/reward:0.1.0"
    env: str = "ghcr.io/rollfleet/env:0.1.0"
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class NatsConfig(_Strict):
    url: str = "nats://rollfleet-nats:4222"


class GpuClass(_Strict):
    """Where a pool of this GPU class runs; copied into its pods as they are."""

    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    resourceName: str = "nvidia.com/gpu"


class RewardConfig(_Strict):
    # auto: a Knative Service when the cluster serves the API. Its scale bounds and
    # concurrency target are the job's own (spec.reward.maxScale, targetConcurrency).
    knative: Literal["auto", "always", "never"] = "auto"


class TrainerConfig(_Strict):
    ray: bool = True  # KubeRay is installed: trainers with several workers run as RayJobs
    checkpointStorage: str = "20Gi"
    storageClassName: str | None = None
    rayVersion: str = "2.60.0"


class OperatorConfig(_Strict):
    images: Images = Images()
    nats: NatsConfig = NatsConfig()
    gpuClasses: dict[str, GpuClass] = Field(default_factory=dict)
    reward: RewardConfig = RewardConfig()
    trainer: TrainerConfig = TrainerConfig()


def load_config(path: str | None = None) -> OperatorConfig:
    """The settings file named by `path` or ROLLFLEET_OPERATOR_CONFIG; defaults if absent."""
    file = Path(path or os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_PATH))
    if not file.exists():
        return OperatorConfig()
    return OperatorConfig.model_validate(yaml.safe_load(file.read_text()) or {})
