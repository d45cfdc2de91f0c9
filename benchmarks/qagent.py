"""QAgent: does training for retrieval (Stage 2) make a search agent reader-agnostic (arXiv 2510.08383)?

    make bench-qagent
    .venv/bin/python benchmarks/qagent.py [--steps 60] [--seeds 3] [--quick]

The job is examples/qagent.yaml: two-hop questions over the generated knowledge base,
BM25 search, at most 5 rounds. One warm-up (the trainer's own SFT on the task's
demonstrations, half of whose second searches name the bridge entity alone and then
answer from memory) is shared by every run. Two readers are trained here once (the tiny
Llama taught to answer from passages, `tasks.qagent.READERS`): `qagent-reader`, the one
Stage 2 trains against, and `qagent-reader-swapped` (another seed, size and data).

Arms, each `--seeds` RL runs from the warm-up through `rollfleet run`:
- stage1: reward exact match of the agent's own answer x the format flag;
- stage2: reward the training reader's exact match on the retrieved passages + 0.5 if
  the gold answer is among them.

Each final agent answers the held-out questions greedily (people no training question
asks about). Reported per arm (mean over seeds): hit rate (the gold answer in a retrieved
passage), the agent's own exact match, and the accuracy of each reader answering from
the agent's retrieved passages.

Ends with `qagent hit_rate stage1=<a> stage2=<b> swapped_reader_acc stage1=<c> stage2=<d>`.
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

TRAINING_READER, SWAPPED_READER = "qagent-reader", "qagent-reader-swapped"


def evaluate(model, tokenizer, job: dict, readers) -> dict[str, float]:
    """Greedy held-out episodes of the agent: hit rate, own exact match, format, and each
    reader's accuracy on the passages the agent retrieved."""
    from rollfleet.rewards import score
    from rollfleet.tasks.qagent import reader_prompt, retrieved

    items = heldout_items(model, tokenizer, job, "qagent_answer")
    out = {
        "hit": statistics.mean(score("qagent_hit", i) for i in items),
        "own_em": statistics.mean(score("qagent_answer", i) for i in items),
        "format": statistics.mean(score("qagent_format", i) for i in items),
        "rounds": statistics.mean(
            sum(t["role"] == "env" and bool(t["info"].get("queries")) for t in i["turns"])
            for i in items
        ),
    }
    prompts = [reader_prompt(i["meta"]["question"], retrieved(i["turns"])) for i in items]
    for name in (TRAINING_READER, SWAPPED_READER):
        with single_thread():
            answers = readers.answer(name, prompts, 8)
        out[name] = statistics.mean(
            a.strip() == i["answer"] for a, i in zip(answers, items, strict=True)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="RL steps (x 40 samples) per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=800)
    parser.add_argument("--reader-steps", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 seed")
    args = parser.parse_args()
    base = example("qagent.yaml")
    if args.quick:
        args.steps, args.seeds, args.warmup_steps, args.reader_steps = 2, 1, 20, 20
        base = merged(base, {"task": {**base["spec"]["task"], "heldoutLimit": 20}})
    base = merged(
        base,
        {
            "model": {
                **base["spec"]["model"],
                "warmup": {**base["spec"]["model"]["warmup"], "steps": args.warmup_steps},
            }
        },
    )
    quiet()
    print(f"machine: {machine()}", flush=True)
    print(
        f"job: examples/qagent.yaml, {args.warmup_steps} warm-up steps, {args.steps} RL steps, "
        f"{args.seeds} seeds per arm",
        flush=True,
    )
    from rollfleet.rewards import RewardModels
    from rollfleet.tasks.qagent import train_reader

    results: dict[str, list[dict]] = {"stage1": [], "stage2": []}
    with tempfile.TemporaryDirectory(prefix="rf-qagent-") as name:
        tmp = Path(name)
        print("readers (training, swapped), once ...", flush=True)
        folders = {}
        for reader in (TRAINING_READER, SWAPPED_READER):
            with single_thread():
                folders[reader] = str(train_reader(tmp / reader, reader, args.reader_steps))
        readers = RewardModels(folders)
        print("warm-up, once, shared ...", flush=True)
        warm = warm_up(base, tmp / "warmup")
        start = evaluate(*load_model(warm), base, readers)
        print(f"after warm-up: {fmt(start)}", flush=True)
        for seed in range(args.seeds):
            for arm in results:
                stage = int(arm[-1])
                sections = {
                    "methods": {"qagent": {**base["spec"]["methods"]["qagent"], "stage": stage}}
                }
                if stage == 2:
                    sections["reward"] = {"models": {"reader": folders[TRAINING_READER]}}
                job = from_model(
                    base, warm, args.steps, name=f"qagent-{arm}-{seed}", seed=seed, **sections
                )
                run_dir = tmp / f"{arm}-{seed}"
                print(f"RL: {arm}, seed {seed} ...", flush=True)
                run = run_job(job, run_dir)
                figures = evaluate(*load_model(warm, run_dir), base, readers)
                figures["wall"] = run["wall"]
                results[arm].append(figures)
                print(f"  {fmt(figures)}  ({run['wall']:.0f} s)", flush=True)
    report(start, results)


def fmt(figures: dict[str, float]) -> str:
    return (
        f"hit {figures['hit']:.3f}, own EM {figures['own_em']:.3f}, format {figures['format']:.3f}, "
        f"rounds {figures['rounds']:.2f}, reader {figures[TRAINING_READER]:.3f}, "
        f"swapped reader {figures[SWAPPED_READER]:.3f}"
    )


def report(start: dict, results: dict[str, list[dict]]) -> None:
    keys = ["hit", "own_em", "format", "rounds", TRAINING_READER, SWAPPED_READER]
    print(
        "\n| agent | hit rate | own EM | format | search rounds | training reader acc | swapped reader acc |"
    )
    print("|---|---|---|---|---|---|---|")
    print("| after warm-up | " + " | ".join(f"{start[k]:.3f}" for k in keys) + " |")
    means = {}
    for arm, runs in results.items():
        means[arm] = {k: statistics.mean(r[k] for r in runs) for k in keys}
        per_seed = " / ".join(f"{r['hit']:.3f}" for r in runs)
        print(
            f"| {arm} (mean of {len(runs)}) | "
            + " | ".join(f"{means[arm][k]:.3f}" for k in keys)
            + " |"
        )
        print(f"|   hit rate per seed | {per_seed} | | | | | |")
    print(
        f"\nqagent hit_rate stage1={means['stage1']['hit']:.3f} stage2={means['stage2']['hit']:.3f} "
        f"swapped_reader_acc stage1={means['stage1'][SWAPPED_READER]:.3f} "
        f"stage2={means['stage2'][SWAPPED_READER]:.3f}"
    )


if __name__ == "__main__":
    main()
