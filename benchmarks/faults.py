"""Processes of the default job killed mid-run (SIGKILL), five kinds, against a run without.

    make bench-faults
    .venv/bin/python benchmarks/faults.py [--steps 500] [--kills 3] [--quick]

One run per kind of fault, each killing that kind of process `--kills` times at random
steps (seeded: the same points every time) between 10 % and 90 % of the run, while the
local runtime (`rollfleet run`'s own code, in this process) restarts it:
- rollout: a rollout worker mid-generation (its tasks go to the others after the ack wait);
- trainer: mid-step (it resumes from its checkpoint and its journal of groups);
- reward: a reward service replica (the workers' client retries, or fails samples);
- env: the env service. Countdown never calls it, so this kind runs the multi-turn
  calculator job (examples/calculator.yaml), against a calculator run without faults;
- nats: the embedded nats-server (JetStream on disk; every client reconnects).
Every run starts from one warm-up (the same model folder), checkpoints every 50 steps as
the default job does, and evaluates at the end.

Per run: completed or not, restarts, wall time and its difference to the run without
faults, samples generated twice or for groups the trainer no longer knew (regenerated
work), groups dropped as stale, groups lost and trained twice (the trainer's group
journals, rollfleet_trainer.journal.audit), held-out accuracy after RL.

Ends with `faults injected=<n> kinds=5 completed=<runs>/5 lost=<groups> trained_twice=<n>
heldout_delta=<worst change in held-out accuracy against the run without faults>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import harness

KINDS = ("rollout", "trainer", "reward", "env", "nats")
CHECKPOINT_EVERY = 50


class Injector(threading.Thread):
    """Kills one kind of process of a LocalRun when the trainer reaches each of `points`."""

    def __init__(self, run, kind: str, points: list[int], rng: random.Random):
        super().__init__(daemon=True)
        self.run_, self.kind, self.points, self.rng = run, kind, points, rng
        self.killed: list[dict] = []
        self.done = threading.Event()

    def target(self) -> int | None:
        """The pid of a live process of this kind (None while it is being restarted)."""
        if self.kind == "nats":
            nats = self.run_.nats
            return nats.process.pid if nats and nats.process.poll() is None else None
        live = [c for c in self.run_.children if c.role == self.kind and c.process.poll() is None]
        return self.rng.choice(live).process.pid if live else None

    def run(self):
        for point in self.points:
            while harness.current_step(self.run_.run_dir) < point or (pid := self.target()) is None:
                if self.done.wait(0.2):
                    return
            os.kill(pid, signal.SIGKILL)
            self.killed.append(
                {
                    "step": harness.current_step(self.run_.run_dir),
                    "pid": pid,
                    "at": time.monotonic(),
                }
            )


def run_arm(job: dict, run_dir: Path, kind: str | None, kills: int, seed: int) -> dict:
    """One `rollfleet run` of `job` in this process, with `kind` killed `kills` times."""
    from rollfleet.local.runtime import LocalRun, RunFailed
    from rollfleet.spec import parse_manifest
    from rollfleet_trainer.journal import audit

    steps = job["spec"]["trainer"]["steps"]
    rng = random.Random(f"faults/{kind}/{seed}")
    points = sorted(rng.sample(range(steps // 10, steps * 9 // 10), kills)) if kind else []
    run = LocalRun(parse_manifest(job), run_dir, show_progress=False)
    injector = Injector(run, kind, points, rng)
    started = time.monotonic()
    if kind:
        injector.start()
    try:
        result, error = run.run(), None
    except RunFailed as e:
        result, error = None, str(e)[-2000:]
    finally:
        injector.done.set()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1] if records else {}
    return {
        "kind": kind or "none",
        "points": points,
        "killed_at_steps": [k["step"] for k in injector.killed],
        "completed": bool(result) and result["steps"] == steps,
        "error": error,
        "restarts": (result or {}).get("restarts", {}),
        "wall_s": time.monotonic() - started,
        "regenerated": sum(
            last.get(f"dropped_{reason}", 0)
            for reason in ("duplicate", "unknown_group", "regenerated")
        ),
        "dropped_stale": last.get("dropped_stale", 0),
        "heldout_after": (result or {}).get("heldout_after"),
        # the batch reward of the last tenth of the steps: what training reached, for a job
        # whose held-out accuracy stays at 0 (the calculator's final additions)
        "reward_end": (
            statistics.mean(r["mean_reward"] for r in records[-max(steps // 10, 1) :])
            if records
            else float("nan")
        ),
        **audit(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--calculator-steps", type=int, default=100)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short runs: shows it works")
    parser.add_argument("--out", type=Path, help="write the per-run table here as JSON")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.calculator_steps = 40, 30
    harness.quiet()
    kinds = args.kinds.split(",")
    every = min(CHECKPOINT_EVERY, max(args.steps // 5, 1))
    jobs = {"countdown": (harness.example("countdown.yaml"), args.steps)}
    if "env" in kinds:
        jobs["calculator"] = (harness.example("calculator.yaml"), args.calculator_steps)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        for name, (job, steps) in jobs.items():
            folder = harness.warm_up(job, Path(tmp) / f"warmup-{name}")
            arm = harness.from_model(job, folder, steps, checkpoint={"every": every})
            for kind in ["none"] + [k for k in kinds if (k == "env") == (name == "calculator")]:
                print(f"-- {name}: {kind}", flush=True)
                run = run_arm(
                    harness.merged(arm, {}, name=f"faults-{name}-{kind}"),
                    Path(tmp) / f"{name}-{kind}",
                    None if kind == "none" else kind,
                    args.kills,
                    args.seed,
                )
                runs[f"{name}/{kind}"] = {**run, "job": name}
                print(json.dumps(run), flush=True)
    faulted = [r for r in runs.values() if r["kind"] != "none"]
    for run in faulted:
        base = runs[f"{run['job']}/none"]
        run["extra_s"] = run["wall_s"] - base["wall_s"]
        if run["heldout_after"] is not None and base["heldout_after"] is not None:
            run["heldout_delta"] = run["heldout_after"] - base["heldout_after"]
    print(f"\n{harness.machine()}")
    print(
        f"{'job/kind':<18}{'kills':>6}{'done':>6}{'extra s':>9}{'regen':>7}{'stale':>7}"
        f"{'lost':>6}{'twice':>6}{'heldout':>9}{'reward':>8}"
    )
    for key, run in runs.items():
        print(
            f"{key:<18}{len(run['killed_at_steps']):>6}{run['completed']!s:>6}"
            f"{run.get('extra_s', 0):>9.0f}{run['regenerated']:>7}{run['dropped_stale']:>7}"
            f"{run.get('lost', 0):>6}{run.get('trained_twice', 0):>6}"
            f"{run['heldout_after'] if run['heldout_after'] is not None else float('nan'):>9.3f}"
            f"{run['reward_end']:>8.3f}"
        )
    if args.out:
        args.out.write_text(json.dumps(runs, indent=2))
    deltas = [r["heldout_delta"] for r in faulted if "heldout_delta" in r]
    worst = min(deltas) if deltas else float("nan")
    print(
        f"faults injected={sum(len(r['killed_at_steps']) for r in faulted)} kinds={len(faulted)} "
        f"completed={sum(r['completed'] for r in faulted)}/{len(faulted)} "
        f"lost={sum(r.get('lost', 0) for r in faulted)} "
        f"trained_twice={sum(r.get('trained_twice', 0) for r in faulted)} "
        f"heldout_delta={worst:+.3f}"
    )


if __name__ == "__main__":
    main()
