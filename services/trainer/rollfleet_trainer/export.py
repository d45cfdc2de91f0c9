"""A trained policy as a Hugging Face model folder: config, tokenizer, safetensors weights.

The folder loads with `AutoModelForCausalLM.from_pretrained` and serves with vLLM (the
builtin FusedKV and NEZHA architectures need `rollfleet.models.architectures` imported
first: they are not in transformers). The trainer exports its final checkpoint when a
job ends (`checkpoint.exportTo`); any checkpoint can be exported on request:

    rollfleet export RUN_DIR OUT [--step N] [--job JOB.yaml]

OUT is a folder, or an fsspec URL (s3://bucket/path, gs://...) when that filesystem's
package is installed (s3fs, gcsfs) and its credentials are in the environment (in a
cluster, from a Secret through the job's `pod.env`). The config and tokenizer come from
the folder the trainer started from: `<run dir>/model/warmup` (the builtin model, or a
model after its methods' warm-up), else the job's `model.path` or `model.huggingface`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rollfleet.models.architectures import import_architectures
from rollfleet.models.source import ModelSourceError, model_folder
from rollfleet.spec import load_manifest
from rollfleet_trainer.checkpoint import latest_checkpoint

EXPORT_INFO = "rollfleet.json"  # what was exported: job, step, policy version


class ExportError(ValueError):
    """What is missing to export, naming the fix."""


def start_folder(run_dir: Path, job_file: Path | None = None) -> Path:
    """The folder with the config and tokenizer the trainer started from."""
    warm = run_dir / "model" / "warmup"
    if (warm / "config.json").is_file():
        return warm
    job_file = job_file or run_dir / "job.yaml"
    if not job_file.is_file():
        raise ExportError(
            f"{run_dir} has no model/warmup folder and no job.yaml: pass --job with the "
            "job's manifest (in a cluster, /etc/rollfleet/job.yaml)"
        )
    try:
        folder = model_folder(load_manifest(job_file).spec.model)  # model.path, or the snapshot
    except ModelSourceError as e:
        raise ExportError(str(e)) from None
    if folder is None or not (folder / "config.json").is_file():
        raise ExportError(
            f"spec.model: {str(folder)!r} is not a model folder to take the config from"
        )
    return folder


def checkpoint_at(run_dir: Path, step: int | None) -> Path:
    root = run_dir / "checkpoints"
    if step is None:
        found = latest_checkpoint(root)
        if found is None:
            raise ExportError(f"{root} holds no complete checkpoint yet")
        return found
    path = root / f"step-{step:08d}"
    if not (path / "state.json").is_file():
        kept = sorted(p.name for p in root.glob("step-*"))
        raise ExportError(f"no checkpoint of step {step} in {root}; kept: {kept}")
    return path


def write_folder(checkpoint: Path, start: Path, folder: Path, job: str = "") -> None:
    """The checkpoint's weights in the start folder's model class, saved with its tokenizer."""
    import_architectures()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(start))
    weights = load_file(checkpoint / "model.safetensors")
    # A tied lm_head is not in the checkpoint (it is the embedding); nothing else may lack.
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"{checkpoint} does not fit the model of {start}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(start).save_pretrained(folder)
    state = json.loads((checkpoint / "state.json").read_text())
    info = {
        "job": job,
        "checkpoint": checkpoint.name,
        "step": state.get("step"),
        "version": state.get("version"),
    }
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2))


def export_checkpoint(
    run_dir: Path, out: str, start: Path, step: int | None = None, job: str = ""
) -> str:
    """Export a checkpoint (the newest, or `step`'s) to `out`, with the config and tokenizer
    of `start` (see start_folder); returns where it went."""
    checkpoint = checkpoint_at(run_dir, step)
    if "://" in out:
        import fsspec

        with tempfile.TemporaryDirectory(prefix="rollfleet-export-") as tmp:
            write_folder(checkpoint, start, Path(tmp), job)
            fs, path = fsspec.core.url_to_fs(out)
            fs.put(f"{tmp}/", path.rstrip("/") + "/", recursive=True)
        return out
    target = Path(out)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_folder(checkpoint, start, staging, job)
    shutil.rmtree(target, ignore_errors=True)  # a new export replaces the old one whole
    staging.rename(target)
    return str(target)
