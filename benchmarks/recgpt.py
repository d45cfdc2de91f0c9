"""RecGPT-V2: do gated rewards beat summed ones, and are summed rewards hacked (arXiv 2512.14503)?

    make bench-recgpt
    .venv/bin/python benchmarks/recgpt.py [--steps 60] [--seeds 3] [--quick]

The job is examples/recgpt.yaml: a planner, three persona experts and an arbiter (one
policy, each agent's turn a segment of the trajectory) predict the tags of a user's next
items. One warm-up (the trainer's own SFT on every agent's teacher turn) is shared by
every run and is the SFT arm. The alignment reward model (`tasks.recgpt.train_align_model`)
is trained here once and served to every run.

Arms, each `--seeds` RL runs from the warm-up through `rollfleet run`, same samples per run:
- summed: R = acc + align + diversity + length (weights 1, methods.recgpt defaults);
- gated:  R = acc x 1[align >= 0.75] x 1[diversity >= 0.5] x 1[length ok].

Each final policy runs the held-out users greedily. Reported per arm (mean over seeds):
hr@k (recall of the target tags by the final top 4, the paper's tag hit rate), the
experts' diversity, alignment and the length band.

Ends with `recgpt hr@k sft=<a> summed=<b> gated=<c> diversity summed=<x> gated=<y>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import (
    example,
    from_model,
    heldout_items,
    load_model,
    machine,
    merged,
    quiet,
    run_job,
    single_thread,
    warm_up,
)

ARMS = ("summed", "gated")
KEYS = ("recgpt_acc", "recgpt_diversity", "recgpt_align", "recgpt_length")


def evaluate(model, tokenizer, job: dict, models) -> dict[str, float]:
    """Greedy held-out episodes of the team, scored by the reward functions (the
    alignment through the reward model `models` serves)."""
    from rollfleet.rewards import compose_batch

    items = heldout_items(model, tokenizer, job, "recgpt_acc", stages=True)
    functions = [(k, 1.0, {"model": "align"} if k == "recgpt_align" else {}) for k in KEYS]
    with single_thread():
        parts = [p for _, p, _ in compose_batch(functions, items, models)]
    return {k: statistics.mean(p[k] for p in parts) for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="RL steps (x 64 samples) per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=800)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 seed")
    args = parser.parse_args()
    base = example("recgpt.yaml")
    if args.quick:
        args.steps, args.seeds, args.warmup_steps = 2, 1, 20
        base = merged(base, {"task": {**base["spec"]["task"], "heldoutLimit": 20}})
    warmup = {**base["spec"]["model"]["warmup"], "steps": args.warmup_steps}
    base = merged(base, {"model": {**base["spec"]["model"], "warmup": warmup}})
    quiet()
    print(f"machine: {machine()}", flush=True)
    print(
        f"job: examples/recgpt.yaml, {warmup['steps']} warm-up steps, {args.steps} RL steps, "
        f"{args.seeds} seeds per arm",
        flush=True,
    )
    from rollfleet.rewards import RewardModels
    from rollfleet.tasks.recgpt import train_align_model

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="rf-recgpt-") as name:
        tmp = Path(name)
        print("alignment reward model, once ...", flush=True)
        with single_thread():
            align = str(train_align_model(tmp / "recgpt-align"))
        models = RewardModels({"align": align})
        print("warm-up (the SFT arm), once, shared ...", flush=True)
        warm = warm_up(base, tmp / "warmup")
        sft = evaluate(*load_model(warm), base, models)
        print(f"SFT: {fmt(sft)}", flush=True)
        for seed in range(args.seeds):
            for arm in ARMS:
                method = {**base["spec"]["methods"]["recgpt"], "reward": arm}
                job = from_model(
                    base,
                    warm,
                    args.steps,
                    name=f"recgpt-{arm}-{seed}",
                    seed=seed,
                    methods={"recgpt": method},
                    reward={"models": {"align": align}},
                )
                run_dir = tmp / f"{arm}-{seed}"
                print(f"RL: {arm}, seed {seed} ...", flush=True)
                run = run_job(job, run_dir)
                figures = evaluate(*load_model(warm, run_dir), base, models)
                figures["wall"] = run["wall"]
                results[arm].append(figures)
                print(f"  {fmt(figures)}  ({run['wall']:.0f} s)", flush=True)
    report(sft, results)


def fmt(figures: dict[str, float]) -> str:
    return (
        f"hr@k {figures['recgpt_acc']:.3f}, diversity {figures['recgpt_diversity']:.3f}, "
        f"align {figures['recgpt_align']:.3f}, length ok {figures['recgpt_length']:.3f}"
    )


def report(sft: dict, results: dict[str, list[dict]]) -> None:
    print("\n| arm | hr@k | experts' diversity | alignment | length ok | hr@k per seed |")
    print("|---|---|---|---|---|---|")
    print("| SFT (the warm-up) | " + " | ".join(f"{sft[k]:.3f}" for k in KEYS) + " | |")
    means = {}
    for arm, runs in results.items():
        means[arm] = {k: statistics.mean(r[k] for r in runs) for k in KEYS}
        per_seed = " / ".join(f"{r['recgpt_acc']:.3f}" for r in runs)
        print(
            f"| GRPO, {arm} (mean of {len(runs)}) | "
            + " | ".join(f"{means[arm][k]:.3f}" for k in KEYS)
            + f" | {per_seed} |"
        )
    print(
        f"\nrecgpt hr@k sft={sft['recgpt_acc']:.3f} summed={means['summed']['recgpt_acc']:.3f} "
        f"gated={means['gated']['recgpt_acc']:.3f} "
        f"diversity summed={means['summed']['recgpt_diversity']:.3f} "
        f"gated={means['gated']['recgpt_diversity']:.3f}"
    )


if __name__ == "__main__":
    main()
