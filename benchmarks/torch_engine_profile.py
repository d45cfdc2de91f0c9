"""Where the torch engine's decode time goes, float32 against bfloat16 (torch.profiler).

    PYTHONPATH=src:services/rollout python benchmarks/torch_engine_profile.py [--device cuda]

Builds the tiny Llama, fills 256 slots, and profiles 20 decode steps in each dtype; prints
the time per step, the kernels launched per step, and the top operators by self time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "services" / "rollout")]


def main() -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from rollfleet.models.tiny import create_tiny_model
    from rollfleet_rollout.torch_engine import SlotLlama, sample

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slots", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = create_tiny_model(Path(tmp) / "m", seed=0, max_len=256)
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            runner = SlotLlama(model, args.slots, 256)
            slots = list(range(args.slots))
            logits = runner.prefill(slots, [[1, 5, 6, 7, 8]] * args.slots)
            slot_t = torch.tensor(slots, device=device)
            positions = torch.full((args.slots,), 5, device=device)
            generator = torch.Generator(device=device).manual_seed(0)
            temperature = torch.ones(args.slots, device=device)
            top_p = torch.ones(args.slots, device=device)

            for _ in range(5):
                tokens, _ = sample(logits, temperature, top_p, generator)
                logits, positions = runner.decode(slot_t, tokens, positions), positions + 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps = 20
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    tokens, _ = sample(logits, temperature, top_p, generator)
                    logits, positions = runner.decode(slot_t, tokens, positions), positions + 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
            per_step = (time.perf_counter() - t0) / steps * 1000
            kernels = (
                sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
                if device.type == "cuda"
                else 0
            )
            print(
                f"== {dtype}: {per_step:.2f} ms per decode step (profiled), {kernels / steps:.0f} kernels per step"
            )
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50))


if __name__ == "__main__":
    main()
