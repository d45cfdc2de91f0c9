"""End-to-end: two trainer workers under Ray Train on a local Ray instance, started and
ended by `rollfleet run`, leaving no process, link or file behind."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.harness import manifest, records, run_processes, start_run, watch

pytestmark = pytest.mark.e2e


RAY_JOB = {
    "seed": 0,
    "task": {"name": "countdown", "heldoutLimit": 20},
    "model": {"warmup": {"steps": 5, "examples": 64}},
    "rollout": {
        "pools": [{"name": "default", "replicas": 1, "maxBatch": 32}],
        "sampling": {"groupSize": 4},
    },
    "trainer": {"steps": 4, "promptsPerStep": 8, "workers": 2},
    "checkpoint": {"every": 2},
}


def ray_symlinks() -> set[Path]:
    return set(Path("/tmp").glob("rf-ray-*"))


def test_two_trainer_workers_run_with_ray_and_leave_nothing(tmp_path):
    ray_home = Path.home() / ".ray"  # where Ray keeps an auth token file when auth is on
    ray_home_before = sorted(ray_home.rglob("*")) if ray_home.exists() else None
    # Relative paths, as a user types them: Ray Train starts its workers in a folder of its
    # own, and they must still find the run directory and the task's data file.
    (tmp_path / "sums.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(40))
    )
    job = {**RAY_JOB, "task": {"name": "jsonl", "params": {"path": "sums.jsonl"}}}
    manifest(tmp_path, "e2e-ray", job)
    run_dir = tmp_path / "run"
    process = start_run(Path("e2e-ray.yaml"), Path("run"), cwd=tmp_path)
    most = watch(process, run_dir, timeout=300)
    _, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["trainer_workers"] == 2
    assert [r["version"] for r in records(run_dir)] == [1, 2, 3, 4]
    assert result["samples"] == 4 * 8 * 4  # steps x prompts x group size, over both ranks
    # nats, reward, env, a rollout worker, the Ray driver and its local Ray processes
    assert most >= 8
    log = (run_dir / "logs" / "trainer.log").read_text()
    assert "world_rank=1" in log and "Ray Train: 2 workers" in log
    assert list((run_dir / "ray").glob("session_*")), "Ray's temp dir is in the run directory"
    time.sleep(0.5)
    assert run_processes(run_dir) == set()
    # the short link to the temp dir is removed (other tests' Ray runs may have links of their own)
    ours = [p for p in ray_symlinks() if (p / "r").resolve().is_relative_to(tmp_path.resolve())]
    assert ours == []
    assert (sorted(ray_home.rglob("*")) if ray_home.exists() else None) == ray_home_before


def test_ctrl_c_ends_the_ray_trainer_too(tmp_path):
    """Ctrl-C as soon as both Ray Train workers run: the local Ray instance, its workers and
    every other process end (a finished job's clean exit is the test above)."""
    run_dir = tmp_path / "run"
    job = {**RAY_JOB, "trainer": {**RAY_JOB["trainer"], "steps": 10000}}
    process = start_run(manifest(tmp_path, "e2e-ray-ctrl-c", job), run_dir)
    log = run_dir / "logs" / "trainer.log"
    deadline = time.monotonic() + 240
    while not (log.exists() and "world_rank=1" in log.read_text(errors="replace")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the second Ray Train worker never started"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    time.sleep(1.0)
    assert run_processes(run_dir) == set()
