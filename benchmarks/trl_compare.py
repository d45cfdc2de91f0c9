"""rollfleet against TRL's GRPOTrainer: the same model, task, prompts and samples on this CPU.

    make bench-trl
    .venv/bin/python benchmarks/trl_compare.py [--steps 250] [--long-steps 40] [--few-shot 8]
        [--alphas 1,0] [--seeds 3] [--first-seed 0] [--workloads default,long_prompt] [--quick]

Needs the `bench` extra (`pip install -c constraints.txt -e '.[bench]'`, which `make
bench-trl` does): TRL is a benchmark-only dependency.

The job is examples/countdown.yaml (the default job) with `--steps` RL steps; both sides get:
- the same start model: the builtin tiny Llama after the default job's warm-up SFT, made
  once here with the trainer's own `prepare_policy` and saved as a Hugging Face folder;
  rollfleet reads it through `model.path`, TRL loads the same folder (AutoModelForCausalLM,
  and the tokenizer from its tokenizer.json);
- the same prompts in the same order: countdown train examples 0, 1, 2, ... (rollfleet's
  dataset cursor; TRL's dataset unshuffled), token for token the ids rollfleet's workers
  feed the engine (`<bos>` + prompt, checked for every prompt);
- the same reward: the countdown verifier of `rollfleet.rewards`, wrapped as a TRL reward
  function;
- the same algorithm: 32 prompts x 8 samples (256) per optimizer step, at most 12 new
  tokens, temperature 1, top-p 1, GRPO advantages, PPO clip 0.2, one update per batch,
  token-mean loss (TRL's "dapo": normalised by the batch's completion tokens), no KL term,
  AdamW (weight decay 0) with the job's learning rate and linear decay to 0, gradient
  norm clipped at 1.

rollfleet runs as `rollfleet run` (the whole local runtime: nats-server, reward service, two
rollout workers, trainer) at each α of `--alphas`: α = 1 (the default job's) is the
headline, α = 0 (synchronous) shows what the one-step overlap gains in speed and costs
in held-out accuracy; TRL runs in this process with `use_cpu=True`, no vLLM, float32, no gradient checkpointing, on all of torch's threads.
Samples/s counts RL steps only (not start-up, warm-up or evaluation): rollfleet's
`samples / rl_seconds` (result.json; its metrics.jsonl gives the step times), TRL's from the
start of its training loop to the end of its last step (a TrainerCallback). Held-out
accuracy comes from one function for all (`rollfleet.evaluation.heldout_accuracy`, as the
trainer calls it, on one thread): avg@4 at temperature 1 and greedy on the 500 held-out
prompts; rollfleet's from its result.json, TRL's on its final model here. The start model
is evaluated here too and must match the before-accuracy of every rollfleet run.

Two workloads, each side on both:
- default: the job as it is, `--steps` RL steps;
- long prompt: the same job with countdown's `few_shot: --few-shot` (every prompt starts
  with that many solved train problems: ~140 tokens at 8, over 8x the at most 12-token
  response), `--long-steps` RL steps, held-out accuracy on its first 100 prompts. Here
  most of a sample's work is its group's shared prompt, which rollfleet computes once per
  group (trainer.sharePrefix, the engine's shared prefill) and TRL once per sample.

Each side runs `--seeds` times (sampling seeds 0, 1, ...: rollfleet's
rollout.sampling.seed, TRL's seed) from the same warm-up, prompts and held-out split.

`--first-seed` and `--workloads default` run more seeds of the default job alone (for
held-out accuracy's spread); the final line needs both workloads.

Ends with `vs-trl samples_per_s=<ratio>x long_prompt=<ratio>x heldout rollfleet=<a> trl=<b>`:
rollfleet's samples/s at the first α of `--alphas` over TRL's on each workload (means over
the seeds), and both sides' held-out avg@4 after training on the default job.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from harness import ROOT, example, load_model, machine, merged, run_job, single_thread, warm_up

JOB = ROOT / "examples" / "countdown.yaml"
# The long-prompt workload's context: ~125 prompt tokens at 8 solved problems, + 12 new.
# The shared start model is made with it (its position limit), the default job runs at 64.
LONG_MAX_LENGTH = 192


def workloads(args) -> dict[str, dict]:
    """Each workload's changes to the default job."""
    params = example(JOB.name)["spec"]["task"]["params"]
    long_prompt = {
        "task": {"params": {**params, "few_shot": args.few_shot}, "heldoutLimit": 100},
        "model": {"maxLength": LONG_MAX_LENGTH},
        "trainer": {"steps": args.long_steps},
    }
    return {"default": {}, "long_prompt": long_prompt}


