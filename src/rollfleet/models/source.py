"""Where the policy starts: a Hugging Face model id at a revision, fetched once into the
Hugging Face cache (`model.huggingface`), resolved to the folder the trainer loads.

    folder = model_folder(spec.model, run_dir)   # model.path, or the snapshot folder of
                                                 # model.huggingface (a resume must match it)

The cache is HF_HOME (a PersistentVolumeClaim in a cluster, mounted by the trainer's pods;
locally the user's own ~/.cache/huggingface), the token HF_TOKEN (from the Secret that
`tokenSecret` names). With HF_HUB_OFFLINE=1 only the cache is read. Only the trainer
loads the model: rollout workers take its config, tokenizer and weights from the trainer
over NATS, so every pool runs exactly the revision the trainer resolved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# What a model folder needs; the rest of a repository (other formats, originals) is left.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]
SOURCE_FILE = "source.json"  # in <run dir>/model: the commit this run started from


class ModelSourceError(ValueError):
    """The model id or revision cannot be resolved; names the field and the fix."""


def resolve_huggingface(source) -> Path:
    """The local snapshot folder of `source` (a spec HuggingFaceSource), downloading into
    the cache what it lacks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"spec.model.huggingface: {source.id} at revision {source.revision!r}"
    try:
        folder = snapshot_download(
            source.id,
            revision=source.revision,
            allow_patterns=MODEL_FILES,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except RevisionNotFoundError:
        raise ModelSourceError(
            f"{where}: no such revision; use a commit, tag or branch of the model"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{where}: no such model, or a gated one without a token; check the id, or "
            "give a token (tokenSecret; locally HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"{where}: not in the Hugging Face cache ({cache_folder()}) and not downloadable "
            "(offline, or no network): fetch it where there is a network, "
            f"`hf download {source.id} --revision {source.revision}`, or fix the id or revision"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelSourceError(f"{where}: cannot be fetched: {e}") from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{where}: the snapshot has no config.json: not a model")
    return path


def cache_folder() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def record_source(run_dir: Path, source, folder: Path) -> None:
    """Remember the commit a run started from; a resume resolving another one is refused
    (a branch moved between the two: the checkpoints belong to the first)."""
    commit = folder.name  # snapshots/<commit>
    path = run_dir / "model" / SOURCE_FILE
    if path.is_file():
        first = json.loads(path.read_text())
        if (first["id"], first["commit"]) != (source.id, commit):
            raise ModelSourceError(
                f"spec.model.huggingface: {source.id} at {source.revision!r} resolves to "
                f"commit {commit}, but this run started from {first['id']} at commit "
                f"{first['commit']}: set revision: {first['commit']} to resume it"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": source.id, "revision": source.revision, "commit": commit}))


def model_folder(model, run_dir: Path | None = None) -> Path | None:
    """The folder of the job's own model (`model` is spec.model): model.path, or the
    snapshot of model.huggingface (recorded in `run_dir`); None for the builtin model."""
    if model.path:
        return Path(model.path)
    if model.huggingface is None:
        return None
    folder = resolve_huggingface(model.huggingface)
    if run_dir is not None:
        record_source(run_dir, model.huggingface, folder)
    return folder
