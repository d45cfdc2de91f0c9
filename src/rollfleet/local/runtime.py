"""Run an RLJob's plan on this machine: every component a local process, NATS embedded.

    run = LocalRun(job, run_dir)
    result = run.run()          # blocks; shows progress; always ends every child

Children start in dependency order (nats-server, reward, env, trainer, rollout workers),
each with its own log file under `<run dir>/logs/`. A child that dies is restarted as
Kubernetes would, after a backoff that doubles (1 s to 30 s); a restarted trainer resumes
from its latest checkpoint. A child that crashes CRASH_LIMIT times within CRASH_WINDOW_S
fails the run with its last log lines, as does a trainer that reports a failure (an
error that a restart would only repeat). Every child is stopped on success, error and
Ctrl-C. Children also get SIGTERM if this process dies (PR_SET_PDEATHSIG).
Once every child is started, `<run dir>/services.json` gives each one's role and URL.
nats-server runs in operator mode with keys made for the run (`<run dir>/nats-auth/`,
owner-only files); the trainer and rollout workers connect as the job's own NATS user
(rollfleet.nats_auth), whose creds file they get in ROLLFLEET_NATS_CREDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from nats.aio.client import RawCredentials

from rollfleet.bus import NATS_CREDS_ENV, Bus
from rollfleet.local.nats import EmbeddedNats, die_with_parent, free_port
from rollfleet.nats_auth import BUS_ROLES, NatsKeys, write_private
from rollfleet.plan import Component, Endpoints, plan
from rollfleet.service import TOKEN_ENV
from rollfleet.spec import RLJob

START_ORDER = ("reward", "env", "trainer", "rollout")
# The env is one process locally (its sessions live in it); its replicas matter in a
# cluster. Reward replicas run locally as separate processes the workers spread calls over.
SINGLE_LOCAL = ("env",)
HTTP_SERVICES = ("reward", "env")  # started first, each waited for until it answers
BUILD_TIMEOUT_S = 1800.0  # builtin reward models trained on first start


RESTART_BACKOFF_S = (1.0, 30.0)  # first wait before a restart, and the longest
CRASH_LIMIT, CRASH_WINDOW_S = 5, 600.0  # this many crashes in this window fail the run


class RunFailed(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    role: str
    process: subprocess.Popen
    log_path: Path
    http_port: int
    component: Component | None = None
    replica: int = 0
    crashes: list[float] = field(default_factory=list)  # when it died, recent ones
    restart_at: float | None = None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def torch_threads(job: RLJob, cores: int) -> dict[str, int]:
    """Torch threads of each compute process, by component name (the rest get one).

    The trainer and the rollout workers run at the same time (asynchronous RL): the
    trainer gets half the cores (shared by its Ray ranks), the workers share the other
    half, at least one thread each; a pool's own `threads` stands. On 2 cores every process
    gets 1 (the busy processes already outnumber the cores); on 16 cores with the default
    two workers, the trainer 8 and each worker 4."""
    spec = job.spec
    trainer_cores = max(1, cores // 2)
    workers = sum(pool.replicas for pool in spec.rollout.pools)
    per_worker = max(1, (cores - trainer_cores) // max(1, workers))
    threads = {"trainer": max(1, trainer_cores // spec.trainer.workers)}
    for pool in spec.rollout.pools:
        threads[f"rollout-{pool.name}"] = pool.threads or per_worker
    return threads


def with_local_defaults(job: RLJob) -> RLJob:
    """`job` as this machine runs it: where the manifest leaves `weights.transport` unset,
    weights go through the run folder (`<run dir>/weights`, the page cache) instead of
    nats-server's object store. Every process shares this machine's disk, and through the
    store a 4 MB version reaches the workers later and costs nats-server more CPU: the
    default job's steps took 12 % longer (benchmarks/RESULTS.md, "Where the default job's
    CPU goes"). A cluster keeps NATS as its default."""
    if "transport" in job.spec.weights.model_fields_set:
        return job
    weights = job.spec.weights.model_copy(update={"transport": "filesystem"})
    return job.model_copy(update={"spec": job.spec.model_copy(update={"weights": weights})})