def manifest(name: str, args, overrides: dict | None = None) -> dict:
    """examples/countdown.yaml with this benchmark's steps (and a smaller job with --quick)."""
    data = merged(
        example(JOB.name),
        {"trainer": {"steps": args.steps, "evalEvery": 0}, "checkpoint": {"every": 100_000}},
        name=name,
    )
    data = merged(data, overrides or {})
    if args.quick:
        data = merged(data, {"model": {"warmup": {"steps": 20}}, "task": {"heldoutLimit": 40}})
    return data


def job_spec(data: dict):
    from rollfleet.spec import parse_manifest

    return parse_manifest(data).spec


def evaluate(model, tokenizer, spec) -> dict[str, float]:
    """Held-out avg@k and greedy accuracy exactly as the trainer's `Trainer.evaluate`."""
    from rollfleet.evaluation import heldout_accuracy
    from rollfleet.tasks import make_task

    task = make_task(spec.task.name, spec.task.params, spec.seed)
    common = dict(
        verifier=spec.verifier(),
        max_new_tokens=spec.rollout.sampling.maxNewTokens,
        limit=spec.task.heldoutLimit,
    )
    with single_thread():
        sampled = heldout_accuracy(
            model,
            tokenizer,
            task,
            **common,
            temperature=spec.rollout.sampling.temperature,
            samples=spec.trainer.evalSamples,
            seed=spec.seed,
        )
        greedy = heldout_accuracy(model, tokenizer, task, **common)
    return {"accuracy": sampled, "greedy": greedy}


# --- rollfleet ---------------------------------------------------------------------------------
def run_rollfleet(
    args, workload: str, model_folder: Path, alpha: int, seed: int, tmp: Path
) -> dict:
    """`rollfleet run` on the workload's job at α; samples/s and held-out accuracy from its
    outputs."""
    name = f"bench-trl-{workload.replace('_', '-')}-a{alpha}-s{seed}"
    sampling = example(JOB.name)["spec"]["rollout"]["sampling"]
    data = manifest(
        name,
        args,
        merged(
            {"spec": workloads(args)[workload]},
            {
                "model": {"path": str(model_folder), "warmup": {"steps": 0}},
                "async": {"ratio": alpha},
                "rollout": {"sampling": {**sampling, "seed": seed}},
            },
        )["spec"],
    )
    run = run_job(data, tmp / name)
    result, records, wall = run["result"], run["records"], run["wall"]
    times = [0.0] + [r["time"] for r in records]  # the loop starts at 0 s
    sizes = [r["samples"] for r in records]
    per_step = [
        (s1 - s0) / (t1 - t0)
        for (t0, t1), (s0, s1) in zip(
            itertools.pairwise(times), itertools.pairwise([0, *sizes]), strict=True
        )
    ]
    return {
        "name": f"rollfleet α={alpha} seed {seed}",
        "workload": workload,
        "seed": seed,
        "alpha": alpha,
        "samples": result["samples"],
        "rl_seconds": result["rl_seconds"],
        "samples_per_s": result["samples"] / result["rl_seconds"],
        "step_samples_per_s": statistics.median(per_step),
        "before": result["heldout_before"],
        "greedy_before": result["heldout_greedy_before"],
        "after": result["heldout_after"],
        "greedy_after": result["heldout_greedy_after"],
        "rewards": [r["mean_reward"] for r in records],
        "response_tokens": sum(r["response_tokens"] for r in records) / result["samples"],
        "wall": wall,
    }


