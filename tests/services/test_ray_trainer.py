"""Data-parallel training with Ray Train: two CPU workers (gloo) take the same steps as one.

One local Ray instance (loopback, temp dir under pytest's tmp) runs TorchTrainer fits of
the real `Trainer.train_step`; the single-worker reference runs in this process. Each
step trains on 4 prompt groups of 4 samples with responses of different lengths, so the
two ranks hold different token counts and the loss normalisation across ranks matters.

- 2 workers (DDP) after K steps == 1 worker after K steps, and their checkpoint resumes
  on 1 worker: K more steps end where 2K uninterrupted single-worker steps end;
- a checkpoint written by 1 worker resumes on 2 workers with FSDP2 (fully_shard), and K
  more steps end there too;
- FSDP2 shards every registered architecture (FusedKV's fused layers) and keeps the step,
  here under sequence-mean aggregation with RAVR (its pull rows give the ranks different
  row counts).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.models.architectures import ARCHITECTURES, import_architectures
from rollfleet.models.tiny import create_tiny_model
from rollfleet.models.weights import export_state
from rollfleet.spec import parse_manifest
from rollfleet_trainer.loop import Trainer
from rollfleet_trainer.parallel import DataParallel
from rollfleet_trainer.synthetic import synthetic_groups

STEPS = 3  # K
PROMPTS, GROUP = 4, 4
# float32 sums in another order, through Adam at lr 1e-2: ~7e-5 seen; a wrong loss
# normalisation across ranks (each rank its own token mean) moves weights by ~5e-2.
ATOL = 5e-4


def job_manifest(aggregation: str = "token-mean", ravr: bool = False) -> dict:
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "ray-eq"},
        "spec": {
            "seed": 0,
            "trainer": {"steps": 2 * STEPS, "promptsPerStep": PROMPTS, "workers": 2},
            "rollout": {"sampling": {"groupSize": GROUP}},
            "algorithm": {
                "learningRate": 1e-2,
                "learningRateSchedule": "linear",
                "lossAggregation": aggregation,
            },
            "checkpoint": {"every": STEPS, "keep": 3},
            "methods": {"ravr": {"posteriorSamples": 2}} if ravr else {},
        },
    }


def with_ravr_conditioning(groups: list) -> list:
    """Synthetic groups as RAVR samples them: the first two of each group drawn under a
    longer, answer-bearing prompt."""
    from rollfleet.protocol import RavrSample

    for g in groups:
        for i, (t, _) in g.samples.items():
            question = list(t.prompt_ids)
            t.conditioning.ravr = RavrSample(
                posterior=i < 2, question_ids=question, cue_ids=[5], reference_ids=[7, 8]
            )
            if i < 2:
                t.prompt_ids = [*question, 9, 10]
    return groups


def train(config: dict) -> None:
    """One rank (or the only process): optionally resume, train `steps`, save the weights."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dp = DataParallel.from_process_group(config["strategy"])
    run_dir = Path(config["run_dir"])
    trainer = Trainer(parse_manifest(config["job"]), None, run_dir, dp)
    import_architectures()  # a FusedKV folder needs its classes registered
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    if dp.rank > 0:  # as in a run, other ranks start from other weights: rank 0's must win
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
    trainer.set_model(model, AutoTokenizer.from_pretrained(config["model"]))
    if config["resume"]:
        assert trainer.load_latest_checkpoint(), "expected a checkpoint to resume from"
    vocab = model.config.vocab_size
    for _ in range(config["steps"]):
        step = trainer.state["step"]
        groups = synthetic_groups(step, PROMPTS, GROUP, vocab)
        if config["job"]["spec"]["methods"]:
            groups = with_ravr_conditioning(groups)
        batch = [g for g in groups if g.index % dp.world == dp.rank]
        trainer.train_step(batch)
        trainer.state["step"] += 1
        trainer.state["version"] += 1
        if trainer.state["step"] % STEPS == 0:
            trainer._checkpoint()
    state = trainer.full_model_state()
    if dp.is_leader:
        save_file(export_state(trainer.model, state), run_dir / config["out"])
        (run_dir / "world.json").write_text(json.dumps({"world": dp.world}))


def listening_addresses(root_pid: int) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) of TCP sockets listened on by
    `root_pid`'s descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    pids, todo = set(), list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        pids.add(pid)
        todo.extend(children.get(pid, []))
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                if (target := os.readlink(fd)).startswith("socket:["):
                    inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.add(fields[1].rsplit(":", 1)[0])
    return addresses


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    from rollfleet_trainer.ray_train import _start_local_ray

    root = tmp_path_factory.mktemp("ray")
    link = _start_local_ray(root, workers=2, gpus=0)
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield root
    ray.shutdown()
    if link is not None:
        link.unlink()
        link.parent.rmdir()


