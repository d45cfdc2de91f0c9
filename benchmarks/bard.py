"""BARD: does the length follow the budget, and does accuracy rise with it (arXiv 2511.01470)?

    make bench-bard
    .venv/bin/python benchmarks/bard.py [--steps 200] [--quick]

The job is examples/bard.yaml: chain_sum (add six digits writing running totals), the
builtin warm-up on the teacher's full chains, then BARD phase 1 (SFT on chains compressed
to the budgets 3/6/9/15 tokens, behind the budget marker) and phase 2 (RL). Both warm-ups
run once here by the trainer's own code and are shared by the RL runs (`model.path`):
- multiplicative: phase 1, then RL with reward accuracy x budget fidelity;
- additive: phase 1, then RL with their mean (the ablation);
- no SFT: RL with the multiplicative reward straight after the full-chain warm-up.
Each final model is evaluated on the 500 held-out prompts at each trained budget and at
12 tokens, a budget never seen in training (interpolation), greedy: per budget its mean
length (tokens, with the end token), mean |length - budget| / budget, share within the
budget (length <= budget) and accuracy. Spearman's rank correlation is over every
(budget, length) pair of the trained budgets.

Ends with `bard spearman=<x> mean_rel_dev=<x> within_budget=<share> acc_by_budget=<a1>/<a2>/
<a3>/<a4> additive_acc=<x> multiplicative_acc=<y>`: the multiplicative run's figures over
its trained budgets, and each run's accuracy over the trained budgets.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

from harness import (
    example,
    from_model,
    load_model,
    machine,
    merged,
    quiet,
    run_job,
    single_thread,
    warm_up,
)

UNSEEN = 12


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho; nan where either side is constant (e.g. every answer at the limit)."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return statistics.correlation(ranks(x), ranks(y))


class FixedBudget:
    """The task with every held-out prompt at one budget (bard's build_request reads it)."""

    def __init__(self, task, budget: int):
        self.task, self.budget = task, budget

    def __getattr__(self, name):
        return getattr(self.task, name)

    def example(self, split, index):
        base = self.task.example(split, index)
        return dataclasses.replace(base, meta={**base.meta, "budget": self.budget})


def by_budget(model, tokenizer, job: dict, budgets: list[int]) -> dict[int, dict]:
    """Greedy held-out answers at each budget: length, deviation, within-budget share, accuracy."""
    from rollfleet.evaluation import heldout_episodes
    from rollfleet.methods import Stages
    from rollfleet.spec import parse_manifest
    from rollfleet.tasks import make_task

    spec = parse_manifest(job).spec
    task, stages = make_task(spec.task.name, spec.task.params, spec.seed), Stages.for_spec(spec)
    out = {}
    for budget in budgets:
        with single_thread():
            scored = heldout_episodes(
                model,
                tokenizer,
                FixedBudget(task, budget),
                spec.verifier(),
                max_new_tokens=spec.rollout.sampling.maxNewTokens,
                limit=spec.task.heldoutLimit,
                stages=stages,
                max_length=spec.model.maxLength,
            )
        lengths = [e.response_tokens for _, e in scored]
        out[budget] = {
            "lengths": lengths,
            "length": statistics.mean(lengths),
            "deviation": statistics.mean(abs(n - budget) / budget for n in lengths),
            "within": statistics.mean(n <= budget for n in lengths),
            "accuracy": statistics.mean(s >= 1.0 for s, _ in scored),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="RL steps (x 256 samples) per run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 40 prompts")
    args = parser.parse_args()
    base = example("bard.yaml")
    if args.quick:
        args.steps = 3
        base = merged(base, {"model": {"warmup": {"steps": 20}}, "task": {"heldoutLimit": 40}})
        base["spec"]["methods"]["bard"]["sftSteps"] = 20
    bard = base["spec"]["methods"]["bard"]
    trained = bard["budgets"]
    budgets = sorted({*trained, UNSEEN})
    quiet()
    print(f"machine: {machine()}", flush=True)
    print(f"job: examples/bard.yaml, budgets {trained} (+{UNSEEN} unseen), {args.steps} RL steps")
    results = {}
    with tempfile.TemporaryDirectory(prefix="rf-bard-") as name:
        tmp = Path(name)
        print("warm-ups (full chains; then + phase 1 SFT), once, shared ...", flush=True)
        no_sft = warm_up(merged(base, {"methods": {"bard": {**bard, "sftSteps": 0}}}), tmp / "w0")
        with_sft = warm_up(base, tmp / "w1")
        arms = {
            "multiplicative": (with_sft, "multiplicative"),
            "additive": (with_sft, "additive"),
            "no SFT": (no_sft, "multiplicative"),
        }
        for arm, (folder, form) in arms.items():
            run_dir = tmp / arm.replace(" ", "-")
            job = from_model(
                base,
                folder,
                args.steps,
                name=f"bard-{run_dir.name.lower()}",
                methods={"bard": {**bard, "sftSteps": 0, "reward": form}},
            )
            print(f"RL: {arm} ...", flush=True)
            run = run_job(job, run_dir)
            model, tokenizer = load_model(folder, run_dir)
            results[arm] = by_budget(model, tokenizer, job, budgets)
            results[arm]["run"] = run["result"]
        start = by_budget(*load_model(with_sft), base, budgets)
    report(results, start, trained, budgets)


def report(results: dict, start: dict, trained: list[int], budgets: list[int]) -> None:
    print("\n| model | budget | mean length | mean abs(L-b)/b | within budget | accuracy |")
    print("|---|---|---|---|---|---|")
    for arm, per in [("after phase 1 (no RL)", start), *results.items()]:
        for b in budgets:
            r = per[b]
            tag = f"{b}" + ("" if b in trained else " (unseen)")
            print(
                f"| {arm} | {tag} | {r['length']:.2f} | {r['deviation']:.3f} | "
                f"{r['within']:.3f} | {r['accuracy']:.3f} |"
            )
    main_arm = results["multiplicative"]
    pairs = [(b, n) for b in trained for n in main_arm[b]["lengths"]]
    rho = spearman([b for b, _ in pairs], [n for _, n in pairs])
    deviation = statistics.mean(main_arm[b]["deviation"] for b in trained)
    within = statistics.mean(main_arm[b]["within"] for b in trained)

    def accuracy(arm: str) -> float:
        return statistics.mean(results[arm][b]["accuracy"] for b in trained)

    by = "/".join(format(main_arm[b]["accuracy"], ".3f") for b in trained)
    print(f"\naccuracy over the trained budgets, RL without phase 1: {accuracy('no SFT'):.3f}")
    print(
        f"bard spearman={rho:.3f} mean_rel_dev={deviation:.3f} within_budget={within:.3f} "
        f"acc_by_budget={by} additive_acc={accuracy('additive'):.3f} "
        f"multiplicative_acc={accuracy('multiplicative'):.3f}"
    )


if __name__ == "__main__":
    main()
