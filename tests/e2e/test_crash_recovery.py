"""End-to-end: children of `rollfleet run` killed mid-run (SIGKILL) are restarted, and the
job completes: a rollout worker's tasks go to the workers after their ack wait, and a
killed trainer resumes from its latest checkpoint and its journal: the groups in flight
are taken up again, none lost or trained twice, its version sequence continuing."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from rollfleet_trainer.journal import audit
from tests.e2e.harness import manifest, records, run_processes, start_run, watch

pytestmark = pytest.mark.e2e

JOB = {
    "seed": 0,
    "task": {"name": "countdown", "heldoutLimit": 20},
    "model": {"warmup": {"steps": 5, "examples": 64}},
    "rollout": {
        "pools": [{"name": "default", "replicas": 2, "maxBatch": 16}],
        "sampling": {"groupSize": 4},
        "taskAckWaitSeconds": 3,  # a dead worker's tasks move on quickly
    },
    "trainer": {"steps": 14, "promptsPerStep": 4},
    "checkpoint": {"every": 3},
}


def child_pid(run_dir: Path, module: str, replica: int = 0) -> int:
    """The live process of the run that runs `python -m module` as that replica."""
    for pid in run_processes(run_dir):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in cmdline and f"ROLLFLEET_REPLICA={replica}".encode() in environ:
            return pid
    raise AssertionError(f"no live {module} replica {replica} in the run")


def wait_for_steps(process, run_dir: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= steps):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"fewer than {steps} steps in {timeout}s"
        time.sleep(0.3)


def test_killed_worker_and_trainer_are_restarted_and_the_job_completes(tmp_path):
    run_dir = tmp_path / "run"
    process = start_run(manifest(tmp_path, "e2e-crash", JOB), run_dir)
    wait_for_steps(process, run_dir, 2)
    os.kill(child_pid(run_dir, "rollfleet_rollout"), signal.SIGKILL)
    wait_for_steps(process, run_dir, 5)  # past the checkpoint at step 3
    killed_at = max(r["step"] for r in records(run_dir))
    os.kill(child_pid(run_dir, "rollfleet_trainer"), signal.SIGKILL)
    watch(process, run_dir, timeout=240)
    out, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    assert "restarted after a crash: rollout-default-0 x1, trainer x1" in out
    assert "rollout-default-0 exited with code -9; restarting" in err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 14
    recs = records(run_dir)
    # The second trainer went back to a checkpoint at or before the kill (the kill may land
    # just after one: then no step is repeated), then on to the end; its versions continue
    # after the newest one published before the kill.
    log = (run_dir / "logs" / "trainer.log").read_text()
    checkpoint_step = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert checkpoint_step % JOB["checkpoint"]["every"] == 0 and checkpoint_step >= 3
    resumed = max(i for i, r in enumerate(recs) if r["step"] == checkpoint_step + 1)
    assert checkpoint_step <= max(r["step"] for r in recs[:resumed])
    assert killed_at <= max(r["step"] for r in recs[:resumed])
    versions = [r["version"] for r in recs[resumed:]]
    assert versions[0] > max(r["version"] for r in recs[:resumed])
    assert versions == list(range(versions[0], versions[0] + len(versions)))
    assert [r["step"] for r in recs[resumed:]] == list(range(checkpoint_step + 1, 15))
    assert re.search(r"rank 0 resumes [1-9]\d* group\(s\) in flight", log), log[-2000:]
    # Every group the run issued was trained once by the final model, dropped with a
    # reason, or still in flight at the end.
    groups = audit(run_dir)
    assert groups["resumes"] == 1
    assert groups["lost"] == 0 and groups["trained_twice"] == 0, groups
    assert groups["trained"] == 14 * 4