def test_local_ray_listens_on_loopback_only(local_ray):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    addresses = listening_addresses(os.getpid())
    assert addresses, "expected Ray's servers (GCS, raylet) among this process's children"
    assert addresses <= LOOPBACK, f"listening beyond loopback: {addresses - LOOPBACK}"
    assert list(local_ray.glob("ray/session_*")), "Ray's temp dir is under the given folder"


def fit_two_workers(config: dict, storage: Path) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        train,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(
            storage_path=str(storage),
            name=Path(config["run_dir"]).name,
            failure_config=FailureConfig(max_failures=0),
        ),
    ).fit()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    model = create_tiny_model(root / "model", seed=0)

    def config(
        name: str,
        steps: int,
        out: str,
        resume: bool = False,
        strategy: str = "ddp",
        aggregation: str = "token-mean",
        ravr: bool = False,
        model_dir: Path = model,
    ):
        run_dir = root / name
        run_dir.mkdir(exist_ok=True)
        return {
            "job": job_manifest(aggregation, ravr),
            "model": str(model_dir),
            "run_dir": str(run_dir),
            "steps": steps,
            "out": out,
            "resume": resume,
            "strategy": strategy,
        }

    # The references, in this process: 2K steps straight; and K steps, a checkpoint
    # (kept aside), then K more after resuming from it.
    train(config("straight", 2 * STEPS, "final.safetensors"))
    train(config("single", STEPS, "k.safetensors"))
    shutil.copytree(root / "single" / "checkpoints", root / "one-worker-checkpoints")
    train(config("single", STEPS, "final.safetensors", resume=True))
    return root, config


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < ATOL, f"largest parameter difference {worst:.2e}"


def test_single_worker_training_moves_the_weights_and_resumes_exactly(setting):
    root, _ = setting
    start = load_file(root / "model" / "model.safetensors")
    after = weights(root / "single" / "k.safetensors")
    moved = max((after[k] - start[k]).abs().max().item() for k in after)
    assert moved > 1e-3  # the comparisons below are not between untouched models
    assert_close(
        weights(root / "single" / "final.safetensors"),
        weights(root / "straight" / "final.safetensors"),
    )


def test_two_workers_take_the_steps_of_one_and_their_checkpoint_resumes_on_one(local_ray, setting):
    root, config = setting
    fit_two_workers(config("two-then-one", STEPS, "k.safetensors"), local_ray)
    assert json.loads((root / "two-then-one" / "world.json").read_text()) == {"world": 2}
    assert_close(
        weights(root / "two-then-one" / "k.safetensors"),
        weights(root / "single" / "k.safetensors"),
    )
    train(config("two-then-one", STEPS, "final.safetensors", resume=True))
    assert_close(
        weights(root / "two-then-one" / "final.safetensors"),
        weights(root / "straight" / "final.safetensors"),
    )


def test_checkpoint_of_one_worker_resumes_on_two_with_fsdp(local_ray, setting):
    root, config = setting
    shutil.copytree(root / "one-worker-checkpoints", root / "one-then-two" / "checkpoints")
    fit_two_workers(
        config("one-then-two", STEPS, "final.safetensors", resume=True, strategy="fsdp"),
        local_ray,
    )
    assert json.loads((root / "one-then-two" / "world.json").read_text()) == {"world": 2}
    assert_close(
        weights(root / "one-then-two" / "final.safetensors"),
        weights(root / "straight" / "final.safetensors"),
    )


def test_fsdp_keeps_the_step_of_fusedkv_with_sequence_mean_and_ravr_rows(local_ray, setting):
    """FSDP on two workers takes the step of one process on FusedKV (its top layers have no
    key/value projections, and fusion weights instead), under sequence-mean aggregation
    (the ranks sum its denominator, sequences, before dividing) with RAVR's pull rows (the
    ranks hold different row counts)."""
    root, config = setting
    folder = ARCHITECTURES["fusedkv"].create(root / "fusedkv-model", seed=0)
    seq = {"aggregation": "seq-mean-token-mean", "ravr": True, "model_dir": folder}
    train(config("fusedkv-seq-single", STEPS, "k.safetensors", **seq))
    fit_two_workers(
        config("fusedkv-seq-two", STEPS, "k.safetensors", strategy="fsdp", **seq), local_ray
    )
    one = weights(root / "fusedkv-seq-single" / "k.safetensors")
    assert any("fusion" in name for name in one)
    assert_close(weights(root / "fusedkv-seq-two" / "k.safetensors"), one)
    train(config("fusedkv-single", STEPS, "k.safetensors", model_dir=folder))
    token_mean = weights(root / "fusedkv-single" / "k.safetensors")
    assert max((one[k] - token_mean[k]).abs().max().item() for k in one) > 10 * ATOL  # not a no-op
