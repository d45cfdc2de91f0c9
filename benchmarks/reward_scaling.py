"""A slow, long-tailed reward on one replica against several (RollArc's serverless reward).

    make bench-reward
    .venv/bin/python benchmarks/reward_scaling.py [--steps 15] [--replicas 1,2,4,8] [--quick]

The default countdown job, each sample scored as soon as it finishes (`async.rewardPerSample`:
the workers' non-blocking calls), against a reward service whose scoring takes device time:
`reward.latencyMs: 40` with a Pareto tail (`latencyTail: 1.5`), requests on a replica taking
turns as on one GPU (an emulated reward model: on 2 CPU cores a real one would compete with
the rollout workers for the same cores, so only its device time is emulated). The same job
runs with 1, 2, 4 and 8 reward replicas (local processes; the workers' reward client sends
each call to the replica with the fewest of its calls in flight).

Per run: RL step time (median), samples/s, the workers' reward call latency (p50, p99: the
upper bounds of their histogram's buckets), and the reward service's utilisation: busy seconds (a request in
progress) over replicas x RL seconds.

Ends with `reward-scaling step_s=<1 replica>-><most> utilisation=<1 replica>-><most>
speedup=<x>x`: median step time and utilisation at one replica and at the most replicas.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import harness

LATENCY_MS, TAIL = 40, 1.5


def quantile(buckets: dict[float, float], q: float) -> float:
    """A histogram's q-quantile upper bound (cumulative bucket counts by bound)."""
    total = buckets[float("inf")]
    return next(bound for bound, count in sorted(buckets.items()) if count >= q * total)


def run_arm(job: dict, run_dir: Path, replicas: int) -> dict:
    result, sampler = harness.run_sampled(job, run_dir, ("trainer", "rollout", "reward"))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    busy = sum(sampler.total("rollfleet_reward_busy_seconds_total").values())
    calls = sampler.total("rollfleet_rollout_reward_call_seconds_bucket", "le")
    buckets = {float(le): count for (le,), count in calls.items()}
    return {
        "replicas": replicas,
        "step_s": statistics.median(b["time"] - a["time"] for a, b in itertools.pairwise(records)),
        "samples_per_s": result["samples"] / result["rl_seconds"],
        "utilisation": busy / (replicas * result["rl_seconds"]),
        "call_p50": quantile(buckets, 0.5),
        "call_p99": quantile(buckets, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--replicas", default="1,2,4,8")
    parser.add_argument("--quick", action="store_true", help="4 steps, short warm-up")
    args = parser.parse_args()
    counts = [int(x) for x in args.replicas.split(",")]
    job = harness.example("countdown.yaml")
    if args.quick:
        args.steps = 4
        job["spec"]["model"]["warmup"]["steps"] = 30
    harness.quiet()
    with tempfile.TemporaryDirectory(prefix="rf-reward-") as name:
        tmp = Path(name)
        print("warm-up ...", flush=True)
        folder = harness.warm_up(job, tmp / "warmup")
        runs = []
        for replicas in counts:
            arm = harness.from_model(
                job,
                folder,
                args.steps,
                name=f"reward-x{replicas}",
                reward={"replicas": replicas, "latencyMs": LATENCY_MS, "latencyTail": TAIL},
                **{"async": {**job["spec"].get("async", {}), "rewardPerSample": True}},
            )
            arm["spec"]["trainer"]["evalSamples"] = 1
            arm["spec"]["task"]["heldoutLimit"] = 20
            runs.append(run_arm(arm, tmp / f"x{replicas}", replicas))
            r = runs[-1]
            print(
                f"  {replicas} replica(s): step {r['step_s']:.2f} s, {r['samples_per_s']:.1f} samples/s,"
                f" reward call p50 {r['call_p50']:.2f} s p99 {r['call_p99']:.2f} s,"
                f" utilisation {r['utilisation']:.2f}",
                flush=True,
            )
    print(
        f"\nReward: {LATENCY_MS} ms mean device time per call, Pareto tail {TAIL}; "
        f"{args.steps} steps per run; {harness.machine()}"
    )
    print(
        "| reward replicas | step s (median) | samples/s | reward call p50 / p99 s (bucket bounds) | utilisation |"
    )
    print("|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['replicas']} | {r['step_s']:.2f} | {r['samples_per_s']:.1f} |"
            f" {r['call_p50']:.2f} / {r['call_p99']:.2f} | {r['utilisation']:.2f} |"
        )
    first, last = runs[0], runs[-1]
    print(
        f"reward-scaling step_s={first['step_s']:.2f}->{last['step_s']:.2f}"
        f" utilisation={first['utilisation']:.2f}->{last['utilisation']:.2f}"
        f" speedup={first['step_s'] / last['step_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