# --- TRL ---------------------------------------------------------------------------------------
def countdown_reward(completions, numbers, target, **_) -> list[float]:
    """TRL reward function: rollfleet's countdown verifier on each decoded completion."""
    from rollfleet.rewards import REWARDS

    return [
        REWARDS["countdown"](text, str(t), {"numbers": list(n), "target": int(t)})
        for text, n, t in zip(completions, numbers, target, strict=True)
    ]


def trl_dataset(spec, tokenizer, prompts: int):
    """Train examples 0..prompts-1, in rollfleet's cursor order; each prompt's token ids as TRL
    tokenizes it must be those rollfleet's workers feed their engine."""
    from datasets import Dataset

    from rollfleet.tasks import make_task

    task = make_task(spec.task.name, spec.task.params, spec.seed)
    rows = []
    for index in range(prompts):
        example = task.example("train", index)
        text = tokenizer.bos_token + example.prompt
        worker_ids = [
            tokenizer.bos_token_id,
            *tokenizer.encode(example.prompt, add_special_tokens=False),
        ]
        trl_ids = tokenizer(text=[text])["input_ids"][0]
        if trl_ids != worker_ids:
            raise AssertionError(f"prompt {index}: TRL ids {trl_ids} != rollfleet ids {worker_ids}")
        rows.append({"prompt": text, **example.meta})
    return Dataset.from_list(rows)


def trl_config(spec, out: Path, steps: int, seed: int):
    from trl import GRPOConfig

    algo, sampling = spec.algorithm, spec.rollout.sampling
    assert algo.advantage == "grpo" and algo.policyLoss == "ppo_clip", algo
    assert algo.lossAggregation == "token-mean" and algo.clipEpsilonHigh is None, algo
    return GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        use_vllm=False,
        activation_checkpointing=False,  # TRL turns it on by default (as gradient_checkpointing)
        gradient_checkpointing=False,
        seed=seed,
        max_steps=steps,
        per_device_train_batch_size=spec.trainer.promptsPerStep * sampling.groupSize,
        gradient_accumulation_steps=1,
        num_generations=sampling.groupSize,
        max_completion_length=sampling.maxNewTokens,
        temperature=sampling.temperature,
        top_p=sampling.topP,
        top_k=0,
        shuffle_dataset=False,
        learning_rate=algo.learningRate,
        lr_scheduler_type=algo.learningRateSchedule,  # "linear" (to 0) or "constant"
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=algo.maxGradNorm,
        beta=0.0,  # rollfleet's ppo_clip has no KL term
        epsilon=algo.clipEpsilon,
        num_iterations=1,
        loss_type="dapo",  # token-mean over the whole batch
        scale_rewards="group",  # GRPO: (r - group mean) / group std
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def make_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Times TRL's training loop: its start, and the end of every optimizer step."""

        def __init__(self):
            self.start, self.ends, self.rewards, self.lengths = None, [], [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])
                self.lengths.append(logs["completions/mean_length"])

    return Clock()


