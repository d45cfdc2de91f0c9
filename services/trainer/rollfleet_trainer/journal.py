"""The trainer's journal of its prompt groups, kept on the bus, so a restart neither loses
nor repeats one.

A trained group's trajectories stay unacked until a checkpoint holds the step that used
them: a trainer that dies between two checkpoints gets them redelivered and trains them
once more on the model it resumes, and a group the checkpoint already holds is not
trained again. The journal (one JSON value per trainer rank in the job's `inflight`
bucket, rewritten as it changes) is what tells the two apart after a crash:

    issued   tasks published, not trained yet        -> resumed as in flight
    trained  trained at `step`, not yet committed    -> in flight if step > checkpoint,
                                                        else already in the model
    reissue  its samples thrown away, to be issued   -> issued again
             again (too old after a resume)
    dropped  not trained on, with a reason           -> its late samples are ignored

plus the data cursor, so indices issued before the crash are not issued again. Writes
happen after the tasks are published (a crash in between re-issues those indices: the
same group id, whichever copy of a sample arrives first is kept) and before any ack that
depends on them.

Each rank also appends what happened to every group to `groups-<rank>.jsonl` in the run
folder (issued, trained at step s, dropped with a reason, left in flight at the end):
the audit trail benchmarks/faults.py reads to count groups lost or trained twice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Entry:
    index: int
    kind: str
    state: str = "issued"  # issued | trained | reissue | dropped
    step: int = 0  # the step that trained it


@dataclass
class GroupJournal:
    rank: int
    world: int
    log_path: Path | None = None
    cursor: int = 0
    entries: dict[str, Entry] = field(default_factory=dict)
    held: dict[str, list] = field(default_factory=dict)  # trained group id -> unacked raws
    dirty: bool = False
    # Each entry's `"id": [...]` text, kept as entries change: the journal is rewritten
    # several times a step and holds every group since the last checkpoint, so encoding
    # all of them each time would cost O(groups) of JSON per write.
    _encoded: dict[str, str] = field(default_factory=dict, repr=False)

    # --- what happens to a group ----------------------------------------------------------
    def issued(self, group_id: str, index: int, kind: str, cursor: int) -> None:
        self.entries[group_id] = Entry(index, kind)
        self.cursor = cursor
        self._changed(group_id)
        self._log(event="issued", index=index)

    def reissue(self, group_id: str) -> None:
        self.entries[group_id].state = "reissue"
        self._changed(group_id)

    def reissued(self, group_id: str) -> None:
        self.entries[group_id].state = "issued"
        self._changed(group_id)

    def trained(self, group_id: str, step: int, raws: list) -> None:
        entry = self.entries[group_id]
        entry.state, entry.step = "trained", step
        self.held[group_id] = raws
        self._changed(group_id)

    def trained_step(self, step: int, indices: list[int]) -> None:
        self._log(event="trained", step=step, indices=sorted(indices))

    def dropped(self, group_id: str, reason: str) -> None:
        if (entry := self.entries.get(group_id)) is not None:
            entry.state = "dropped"
            self._changed(group_id)
            self._log(event="dropped", index=entry.index, reason=reason)

    def commit(self, step: int) -> list:
        """A checkpoint at `step` holds every group trained so far: forget them and the
        dropped ones, and return the raw messages now safe to ack."""
        done = [g for g, e in self.entries.items() if e.state in ("trained", "dropped")]
        raws = [raw for g in done for raw in self.held.pop(g, [])]
        for group_id in done:
            del self.entries[group_id], self._encoded[group_id]
        self.dirty = self.dirty or bool(done)
        return raws

    def ended(self, in_flight: list[int]) -> None:
        self._log(event="ended", in_flight=sorted(in_flight))

    def unacked(self) -> list:
        return [raw for raws in self.held.values() for raw in raws]

    # --- on the bus -------------------------------------------------------------------------
    def _changed(self, group_id: str) -> None:
        e = self.entries[group_id]
        self._encoded[group_id] = f"{json.dumps(group_id)}: " + json.dumps(
            [e.index, e.kind, e.state, e.step]
        )
        self.dirty = True

    def encode(self) -> bytes:
        """{"world": ..., "cursor": ..., "groups": {id: [index, kind, state, step]}}"""
        groups = ", ".join(self._encoded.values())
        return (
            f'{{"world": {self.world}, "cursor": {self.cursor}, "groups": {{{groups}}}}}'
        ).encode()

    @staticmethod
    def read(data: bytes) -> dict:
        return json.loads(data)

    def restore(self, saved: dict, checkpoint_step: int) -> tuple[list[Entry], list[str]]:
        """Take the previous life's journal (as `read` returns it, written by as many ranks):
        (groups to resume: in flight, or `reissue` to be issued again; ids of groups
        whose late samples are ignored)."""
        self.cursor = saved["cursor"]
        resumed, finished = [], []
        for group_id, (index, kind, state, step) in saved["groups"].items():
            if state == "dropped" or (state == "trained" and step <= checkpoint_step):
                finished.append(group_id)  # dropped, or already in the checkpoint
                continue
            self.entries[group_id] = Entry(
                index, kind, "reissue" if state == "reissue" else "issued"
            )
            self._changed(group_id)
            resumed.append(self.entries[group_id])
        self.dirty = True
        return resumed, finished

    def resumed(self, checkpoint_step: int, in_flight: int) -> None:
        self._log(event="resumed", checkpoint_step=checkpoint_step, in_flight=in_flight)

    def _log(self, **event) -> None:
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(event) + "\n")


def audit(run_dir: Path) -> dict[str, int]:
    """What became of every group the run issued, from its `groups-<rank>.jsonl` files.

    A resume discards the steps after its checkpoint; what the final model learnt from is
    the steps left. `trained_twice` counts groups in two of those steps, `lost` groups
    issued but neither trained there, nor dropped with a reason, nor in flight at the end.
    """
    totals = Counter()
    for path in sorted(run_dir.glob("groups-*.jsonl")):
        issued, dropped, in_flight = set(), set(), set()
        steps: dict[int, list[int]] = {}
        for line in path.read_text().splitlines():
            event = json.loads(line)
            match event["event"]:
                case "issued":
                    issued.add(event["index"])
                case "dropped":
                    dropped.add(event["index"])
                case "trained":
                    steps[event["step"]] = event["indices"]
                case "resumed":
                    steps = {s: i for s, i in steps.items() if s <= event["checkpoint_step"]}
                    totals["resumes"] += 1
                case "ended":
                    in_flight = set(event["in_flight"])
        trained = Counter(i for indices in steps.values() for i in indices)
        totals["issued"] += len(issued)
        totals["trained"] += len(trained)
        totals["dropped"] += len(dropped - set(trained))
        totals["trained_twice"] += sum(1 for n in trained.values() if n > 1)
        totals["lost"] += len(issued - set(trained) - dropped - in_flight)
    return dict(totals)
