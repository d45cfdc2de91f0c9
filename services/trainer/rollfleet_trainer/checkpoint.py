"""Checkpoints: model weights as safetensors, optimizer state, and the trainer's counters.

    runs/<job>/checkpoints/step-00000050/{model.safetensors, optimizer.pt, state.json}
    runs/<job>/checkpoints/latest        # name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and `latest` is
replaced atomically, so a crash mid-write never leaves a half checkpoint behind `latest`.
The optimizer state is keyed by parameter name (torch.distributed.checkpoint's full form),
so a checkpoint written by N trainer ranks resumes on M; it is read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(
    root: Path, step: int, model_state: dict, optimizer_state: dict, state: dict, keep: int
) -> Path:
    """Write a checkpoint from full (unsharded) states; only the leader rank calls this."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_state, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, trainer state) as written by save_checkpoint."""
    return (
        load_file(path / "model.safetensors"),
        torch.load(path / "optimizer.pt", weights_only=True),
        json.loads((path / "state.json").read_text()),
    )
