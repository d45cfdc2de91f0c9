"""A real rollout worker whose env service is killed mid-episode: the samples in flight
fail with a counted reason, the worker keeps running, and once the env service is back
on the same port (empty: its sessions are gone) new episodes succeed.

The worker runs on a real nats-server (tests/services/worker_harness.py, the test playing
the trainer) with the builtin tiny model; the env service is `python -m rollfleet_env`
started with subprocess, its steps slowed to 500 ms so that every session is in a step
when it gets SIGKILL.

    .venv/bin/pytest tests/services/test_env_worker_faults.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from rollfleet.local.nats import free_port
from rollfleet.models.weights import export_state
from rollfleet.protocol import RolloutTask, TrajectoryStatus
from rollfleet.service import TOKEN_ENV
from rollfleet.spec import RLJobSpec
from rollfleet.tasks import make_task
from rollfleet_reward.app import create_app as create_reward_app
from tests.conftest import serving
from tests.services import worker_harness as harness
from tests.services.test_rollout_worker import collect

POOL = "p"
GROUP = 4


def job_spec() -> dict:
    return {
        "task": {"name": "calculator"},
        "async": {"ratio": 1},
        "rollout": {
            "pools": [{"name": POOL, "replicas": 1, "maxBatch": 8}],
            "sampling": {"groupSize": GROUP, "maxNewTokens": 8, "temperature": 0.0},
        },
        "model": {"maxLength": 64},
        # Slow steps keep the episodes in the env service when it is killed.
        "env": {"stepLatencyMs": 500, "sandboxes": 1},
        "reward": {"client": {"attempts": 2, "backoffSeconds": 0.01}},
    }


@contextlib.contextmanager
def env_service(job_file: Path, port: int, log: Path):
    """`python -m rollfleet_env` on `port`, as `rollfleet run` starts it."""
    env = {
        **os.environ,
        "ROLLFLEET_JOB_FILE": str(job_file),
        "ROLLFLEET_NATS_URL": "nats://127.0.0.1:9",  # the env service never uses the bus
        "ROLLFLEET_HTTP_PORT": str(port),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rollfleet_env"], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the env service did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def env_failures() -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for m in REGISTRY.collect()
        if m.name == "rollfleet_rollout_env_failures"
        for s in m.samples
        if s.name.endswith("_total") and s.labels["pool"] == POOL
    }


def calculator_task(index: int) -> RolloutTask:
    example = make_task("calculator").example("heldout", index)
    return RolloutTask.for_example(
        example, index=index, group_id=f"g{index}", samples=GROUP, multi_turn=True
    )


async def test_env_service_killed_mid_episode_fails_samples_and_the_worker_carries_on(
    nats_server, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    spec = RLJobSpec.model_validate(job_spec())
    job_file = tmp_path / "job.yaml"
    manifest = {"apiVersion": "rollfleet.io/v1alpha1", "kind": "RLJob"}
    job_file.write_text(yaml.safe_dump({**manifest, "metadata": {"name": "j"}, "spec": job_spec()}))
    port, log = free_port(), tmp_path / "env.log"
    env_url = f"http://127.0.0.1:{port}"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reward = create_reward_app(spec.reward_functions())
    with serving(reward) as reward_url, env_service(job_file, port, log) as env:
        async with harness.running_worker(
            nats_server,
            "env-faults",
            tiny_model_dir,
            export_state(model),
            spec,
            reward_url=reward_url,
            env_url=env_url,
        ) as (trainer, worker):
            before = env_failures()
            await trainer.publish(trainer.subjects.tasks, calculator_task(0))
            async with httpx.AsyncClient(base_url=env_url) as http:
                while (await http.get("/healthz")).json()["sessions"] < GROUP:
                    await asyncio.sleep(0.02)
            env.send_signal(signal.SIGKILL)  # every session is in a step: 500 ms each
            killed = time.monotonic()
            failed = await collect(trainer, GROUP, timeout=30)
            assert time.monotonic() - killed < 10  # far within the client's timeout
            assert {t.status for t in failed} == {TrajectoryStatus.FAILED}
            after = env_failures()
            assert after["unreachable"] == before["unreachable"] + GROUP, after
            assert sum(after.values()) == sum(before.values()) + GROUP

            with env_service(job_file, port, log):  # back on the same port, empty
                await trainer.publish(trainer.subjects.tasks, calculator_task(1))
                done = await collect(trainer, GROUP, timeout=30)
                metrics = httpx.get(f"{env_url}/metrics").text
            assert TrajectoryStatus.FAILED not in {t.status for t in done}
            assert f"rollfleet_env_step_seconds_count {float(GROUP)}" in metrics  # all stepped
            assert env_failures() == after
            assert not worker._tasks  # nothing left running or hung
