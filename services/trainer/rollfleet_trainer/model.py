"""The policy the trainer starts from: a user's HF folder, or the builtin tiny model after warm-up.

Method modules may add warm-up stages (SFT on their own data, auxiliary networks) after
it. The result is cached in `<run dir>/model/warmup/`, so `rollfleet run --resume` and a
restarted trainer pod skip it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rollfleet.bus import Bus
from rollfleet.methods import Stages
from rollfleet.models.architectures import ARCHITECTURES, import_architectures
from rollfleet.models.files import fetch_model_files
from rollfleet.models.source import model_folder
from rollfleet.models.warmup import warmup_sft
from rollfleet.spec import RLJobSpec
from rollfleet.tasks import make_task

log = logging.getLogger("trainer")


def load_folder(folder: Path):
    import_architectures()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path: {str(folder)!r} is not a Hugging Face model folder (no config.json)"
        )
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ), AutoTokenizer.from_pretrained(folder)


async def build_from_bus(bus: Bus, folder: Path, extra: tuple[str, ...] = ()):
    """(model, tokenizer) from the files the leader published (`extra`: the methods' own);
    the weights are random until the leader's are broadcast."""
    await fetch_model_files(bus, folder, extra)
    import_architectures()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def prepare_policy(spec: RLJobSpec, run_dir: Path):
    """Returns (model, tokenizer, folder holding its config and tokenizer files).

    The start model (`model.path`, `model.huggingface`'s snapshot, or the builtin model
    after its warm-up SFT), then the
    enabled methods' `warmup` stages; the result is cached in <run dir>/model/warmup."""
    stages = Stages.for_spec(spec)
    folder = run_dir / "model" / "warmup"
    if (folder / "config.json").is_file():
        log.info("using the cached warm-up model in %s", folder)
        model, tokenizer = load_folder(folder)
        return model.eval(), tokenizer, folder
    if (own := model_folder(spec.model, run_dir)) is not None:
        model, tokenizer = load_folder(own)
        if not stages.warms_up:
            return model.eval(), tokenizer, own
    else:
        model, tokenizer = builtin_warm_model(spec, run_dir)
    if stages.warms_up:
        task = make_task(spec.task.name, spec.task.params, spec.seed)
        folder.mkdir(parents=True, exist_ok=True)
        stages.warmup(model, tokenizer, task, folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer, folder


def builtin_warm_model(spec: RLJobSpec, run_dir: Path):
    """The builtin model (`model.architecture`), created and warmed up on the task's
    demonstrations."""
    m = spec.model
    init = ARCHITECTURES[m.architecture].create(
        run_dir / "model" / "init",
        seed=spec.seed,
        hidden=m.hidden,
        layers=m.layers,
        heads=m.heads,
        max_len=m.maxLength,
    )
    model, tokenizer = load_folder(init)
    warm = m.warmup
    if warm.steps:
        task = make_task(spec.task.name, spec.task.params, spec.seed)
        log.info("warm-up SFT: %d steps on %s demonstrations", warm.steps, task.name)
        with (run_dir / "warmup.jsonl").open("w") as f:
            warmup_sft(
                model,
                tokenizer,
                task,
                steps=warm.steps,
                batch_size=warm.batchSize,
                lr=warm.learningRate,
                seed=spec.seed,
                examples=warm.examples,
                on_step=lambda step, loss: f.write(json.dumps({"step": step, "loss": loss}) + "\n"),
            )
    return model, tokenizer
