"""Reasoning Palette: strategies under greedy decoding, latent pass@k, and RL against GRPO
(arXiv 2512.17206's claims).

    make bench-palette
    .venv/bin/python benchmarks/palette.py [--steps 200] [--seeds 3] [--quick]

The job is examples/palette.yaml: countdown, where a problem has several correct
expressions, told apart by their operator pattern (`3*5+7` is `*+`, `7+3*5` is `+*`:
`tasks.countdown.strategy`). Its warm-up (the builtin SFT, then Palette's VAE and 10 SFT
steps with one-position prior prefixes) runs once; everything below starts from it.
1. Strategies: on each of the first 64 held-out problems, one greedy answer behind each of
   32 prefixes (8 positions, latents from the prior); the number of distinct operator
   patterns among the well-formed answers, averaged over problems. Plain greedy decoding
   gives one answer, so one pattern, by construction.
2. pass@8 on the held-out problems: 8 prefixes, one greedy answer each, against 8 plain
   samples at temperature 1 (the paper's Fig. 1: GSM8K pass@32 52.9 -> 85.3).
3. RL, `--seeds` sampling seeds per arm, the same steps and samples (32 prompts x 8):
   grpo (no method) against palette (the example's linear schedule). Held-out accuracy is
   the trainer's avg@4 at temperature 1 on 500 held-out prompts, without a prefix (the
   paper's 5-benchmark average: GRPO 21.18 -> 24.05 with linear decay).

Ends with `palette strategies_greedy=<n>/32 pass@8 latent=<a> sampled=<b> heldout
grpo=<mean> palette=<mean>`.
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

ARMS = ("grpo", "palette")
PROBLEMS = 64  # held-out problems of the strategy count


def latent_answers(model, tokenizer, job: dict, k: int, limit: int, prefixed: bool):
    """k answers per held-out problem (the first `limit`), in problem order: greedy behind
    k prior prefixes, or k plain samples at temperature 1. (score, final text) each."""
    from rollfleet.evaluation import heldout_episodes
    from rollfleet.methods import Stages
    from rollfleet.methods.palette.stages import Palette
    from rollfleet.spec import parse_manifest
    from rollfleet.tasks import make_task

    spec = parse_manifest(job).spec
    task = make_task(spec.task.name, spec.task.params, spec.seed)

    class EveryAnswerPrefixed(Palette):
        """Held-out answers behind a prefix each: the j-th answer to a problem gets the
        j-th latent of that problem (RL's own stage prefixes only training samples)."""

        def __init__(self, params, spec):
            super().__init__(params, spec)
            self.seen: dict[str, int] = {}

        def build_request(self, task, request, tokenizer):
            j = self.seen[task.task_id] = self.seen.get(task.task_id, -1) + 1
            z = self.latents(f"heldout/{task.task_id}/{j}", self.params.prefixLength)
            return self.prefixed(request, z, tokenizer)

    stages = None
    if prefixed:
        palette = EveryAnswerPrefixed(spec.methods.palette, spec)
        palette.load_files(Path(job["spec"]["model"]["path"]))
        stages = Stages([palette])
    with single_thread():
        scored = heldout_episodes(
            model,
            tokenizer,
            task,
            spec.verifier(),
            max_new_tokens=spec.rollout.sampling.maxNewTokens,
            limit=limit,
            temperature=0.0 if prefixed else 1.0,
            samples=k,
            seed=spec.seed,
            stages=stages,
            max_length=spec.model.maxLength,
        )
    return [(score, episode.final_text) for score, episode in scored]


def per_problem(answers: list, k: int) -> list[list]:
    return [answers[i : i + k] for i in range(0, len(answers), k)]


def arm_job(base: dict, arm: str, seed: int, folder: Path, steps: int) -> dict:
    return from_model(
        base,
        folder,
        steps,
        name=f"palette-{arm}-s{seed}",
        seed=seed,
        methods=None if arm == "grpo" else base["spec"]["methods"],
    )


def main() -> None:
    from rollfleet.tasks.countdown import strategy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="RL steps (x 256 samples) per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 40 prompts")
    args = parser.parse_args()
    base = example("palette.yaml")
    heldout = None
    if args.quick:
        args.steps, heldout = 3, 40
        base = merged(
            base,
            {
                "model": {"warmup": {"steps": 20}},
                "task": {**base["spec"]["task"], "heldoutLimit": 40},
            },
        )
    quiet()
    print(f"machine: {machine()}", flush=True)
    print(f"job: examples/palette.yaml, {args.steps} steps, seeds 0..{args.seeds - 1}")
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="rf-palette-") as name:
        tmp = Path(name)
        print("warm-up (builtin SFT, VAE, prefix SFT; once, shared) ...", flush=True)
        folder = warm_up(base, tmp / "warmup")
        job = from_model(base, folder, args.steps)
        model, tokenizer = load_model(folder)
        greedy = latent_answers(model, tokenizer, job, 32, PROBLEMS, prefixed=True)
        patterns = [
            {s for _, text in answers if (s := strategy(text)) is not None}
            for answers in per_problem(greedy, 32)
        ]
        correct = [
            {strategy(text) for score, text in answers if score >= 1.0}
            for answers in per_problem(greedy, 32)
        ]
        strategies = statistics.mean(len(p) for p in patterns)
        print(
            f"strategies behind 32 prefixes, greedy, {len(patterns)} problems: "
            f"{strategies:.2f} patterns per problem (max {max(len(p) for p in patterns)}), "
            f"{statistics.mean(len(c) for c in correct):.2f} among correct answers; "
            f"accuracy {statistics.mean(s >= 1.0 for s, _ in greedy):.3f}",
            flush=True,
        )
        pass_at = {}
        for kind, prefixed in (("latent", True), ("sampled", False)):
            answers = latent_answers(model, tokenizer, job, 8, heldout, prefixed=prefixed)
            pass_at[kind] = statistics.mean(
                any(score >= 1.0 for score, _ in group) for group in per_problem(answers, 8)
            )
        print(
            f"pass@8 on the held-out problems: 8 prefixes greedy {pass_at['latent']:.3f}, "
            f"8 plain samples {pass_at['sampled']:.3f}",
            flush=True,
        )
        for seed in range(args.seeds):
            for arm in ARMS:
                run = run_job(arm_job(base, arm, seed, folder, args.steps), tmp / f"{arm}-{seed}")
                r = run["result"]
                results[arm].append({**r, "wall": run["wall"]})
                print(
                    f"  seed {seed} {arm:7s} held-out {r['heldout_before']:.3f} -> "
                    f"{r['heldout_after']:.3f} (greedy {r['heldout_greedy_after']:.3f}), "
                    f"{run['wall']:.0f} s",
                    flush=True,
                )
    means = heldout_table(results)["heldout_after"]
    start = results["grpo"][0]["heldout_before"]
    print(f"\nstart (shared warm-up): held-out avg@4 {start:.3f}")
    print(
        f"palette strategies_greedy={strategies:.1f}/32 pass@8 latent={pass_at['latent']:.3f} "
        f"sampled={pass_at['sampled']:.3f} heldout grpo={means['grpo']:.3f} "
        f"palette={means['palette']:.3f}"
    )


if __name__ == "__main__":
    main()
