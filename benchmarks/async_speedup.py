"""Asynchronous against synchronous training, side by side (ROLL Flash's claim, on this machine).

    make bench-async
    .venv/bin/python benchmarks/async_speedup.py [--steps 30] [--repeats 2] [--seeds 3] [--quality-steps 80]

Part 1, speed: the same job at α = 0, 1, 2, 4 on two workloads, one run after another in
this invocation (each run the whole local runtime: nats-server, reward, env, 2 rollout
workers, trainer):
- rlvr: countdown whose warm-up demonstrations end with a Pareto-distributed number of
  dots after the answer (pad_tail 1.2): the model answers with long-tailed lengths;
- agentic: calculator, a multi-turn tool-use task through the env service, each env step
  20 ms with a Pareto tail (latencyTail 1.5).
Per run: samples/s (samples trained / RL seconds), median step time, the trainer's idle
share (metrics.jsonl) and the rollout workers' (their /metrics, read every second).

Part 2, quality: rlvr at α = 0 and α = 2 for several seeds: held-out accuracy after the
same number of samples, and the batch reward against samples consumed.

Ends with `async-speedup alpha=2 rlvr=<x>x agentic=<y>x`: samples/s at α = 2 over α = 0,
medians over the repeats of this run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import tempfile
import threading
from pathlib import Path

import harness
import httpx

ROOT = harness.ROOT

ALPHAS = (0, 1, 2, 4)
IDLE_LINE = re.compile(r"^rollfleet_rollout_idle_fraction\{[^}]*\} ([0-9.eE+-]+)$", re.M)

WORKLOADS = {
    "rlvr": {
        "task": {"name": "countdown", "params": {"pad_tail": 1.2, "pad_scale": 2.0, "pad_max": 24}},
        "rollout": {"sampling": {"groupSize": 8, "maxNewTokens": 48}},
        "model": {"warmup": {"steps": 300, "examples": 1024}},
    },
    "agentic": {
        "task": {"name": "calculator", "params": {"max_turns": 3}},
        "env": {"stepLatencyMs": 20, "latencyTail": 1.5},
        "rollout": {"sampling": {"groupSize": 8, "maxNewTokens": 10}},
        "model": {"warmup": {"steps": 300}},
    },
}


def manifest(name: str, workload: str, spec: dict) -> dict:
    base = json.loads(json.dumps(WORKLOADS[workload]))  # a deep copy
    base["rollout"]["pools"] = [{"name": "default", "replicas": 2, "maxBatch": 64}]
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": name},
        "spec": base,
    }


def warm_up(workload: str, folder: Path) -> Path:
    """The workload's warmed-up policy, made once and shared by its runs (model.path)."""
    return harness.warm_up(manifest(f"warmup-{workload}", workload, {}), folder)


class IdleSampler(threading.Thread):
    """Reads the rollout workers' idle gauges every second while a run goes on."""

    def __init__(self, run):
        super().__init__(daemon=True)
        self.run_, self.values, self.done = run, [], threading.Event()

    def run(self):
        while not self.done.wait(1.0):
            for child in list(self.run_.children):
                if child.role != "rollout":
                    continue
                try:
                    text = httpx.get(f"http://127.0.0.1:{child.http_port}/metrics", timeout=1).text
                except httpx.HTTPError:
                    continue
                self.values += [float(v) for v in IDLE_LINE.findall(text)]


def run_job(data: dict, run_dir: Path) -> dict:
    from rollfleet.local.runtime import LocalRun
    from rollfleet.spec import parse_manifest

    run = LocalRun(parse_manifest(data), run_dir, show_progress=False)
    sampler = IdleSampler(run)
    sampler.start()
    try:
        result = run.run()
    finally:
        sampler.done.set()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records]
    return {
        "samples_per_s": result["samples"] / result["rl_seconds"],
        "step_s": statistics.median(b - a for a, b in itertools.pairwise(times)),
        "trainer_idle": statistics.mean(r["trainer_idle_fraction"] for r in records[1:]),
        "rollout_idle": statistics.mean(sampler.values) if sampler.values else float("nan"),
        "heldout_after": result["heldout_after"],
        "heldout_before": result["heldout_before"],
        "records": records,
    }