def write_job_file(job: RLJob, run_dir: Path) -> Path:
    path = run_dir / "job.yaml"
    data = job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (Linux /proc; elsewhere only the leader is tracked)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command: state, ppid, pgrp, session
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


class LocalRun:
    def __init__(self, job: RLJob, run_dir: Path, show_progress: bool = True):
        self.job, self.run_dir, self.show_progress = (
            with_local_defaults(job),
            run_dir,
            show_progress,
        )
        self.children: list[Child] = []
        self.nats: EmbeddedNats | None = None
        self.service_token = secrets.token_hex(16)
        self.nats_creds = run_dir / "nats-auth" / "job.creds"  # this job's NATS user
        self.restarts: dict[str, int] = {}  # child name -> restarts in this run
        self.nats_crashes: list[float] = []
        # The HTTP services everyone else calls get their ports up front; the rest pick their own.
        self.threads = torch_threads(job, len(os.sched_getaffinity(0)))
        self._ports = {
            "reward": [free_port() for _ in range(job.spec.reward.replicas)],
            "env": [free_port()],
        }

    # --- processes -----------------------------------------------------------------------
    def _spawn(self, component: Component, replica: int, port: int | None = None) -> Child:
        name = (
            component.name
            if component.replicas == 1 or component.role in SINGLE_LOCAL
            else f"{component.name}-{replica}"
        )
        if port is None:
            ports = self._ports.get(component.role)
            port = ports[replica] if ports else free_port()
        threads = self.threads.get(component.name, 1)
        env = {
            **os.environ,
            **component.env,
            "ROLLFLEET_HTTP_PORT": str(port),
            "ROLLFLEET_REPLICA": str(replica),
            TOKEN_ENV: self.service_token,
            "PYTHONUNBUFFERED": "1",
            "ROLLFLEET_TORCH_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),  # more than the process's share only thrashes
            "TOKENIZERS_PARALLELISM": "false",
        }
        if component.role in BUS_ROLES:
            env[NATS_CREDS_ENV] = str(self.nats_creds.resolve())
        else:
            env.pop(NATS_CREDS_ENV, None)
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            component.command(sys.executable),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only the supervisor, which stops us in order
            preexec_fn=die_with_parent,
            cwd=os.getcwd(),
        )
        log.close()
        return Child(name, component.role, process, log_path, port, component, replica)

    def _wait_healthy(self, child: Child, timeout: float = 60.0, models: bool = False) -> None:
        """Until `child` answers /healthz (and, with `models`, has its reward models ready)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{child.http_port}/healthz"
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RunFailed(
                    f"{child.name} exited with code {child.process.returncode} while starting:\n{child.tail()}"
                )
            try:
                reply = httpx.get(url, timeout=1.0)
                if reply.status_code == 200 and (not models or reply.json().get("models_ready")):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RunFailed(f"{child.name} did not answer {url} within {timeout:.0f}s:\n{child.tail()}")

    def start(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        job_file = write_job_file(self.job, self.run_dir)
        # NATS in operator mode with this run's keys (kept for --resume: JetStream files
        # each account's streams under its key), and one user for the job.
        keys = NatsKeys.load_or_create(self.nats_creds.parent)
        write_private(self.nats_creds, keys.signer().job_creds(self.job.bus_name))
        self.nats = EmbeddedNats(
            self.run_dir / "nats", log_file=self.run_dir / "logs" / "nats-server.log", keys=keys
        ).start()
        asyncio.run(self._set_up_streams(keys))
        endpoints = Endpoints(
            nats_url=self.nats.url,
            # Several reward replicas: the workers' reward client spreads calls over them.
            reward_url=",".join(f"http://127.0.0.1:{p}" for p in self._ports["reward"]),
            env_url=f"http://127.0.0.1:{self._ports['env'][0]}",
            # Absolute: a process may run elsewhere (Ray Train workers start in Ray's own folder).
            run_dir=str(self.run_dir.resolve()),
            job_file=str(job_file.resolve()),
        )
        components = sorted(plan(self.job, endpoints), key=lambda c: START_ORDER.index(c.role))
        for component in components:
            replicas = 1 if component.role in SINGLE_LOCAL else component.replicas
            for replica in range(replicas):
                child = self._spawn(component, replica)
                self.children.append(child)
                if component.role in HTTP_SERVICES:
                    # The first reward replica trains any builtin reward model into the
                    # shared cache; the others start once it is there and only load it.
                    building = component.role == "reward" and replica == 0 and replicas > 1
                    timeout = BUILD_TIMEOUT_S if building else 60.0
                    self._wait_healthy(child, timeout, models=building)
        self._write_services()

    async def _set_up_streams(self, keys: NatsKeys) -> None:
        """The job's streams and buckets, made by the run itself: the job's own user may
        not create streams (rollfleet.nats_auth.job_permissions)."""
        creds = keys.signer().job_creds(
            self.job.bus_name, name="rollfleet run", ttl_s=600, manage_streams=True
        )
        bus = await Bus.connect(
            self.nats.url, self.job.bus_name, name="cli", credentials=RawCredentials(creds)
        )
        try:
            await bus.ensure_streams()
        finally:
            await bus.close()

    def _write_services(self) -> None:
        """`<run dir>/services.json`: each child's role and base URL (/healthz, /metrics), for
        tools outside the run such as a Prometheus scrape config (scripts/dashboards_check.py)."""
        services = {
            c.name: {"role": c.role, "url": f"http://127.0.0.1:{c.http_port}"}
            for c in self.children
        }
        path = self.run_dir / "services.json"
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(services, indent=2) + "\n")
        partial.replace(path)  # readers never see half a file

    def stop(self, timeout: float = 10.0) -> None:
        """End every child: SIGTERM, then SIGKILL for any still alive after `timeout`."""
        # Each child leads its own session. The child itself is asked first, so it can stop
        # what it started (the trainer's local Ray instance); whatever is left in its
        # session after that, such as Ray workers in process groups of their own, is killed.
        for child in self.children:
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            for pid in session_members(child.process.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.nats:
            self.nats.stop()

    # --- supervision -----------------------------------------------------------------------
    def _check_children(self) -> Child | None:
        """Restart children that died (after their backoff), raise for one that keeps
        crashing; return the trainer once it has exited cleanly."""
        now = time.monotonic()
        if self.nats.process.poll() is not None:
            self._restart_nats(now)
        for i, child in enumerate(self.children):
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self.children[i] = self._restart(child)
                continue
            code = child.process.poll()
            if code is None:
                continue
            if child.role == "trainer" and code == 0:
                return child
            child.crashes = [t for t in child.crashes if now - t < CRASH_WINDOW_S] + [now]
            if len(child.crashes) > CRASH_LIMIT:
                raise RunFailed(
                    f"{child.name} exited with code {code}, its {len(child.crashes)}th crash in "
                    f"{CRASH_WINDOW_S:.0f} s; last lines of {child.log_path}:\n{child.tail()}"
                )
            first, longest = RESTART_BACKOFF_S
            delay = min(longest, first * 2 ** (len(child.crashes) - 1))
            child.restart_at = now + delay
            self.restarts[child.name] = self.restarts.get(child.name, 0) + 1
            print(
                f"{child.name} exited with code {code}; restarting in {delay:.0f} s "
                f"(crash {len(child.crashes)} of at most {CRASH_LIMIT} in {CRASH_WINDOW_S:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return None

    def _restart_nats(self, now: float) -> None:
        """nats-server again on its port and store: JetStream recovers the streams from disk
        and every client reconnects (rollfleet.bus rides out the gap)."""
        code = self.nats.process.returncode
        self.nats_crashes = [t for t in self.nats_crashes if now - t < CRASH_WINDOW_S] + [now]
        if len(self.nats_crashes) > CRASH_LIMIT:
            raise RunFailed(
                f"nats-server exited with code {code}, its {len(self.nats_crashes)}th crash in "
                f"{CRASH_WINDOW_S:.0f} s; see {self.nats.log_file}"
            )
        self.restarts["nats-server"] = self.restarts.get("nats-server", 0) + 1
        print(f"nats-server exited with code {code}; restarting", file=sys.stderr, flush=True)
        self.nats.start()

    def _restart(self, child: Child) -> Child:
        """The same component, replica and port again; its log file goes on."""
        for pid in session_members(child.process.pid):  # what it started dies with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        fresh = self._spawn(child.component, child.replica, port=child.http_port)
        fresh.crashes = child.crashes
        self._write_services()
        return fresh

    async def _supervise(self) -> None:
        # Ctrl-C sets an event the loop checks, rather than cancelling whatever NATS call is
        # in flight (a cancellation there can be swallowed, and the run would go on).
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        bus = await Bus.connect(
            self.nats.url, self.job.bus_name, name="cli", credentials=self.nats_creds
        )
        bar = None
        try:
            while self._check_children() is None:
                progress = await bus.get_progress()
                if progress and self.show_progress:
                    bar = self._show(bar, progress)
                if progress and progress.phase == "Failed":
                    raise RunFailed(f"trainer reported failure: {progress.message}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(interrupted.wait(), 0.5)
                if interrupted.is_set():
                    raise KeyboardInterrupt
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if bar is not None:
                bar.close()
            await asyncio.wait_for(bus.close(), 5)

    def _show(self, bar, progress):
        from tqdm import tqdm

        if bar is None and progress.phase != "WarmingUp":
            # In a terminal the bar redraws in place; in a log (no TTY) a line every 15 s.
            interactive = sys.stderr.isatty()
            bar = tqdm(
                total=progress.total_steps,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5 if interactive else 15,
                ascii=not interactive,
            )
        if bar is None:
            return None
        bar.n = progress.step
        fields = {"version": progress.policy_version}
        if progress.mean_reward is not None:
            fields["reward"] = f"{progress.mean_reward:.3f}"
        if progress.samples_per_second:
            fields["samples/s"] = f"{progress.samples_per_second:.0f}"
        if progress.staleness is not None:
            fields["staleness"] = f"{progress.staleness:.2f}"
        bar.set_postfix(fields, refresh=False)
        bar.update(0)  # redraws only when mininterval has passed
        return bar

    def run(self) -> dict:
        try:
            self.start()
            asyncio.run(self._supervise())
        finally:
            self.stop()
        result = json.loads((self.run_dir / "result.json").read_text())
        result["restarts"] = self.restarts
        plot_rewards(self.run_dir)
        return result


def plot_rewards(run_dir: Path) -> Path | None:
    """Reward (and held-out accuracy where evaluated) per step, as reward_curve.png."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        [r["step"] for r in records],
        [r["mean_reward"] for r in records],
        label="mean reward (batch)",
        alpha=0.6,
    )
    points = [(r["step"], r["heldout_accuracy"]) for r in records if "heldout_accuracy" in r]
    result_file = run_dir / "result.json"
    if result_file.exists():  # before RL at step 0, after it at the last step
        result = json.loads(result_file.read_text())
        points = [
            (0, result["heldout_before"]),
            *points,
            (result["steps"], result["heldout_after"]),
        ]
    if points:
        ax.plot(*zip(*points, strict=True), "o-", label="held-out accuracy (avg@k)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    path = run_dir / "reward_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
