"""The env service's sandboxes: runaway actions are stopped, answered with a reason and
counted, and the worker's env client names each failure.

A test-only task (`Runaway`, passed to the service as its own factory: each sandbox
process imports this module and builds it, so keep its imports light) has actions that
loop forever, allocate without bound, raise, or get their sandbox killed as the kernel's
OOM killer would. The service runs for real (uvicorn) with two sandboxes, a 1 s step
limit and a 64 MB memory limit. tests/services/test_env_worker_faults.py kills a whole
env service under a real worker.

    .venv/bin/pytest tests/services/test_env_sandbox.py
"""

from __future__ import annotations

import ast
import os
import pkgutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

import rollfleet.tasks
from rollfleet.local.nats import free_port
from rollfleet.tasks import Task, TaskEnv
from rollfleet_env.app import create_app
from rollfleet_rollout.env_client import EnvFailed, HttpEnvSession
from tests.conftest import serving

STEP_TIMEOUT = 1.0
MARGIN = 2.0  # killing a sandbox on a busy 2-core machine


class Runaway(Task):
    name = "runaway"
    multi_turn = True

    def open_env(self, meta):
        return RunawayEnv(self, meta)


class RunawayEnv(TaskEnv):
    def step(self, action):
        if action == "loop":
            while True:
                pass
        if action == "hog":
            chunks = []
            while True:
                chunks.append(bytearray(1 << 20))
        if action == "raise":
            raise RuntimeError("the env broke")
        if action == "oom":  # what the kernel's OOM killer does to the sandbox
            os.kill(os.getpid(), signal.SIGKILL)
        self.turn += 1
        return f"ok{self.turn}", False, {"turn": self.turn}


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("rollfleet_env_steps_failed_total", {"reason": reason}) or 0


def restarts() -> float:
    return REGISTRY.get_sample_value("rollfleet_env_sandbox_restarts_total") or 0


@pytest.fixture
def client(serve_app):
    """Two sandboxes; sessions go to the one with fewer, the first on a tie."""
    return serve_app(
        create_app(Runaway, session_timeout=30, step_timeout=STEP_TIMEOUT, step_memory_mb=64)
    )


def open_session(client) -> str:
    return client.post("/sessions", json={"meta": {}}).json()["session_id"]


def step(client, session: str, action: str = "go") -> httpx.Response:
    return client.post(f"/sessions/{session}/step", json={"action": action})


