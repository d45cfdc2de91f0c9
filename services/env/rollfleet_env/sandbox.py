"""Sandbox processes that run a task's env code for the env service, under limits.

The env service (rollfleet_env.app) keeps a small pool of long-lived sandbox processes
(`env.sandboxes`). Each holds the envs (`Task.open_env`) of the sessions pinned to it and
runs their requests one at a time:

- no eval, no shell: a sandbox only calls the task's own `open_env` and `step` (the
  calculator parses its expressions, the search env queries its index);
- a time limit per request (`env.stepTimeoutSeconds`): the service waits that long for
  the answer, then kills the sandbox (a thread cannot be stopped, a process can); the
  next request starts a new one. The other sessions that sandbox held are lost;
- a memory limit per request (`env.stepMemoryMB`): before each request the sandbox caps
  its own address space (RLIMIT_AS) at what it maps now plus that much, so an allocation
  beyond fails with MemoryError and that session's env is dropped. A sandbox that dies
  during a request (a C allocation failing hard, the kernel's OOM killer) counts the same.

Sandboxes are started with multiprocessing's spawn: a fresh interpreter that inherits none
of the service's sockets or threads and dies with the service (PR_SET_PDEATHSIG), even in
the middle of a runaway step. (A forkserver would restart faster, but it outlives the
service for as long as one of its children runs.) A start costs about a second plus the
task's own setup. The task reaches a sandbox once, as it starts, pickled by
multiprocessing: it is the service's own configuration. Every message after that is JSON
over a pipe (`send_bytes`): requests carry the untrusted action and meta, replies the
observation and info.

    {"op": "open", "session": "...", "meta": {...}}     -> {}
    {"op": "step", "session": "...", "action": "..."}   -> {"observation": "...", "done": false, "info": {}}
    {"op": "close", "session": "..."}                   -> {}
    a request that failed                               -> {"error": "step_memory" | "step_error", "detail": "..."}

It runs inside the service (`python -m rollfleet_env`); tests/services/test_env_sandbox.py
drives runaway actions through it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import signal
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from rollfleet.local.nats import die_with_parent
from rollfleet.tasks import Task, TaskEnv

RESTARTS = Counter(
    "rollfleet_env_sandbox_restarts_total",
    "Sandbox processes killed (a step ran past its time limit) or found dead; the next request starts a new one",
)

STARTUP_SECONDS = 300  # building the task in a new sandbox (a search index) may take a while
PAGE = os.sysconf("SC_PAGE_SIZE")
_, AS_HARD = resource.getrlimit(resource.RLIMIT_AS)

TaskSource = Task | Callable[[], Task]


class SessionLost(Exception):
    """The session's sandbox was restarted since the session was opened."""


class SandboxFailed(Exception):
    """A request failed for good; `reason` is the label it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# --- the sandbox process ------------------------------------------------------------------


def _address_space(statm: int) -> int:
    """Bytes mapped now, from /proc/self/statm kept open (`statm`: its descriptor)."""
    return int(os.pread(statm, 64, 0).split()[0]) * PAGE


def _run(task: Task, envs: dict[str, TaskEnv], request: dict[str, Any]) -> dict[str, Any]:
    session = request["session"]
    if request["op"] == "open":
        envs[session] = task.open_env(request["meta"])
        return {}
    observation, done, info = envs[session].step(request["action"])
    return {"observation": observation, "done": bool(done), "info": info}


def _answer(
    task: Task, envs: dict[str, TaskEnv], request: dict[str, Any], headroom: int, statm: int
) -> bytes:
    if request["op"] == "close":
        envs.pop(request["session"], None)
        return b"{}"
    resource.setrlimit(resource.RLIMIT_AS, (_address_space(statm) + headroom, AS_HARD))
    try:
        # Encoded under the limit too: an observation is part of what the step made.
        return json.dumps(_run(task, envs, request)).encode()
    except MemoryError:
        error = ("step_memory", f"the step needed more than env.stepMemoryMB ({headroom >> 20} MB)")
    except Exception as e:  # the task's own error, or info that is not JSON
        error = ("step_error", f"{type(e).__name__}: {e}")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (AS_HARD, AS_HARD))
    envs.pop(request["session"], None)  # its state may be half-written
    return json.dumps({"error": error[0], "detail": error[1]}).encode()


def serve(conn, source: TaskSource, memory_mb: float) -> None:
    """A sandbox's main: build the task, say hello, answer requests until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the service, which ends us
    die_with_parent()  # the service: a runaway step ends with it too
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash under the limit leaves no core
    try:
        task = source if isinstance(source, Task) else source()
    except Exception as e:
        conn.send_bytes(
            json.dumps({"error": "task", "detail": f"{type(e).__name__}: {e}"}).encode()
        )
        return
    conn.send_bytes(json.dumps({"task": task.name, "multi_turn": task.multi_turn}).encode())
    envs: dict[str, TaskEnv] = {}
    headroom = int(memory_mb * 2**20)
    statm = os.open("/proc/self/statm", os.O_RDONLY)  # kept open: a read per request is cheap
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:  # the service closed its end, or died
            return
        conn.send_bytes(_answer(task, envs, request, headroom, statm))


