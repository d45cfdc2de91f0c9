"""`jsonl`: a user's own prompts from a JSON Lines file, one object per line.

    task:
      name: jsonl
      params: {path: data/train.jsonl, heldout_path: data/test.jsonl}

Each line needs the prompt and answer fields (names configurable). Without
`heldout_path`, the last `heldout_fraction` of the file is held out. The train split
cycles through its rows epoch after epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

from rollfleet.tasks import Example, Split, Task, register_task


def read_jsonl(path: Path, field: str):
    """(line number, object) for each non-empty line of a JSON Lines file; errors name the
    file and line, and `field`, the task parameter that named the file."""
    if path.is_dir():
        raise ValueError(f"{field}: {str(path)!r} is a folder, not a JSON Lines file")
    if not path.is_file():
        raise FileNotFoundError(f"{field}: file {str(path)!r} does not exist")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{field}: {path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x}); a "
                    "JSON Lines file is UTF-8 text, one JSON object per line"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{field}: {path}:{number}: not valid JSON ({e.msg}); a JSON Lines file "
                    "holds one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{field}: {path}:{number}: expected a JSON object per line, "
                    f"got {type(row).__name__}"
                )
            yield number, row


def _read_rows(path: Path, prompt_field: str, answer_field: str, field="task.params.path"):
    rows = []
    for number, row in read_jsonl(path, field):
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
        rows = _read_rows(Path(path), prompt_field, answer_field)
        if heldout_path:
            self._rows = {
                "train": rows,
                "heldout": _read_rows(
                    Path(heldout_path), prompt_field, answer_field, "task.params.heldout_path"
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