def test_a_runaway_step_is_stopped_and_only_its_sandbox_restarts(client):
    runaway, other, neighbour, bystander = (open_session(client) for _ in range(4))
    # runaway and neighbour share sandbox 0; other and bystander live in sandbox 1.
    timeouts, lost, restarted = failures("step_timeout"), failures("session_lost"), restarts()
    replies = {}

    def run_away():
        started = time.monotonic()
        replies["runaway"] = step(client, runaway, "loop")
        replies["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run_away)
    thread.start()
    answered = 0
    while thread.is_alive():  # the other sandbox keeps answering meanwhile
        started = time.monotonic()
        assert step(client, other).status_code == 200
        assert time.monotonic() - started < STEP_TIMEOUT / 2
        answered += 1
        time.sleep(0.05)
    assert answered >= 2
    assert STEP_TIMEOUT <= replies["seconds"] < STEP_TIMEOUT + MARGIN
    assert replies["runaway"].status_code == 408
    assert replies["runaway"].json()["reason"] == "step_timeout"
    assert "env.stepTimeoutSeconds" in replies["runaway"].json()["detail"]
    assert failures("step_timeout") == timeouts + 1 and restarts() == restarted + 1

    gone = step(client, neighbour)
    assert gone.status_code == 410 and gone.json()["reason"] == "session_lost"
    assert "sandbox was restarted" in gone.json()["detail"]
    assert failures("session_lost") == lost + 1
    assert step(client, neighbour).status_code == 404  # lost once, then unknown
    assert step(client, runaway).status_code == 404  # a failed step ends its session
    # The restarted sandbox takes new sessions; the other sandbox's sessions carry on.
    fresh = open_session(client)
    assert step(client, fresh).json() == {
        "observation": "ok1",
        "done": False,
        "turn": 1,
        "info": {"turn": 1},
    }
    assert step(client, bystander).json()["turn"] == 1
    assert client.get("/healthz").json()["sessions"] == 3


def test_a_step_past_the_memory_limit_fails_and_its_sandbox_lives_on(client):
    hog, neighbour = open_session(client), open_session(client)
    same_sandbox = open_session(client)  # sandbox 0, with hog
    before, restarted = failures("step_memory"), restarts()
    started = time.monotonic()
    reply = step(client, hog, "hog")
    assert time.monotonic() - started < STEP_TIMEOUT  # stopped by the limit, not the clock
    assert reply.status_code == 422
    assert reply.json()["reason"] == "step_memory"
    assert "env.stepMemoryMB (64 MB)" in reply.json()["detail"]
    assert failures("step_memory") == before + 1 and restarts() == restarted
    assert step(client, same_sandbox).status_code == 200  # its sandbox was not restarted
    assert step(client, neighbour).status_code == 200
    assert step(client, hog).status_code == 404


def test_a_raising_step_or_a_dying_sandbox_fails_with_its_reason(client):
    dying, broken, neighbour, _ = (open_session(client) for _ in range(4))  # 0, 1, 0, 1
    errors, memory = failures("step_error"), failures("step_memory")
    reply = step(client, broken, "raise")
    assert reply.status_code == 422
    assert reply.json() == {
        "detail": f"session {broken!r} ended: RuntimeError: the env broke",
        "reason": "step_error",
    }
    assert failures("step_error") == errors + 1
    reply = step(client, dying, "oom")  # its sandbox dies during the step
    assert reply.status_code == 422 and reply.json()["reason"] == "step_memory"
    assert "exit code -9" in reply.json()["detail"]
    assert failures("step_memory") == memory + 1
    assert step(client, neighbour).status_code == 410


async def test_the_workers_env_client_names_each_failure(client):
    """HttpEnvSession (the worker's side) against the real service: every failure becomes
    EnvFailed with the reason the sample is counted under."""
    url = str(client.base_url).rstrip("/")
    async with httpx.AsyncClient() as http:

        async def failure(action: str, session: HttpEnvSession) -> str:
            with pytest.raises(EnvFailed) as failed:
                await session.step(action)
            return failed.value.reason

        sessions = [HttpEnvSession(http, url, STEP_TIMEOUT) for _ in range(4)]
        for session in sessions:
            await session.open({})
        looping, other, neighbour, _ = sessions
        assert await failure("raise", other) == "step_error"
        assert await failure("loop", looping) == "step_timeout"
        assert await failure("go", neighbour) == "session_lost"
        assert await failure("go", neighbour) == "http_404"  # what a restarted service says
        assert await failure("hog", sessions[3]) == "step_memory"
        with pytest.raises(EnvFailed) as down:
            await HttpEnvSession(http, f"http://127.0.0.1:{free_port()}", 1, 0.5).open({})
        assert down.value.reason == "unreachable"


async def test_a_new_session_waits_for_an_env_service_on_its_way_back():
    """Nothing of the sample is lost before its session opens: the client waits for a
    restarting service (up to its grace) instead of failing the sample at once."""
    port = free_port()
    app = create_app(Runaway, session_timeout=30, step_timeout=STEP_TIMEOUT, step_memory_mb=64)
    comes_back = threading.Event()

    def serve_later():
        time.sleep(1.0)
        with serving(app, port=port):
            comes_back.wait(30)

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    try:
        async with httpx.AsyncClient() as http:
            session = HttpEnvSession(http, f"http://127.0.0.1:{port}", 1, open_grace=20)
            started = time.monotonic()
            await session.open({})
            assert time.monotonic() - started >= 0.9  # it did wait
            assert await session.step("go") == ("ok1", False, {"turn": 1})
            await session.close()
    finally:
        comes_back.set()
        thread.join(10)


def test_task_envs_use_no_eval_exec_or_shell():
    """The sandbox runs task code only; none of it evaluates text or starts a process."""
    forbidden_calls = {"eval", "exec", "compile", "__import__"}
    forbidden_modules = {"subprocess", "pty", "shlex"}
    forbidden_os = {"system", "popen", "spawnl", "spawnv", "execv", "execve", "fork"}
    folder = Path(rollfleet.tasks.__file__).parent
    for module in pkgutil.iter_modules([str(folder)]):
        path = folder / f"{module.name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in forbidden_calls, f"{path}:{node.lineno}"
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                assert node.attr not in forbidden_os, f"{path}:{node.lineno}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not forbidden_modules & {n.split(".")[0] for n in names}, path
