"""End-to-end: `rollfleet run` as a user runs it, every service a real process.

α = 0 is synchronous with every scheduling switch on; Ctrl-C ends every process; bad
manifests, missing data and suspended jobs start nothing and say why. (The countdown run
that must learn is in test_countdown_run.py, the Ray trainer in test_ray_run.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.harness import cli, manifest, records, run_processes, start_run, watch

pytestmark = pytest.mark.e2e


SYNC_JOB = {
    "seed": 0,
    "task": {"name": "countdown", "heldoutLimit": 20},
    "model": {"warmup": {"steps": 5, "examples": 64}},
    # alpha = 0 with every scheduling switch on: one-sample tasks, rewards per sample,
    # two redundant groups whose stragglers get cancelled, KV re-prefilled on swaps
    "async": {
        "ratio": 0,
        "replicatePrompts": True,
        "rewardPerSample": True,
        "redundantGroups": 2,
        "partialRollout": "reprefill",
    },
    "rollout": {
        "pools": [{"name": "default", "replicas": 2, "maxBatch": 16}],
        "sampling": {"groupSize": 4},
    },
    "trainer": {"steps": 6, "promptsPerStep": 4},
}


def test_alpha_zero_is_synchronous_with_every_scheduling_switch_on(tmp_path):
    run_dir = tmp_path / "run"
    process = start_run(manifest(tmp_path, "e2e-sync", SYNC_JOB), run_dir)
    watch(process, run_dir, timeout=240)
    _, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    recs = records(run_dir)
    assert [r["version"] for r in recs] == list(range(1, 7))
    for r in recs:  # every trained token came from the version being trained
        assert (r["max_staleness"], r["staleness"], r["off_policy_fraction"]) == (0, 0.0, 0.0)
    assert json.loads((run_dir / "result.json").read_text())["samples"] == 6 * 4 * 4


def test_ctrl_c_ends_every_process(tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(10, 60)
        )
    )
    spec = {
        "task": {"name": "jsonl", "params": {"path": str(data)}},
        "model": {"warmup": {"steps": 5}},
        "rollout": {"sampling": {"maxNewTokens": 4}},
        "trainer": {"steps": 10000, "promptsPerStep": 4},
    }
    run_dir = tmp_path / "run"
    process = start_run(manifest(tmp_path, "e2e-ctrl-c", spec), run_dir)
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").exists() and records(run_dir)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the jsonl job never trained a step"
        time.sleep(0.5)
    assert len(run_processes(run_dir)) >= 6
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert f"--resume {run_dir}" in err
    time.sleep(0.5)
    assert run_processes(run_dir) == set()


def test_invalid_manifest_starts_nothing(tmp_path):
    spec = {
        "async": {"ratio": -1},
        "rollout": {"pools": [{"name": "default", "replicas": 0}]},
        "task": {"name": "nope"},
    }
    run_dir = tmp_path / "run"
    done = cli("run", str(manifest(tmp_path, "bad", spec)), "--run-dir", str(run_dir))
    assert done.returncode == 2
    for field in ("spec.async.ratio", "spec.rollout.pools.0.replicas", "spec.task.name"):
        assert field in done.stderr
    assert not run_dir.exists()


def test_missing_dataset_names_the_path(tmp_path):
    spec = {"task": {"name": "jsonl", "params": {"path": str(tmp_path / "missing.jsonl")}}}
    done = cli("run", str(manifest(tmp_path, "nodata", spec)), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert str(tmp_path / "missing.jsonl") in done.stderr
    assert not (tmp_path / "run").exists()


def test_missing_model_path_names_the_path(tmp_path):
    spec = {"model": {"path": str(tmp_path / "no-model")}}
    done = cli("run", str(manifest(tmp_path, "nomodel", spec)), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "spec.model.path" in done.stderr and str(tmp_path / "no-model") in done.stderr


def test_proc_scan_sees_a_marked_process(tmp_path):
    """The process scan the tests above rely on must find a process that carries the marker."""
    env = {**os.environ, "ROLLFLEET_RUN_DIR": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        time.sleep(0.2)
        assert child.pid in run_processes(tmp_path)
    finally:
        child.kill()
        child.wait()
    assert child.pid not in run_processes(tmp_path)


def test_a_suspended_job_is_refused(tmp_path):
    spec = {"suspend": True}
    done = cli("run", str(manifest(tmp_path, "refused", spec)), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "spec.suspend" in done.stderr
    assert not (tmp_path / "run").exists()
