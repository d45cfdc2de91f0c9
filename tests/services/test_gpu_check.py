"""scripts/gpu_check.sh: without a GPU it says what it skipped and exits 0; its measuring
code runs end to end on the CPU (`--cpu --quick`), the same code that runs on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_without_a_gpu_it_says_what_it_skipped_and_exits_cleanly():
    assert not torch.cuda.is_available()  # this suite runs on CPU machines
    done = run()
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "no CUDA GPU here; skipped: torch engine on GPU, trainer steps on GPU, vLLM" in done.stdout
    )


def test_the_measurements_run_on_the_cpu():
    done = run("--cpu", "--quick")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = {line.split(" ")[0]: line for line in done.stdout.splitlines()}
    rate = float(lines["torch-engine"].split(": ")[1].split(" tokens/s")[0].replace(",", ""))
    step_ms = float(lines["trainer-step"].split(": ")[1].split(" ms")[0].replace(",", ""))
    assert rate > 0 and step_ms > 0
    # prefix trees against every sample whole: the same log-probs
    diff = float(lines["prefix-sharing"].rsplit("max |d log-prob| ", 1)[1])
    assert diff < 1e-4
    # the reward models' check compares the device with the CPU (here both the CPU)
    assert "max |p - p_cpu| 0.00e+00" in lines["reward-models"]
    assert "answers equal 16/16" in lines["reward-models"]
    assert "vLLM engine" in done.stdout  # named among what was skipped
    assert "FAILED" not in done.stdout
