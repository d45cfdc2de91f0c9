"""A policy's config and tokenizer files, shared over the bus so every process builds the same model.

The trainer's leader publishes them after the warm-up; rollout workers and the other
trainer ranks fetch them into a folder and build the model from its config (the weights
come separately: weight_transport.py for workers, a broadcast for trainer ranks).
"""

from __future__ import annotations

from pathlib import Path

from rollfleet.bus import Bus

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REQUIRED = ("config.json", "tokenizer.json")


async def publish_model_files(bus: Bus, folder: Path) -> None:
    for name in MODEL_FILES:
        if (folder / name).is_file():
            await bus.put_file(name, (folder / name).read_bytes())


async def fetch_model_files(bus: Bus, folder: Path) -> Path:
    """Write the published files into `folder`; the optional ones may be missing."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        try:
            (folder / name).write_bytes(await bus.get_file(name))
        except Exception:
            if name in REQUIRED:
                raise
    return folder
