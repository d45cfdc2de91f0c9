"""RollArc's affinity routing against one shared task queue, same samples (`make bench-affinity`).

    make bench-affinity
    .venv/bin/python benchmarks/affinity.py [--steps 20] [--repeats 5] [--quick]

Two local rollout pools whose torch engines really differ:
- `compute`: 2 torch threads, 16 slots: its long prefills run on two cores, and few
  slots means a prefill stalls few decoding sequences;
- `bandwidth`: 1 thread, 64 slots: many sequences share each decode step.
Part 1 measures each pool's engine on its own (the tiny model, same thread count and
slots): prefill tokens/s on long prompts and decode tokens/s with every slot busy.

Part 2 runs the job (the whole local runtime) on a mixed workload, one task per
example drawn from:
- calculator with 48 characters of tool log before each tool answer (`observation_pad`):
  multi-turn episodes whose contexts the engine prefills again every turn (prefill-heavy);
- countdown whose warm-up ends answers with a long-tailed run of dots: long generations
  (decode-heavy).
Same warm-up, seed, tasks and pools in both arms; `rollout.routing: shared` (both pools
pull from one queue) against `affinity` (`compute` prefers prefill, `bandwidth` decode).
Per run: samples/s (samples trained / RL seconds), tasks routed and fallen back
(the trainer's /metrics), tasks each pool completed.

Ends with `affinity speedup=<x>x fallback_share=<y>`: samples/s with affinity routing
over the shared queue (median of the repeats' ratios, each repeat runs both arms back to
back), and the share of routed tasks that fell back.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import harness

POOLS = {
    "compute": {"threads": 2, "maxBatch": 16, "prefers": "prefill"},
    "bandwidth": {"threads": 1, "maxBatch": 64, "prefers": "decode"},
}
MAX_LENGTH = 160
MIX = [
    {"name": "calculator", "params": {"observation_pad": 48, "max_turns": 3}},
    {"name": "countdown", "params": {"pad_tail": 1.2, "pad_scale": 8.0, "pad_max": 60}},
]


def manifest(name: str, routing: str, steps: int) -> dict:
    # The same pools either way; with one shared queue they may not state a preference.
    pools = [{"name": pool, "replicas": 1, **settings} for pool, settings in POOLS.items()]
    if routing == "shared":
        pools = [{k: v for k, v in p.items() if k != "prefers"} for p in pools]
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": name},
        "spec": {
            "seed": 0,
            "task": {"name": "mixed", "params": {"tasks": MIX}, "heldoutLimit": 20},
            "model": {"maxLength": MAX_LENGTH, "warmup": {"steps": 300, "examples": 1024}},
            "rollout": {
                "routing": routing,
                # Calculator episodes here prefill ~5 tokens per generated one, just above the
                # default threshold of 4; countdown's stay below 1: 2 separates them with margin.
                "prefillRatio": 2.0,
                "pools": pools,
                "sampling": {"groupSize": 8, "maxNewTokens": 80},
            },
            "trainer": {"steps": steps, "promptsPerStep": 16, "evalSamples": 1},
            "checkpoint": {"every": 100_000},
        },
    }


# --- part 1: each pool's engine on its own ----------------------------------------------------
def _engine_rates(folder: str, threads: int, slots: int, queue) -> None:
    """In a fresh process (its own thread count): prefill and decode tokens/s."""
    import sys

    sys.path.insert(0, str(harness.ROOT / "services" / "rollout"))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from rollfleet_rollout.engine import GenerationRequest, SamplingParams, complete
    from rollfleet_rollout.torch_engine import TorchEngine

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()

    async def measure() -> dict[str, float]:
        engine = TorchEngine(model, slots=slots, max_len=MAX_LENGTH, eos_token_id=-1, seed=0)
        await engine.start()

        async def run(prompt_len: int, new: int, count: int) -> float:
            params = SamplingParams(max_new_tokens=new, temperature=0.0)
            requests = [
                GenerationRequest(f"r{i}", [1 + (i + j) % 30 for j in range(prompt_len)], params)
                for i in range(count)
            ]
            started = time.perf_counter()
            await asyncio.gather(*(complete(engine, r) for r in requests))
            return time.perf_counter() - started

        await run(8, 4, slots)  # warm the kernels
        prefill_s = min([await run(120, 1, 64) for _ in range(3)])
        decode_s = min([await run(4, 48, slots) for _ in range(3)])
        await engine.stop()
        return {"prefill": 64 * 120 / prefill_s, "decode": slots * 48 / decode_s}

    queue.put(asyncio.run(measure()))


def engine_rates(folder: Path) -> dict[str, dict[str, float]]:
    rates = {}
    context = multiprocessing.get_context("spawn")
    for pool, settings in POOLS.items():
        queue = context.Queue()
        process = context.Process(
            target=_engine_rates,
            args=(str(folder), settings["threads"], settings["maxBatch"], queue),
        )
        process.start()
        rates[pool] = queue.get(timeout=600)
        process.join()
    return rates


# --- part 2: the job, routed and shared ---------------------------------------------------------
def run_arm(data: dict, run_dir: Path) -> dict:
    result, sampler = harness.run_sampled(data, run_dir, ("trainer", "rollout"))
    routed = sampler.total("rollfleet_router_tasks_total", "pool", "profile", "route")
    completed = sampler.total("rollfleet_rollout_tasks_completed_total", "pool")
    return {
        "samples_per_s": result["samples"] / result["rl_seconds"],
        "rl_seconds": result["rl_seconds"],
        "routed": routed,
        "fallback": sum(v for (_, _, route), v in routed.items() if route == "fallback"),
        "routed_total": sum(routed.values()),
        "completed": {pool: v for (pool,), v in completed.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 repeat, short warm-up")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 4, 1
    harness.quiet()
    with tempfile.TemporaryDirectory(prefix="rf-affinity-") as name:
        tmp = Path(name)
        warmup_job = manifest("affinity-warmup", "shared", args.steps)
        if args.quick:
            warmup_job["spec"]["model"]["warmup"]["steps"] = 30
        print("warm-up on the mixed task ...", flush=True)
        folder = harness.warm_up(warmup_job, tmp / "warmup")

        print("\nEngines on their own (tiny model, greedy):", flush=True)
        rates = engine_rates(folder)
        print(
            "| pool | threads | slots | prefill tokens/s (120-token prompts) | decode tokens/s (all slots) |"
        )
        print("|---|---|---|---|---|")
        for pool, r in rates.items():
            s = POOLS[pool]
            print(
                f"| {pool} | {s['threads']} | {s['maxBatch']} | {r['prefill']:.0f} | {r['decode']:.0f} |"
            )

        runs: dict[str, list[dict]] = {"shared": [], "affinity": []}
        print(f"\nJob: {args.steps} steps x 16 prompts x 8 samples per run", flush=True)
        for repeat in range(args.repeats):
            for routing in ("shared", "affinity"):
                data = harness.from_model(
                    manifest(f"affinity-{routing}-r{repeat}", routing, args.steps),
                    folder,
                    args.steps,
                )
                arm = run_arm(data, tmp / f"{routing}-r{repeat}")
                runs[routing].append(arm)
                done = ", ".join(f"{p} {v:.0f}" for p, v in sorted(arm["completed"].items()))
                print(
                    f"  {routing:8s} r{repeat}: {arm['samples_per_s']:6.1f} samples/s"
                    f"  ({arm['rl_seconds']:.0f} s)  tasks completed: {done}"
                    + (
                        f"  fell back {arm['fallback']:.0f}/{arm['routed_total']:.0f}"
                        if arm["routed_total"]
                        else ""
                    ),
                    flush=True,
                )

    ratios = [
        a["samples_per_s"] / s["samples_per_s"]
        for s, a in zip(runs["shared"], runs["affinity"], strict=True)
    ]
    print("\n| routing | samples/s (median; min-max) |")
    print("|---|---|")
    for routing, arms in runs.items():
        values = [a["samples_per_s"] for a in arms]
        print(
            f"| {routing} | {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}) |"
        )
    print("\nTasks routed by affinity (pool, profile, route), summed over the repeats:")
    totals: dict[tuple, float] = {}
    for arm in runs["affinity"]:
        for key, value in arm["routed"].items():
            totals[key] = totals.get(key, 0.0) + value
    for (pool, profile, route), value in sorted(totals.items()):
        print(f"  {pool:10s} {profile:8s} {route:9s} {value:.0f}")
    fallback_share = sum(a["fallback"] for a in runs["affinity"]) / max(
        1.0, sum(a["routed_total"] for a in runs["affinity"])
    )
    print(f"per repeat, affinity over shared: {', '.join(f'{r:.2f}x' for r in ratios)}")
    print(f"affinity speedup={statistics.median(ratios):.2f}x fallback_share={fallback_share:.2f}")


if __name__ == "__main__":
    main()
