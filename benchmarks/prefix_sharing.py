"""A group's shared prompt computed once, against once per sample: trainer steps and
engine generation side by side, on the default job's prompts and on a long-prompt one.

    make bench-prefix
    .venv/bin/python benchmarks/prefix_sharing.py [--rounds 5] [--quick]

Both workloads use the builtin tiny Llama (the default job's size), one torch thread, 32
prompts x 8 samples, at most 12 new tokens:
- default: countdown prompts as the default job has them (~10 tokens);
- long prompt: countdown with `few_shot: 8` (every prompt starts with eight solved
  problems: ~140 tokens, over 8x the response).

Trainer: `Trainer.train_step` on one batch of real prompts with random responses (lengths
1-12), `trainer.sharePrefix` on and off in alternating rounds (ABAB...), the median step
time of each. Engine: the torch engine generates the same 256 requests (the group's 8
samples submitted together), `share_prompts` on and off alternating, median tokens/s.
Each reports the tokens it ran through the model and its achieved model FLOP/s
(rollfleet.models.flops) against this machine's one-thread matmul peak.

Multi-turn: 32 episodes of 4 turns on the long prompts, each turn at most 12 new tokens
followed by an 8-token env reply, every turn's prompt the conversation so far: the torch
engine with each episode's turns as one session (its KV cache kept between turns)
against without (each turn prefills the whole conversation), alternating, median
tokens/s.

Ends with `prefix-sharing trainer=<ratio>x engine=<ratio>x long_prompt trainer=<ratio>x
engine=<ratio>x multi_turn engine=<ratio>x` (step-time and tokens/s ratios, shared or
kept over per-sample).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from harness import machine, quiet

PROMPTS, GROUP, NEW_TOKENS = 32, 8, 12
TURNS, REPLY = 4, [5, 6, 7, 8, 9, 10, 11, 12]  # multi-turn: turns, the env's reply tokens


def trajectories_for(prompts: list[list[int]], seed: int):
    """Groups of real prompts with random responses, as the trainer receives them."""
    from rollfleet.protocol import Trajectory, TrajectoryStatus
    from rollfleet_trainer.loop import Group

    rng = random.Random(seed)
    groups = []
    for index, prompt in enumerate(prompts):
        group = Group(index=index, size=GROUP)
        for i in range(GROUP):
            n = rng.randint(1, NEW_TOKENS)
            group.samples[i] = (
                Trajectory(
                    task_id=f"t{index}",
                    group_id=group.id,
                    sample_index=i,
                    group_size=GROUP,
                    worker="bench",
                    status=TrajectoryStatus.COMPLETED,
                    prompt_ids=prompt,
                    response_ids=[rng.randrange(4, 20) for _ in range(n)],
                    behaviour_logprobs=[-rng.uniform(0.5, 3.0) for _ in range(n)],
                    token_versions=[0] * n,
                    loss_mask=[1.0] * n,
                    reward=float(rng.random() < 0.5),
                ),
                None,
            )
        groups.append(group)
    return groups


def job(few_shot: int, share: bool):
    from rollfleet.spec import parse_manifest

    return parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "prefix"},
            "spec": {
                "task": {"name": "countdown", "params": {"few_shot": few_shot}},
                "model": {"maxLength": 192},
                "trainer": {"promptsPerStep": PROMPTS, "sharePrefix": share},
                "rollout": {"sampling": {"groupSize": GROUP, "maxNewTokens": NEW_TOKENS}},
            },
        }
    )


def prompts_of(few_shot: int, tokenizer) -> list[list[int]]:
    from rollfleet.tasks import make_task

    task = make_task("countdown", {"few_shot": few_shot}, seed=0)
    return [tokenizer.encode(task.example("train", i).prompt) for i in range(PROMPTS)]


def trainer_rounds(folder: Path, few_shot: int, rounds: int, run_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollfleet.models.batching import TrainBatch
    from rollfleet.models.prefix_sharing import forward_work, pack_groups
    from rollfleet_trainer.loop import Trainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = prompts_of(few_shot, tokenizer)
    trainers = {}
    for share in (True, False):
        trainer = Trainer(job(few_shot, share), None, run_dir / f"trainer-{share}")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        trainer.set_model(model, tokenizer)
        trainers[share] = trainer
    times = {True: [], False: []}
    flops = {True: [], False: []}
    for step in range(rounds + 1):  # the first round warms up and is not counted
        groups = trajectories_for(prompts, seed=step)
        for share in (True, False) if step % 2 else (False, True):
            trainer = trainers[share]
            before = trainer.meter.flops
            started = time.perf_counter()
            trainer.train_step(trajectories_for(prompts, seed=step))
            seconds = time.perf_counter() - started
            if step:
                times[share].append(seconds)
                flops[share].append((trainer.meter.flops - before) / seconds)
    trajectories = [g.samples[i][0] for g in groups for i in range(GROUP)]
    batch = TrainBatch.from_trajectories(trajectories, GROUP, tokenizer.pad_token_id)
    shared = trainers[True].shared_groups(batch)
    return {
        share: {
            "step_s": statistics.median(times[share]),
            "tokens": forward_work(batch, pack_groups(batch, shared) if share else None)[0],
            "flops_per_s": statistics.median(flops[share]),
        }
        for share in (True, False)
    }


async def generate_all(engine, prompts: list[list[int]]) -> float:
    from rollfleet_rollout.engine import GenerationRequest, SamplingParams

    async def one(rid: str, prompt: list[int]):
        request = GenerationRequest(rid, prompt, SamplingParams(max_new_tokens=NEW_TOKENS))
        async for _ in engine.generate(request):
            pass

    before = engine.tokens_generated
    started = time.perf_counter()
    await asyncio.gather(*(one(f"{g}-{i}", p) for g, p in enumerate(prompts) for i in range(GROUP)))
    return (engine.tokens_generated - before) / (time.perf_counter() - started)


def engine_rounds(folder: Path, rounds: int, measure, options) -> dict:
    """Two torch engines made with `options(on)`, the switch on (True) and off (False),
    each `measure(engine, on)`
    (a tokens/s) in alternating order for `rounds` rounds after a warm-up round: the
    median rate, prompt tokens prefilled per round and achieved FLOP/s of each."""
    from transformers import AutoModelForCausalLM

    from rollfleet_rollout.torch_engine import TorchEngine

    async def run() -> dict:
        engines = {}
        for on in (True, False):
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            engines[on] = TorchEngine(model, slots=64, eos_token_id=-1, seed=0, **options(on))
            await engines[on].start()
        rates = {True: [], False: []}
        try:
            for round_ in range(rounds + 1):
                for on in (True, False) if round_ % 2 else (False, True):
                    rate = await measure(engines[on], on)
                    if round_:
                        rates[on].append(rate)
        finally:
            for engine in engines.values():
                await engine.stop()
        return {
            on: {
                "tokens_per_s": statistics.median(rates[on]),
                "prefill_tokens": engines[on].prefill_tokens // (rounds + 1),
                "flops_per_s": engines[on].meter.per_second(),
            }
            for on in (True, False)
        }

    return asyncio.run(run())


async def episodes(engine, prompts: list[list[int]], sessions: bool) -> float:
    """Every prompt as a TURNS-turn episode; generated tokens/s over the whole run."""
    from rollfleet_rollout.engine import GenerationRequest, SamplingParams, complete

    params = SamplingParams(max_new_tokens=NEW_TOKENS)

    async def episode(index: int, prompt: list[int]):
        session = f"e{index}" if sessions else None
        context = list(prompt)
        for turn in range(TURNS):
            request = GenerationRequest(f"e{index}/{turn}", context, params, session=session)
            out = await complete(engine, request)
            context = [*context, *out.token_ids, *REPLY]
        if session:
            engine.end_session(session)

    before = engine.tokens_generated
    started = time.perf_counter()
    await asyncio.gather(*(episode(i, p) for i, p in enumerate(prompts)))
    return (engine.tokens_generated - before) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two rounds")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    quiet()
    import torch
    from transformers import AutoTokenizer

    from rollfleet.models.flops import peak_flops_per_core
    from rollfleet.models.tiny import create_tiny_model

    torch.set_num_threads(1)
    peak = peak_flops_per_core()
    print(machine())
    print(f"one-thread float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = create_tiny_model(Path(tmp) / "model", seed=0, max_len=256)
        for name, few_shot in (("default", 0), ("long_prompt", 8)):
            trainer = trainer_rounds(folder, few_shot, rounds, Path(tmp))
            prompts = prompts_of(few_shot, AutoTokenizer.from_pretrained(folder))
            engine = engine_rounds(
                folder,
                rounds,
                lambda engine, _, prompts=prompts: generate_all(engine, prompts),
                lambda on: {"max_len": 192, "share_prompts": on},
            )
            for share in (True, False):
                label = "shared" if share else "per-sample"
                t, e = trainer[share], engine[share]
                print(
                    f"{name:12} {label:10} trainer step {t['step_s']:.3f} s, "
                    f"{t['tokens']} tokens, {t['flops_per_s'] / 1e9:.2f} GFLOP/s "
                    f"({t['flops_per_s'] / peak:.0%} of peak) | engine "
                    f"{e['tokens_per_s']:.0f} tokens/s, {e['prefill_tokens']} prompt tokens "
                    f"prefilled, {e['flops_per_s'] / 1e9:.2f} GFLOP/s ({e['flops_per_s'] / peak:.0%})"
                )
            ratios[name] = (
                trainer[False]["step_s"] / trainer[True]["step_s"],
                engine[True]["tokens_per_s"] / engine[False]["tokens_per_s"],
            )
        long_prompts = prompts_of(8, AutoTokenizer.from_pretrained(folder))
        turns = engine_rounds(
            folder,
            rounds,
            lambda engine, on: episodes(engine, long_prompts, sessions=on),
            lambda on: {"max_len": 256},
        )
        for kept in (True, False):
            label = "sessions" if kept else "per turn"
            m = turns[kept]
            print(
                f"{'multi_turn':12} {label:10} engine {m['tokens_per_s']:.0f} tokens/s, "
                f"{m['prefill_tokens']} prompt tokens prefilled, "
                f"{m['flops_per_s'] / 1e9:.2f} GFLOP/s ({m['flops_per_s'] / peak:.0%})"
            )
    (dt, de), (lt, le) = ratios["default"], ratios["long_prompt"]
    me = turns[True]["tokens_per_s"] / turns[False]["tokens_per_s"]
    print(
        f"prefix-sharing trainer={dt:.2f}x engine={de:.2f}x "
        f"long_prompt trainer={lt:.2f}x engine={le:.2f}x multi_turn engine={me:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