# --- the service's side -------------------------------------------------------------------

SPAWN = multiprocessing.get_context("spawn")


class Sandbox:
    """One sandbox process as the service sees it: requests one at a time (`lock`), each
    answered within `timeout` seconds or the process is killed; the next request starts
    a new one."""

    def __init__(self, index: int, source: TaskSource, timeout: float, memory_mb: float):
        self.index, self.source, self.timeout, self.memory_mb = index, source, timeout, memory_mb
        self.generation = 0  # bumped at each kill: sessions opened before it are lost
        self.sessions: set[str] = set()  # ids of the open sessions whose envs live here
        self.opening = 0  # sessions being opened here
        self.lock = asyncio.Lock()
        self.process = self.conn = None

    async def start(self) -> dict[str, Any]:
        """Start the process; its hello (the task's name and whether it is multi-turn)."""
        ours, theirs = SPAWN.Pipe()
        process = SPAWN.Process(
            target=serve,
            args=(theirs, self.source, self.memory_mb),
            name=f"env-sandbox-{self.index}",
            daemon=True,
        )
        # From the event loop's own thread: the death signal fires when the thread that
        # started the process ends (an executor's thread might end first).
        process.start()
        theirs.close()
        self.process, self.conn = process, ours
        try:
            hello = await self._receive(STARTUP_SECONDS)
        except (EOFError, OSError, TimeoutError) as e:
            hello = {"error": "start", "detail": f"no hello ({type(e).__name__}); see its log"}
        if "error" in hello:
            await self._end()
            raise RuntimeError(f"env sandbox {self.index} did not start: {hello['detail']}")
        return hello

    async def stop(self) -> None:
        """Close the pipe (the sandbox exits on its own); kill it if it does not."""
        if self.process is None:
            return
        self.conn.close()
        await asyncio.to_thread(self.process.join, 2)
        if self.process.exitcode is None:
            self.process.kill()
            await asyncio.to_thread(self.process.join)

    async def _end(self) -> int | None:
        """Kill the process if it still runs, and forget it; its exit code (negative: the
        signal that ended it)."""
        self.process.kill()
        await asyncio.to_thread(self.process.join)
        self.conn.close()
        code, self.process, self.conn = self.process.exitcode, None, None
        return code

    async def _kill(self) -> int | None:
        """End the process and so every session in it; the next request starts a new one
        (so the request that failed does not wait for a restart)."""
        code = await self._end()
        self.generation += 1
        self.sessions.clear()
        RESTARTS.inc()
        return code

    async def _receive(self, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await readable
        finally:
            loop.remove_reader(fd)
        return json.loads(self.conn.recv_bytes())  # EOFError when the process died

    async def call(self, request: dict[str, Any], generation: int | None) -> tuple[dict, int]:
        """Send `request` for a session of `generation` (None: a new session) and await the
        reply; the reply and the generation it was served by. SessionLost if the session's
        sandbox was killed since, SandboxFailed when the request ran past a limit or failed."""
        async with self.lock:
            if self.process is not None and self.process.exitcode is not None:
                await self._kill()  # died while idle (killed from outside)
            if generation is not None and generation != self.generation:
                raise SessionLost
            if self.process is None:
                await self.start()
            try:
                self.conn.send_bytes(json.dumps(request).encode())
                reply = await self._receive(self.timeout)
            except TimeoutError:
                await self._kill()
                raise SandboxFailed(
                    "step_timeout",
                    f"the env ran longer than env.stepTimeoutSeconds ({self.timeout:g} s); "
                    "its sandbox was killed",
                ) from None
            except (EOFError, OSError):
                code = await self._kill()
                raise SandboxFailed(
                    "step_memory",
                    f"the sandbox died during the request (exit code {code}), most likely out "
                    "of memory: the step needed more than env.stepMemoryMB or the pod's limit",
                ) from None
            generation = self.generation
        if "error" in reply:
            raise SandboxFailed(reply["error"], reply["detail"])
        return reply, generation
