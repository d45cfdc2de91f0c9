"""End-to-end: a local run's step metrics reach Weights & Biases (offline: its run file in
the run directory) and a real MLflow tracking server started here, named after the job and
carrying its spec, beside metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rollfleet.local.nats import free_port
from tests.e2e.harness import manifest, records, start_run, watch

pytestmark = pytest.mark.e2e

STEPS = 4
JOB = {
    "seed": 0,
    "task": {"name": "countdown", "heldoutLimit": 8},
    "model": {"warmup": {"steps": 5, "examples": 64}},
    "rollout": {"pools": [{"name": "default", "replicas": 1, "maxBatch": 16}]},
    "trainer": {"steps": STEPS, "promptsPerStep": 4},
}


@contextlib.contextmanager
def mlflow_server(folder: Path):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--default-artifact-root",
            str(folder / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the MLflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: a 7-byte header, then LevelDB-style 32 KiB blocks of
    chunks (checksum, length, type: full 1, first 2, middle 3, last 4), each record one
    protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero-filled rest of a block
            pos += left - 7
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_step_metrics_reach_wandb_offline_and_a_real_mlflow_server(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    with mlflow_server(tmp_path) as url:
        tracking = {
            "wandb": {"project": "rollfleet-e2e", "mode": "offline"},
            "mlflow": {"trackingUri": url, "experiment": "e2e"},
        }
        run_dir = tmp_path / "run"
        process = start_run(
            manifest(tmp_path, "e2e-tracked", {**JOB, "tracking": tracking}), run_dir
        )
        watch(process, run_dir, timeout=240)
        _, err = process.communicate()
        assert process.returncode == 0, err[-3000:]
        written = {r["step"]: r for r in records(run_dir)}
        result = json.loads((run_dir / "result.json").read_text())

        client = MlflowClient(url)
        # one run, the job's: logging from the trainer's worker thread starts no other
        (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
        assert run.info.run_name == "e2e-tracked" and run.info.status == "FINISHED"
        assert run.data.params["task.name"] == "countdown"
        assert run.data.params["trainer.steps"] == str(STEPS)
        history = client.get_metric_history(run.info.run_id, "mean_reward")
        assert {m.step: m.value for m in history} == {
            s: pytest.approx(r["mean_reward"]) for s, r in written.items()
        }
        assert run.data.metrics["result.heldout_after"] == pytest.approx(result["heldout_after"])

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    wandb = wandb_records(run_file)
    (started,) = [r.run for r in wandb if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "e2e-tracked" and started.project == "rollfleet-e2e"
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert config["task"]["name"] == "countdown"
    steps = {}
    for record in wandb:
        if record.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            steps[items["_step"]] = items
    assert sorted(steps) == sorted(written)
    for step, items in steps.items():
        assert items["mean_reward"] == pytest.approx(written[step]["mean_reward"])
        assert items["loss"] == pytest.approx(written[step]["loss"])
