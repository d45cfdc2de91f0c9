"""The status rules (status.py) without a cluster: phases, conditions, children's health."""

from __future__ import annotations

from rollfleet.protocol import Progress
from rollfleet_operator.status import (
    CONDITION_TYPES,
    Observation,
    child_problems,
    job_status,
    phase_of,
)


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_every_condition_is_written_with_the_generation():
    status = job_status(Observation(generation=4), None)
    assert status["phase"] == "Pending" and status["observedGeneration"] == 4
    assert [c["type"] for c in status["conditions"]] == list(CONDITION_TYPES)
    assert all(
        c["observedGeneration"] == 4 and c["lastTransitionTime"] for c in status["conditions"]
    )


def test_transition_time_moves_only_when_the_status_does():
    first = job_status(Observation(generation=1), None)
    for c in first["conditions"]:
        c["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    running = Observation(generation=1, progress=Progress(phase="Running", step=3, total_steps=9))
    second = conditions(job_status(running, first["conditions"]))
    assert second["Ready"]["status"] == "True"
    assert second["Ready"]["lastTransitionTime"] != "2026-01-01T00:00:00Z"  # False -> True
    assert second["Failed"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # still False
    assert second["Progressing"]["message"] == "step 3/9"


def test_failure_wins_over_everything_else():
    progress = Progress(phase="Succeeded")
    assert phase_of(Observation(1, progress=progress)) == "Succeeded"
    assert phase_of(Observation(1, progress=progress, failed=["RayJob x failed"])) == "Failed"
    assert phase_of(Observation(1, suspended=True, invalid="spec.x: bad")) == "Failed"
    assert phase_of(Observation(1, suspended=True)) == "Suspended"


def test_children_that_fail_or_degrade():
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "j-trainer"},
        "status": {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"},
    }
    assert child_problems(rayjob) == (None, "RayJob j-trainer failed: DeadlineExceeded")
    stuck = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "j-rollout-a"},
        "status": {
            "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
            ]
        },
    }
    degraded, failed = child_problems(stuck)
    assert failed is None and degraded.startswith(
        "Deployment j-rollout-a: ProgressDeadlineExceeded"
    )
    healthy = {**stuck, "status": {"conditions": [{"type": "Progressing", "status": "True"}]}}
    assert child_problems(healthy) == (None, None)
