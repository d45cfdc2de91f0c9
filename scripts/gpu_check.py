"""GPU check (run through scripts/gpu_check.sh): measure the torch engine and the trainer on a GPU.

For two model sizes (the builtin tiny Llama, ~1 M parameters, and a 134 M-parameter Llama
of the same family, both with random weights) it prints:
- torch engine: generated tokens/s with continuous batching over its slots;
- trainer: milliseconds per optimizer step (GRPO + PPO-clip, the real `Trainer.train_step`);
- prefix sharing: the forward and backward of long-prompt groups (a 224-token prompt, 8
  samples of 16-32 tokens each) packed as prefix trees against every sample whole
  (rollfleet.models.prefix_sharing): milliseconds of each and the largest log-prob
  difference;
- vLLM engine: tokens/s for the same requests, if vLLM is importable;
- reward models (`rollfleet.rewards.RewardModels`, as the reward service loads them with
  `reward.gpus`): a sequence classifier's probabilities (RecGPT-V2's alignment model) and
  a reader's greedy answers (QAgent's, untrained) on the GPU against the same models on
  the CPU: the largest difference, the share of equal answers, and each side's time.
Without a CUDA GPU it prints what it skipped and exits 0. `--cpu` runs the same code on the
CPU (how the test suite checks this script); `--quick` shrinks every run; `--rewards`
runs only the reward models.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SIZES = {  # name: (hidden, layers, heads)
    "tiny-1M": (128, 4, 4),
    "llama-134M": (1024, 8, 16),
}
MAX_LEN = 256


def build(folder: Path, size: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollfleet.models.tiny import create_tiny_model

    hidden, layers, heads = SIZES[size]
    create_tiny_model(folder, seed=0, hidden=hidden, layers=layers, heads=heads, max_len=MAX_LEN)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, vocab) for _ in range(rng.randint(8, 24))] for _ in range(n)]


async def run_engine(engine, requests: list[list[int]], new_tokens: int) -> float:
    """Generated tokens per second for all requests submitted at once."""
    from rollfleet_rollout.engine import GenerationRequest, SamplingParams, complete

    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    await engine.start()
    try:
        t0 = time.perf_counter()
        outputs = await asyncio.gather(
            *(
                complete(engine, GenerationRequest(f"r{i}", ids, params))
                for i, ids in enumerate(requests)
            )
        )
        seconds = time.perf_counter() - t0
    finally:
        await engine.stop()
    return sum(len(o.token_ids) for o in outputs) / seconds


def torch_engine_tokens_per_s(model, requests, slots: int, new_tokens: int) -> float:
    from rollfleet_rollout.torch_engine import TorchEngine

    def engine():  # eos never ends a sample early: every request makes `new_tokens`
        return TorchEngine(model, slots=slots, max_len=MAX_LEN, eos_token_id=-1, seed=0)

    asyncio.run(run_engine(engine(), requests[:slots], 4))  # warm-up (CUDA init, kernels)
    return asyncio.run(run_engine(engine(), requests, new_tokens))


def vllm_tokens_per_s(model, tokenizer, requests, slots: int, new_tokens: int) -> float:
    from rollfleet_rollout.vllm_engine import VllmEngine

    engine = VllmEngine.from_model(
        model, tokenizer, version=0, max_len=MAX_LEN, seed=0, slots=slots
    )
    return asyncio.run(run_engine(engine, requests, new_tokens))


def trainer_step_ms(model, tokenizer, run_dir: Path, gpus: int, steps: int) -> tuple[float, int]:
    """Median wall time of `steps` optimizer steps (after two warm-up steps), and tokens/step."""
    from rollfleet.spec import parse_manifest
    from rollfleet_trainer.loop import Trainer
    from rollfleet_trainer.synthetic import synthetic_groups

    prompts_per_step, group = 8, 8
    job = parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "gpu-check"},
            "spec": {
                "trainer": {"promptsPerStep": prompts_per_step, "gpusPerWorker": gpus},
                "rollout": {"sampling": {"groupSize": group}},
            },
        }
    )
    trainer = Trainer(job, None, run_dir)
    trainer.set_model(model, tokenizer)
    batch = synthetic_groups(
        0, prompts_per_step, group, model.config.vocab_size, (8, 24), (32, 128)
    )
    times = []
    for i in range(steps + 2):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    tokens = sum(
        len(t.prompt_ids) + len(t.response_ids) for g in batch for t, _ in g.samples.values()
    )
    return statistics.median(times) * 1000, tokens


def reward_models_check(folder: Path, texts: int, prompts: int, train_steps: int) -> str:
    """The reward models on their device (the GPU when there is one) against the CPU."""
    from rollfleet.models.tiny import create_tiny_model
    from rollfleet.rewards import RewardModels
    from rollfleet.tasks.qagent import ReaderTask
    from rollfleet.tasks.recgpt import AlignTask, train_align_model

    align = train_align_model(folder / "align", steps=train_steps)
    reader = create_tiny_model(folder / "reader", seed=0, max_len=256)
    models = RewardModels({"align": str(align), "reader": str(reader)})
    classify = [AlignTask(0).example("heldout", i).prompt for i in range(texts)]
    ask = [ReaderTask(0, 1).example("heldout", i).prompt for i in range(prompts)]

    def timed(fn, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1000

    device = next(models.loaded["align"][0].parameters()).device
    models.probability("align", classify[:8])  # warm-up: kernels, allocator
    p_dev, p_ms = timed(models.probability, "align", classify)
    a_dev, a_ms = timed(models.answer, "reader", ask, 8)
    for name, (model, tokenizer, classifier) in list(models.loaded.items()):
        models.loaded[name] = (model.cpu(), tokenizer, classifier)
    p_cpu, p_cpu_ms = timed(models.probability, "align", classify)
    a_cpu, a_cpu_ms = timed(models.answer, "reader", ask, 8)
    gap = max(abs(a - b) for a, b in zip(p_dev, p_cpu, strict=True))
    same = sum(a == b for a, b in zip(a_dev, a_cpu, strict=True))
    return (
        f"reward-models on {device.type}: classifier {texts:,} texts {p_ms:,.1f} ms "
        f"(cpu {p_cpu_ms:,.1f} ms), max |p - p_cpu| {gap:.2e}; reader {prompts:,} prompts x 8 "
        f"tokens {a_ms:,.1f} ms (cpu {a_cpu_ms:,.1f} ms), answers equal {same}/{prompts}"
    )


def prefix_sharing_ms(model, device, lengths: tuple[int, int, int], repeats: int):
    """Median ms of the forward and backward of the same long-prompt groups, packed as
    prefix trees and per sample, and the largest log-prob difference between the two."""
    from rollfleet.models.batching import TrainBatch, token_logprobs
    from rollfleet.models.prefix_sharing import (
        grouped_token_logprobs,
        pack_groups,
        shared_prefix_groups,
    )
    from rollfleet_trainer.synthetic import synthetic_groups

    prompt, response, prompts, group = lengths[0], lengths[1:], 4, 8
    groups = synthetic_groups(
        0, prompts, group, model.config.vocab_size, (prompt, prompt), response
    )
    rows = [g.samples[i][0] for g in groups for i in range(group)]
    batch = TrainBatch.from_trajectories(rows, group, pad_id=0, device=device)
    packed = pack_groups(batch, shared_prefix_groups(batch))
    runs = {
        "shared": lambda: grouped_token_logprobs(model, batch, packed),
        "per sample": lambda: token_logprobs(model, batch.input_ids, batch.attention_mask),
    }
    times, logprobs = {name: [] for name in runs}, {}
    for i in range(repeats + 1):  # the first round warms up
        for name, forward in runs.items():
            model.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = forward()
            (out * batch.attention_mask).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t0)
            logprobs[name] = out.detach()
    mask = batch.attention_mask.bool()
    diff = (logprobs["shared"] - logprobs["per sample"])[mask].abs().max().item()
    shared, alone = (statistics.median(times[n]) * 1000 for n in runs)
    return shared, alone, diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (checks the script)")
    parser.add_argument("--quick", action="store_true", help="small runs, tiny model only")
    parser.add_argument("--rewards", action="store_true", help="only the reward models")
    args = parser.parse_args()
    torch.manual_seed(0)
    skipped = []
    if args.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"gpu-check: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    else:
        print(
            "gpu-check: no CUDA GPU here; skipped: torch engine on GPU, trainer steps on GPU, "
            "vLLM engine. Nothing failed."
        )
        return 0
    try:
        import vllm

        have_vllm = device.type == "cuda"
    except ImportError:
        have_vllm = False
        skipped.append("vLLM engine (vLLM is not installed)")
    if device.type != "cuda":
        skipped.append("vLLM engine (needs a GPU)")
    sizes = ["tiny-1M"] if args.quick else list(SIZES)
    requests, new_tokens, slots, steps = (16, 8, 8, 2) if args.quick else (512, 128, 256, 5)
    gpus = 1 if device.type == "cuda" else 0
    failed = []

    def attempt(what: str, measure):
        """Run one measurement; a failure is reported and the others still run."""
        try:
            measure()
        except Exception:
            failed.append(what)
            print(f"gpu-check: FAILED {what}:\n{traceback.format_exc()}")

    with tempfile.TemporaryDirectory(prefix="rollfleet-gpu-check-") as tmp:
        texts, asks, train_steps = (64, 16, 10) if args.quick else (4096, 512, 100)
        attempt(
            "reward models",
            lambda: print(reward_models_check(Path(tmp) / "rewards", texts, asks, train_steps)),
        )
        for size in [] if args.rewards else sizes:
            for dtype in (torch.float32, torch.bfloat16) if gpus else (torch.float32,):
                model, tokenizer = build(Path(tmp) / size, size, device, dtype)
                params = sum(p.numel() for p in model.parameters()) / 1e6
                work = prompts(requests, model.config.vocab_size)
                label = f"{size} ({params:.1f} M params, {str(dtype).removeprefix('torch.')})"

                def engine(model=model, work=work, label=label):
                    rate = torch_engine_tokens_per_s(model, work, slots, new_tokens)
                    print(
                        f"torch-engine {label} on {device.type}: {rate:,.0f} tokens/s "
                        f"({requests} requests x {new_tokens} new tokens, {slots} slots)"
                    )

                def vllm(model=model, tokenizer=tokenizer, work=work, label=label):
                    rate = vllm_tokens_per_s(model, tokenizer, work, slots, new_tokens)
                    print(f"vllm-engine {label}: {rate:,.0f} tokens/s")

                def sharing(model=model, label=label):
                    lengths = (24, 4, 8) if args.quick else (224, 16, 32)
                    shared, alone, diff = prefix_sharing_ms(model, device, lengths, steps)
                    print(
                        f"prefix-sharing {label} on {device.type}: shared {shared:,.1f} ms, "
                        f"per sample {alone:,.1f} ms ({alone / shared:.2f}x), forward and "
                        f"backward of 4 groups of 8 ({lengths[0]}-token prompt, "
                        f"{lengths[1]}-{lengths[2]}-token samples), max |d log-prob| {diff:.1e}"
                    )

                def trainer(model=model, tokenizer=tokenizer, label=label):
                    ms, tokens = trainer_step_ms(model, tokenizer, Path(tmp) / "run", gpus, steps)
                    print(
                        f"trainer-step {label} on {device.type}: {ms:,.1f} ms median of {steps} "
                        f"(64 samples, {tokens:,} tokens, AdamW)"
                    )

                attempt(f"torch engine {label}", engine)
                if have_vllm and dtype == torch.bfloat16:
                    attempt(f"vLLM engine {label}", vllm)
                if dtype == torch.float32:  # the trainer trains in float32
                    attempt(f"trainer {label}", trainer)
                    attempt(f"prefix sharing {label}", sharing)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if skipped:
        print("gpu-check: skipped: " + "; ".join(skipped))
    if failed:
        print("gpu-check: FAILED: " + "; ".join(failed))
        return 1
    print("gpu-check: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