def speed(args, tmp: Path, models: dict[str, Path]) -> dict[str, dict[int, list[dict]]]:
    results: dict[str, dict[int, list[dict]]] = {}
    for repeat in range(args.repeats):
        for workload in WORKLOADS:
            for alpha in ALPHAS:
                name = f"{workload}-a{alpha}-r{repeat}"
                data = manifest(
                    name,
                    workload,
                    {
                        "model": {"path": str(models[workload]), "warmup": {"steps": 0}},
                        "async": {"ratio": alpha},
                        "trainer": {"steps": args.steps, "promptsPerStep": 16, "evalSamples": 1},
                        "task": {"heldoutLimit": 20},
                        "checkpoint": {"every": 10_000},
                    },
                )
                run = run_job(data, tmp / name)
                results.setdefault(workload, {}).setdefault(alpha, []).append(run)
                print(
                    f"  {name:16s} {run['samples_per_s']:7.1f} samples/s  step {run['step_s']:.2f} s"
                    f"  trainer idle {run['trainer_idle']:.2f}  rollout idle {run['rollout_idle']:.2f}",
                    flush=True,
                )
    return results


def quality(args, tmp: Path, models: dict[str, Path]) -> dict[int, list[dict]]:
    runs: dict[int, list[dict]] = {}
    for seed in range(args.seeds):
        for alpha in (0, 2):
            name = f"quality-a{alpha}-s{seed}"
            data = manifest(
                name,
                "rlvr",
                {
                    "seed": seed,
                    "model": {"path": str(models["rlvr"]), "warmup": {"steps": 0}},
                    "async": {"ratio": alpha},
                    "trainer": {"steps": args.quality_steps, "promptsPerStep": 16},
                    "task": {"heldoutLimit": 200},
                    "algorithm": {"learningRate": 4e-4, "learningRateSchedule": "linear"},
                    "checkpoint": {"every": 10_000},
                },
            )
            run = run_job(data, tmp / name)
            runs.setdefault(alpha, []).append(run)
            print(
                f"  {name:16s} held-out {run['heldout_before']:.3f} -> {run['heldout_after']:.3f}"
                f"  ({run['samples_per_s']:.0f} samples/s)",
                flush=True,
            )
    return runs


def reward_by_samples(records: list[dict], points: int = 5) -> list[tuple[int, float]]:
    """Mean batch reward over consecutive fifths of the run, at the samples consumed."""
    size = max(1, len(records) // points)
    return [
        (chunk[-1]["samples"], statistics.mean(r["mean_reward"] for r in chunk))
        for chunk in (records[i : i + size] for i in range(0, len(records), size))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="RL steps per speed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quality-steps", type=int, default=80)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rf-async-") as name:
        tmp = Path(name)
        print("warm-up (once per workload) ...", flush=True)
        models = {w: warm_up(w, tmp / f"warmup-{w}") for w in WORKLOADS}
        print(f"speed: {args.steps} steps x 16 prompts x 8 samples per run, {args.repeats} repeats")
        results = speed(args, tmp, models)
        print(f"quality: rlvr, {args.quality_steps} steps, seeds 0..{args.seeds - 1}")
        runs = quality(args, tmp, models) if args.seeds else {}

    print(
        "\n| workload | α | samples/s (median; min-max) | step s | trainer idle | rollout idle | vs α=0 |"
    )
    print("|---|---|---|---|---|---|---|")
    speedup = {}
    for workload, by_alpha in results.items():
        base = statistics.median(r["samples_per_s"] for r in by_alpha[0])
        for alpha, rs in by_alpha.items():
            rates = [r["samples_per_s"] for r in rs]
            ratio = statistics.median(rates) / base
            if alpha == 2:
                speedup[workload] = ratio
            print(
                f"| {workload} | {alpha} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})"
                f" | {statistics.median(r['step_s'] for r in rs):.2f}"
                f" | {statistics.median(r['trainer_idle'] for r in rs):.2f}"
                f" | {statistics.median(r['rollout_idle'] for r in rs):.2f} | {ratio:.2f}x |"
            )
    for alpha, rs in runs.items():
        after = [r["heldout_after"] for r in rs]
        print(
            f"\nquality α={alpha}: held-out after {args.quality_steps} steps: "
            + ", ".join(f"{a:.3f}" for a in after)
            + f" (mean {statistics.mean(after):.3f})"
        )
        for i, r in enumerate(rs):
            curve = ", ".join(f"{s}:{v:.3f}" for s, v in reward_by_samples(r["records"]))
            print(f"  seed {i} reward by samples consumed: {curve}")
    print(
        f"async-speedup alpha=2 rlvr={speedup.get('rlvr', float('nan')):.2f}x "
        f"agentic={speedup.get('agentic', float('nan')):.2f}x"
    )


if __name__ == "__main__":
    main()
