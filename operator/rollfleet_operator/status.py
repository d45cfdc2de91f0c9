"""An RLJob's status from what the operator observes: the trainer's progress and the children.

Pure functions, so every rule can be tested without a cluster:

    observed = Observation(generation=3, progress=progress, failures=["..."], suspended=False)
    status = job_status(observed, previous_conditions)

The phase is one of Pending, WarmingUp, Running, Suspended, Succeeded, Failed. Five
conditions are always written (Ready, Progressing, Complete, Failed, Degraded), each with
a reason, a message, the generation it describes and when its status last changed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from rollfleet.protocol import Progress

CONDITION_TYPES = ("Ready", "Progressing", "Complete", "Failed", "Degraded")


@dataclass
class Observation:
    generation: int
    progress: Progress | None = None
    suspended: bool = False
    invalid: str | None = None  # the message naming the bad field
    refused: str | None = None  # a spec change that cannot apply in place
    degraded: list[str] = field(default_factory=list)  # "child: what is wrong"
    failed: list[str] = field(default_factory=list)  # a child that ended the job


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def phase_of(obs: Observation) -> str:
    if obs.invalid or obs.failed or (obs.progress and obs.progress.phase == "Failed"):
        return "Failed"
    if obs.progress and obs.progress.phase == "Succeeded":
        return "Succeeded"
    if obs.suspended:
        return "Suspended"
    if obs.progress and obs.progress.phase in ("WarmingUp", "Running"):
        return obs.progress.phase
    return "Pending"


def _conditions(obs: Observation, phase: str) -> dict[str, tuple[str, str, str]]:
    """type -> (status, reason, message)."""
    progress = obs.progress
    if obs.invalid:
        failed = ("True", "InvalidSpec", obs.invalid)
    elif obs.failed:
        failed = ("True", "ChildFailed", "; ".join(obs.failed))
    elif progress and progress.phase == "Failed":
        failed = ("True", "TrainerFailed", progress.message or "the trainer reported a failure")
    else:
        failed = ("False", "NoFailure", "")

    if obs.degraded:
        degraded = ("True", "ChildUnhealthy", "; ".join(obs.degraded))
    else:
        degraded = ("False", "ChildrenHealthy", "")

    if phase == "Succeeded":
        complete = ("True", "TrainingFinished", progress.message if progress else "")
    else:
        complete = ("False", "NotFinished", "")

    if obs.refused:
        progressing = ("False", "SpecChangeRefused", obs.refused)
    elif phase in ("Pending", "WarmingUp", "Running"):
        step = f"step {progress.step}/{progress.total_steps}" if progress else "starting"
        progressing = ("True", phase, step)
    else:
        progressing = ("False", phase, "")

    if phase in ("WarmingUp", "Running") and not obs.degraded:
        ready = ("True", "Training", "the trainer reports progress")
    else:
        ready = ("False", phase, "")
    return {
        "Ready": ready,
        "Progressing": progressing,
        "Complete": complete,
        "Failed": failed,
        "Degraded": degraded,
    }


def job_status(obs: Observation, previous: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The status to write; lastTransitionTime moves only when a condition's status changes."""
    phase = phase_of(obs)
    before = {c.get("type"): c for c in previous or []}
    conditions = []
    for kind, (status, reason, message) in _conditions(obs, phase).items():
        old = before.get(kind)
        changed = old is None or old.get("status") != status
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now() if changed else old.get("lastTransitionTime"),
                "observedGeneration": obs.generation,
            }
        )
    out: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": obs.generation,
        "conditions": conditions,
    }
    if obs.progress:
        p = obs.progress
        out |= {
            "step": p.step,
            "policyVersion": p.policy_version,
            "meanReward": p.mean_reward,
            "samplesPerSecond": p.samples_per_second,
            "staleness": p.staleness,
            "heldoutAccuracy": p.heldout_after if p.heldout_after is not None else p.heldout_before,
        }
    return out


# --- children's health ----------------------------------------------------------------------
def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in obj.get("status", {}).get("conditions", []) or []:
        if c.get("type") == kind:
            return c
    return None


def child_problems(child: dict[str, Any]) -> tuple[str | None, str | None]:
    """(degraded, failed) messages for one child as the API server reports it, or Nones."""
    kind, name = child["kind"], child["metadata"]["name"]
    status = child.get("status", {}) or {}
    if kind == "RayJob":
        if status.get("jobStatus") == "FAILED" or status.get("jobDeploymentStatus") == "Failed":
            return (
                None,
                f"RayJob {name} failed: {status.get('message') or status.get('reason', '')}",
            )
        return None, None
    if kind == "Deployment":
        progressing = _condition(child, "Progressing")
        if progressing and progressing.get("status") == "False":
            return (
                f"Deployment {name}: {progressing.get('reason')}: {progressing.get('message', '')}",
                None,
            )
        return None, None
    if kind == "Service" and child["apiVersion"].startswith("serving.knative.dev"):
        ready = _condition(child, "Ready")
        if ready and ready.get("status") == "False":
            return (
                f"Knative Service {name}: {ready.get('reason')}: {ready.get('message', '')}",
                None,
            )
    return None, None


def pod_problem(pod: dict[str, Any]) -> str | None:
    """A pod whose container keeps crashing (CrashLoopBackOff, image pull failures)."""
    name = pod["metadata"]["name"]
    component = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component", "?")
    pool = pod["metadata"].get("labels", {}).get("rollfleet.io/pool")
    owner = f"{component} {pool}" if pool else component
    for cs in pod.get("status", {}).get("containerStatuses", []) or []:
        reason = (cs.get("state", {}).get("waiting") or {}).get("reason")
        if reason in (
            "CrashLoopBackOff",
            "ImagePullBackOff",
            "ErrImagePull",
            "CreateContainerConfigError",
        ):
            return f"{owner}: pod {name} is in {reason} (restarts {cs.get('restartCount', 0)})"
    return None
