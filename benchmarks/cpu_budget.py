"""Where the default job's CPU goes: each process's CPU seconds per RL step, side by side.

    make bench-cpu
    .venv/bin/python benchmarks/cpu_budget.py [--steps 120] [--skip 20] [--quick]

On this machine every process of a job shares the same cores, so what one process spends
on plumbing (serialising, the bus, waking threads) another cannot spend on the model.
This runs the default job (examples/countdown.yaml, no evaluation during the run) from
one warm-up, once per arm:
- `nats`: weights through nats-server's object store (`weights.transport: nats`, the
  cluster default);
- `run-folder`: weights through `<run dir>/weights` (what `rollfleet run` uses unless
  the manifest sets the transport).
It reads each child's CPU time (user + system, /proc/<pid>/stat, the child and everything
in its session) when the trainer reaches step `--skip` and at the end of the run, and
divides by the steps between: milliseconds of CPU per step for nats-server, the reward
service, the env service, the trainer and each rollout worker, their total, and the
wall-clock milliseconds per step over the same steps (the cores' capacity is 1,000 ms of
CPU per core per wall-clock second).

Ends with `cpu-budget nats=<ms>ms run_folder=<ms>ms saved=<percent>% wall nats=<ms>ms
run_folder=<ms>ms`: the total CPU per step of each arm, and the wall time per step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import harness
from harness import example, from_model, machine, warm_up

from rollfleet.local.runtime import session_members

JOB = "countdown.yaml"
ARMS = {"nats": {"weights": {"transport": "nats"}}, "run-folder": {}}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and of every process in its session."""
    total = 0.0
    for member in session_members(pid) or [pid]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


class CpuSampler(threading.Thread):
    """Reads every child's CPU time when the trainer's step reaches `skip`, and keeps
    reading it each 0.5 s until the run ends (the last reading is the run's end)."""

    def __init__(self, run, run_dir: Path, skip: int):
        super().__init__(daemon=True)
        self.run_, self.run_dir, self.skip = run, run_dir, skip
        self.start_reading: tuple[float, int, dict] | None = None
        self.last_reading: tuple[float, int, dict] | None = None
        self.done = threading.Event()

    def reading(self) -> dict[str, float]:
        children = {c.name: c.process.pid for c in self.run_.children}
        if self.run_.nats and self.run_.nats.process:
            children["nats-server"] = self.run_.nats.process.pid
        return {name: cpu_seconds(pid) for name, pid in children.items()}

    def run(self):
        while not self.done.wait(0.5):
            step = harness.current_step(self.run_dir)
            if step < self.skip:
                continue
            reading = (time.monotonic(), step, self.reading())
            if self.start_reading is None:
                self.start_reading = reading
            elif step < self.run_.job.spec.trainer.steps:
                self.last_reading = reading  # before the final evaluation and export

    def per_step(self) -> tuple[dict[str, float], float]:
        """ms of CPU per step by process, and wall ms per step."""
        (t0, s0, a), (t1, s1, b) = self.start_reading, self.last_reading
        steps = s1 - s0
        return {n: (b[n] - a[n]) * 1000 / steps for n in b if n in a}, (t1 - t0) * 1000 / steps


def run_arm(job: dict, run_dir: Path, skip: int) -> tuple[dict[str, float], float]:
    from rollfleet.local.runtime import LocalRun
    from rollfleet.spec import parse_manifest

    run = LocalRun(parse_manifest(job), run_dir, show_progress=False)
    sampler = CpuSampler(run, run_dir, skip)
    sampler.start()
    try:
        run.run()
    finally:
        sampler.done.set()
        sampler.join()
    return sampler.per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="RL steps per arm")
    parser.add_argument("--skip", type=int, default=20, help="steps before the first reading")
    parser.add_argument("--quick", action="store_true", help="a short warm-up and run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.skip = 12, 3
    harness.quiet()
    job = example(JOB)
    if args.quick:
        job = harness.merged(job, {"model": {"warmup": {"steps": 20}}})
    print(
        f"machine: {machine()}; job {JOB}, {args.steps} steps per arm, read from step {args.skip}"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        folder = warm_up(job, Path(tmp) / "warmup")
        for arm, sections in ARMS.items():
            data = from_model(job, folder, args.steps, name=f"bench-cpu-{arm}", **sections)
            results[arm] = run_arm(data, Path(tmp) / arm, args.skip)
    names = sorted({n for per_step, _ in results.values() for n in per_step})
    print("\n| process | " + " | ".join(f"{arm} ms CPU/step" for arm in ARMS) + " |")
    print("|---" * (1 + len(ARMS)) + "|")
    for name in names:
        cells = " | ".join(f"{results[arm][0].get(name, 0.0):.1f}" for arm in ARMS)
        print(f"| {name} | {cells} |")
    totals = {arm: sum(per_step.values()) for arm, (per_step, _) in results.items()}
    walls = {arm: wall for arm, (_, wall) in results.items()}
    print("| total | " + " | ".join(f"{totals[arm]:.1f}" for arm in ARMS) + " |")
    print("| wall ms/step | " + " | ".join(f"{walls[arm]:.1f}" for arm in ARMS) + " |")
    saved = 100 * (1 - totals["run-folder"] / totals["nats"])
    print(
        f"\ncpu-budget nats={totals['nats']:.0f}ms run_folder={totals['run-folder']:.0f}ms "
        f"saved={saved:.0f}% wall nats={walls['nats']:.0f}ms "
        f"run_folder={walls['run-folder']:.0f}ms"
    )


if __name__ == "__main__":
    main()
