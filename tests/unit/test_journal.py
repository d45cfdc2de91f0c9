"""The trainer's journal of groups (rollfleet_trainer.journal): what a restart takes up
again, and the audit of a run's group log.

    .venv/bin/pytest -q tests/unit/test_journal.py
"""

from __future__ import annotations

import json

from rollfleet_trainer.journal import GroupJournal, audit


def test_a_restart_takes_up_what_the_checkpoint_does_not_hold():
    journal = GroupJournal(rank=0, world=1)
    for index in range(5):
        journal.issued(f"g{index}", index, "countdown", cursor=index + 1)
    journal.trained("g0", step=3, raws=["r0"])  # in the checkpoint at step 4
    journal.trained("g1", step=5, raws=["r1"])  # after it: trained again
    journal.dropped("g2", "failed")
    journal.reissue("g3")  # its samples were thrown away: to be issued again
    saved = GroupJournal.read(journal.encode())

    fresh = GroupJournal(rank=0, world=1)
    resumed, finished = fresh.restore(saved, checkpoint_step=4)
    assert sorted((e.index, e.state) for e in resumed) == [
        (1, "issued"),
        (3, "reissue"),
        (4, "issued"),
    ]
    assert sorted(finished) == ["g0", "g2"]
    assert fresh.cursor == 5


def test_a_commit_releases_the_held_samples_of_trained_groups_only():
    journal = GroupJournal(rank=0, world=1)
    for index in range(3):
        journal.issued(f"g{index}", index, "countdown", cursor=index + 1)
    journal.trained("g0", step=1, raws=["a", "b"])
    journal.dropped("g1", "stale")
    assert journal.unacked() == ["a", "b"]
    assert journal.commit(step=1) == ["a", "b"]
    assert list(journal.entries) == ["g2"]  # still in flight
    assert journal.unacked() == []


def test_the_encoded_journal_follows_every_change_of_its_groups():
    journal = GroupJournal(rank=0, world=2)
    for index in range(4):
        journal.issued(f"g{index}", index, "countdown", cursor=index + 1)
    journal.trained("g0", step=1, raws=["a"])
    journal.dropped("g1", "stale")
    journal.reissue("g2")
    journal.reissued("g2")
    journal.commit(step=1)
    journal.trained("g3", step=2, raws=["b"])
    assert GroupJournal.read(journal.encode()) == {
        "world": 2,
        "cursor": 4,
        "groups": {"g2": [2, "countdown", "issued", 0], "g3": [3, "countdown", "trained", 2]},
    }
    fresh = GroupJournal(rank=0, world=2)
    fresh.restore(GroupJournal.read(journal.encode()), checkpoint_step=1)
    assert GroupJournal.read(fresh.encode())["groups"] == {
        "g2": [2, "countdown", "issued", 0],
        "g3": [3, "countdown", "issued", 0],
    }


def write_log(run_dir, events):
    (run_dir / "groups-0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_the_audit_follows_the_steps_a_resume_kept(tmp_path):
    issued = [{"event": "issued", "index": i} for i in range(6)]
    write_log(
        tmp_path,
        [
            *issued,
            {"event": "trained", "step": 1, "indices": [0, 1]},
            {"event": "trained", "step": 2, "indices": [2, 3]},  # undone by the resume
            {"event": "resumed", "checkpoint_step": 1, "in_flight": 3},
            {"event": "trained", "step": 2, "indices": [2, 3]},
            {"event": "dropped", "index": 4, "reason": "failed"},
            {"event": "ended", "in_flight": [5]},
        ],
    )
    assert audit(tmp_path) == {
        "issued": 6,
        "trained": 4,
        "dropped": 1,
        "trained_twice": 0,
        "lost": 0,
        "resumes": 1,
    }


def test_the_audit_counts_groups_trained_twice_and_lost(tmp_path):
    write_log(
        tmp_path,
        [
            *[{"event": "issued", "index": i} for i in range(4)],
            {"event": "trained", "step": 1, "indices": [0, 1]},
            {"event": "trained", "step": 2, "indices": [1, 2]},  # 1 again; 3 never seen
            {"event": "ended", "in_flight": []},
        ],
    )
    counts = audit(tmp_path)
    assert counts["trained_twice"] == 1
    assert counts["lost"] == 1


def test_the_journal_is_json_whatever_its_group_ids_hold():
    journal = GroupJournal(rank=0, world=1)
    journal.issued('g"0\\', 0, "count\ndown", cursor=1)
    assert GroupJournal.read(journal.encode())["groups"] == {
        'g"0\\': [0, "count\ndown", "issued", 0]
    }
