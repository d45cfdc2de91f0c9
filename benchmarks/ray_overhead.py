"""Ray Train against the single-process trainer: the same optimizer steps, side by side.

    .venv/bin/python benchmarks/ray_overhead.py [--steps 20] [--repeats 3]

Times the real `Trainer.train_step` on the same seeded synthetic batches as the default
job's (32 prompt groups x 8 samples, the tiny model) in four set-ups, in one run:
- single-1t: one process, one torch thread (what `trainer.workers: 1` runs locally);
- single-2t: one process, two torch threads (the whole machine);
- ray-1: one Ray Train worker (Ray's cost alone);
- ray-2: two Ray Train workers, DDP over gloo, 16 groups each, one thread each.
Prints the median step time of each (min/max over repeats), ratios against single-1t, and
Ray's start-up (ray.init, then fit() until rank 0's first step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "services" / "trainer")]

PROMPTS, GROUP = 32, 8


def job(workers: int) -> dict:
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "ray-overhead"},
        "spec": {
            "trainer": {"promptsPerStep": PROMPTS, "workers": workers},
            "rollout": {"sampling": {"groupSize": GROUP}},
        },
    }


def time_steps(config: dict) -> None:
    """Train `steps` (+2 warm-up) steps on this rank's share; rank 0 writes its timings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollfleet.spec import parse_manifest
    from rollfleet_trainer.loop import Trainer
    from rollfleet_trainer.parallel import DataParallel
    from rollfleet_trainer.synthetic import synthetic_groups

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    dp = DataParallel.from_process_group("ddp")
    trainer = Trainer(parse_manifest(job(dp.world)), None, Path(config["run_dir"]), dp)
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    trainer.set_model(model, AutoTokenizer.from_pretrained(config["model"]))
    first_step_at, times = time.time(), []
    for step in range(config["steps"] + 2):
        groups = synthetic_groups(step, PROMPTS, GROUP, model.config.vocab_size, (4, 8), (4, 12))
        batch = [g for g in groups if g.index % dp.world == dp.rank]
        t0 = time.perf_counter()
        trainer.train_step(batch)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    if dp.is_leader:
        Path(config["out"]).write_text(json.dumps({"times": times, "first_step_at": first_step_at}))


def run_ray(config: dict, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.time()
    TorchTrainer(
        time_steps,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(storage_path=str(Path(config["run_dir"]) / "ray-results")),
    ).fit()
    result = json.loads(Path(config["out"]).read_text())
    result["startup"] = result["first_step_at"] - started
    return result


def main() -> None:
    from rollfleet.models.tiny import create_tiny_model
    from rollfleet_trainer.ray_train import _start_local_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        root = Path(tmp)
        model = create_tiny_model(root / "model", seed=0)
        t0 = time.time()
        link = _start_local_ray(root, workers=2, gpus=0)
        init_seconds = time.time() - t0
        import ray

        medians: dict[str, list[float]] = {}
        startups: dict[str, list[float]] = {}
        try:
            for repeat in range(args.repeats):
                for name in ("single-1t", "single-2t", "ray-1", "ray-2"):
                    config = {
                        "model": str(model),
                        "run_dir": str(root / f"{name}-{repeat}"),
                        "steps": args.steps,
                        "threads": 2 if name == "single-2t" else 1,
                        "out": str(root / f"{name}-{repeat}.json"),
                    }
                    Path(config["run_dir"]).mkdir()
                    if name.startswith("single"):
                        time_steps(config)
                        result = json.loads(Path(config["out"]).read_text())
                    else:
                        result = run_ray(config, workers=int(name[-1]))
                        startups.setdefault(name, []).append(result["startup"])
                    medians.setdefault(name, []).append(statistics.median(result["times"]))
        finally:
            ray.shutdown()
            if link is not None:
                link.unlink()
                link.parent.rmdir()
    base = statistics.median(medians["single-1t"])
    print(
        f"train step, {PROMPTS}x{GROUP} samples, tiny model; median of {args.steps} steps, {args.repeats} repeats"
    )
    for name, values in medians.items():
        m = statistics.median(values)
        print(
            f"  {name:10s} {m * 1000:7.1f} ms  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"
            f"  x{m / base:.2f} of single-1t"
        )
    for name, values in startups.items():
        print(
            f"  {name} start-up (fit() to first step): median {statistics.median(values):.1f} s "
            f"(min {min(values):.1f}, max {max(values):.1f})"
        )
    print(f"  ray.init on loopback: {init_seconds:.1f} s")
    ray1 = statistics.median(medians["ray-1"]) / base
    ray2 = statistics.median(medians["ray-2"]) / base
    print(f"ray-overhead step ray-1={ray1:.2f}x ray-2={ray2:.2f}x (against single-1t)")


if __name__ == "__main__":
    main()
