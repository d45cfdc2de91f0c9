"""What the end-to-end tests share: `rollfleet run` as a user runs it, and a scan of /proc
for the processes of one run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLLFLEET = [sys.executable, "-m", "rollfleet.cli"]


def manifest(tmp: Path, name: str, spec: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "rollfleet.io/v1alpha1",
                "kind": "RLJob",
                "metadata": {"name": name},
                "spec": spec,
            }
        )
    )
    return path


def start_run(manifest_path: Path, run_dir: Path, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(
        [*ROLLFLEET, "run", str(manifest_path), "--run-dir", str(run_dir), "--quiet"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ROLLFLEET, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def run_processes(run_dir: Path) -> set[int]:
    """PIDs of live processes of one run: services carry ROLLFLEET_RUN_DIR, nats-server its store."""
    marker_env = f"ROLLFLEET_RUN_DIR={run_dir}".encode()
    marker_cmd = str(run_dir / "nats").encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().split(") ")[1].startswith("Z"):
                continue  # a zombie has ended; only its parent has not reaped it yet
            if (
                marker_env in (entry / "environ").read_bytes().split(b"\0")
                or marker_cmd in (entry / "cmdline").read_bytes()
            ):
                found.add(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def watch(process: subprocess.Popen, run_dir: Path, timeout: float) -> int:
    """Wait for the CLI to exit; return the most processes of the run seen alive at once."""
    most = 0
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        most = max(most, len(run_processes(run_dir)))
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"rollfleet run did not finish within {timeout}s")
        time.sleep(0.5)
    return most


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
