"""RAVR against GRPO on a split the warmed-up model rarely solves (arXiv 2510.25206's claim).

    make bench-ravr
    .venv/bin/python benchmarks/ravr.py [--steps 100] [--seeds 3] [--quick]

The job is examples/ravr.yaml: `solve` with three operations on x < 100 (find x in
(x+4)*3-5=34). Its warm-up (the builtin SFT on the teacher's undo chains, then RAVR's SFT
under the posterior template) runs once and every run of both arms starts from it
(`model.path`). The split is hard when the warmed-up model's pass@8 on the held-out
prompts (8 samples at temperature 1 each) is at most 0.1; the benchmark measures it first
and says so. Two arms, `--seeds` sampling seeds each (rollout.sampling.seed), the same
steps and the same samples per step (16 prompts x 8):
- grpo: no method, all 8 samples from the question-only prompt;
- ravr: 4 of the 8 with the answer in view (the example's settings).
Held-out accuracy is the trainer's avg@4 at temperature 1 on 500 held-out prompts
(result.json), greedy beside it. `zero_advantage_groups` is the share of groups whose
question-only samples all scored alike (GRPO's no-gradient groups: all of a GRPO group,
the prior half of a RAVR group), averaged over the run; the utilities are RAVR's mean
s(z) = π(y*|x, z) of its posterior and prior samples over the run. The paper's claims:
E_posterior[s] > E_prior[s], and RAVR beats GRPO where GRPO stalls (GPQA-Diamond 35.35
-> 40.91; RAVR with 8 rollouts matches GRPO with 24).

Ends with `ravr hard_heldout grpo=<mean> ravr=<mean> zero_advantage_groups grpo=<share>
ravr=<share> utility posterior=<mean s> prior=<mean s>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import (
    example,
    from_model,
    heldout_table,
    load_model,
    machine,
    merged,
    quiet,
    run_job,
    single_thread,
    warm_up,
)

ARMS = ("grpo", "ravr")


def pass_at(model, tokenizer, job: dict, k: int) -> float:
    """Share of held-out prompts with at least one of k samples (temperature 1) correct."""
    from rollfleet.evaluation import heldout_episodes
    from rollfleet.spec import parse_manifest
    from rollfleet.tasks import make_task

    spec = parse_manifest(job).spec
    task = make_task(spec.task.name, spec.task.params, spec.seed)
    with single_thread():
        scored = heldout_episodes(
            model,
            tokenizer,
            task,
            spec.verifier(),
            max_new_tokens=spec.rollout.sampling.maxNewTokens,
            limit=spec.task.heldoutLimit,
            temperature=1.0,
            samples=k,
            seed=spec.seed,
            max_length=spec.model.maxLength,
        )
    hits = [score >= 1.0 for score, _ in scored]
    return statistics.mean(any(hits[i : i + k]) for i in range(0, len(hits), k))


def arm_job(base: dict, arm: str, seed: int, folder: Path, steps: int) -> dict:
    # The shared warm-up already ran RAVR's posterior SFT: the RAVR arm does not repeat it.
    ravr = {**base["spec"]["methods"]["ravr"], "posteriorWarmupSteps": 0}
    return from_model(
        base,
        folder,
        steps,
        name=f"ravr-{arm}-s{seed}",
        seed=seed,
        methods=None if arm == "grpo" else {"ravr": ravr},
    )


def run_mean(records: list[dict], name: str) -> float:
    return statistics.mean(r[name] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="RL steps (x 128 samples) per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 40 prompts")
    args = parser.parse_args()
    base = example("ravr.yaml")
    if args.quick:
        args.steps = 3
        base = merged(base, {"model": {"warmup": {"steps": 20}}, "task": {"heldoutLimit": 40}})
    quiet()
    print(f"machine: {machine()}", flush=True)
    print(f"job: examples/ravr.yaml, {args.steps} steps, seeds 0..{args.seeds - 1}")
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="rf-ravr-") as name:
        tmp = Path(name)
        print("warm-up SFT (once, shared) ...", flush=True)
        folder = warm_up(base, tmp / "warmup")
        hard = pass_at(*load_model(folder), base, k=8)
        verdict = "hard (<= 0.1)" if hard <= 0.1 else "NOT hard (> 0.1)"
        print(f"warmed-up model: held-out pass@8 {hard:.3f}: the split is {verdict}", flush=True)
        for seed in range(args.seeds):
            for arm in ARMS:
                run = run_job(arm_job(base, arm, seed, folder, args.steps), tmp / f"{arm}-{seed}")
                r, records = run["result"], run["records"]
                zero_key = (
                    "ravr_zero_advantage_groups" if arm == "ravr" else "zero_advantage_groups"
                )
                entry = {**r, "zero": run_mean(records, zero_key), "wall": run["wall"]}
                if arm == "ravr":
                    entry["posterior"] = run_mean(records, "ravr_utility_posterior")
                    entry["prior"] = run_mean(records, "ravr_utility_prior")
                results[arm].append(entry)
                print(
                    f"  seed {seed} {arm:5s} held-out {r['heldout_before']:.3f} -> "
                    f"{r['heldout_after']:.3f} (greedy {r['heldout_greedy_after']:.3f}), "
                    f"zero-advantage groups {entry['zero']:.3f}, {run['wall']:.0f} s",
                    flush=True,
                )
    table = heldout_table(results, zero_advantage_groups="zero")
    means, zero = table["heldout_after"], table["zero"]
    posterior = statistics.mean(r["posterior"] for r in results["ravr"])
    prior = statistics.mean(r["prior"] for r in results["ravr"])
    start = results["grpo"][0]["heldout_before"]
    print(f"\nstart (shared warm-up): held-out avg@4 {start:.3f}, pass@8 {hard:.3f}")
    print(
        f"ravr hard_heldout grpo={means['grpo']:.3f} ravr={means['ravr']:.3f} "
        f"zero_advantage_groups grpo={zero['grpo']:.3f} ravr={zero['ravr']:.3f} "
        f"utility posterior={posterior:.3f} prior={prior:.3f}"
    )


if __name__ == "__main__":
    main()