def run_trl(
    workload: str, model_folder: Path, spec, seed: int, tmp: Path
) -> tuple[dict, object, object]:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOTrainer

    started = time.monotonic()
    model, tokenizer = load_model(model_folder)
    steps = spec.trainer.steps
    dataset = trl_dataset(spec, tokenizer, steps * spec.trainer.promptsPerStep)
    clock = make_clock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=countdown_reward,
        args=trl_config(spec, tmp / f"trl-{workload}-{seed}", steps, seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    assert not trainer.args.activation_checkpointing and not trainer.args.bf16
    trainer.train()
    times = [clock.start, *clock.ends]
    batch = spec.trainer.promptsPerStep * spec.rollout.sampling.groupSize
    samples = batch * len(clock.ends)
    rl_seconds = clock.ends[-1] - clock.start
    trained = trainer.model.eval()
    return (
        {
            "name": f"TRL GRPOTrainer seed {seed}",
            "workload": workload,
            "seed": seed,
            "alpha": None,
            "samples": samples,
            "rl_seconds": rl_seconds,
            "samples_per_s": samples / rl_seconds,
            "step_samples_per_s": statistics.median(
                batch / (b - a) for a, b in itertools.pairwise(times)
            ),
            "rewards": clock.rewards,
            "response_tokens": statistics.mean(clock.lengths),
            "wall": time.monotonic() - started,
        },
        trained,
        tokenizer,
    )


# --- report ------------------------------------------------------------------------------------
def reward_curve(rewards: list[float], points: int = 4) -> str:
    """Mean batch reward over each quarter of the run's steps."""
    size = -(-len(rewards) // points)  # ceil: at most `points` chunks
    chunks = [rewards[i : i + size] for i in range(0, len(rewards), size)]
    return " / ".join(f"{statistics.mean(c):.3f}" for c in chunks)


def report(runs: list[dict], start: dict) -> None:
    print(
        "\n| workload | set-up | samples | RL s | samples/s | median step samples/s"
        " | response tokens | held-out avg@4 before → after | greedy before → after | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        before = start[r["workload"]]
        print(
            f"| {r['workload']} | {r['name']} | {r['samples']} | {r['rl_seconds']:.1f} | {r['samples_per_s']:.1f}"
            f" | {r['step_samples_per_s']:.1f} | {r['response_tokens']:.2f}"
            f" | {before['accuracy']:.3f} → {r['after']:.3f}"
            f" | {before['greedy']:.3f} → {r['greedy_after']:.3f} | {r['wall']:.0f} |"
        )
    print("\nbatch reward by quarter of the run:")
    for r in runs:
        print(f"  {r['workload']:12s} {r['name']:26s} {reward_curve(r['rewards'])}")


def speed_ratio(head: list[dict], trl_runs: list[dict]) -> tuple[float, float, float]:
    """rollfleet's mean samples/s over TRL's, and the least and greatest of the per-seed
    ratios."""
    per_seed = [
        r["samples_per_s"] / t["samples_per_s"]
        for r in head
        for t in trl_runs
        if r["seed"] == t["seed"]
    ]
    mean_ratio = statistics.mean(r["samples_per_s"] for r in head) / statistics.mean(
        t["samples_per_s"] for t in trl_runs
    )
    return mean_ratio, min(per_seed), max(per_seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="RL steps (x 256 samples) per run")
    parser.add_argument(
        "--long-steps", type=int, default=40, help="RL steps of the long-prompt workload"
    )
    parser.add_argument(
        "--few-shot", type=int, default=8, help="solved problems before each long prompt"
    )
    parser.add_argument(
        "--alphas",
        default="1,0",
        help="rollfleet's α values; the first is the headline (α = 0: the synchronous trade-off)",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="sampling seeds per side (same warm-up and prompts)"
    )
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the first sampling seed (more seeds, later)"
    )
    parser.add_argument(
        "--workloads",
        default="default,long_prompt",
        help="the workloads to run (the final line needs both; default alone: held-out seeds)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 steps, 20 warm-up steps, 40 prompts"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.long_steps = min(args.steps, 3), min(args.long_steps, 3)
    alphas = [int(a) for a in args.alphas.split(",")]
    unknown = set(args.workloads.split(",")) - set(workloads(args))
    if unknown:
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from {list(workloads(args))}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    import torch
    import transformers
    import trl

    transformers.utils.logging.disable_progress_bar()
    # TRL 1.16 still reads transformers' deprecated checkpointing names; nothing to act on.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)

    print(
        f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads for"
        f" TRL), transformers {transformers.__version__}, trl {trl.__version__}",
        flush=True,
    )
    specs = {
        workload: job_spec(manifest("bench-trl", args, changes))
        for workload, changes in workloads(args).items()
        if workload in args.workloads.split(",")
    }
    for workload, spec in specs.items():
        batch = spec.trainer.promptsPerStep * spec.rollout.sampling.groupSize
        print(
            f"{workload}: {JOB.relative_to(ROOT)}, task params {spec.task.params},"
            f" {spec.trainer.steps} steps x {batch} samples, seeds {list(seeds)}",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="rf-trl-") as name:
        tmp = Path(name)
        print("warm-up SFT (once, shared) ...", flush=True)
        warmup_job = manifest("warmup", args, {"model": {"maxLength": LONG_MAX_LENGTH}})
        folder = warm_up(warmup_job, tmp / "warmup")
        start = {w: evaluate(*load_model(folder), spec) for w, spec in specs.items()}
        for workload, before in start.items():
            print(
                f"  start model, {workload}: held-out avg@4 {before['accuracy']:.3f},"
                f" greedy {before['greedy']:.3f}"
            )
        runs = []
        for seed in seeds:
            for workload, spec in specs.items():
                for alpha in alphas:
                    print(f"rollfleet run, {workload}, α={alpha}, seed {seed} ...", flush=True)
                    run = run_rollfleet(args, workload, folder, alpha, seed, tmp)
                    before = start[workload]
                    if (run["before"], run["greedy_before"]) != (
                        before["accuracy"],
                        before["greedy"],
                    ):
                        raise AssertionError(f"{run['name']} started elsewhere: {run} vs {before}")
                    print(
                        f"  {run['samples_per_s']:.1f} samples/s, held-out after {run['after']:.3f}"
                    )
                    runs.append(run)
                print(f"TRL GRPOTrainer, {workload}, seed {seed} ...", flush=True)
                trl_run, model, tokenizer = run_trl(workload, folder, spec, seed, tmp)
                after = evaluate(model, tokenizer, spec)
                trl_run.update(after=after["accuracy"], greedy_after=after["greedy"])
                print(
                    f"  {trl_run['samples_per_s']:.1f} samples/s,"
                    f" held-out after {trl_run['after']:.3f}"
                )
                runs.append(trl_run)
    report(runs, start)
    print(
        "\n| workload | side | held-out avg@4 per seed | mean | greedy mean | samples/s per seed"
        " | samples/s mean |"
    )
    print("|---|---|---|---|---|---|---|")
    ratios, heldout, trl_heldout = {}, {}, {}
    for workload in specs:
        sides = {
            f"rollfleet α={a}": [r for r in runs if (r["workload"], r["alpha"]) == (workload, a)]
            for a in alphas
        }
        sides["TRL"] = [r for r in runs if (r["workload"], r["alpha"]) == (workload, None)]
        for side, side_runs in sides.items():
            print(
                f"| {workload} | {side}"
                f" | {' / '.join(format(r['after'], '.3f') for r in side_runs)}"
                f" | {statistics.mean(r['after'] for r in side_runs):.3f}"
                f" | {statistics.mean(r['greedy_after'] for r in side_runs):.3f}"
                f" | {' / '.join(format(r['samples_per_s'], '.1f') for r in side_runs)}"
                f" | {statistics.mean(r['samples_per_s'] for r in side_runs):.1f} |"
            )
        trl_runs = sides["TRL"]
        trl_heldout[workload] = [r["after"] for r in trl_runs]
        for a in alphas:
            side = sides[f"rollfleet α={a}"]
            ratios[workload, a] = speed_ratio(side, trl_runs)
            heldout[workload, a] = statistics.mean(r["after"] for r in side)
    print()
    for (workload, a), (ratio, low, high) in ratios.items():
        theirs = trl_heldout[workload]
        print(
            f"{workload}, rollfleet α={a}: samples/s {ratio:.2f}x TRL's (per seed {low:.2f}x to"
            f" {high:.2f}x); held-out {heldout[workload, a]:.3f} against TRL's"
            f" {statistics.mean(theirs):.3f} ({min(theirs):.3f} to {max(theirs):.3f} over its seeds)"
        )
    head = alphas[0]
    if not {("default", head), ("long_prompt", head)} <= ratios.keys():
        print("no vs-trl line: it needs both workloads (--workloads default,long_prompt)")
        return
    speed, long_speed = ratios["default", head][0], ratios["long_prompt", head][0]
    ours, theirs = heldout["default", head], trl_heldout["default"]
    met = speed >= 1.5 and long_speed >= 3 and ours >= min(theirs)
    print(
        "target (1.5x TRL's samples/s on the default job, 3x on long prompts, held-out within"
        f" TRL's seeds or better): {'met' if met else 'not met'}"
    )
    print(
        f"vs-trl samples_per_s={speed:.2f}x long_prompt={long_speed:.2f}x"
        f" heldout rollfleet={ours:.3f} trl={statistics.mean(theirs):.3f}"
    )


if __name__ == "__main__":
    main()
