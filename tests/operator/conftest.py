"""The operator tests' fixtures (helpers are in harness.py)."""

from __future__ import annotations

import pytest

from rollfleet_operator.config import OperatorConfig


@pytest.fixture
def nats_server(secure_nats):
    """NATS as the chart runs it: operator mode, each job's user minted by the operator."""
    return secure_nats


@pytest.fixture
def gpu_config() -> OperatorConfig:
    return OperatorConfig.model_validate(
        {
            "gpuClasses": {
                "H800": {"nodeSelector": {"rollfleet.io/node-profile": "compute-optimised"}},
                "H20": {
                    "nodeSelector": {"rollfleet.io/node-profile": "bandwidth-optimised"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                },
            }
        }
    )
