"""`jsonl`: a user's own prompts from a JSON Lines file (one object per line) or a Parquet
file (one row per prompt), on disk or at an fsspec URL.

    task:
      name: jsonl
      params: {path: data/train.jsonl, heldout_path: data/test.parquet}
      # or s3://bucket/train.parquet, with s3fs installed and credentials in the
      # environment (in a cluster: task.secret)

Each line needs the prompt and answer fields (names configurable). Without
`heldout_path`, the last `heldout_fraction` of the file is held out. The train split
cycles through its rows epoch after epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

from rollfleet.tasks import Example, Split, Task, register_task


def read_records(source: str | Path, field: str):
    """(row number, object) of each row of a task file: JSON Lines, or Parquet (by its
    `.parquet` suffix), at a path or an fsspec URL (s3://, gs://, https://; the filesystem's
    package installed and its credentials in the environment). Errors name the file, the
    line, and `field`, the task parameter that named the file."""
    name = str(source)
    with _open(name, field) as f:
        if name.endswith(".parquet"):
            yield from _parquet_rows(f, name, field)
        else:
            yield from _jsonl_rows(f, name, field)


def _open(name: str, field: str):
    if "://" not in name:
        path = Path(name)
        if path.is_dir():
            raise ValueError(f"{field}: {name!r} is a folder, not a JSON Lines or Parquet file")
        if not path.is_file():
            raise FileNotFoundError(f"{field}: file {name!r} does not exist")
        return path.open("rb")
    import fsspec

    protocol = name.split("://", 1)[0]
    try:
        return fsspec.open(name, "rb").open()
    except ImportError as e:
        raise ValueError(
            f"{field}: {name} needs the fsspec filesystem for {protocol}:// ({e})"
        ) from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{field}: {name} does not exist") from None
    except (ValueError, OSError) as e:  # an unknown protocol, a refused connection
        raise ValueError(f"{field}: {name} cannot be opened: {e}") from None


def _parquet_rows(f, name: str, field: str):
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(f)
    except pyarrow.ArrowException as e:
        raise ValueError(f"{field}: {name}: not a Parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _jsonl_rows(f, name: str, field: str):
    for number, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{field}: {name}:{number}: not UTF-8 text (byte {raw[e.start]:#04x}); a "
                "JSON Lines file is UTF-8 text, one JSON object per line"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{field}: {name}:{number}: not valid JSON ({e.msg}); a JSON Lines file "
                "holds one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{field}: {name}:{number}: expected a JSON object per line, "
                f"got {type(row).__name__}"
            )
        yield number, row


def _read_rows(path: str, prompt_field: str, answer_field: str, field="task.params.path"):
    rows = []
    for number, row in read_records(path, field):
        for name in (prompt_field, answer_field):
            if name in row and not isinstance(row[name], str | int | float):
                raise ValueError(
                    f"{field}: {path}:{number}: field {name!r} must be text or a number, "
                    f"got {json.dumps(row[name])[:40]}"
                )
            if name not in row:
                hint = "prompt" if name == prompt_field else "answer"
                raise ValueError(
                    f"{field}: {path}:{number}: missing field {name!r}"
                    + (
                        f"; set task.params.{hint}_field to the right name"
                        if field.endswith("path")
                        else ""
                    )
                )
        rows.append(row)
    if not rows:
        raise ValueError(f"{field}: {path} holds no rows")
    return rows


@register_task("jsonl")
class JsonlTask(Task):
    name = "jsonl"
    default_reward = "exact_match"

    def __init__(
        self,
        seed: int = 0,
        path: str | None = None,
        heldout_path: str | None = None,
        heldout_fraction: float = 0.1,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
    ):
        if not path:
            raise ValueError("task.params.path: the jsonl task needs the path of a JSON Lines file")
        self.prompt_field, self.answer_field = prompt_field, answer_field
        rows = _read_rows(path, prompt_field, answer_field)
        if heldout_path:
            self._rows = {
                "train": rows,
                "heldout": _read_rows(
                    heldout_path, prompt_field, answer_field, "task.params.heldout_path"
                ),
            }
        else:
            cut = max(1, round(len(rows) * (1 - heldout_fraction)))
            if cut >= len(rows):
                raise ValueError(
                    f"task.params.path: {len(rows)} rows leave nothing to hold out; add rows, "
                    "raise heldout_fraction or set heldout_path"
                )
            self._rows = {"train": rows[:cut], "heldout": rows[cut:]}

    def size(self, split: Split) -> int | None:
        return len(self._rows[split])

    def example(self, split: Split, index: int) -> Example:
        rows = self._rows[split]
        row = rows[index % len(rows)]
        answer = str(row[self.answer_field])
        return Example(
            id=f"jsonl-{split}-{index % len(rows)}",
            prompt=str(row[self.prompt_field]),
            answer=answer,
            meta={},
            demonstration=(("model", str(row.get("demonstration", answer))),),
        )
