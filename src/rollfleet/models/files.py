"""A policy's config and tokenizer files, shared over the bus so every process builds the same model.

The trainer's leader publishes them after the warm-up; rollout workers and the other
trainer ranks fetch them into a folder and build the model from its config (the weights
come separately: weight_transport.py for workers, a broadcast for trainer ranks). Method
modules add files of their own (`extra`: `Stages.model_files`, e.g. Reasoning Palette's
VAE), which are required where a method lists them.
"""

from __future__ import annotations

from pathlib import Path

from rollfleet.bus import Bus

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
REQUIRED = ("config.json", "tokenizer.json")


async def publish_model_files(bus: Bus, folder: Path, extra: tuple[str, ...] = ()) -> None:
    for name in extra:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: a method's warm-up should have written it")
    for name in (*MODEL_FILES, *extra):
        if (folder / name).is_file():
            await bus.put_file(name, (folder / name).read_bytes())


async def fetch_model_files(bus: Bus, folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """Write the published files into `folder`; the optional ones may be missing."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*MODEL_FILES, *extra):
        try:
            (folder / name).write_bytes(await bus.get_file(name))
        except Exception:
            if name in REQUIRED or name in extra:
                raise
    return folder
