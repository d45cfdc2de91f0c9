"""The trainer's update schedule and batch rules: mini-batches and epochs (the PPO inner
loop), the proximal policy of decoupled PPO, REINFORCE++'s batch statistics across ranks,
and the staleness bound on every group a batch takes."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.algorithms import ADVANTAGES
from rollfleet.spec import parse_manifest
from rollfleet_trainer.loop import Trainer
from rollfleet_trainer.synthetic import synthetic_groups


def job(prompts: int = 4, alpha: int = 1, **algorithm):
    return parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "updates"},
            "spec": {
                "async": {"ratio": alpha},
                "trainer": {"steps": 10, "promptsPerStep": prompts},
                "rollout": {"sampling": {"groupSize": 4}},
                "algorithm": {"learningRate": 1e-2, **algorithm},
            },
        }
    )


def trainer_for(spec_job, model_dir, run_dir) -> Trainer:
    trainer = Trainer(spec_job, None, run_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer.set_model(model, AutoTokenizer.from_pretrained(model_dir))
    return trainer


def on_policy(groups, trainer: Trainer):
    """Behaviour log-probs set to the trainer's current ones: ratio 1 at the first update."""
    from rollfleet.models.batching import TrainBatch

    trajectories = [g.samples[i][0] for g in groups for i in range(g.size)]
    batch = TrainBatch.from_trajectories(trajectories, 4, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = trainer.policy_logprobs(batch)
    for row, t in enumerate(trajectories):
        start = len(t.prompt_ids)
        t.behaviour_logprobs = logprobs[row, start : start + len(t.response_ids)].tolist()
    return groups


def test_decoupled_ppo_clips_against_the_policy_before_the_batch(tiny_model_dir, tmp_path):
    """With two epochs the second pass's ratio π/π_prox moves away from 1 and the clip bites;
    with π_prox the current forward (detached) it could never (ratio 1 by construction)."""
    stats = {}
    for epochs in (1, 2):
        trainer = trainer_for(
            job(policyLoss="decoupled_ppo", epochs=epochs), tiny_model_dir, tmp_path / f"e{epochs}"
        )
        groups = on_policy(synthetic_groups(0, 4, 4, 64), trainer)
        stats[epochs] = trainer.train_step(groups)
    assert stats[1]["clip_fraction"] == 0.0
    # Averaged over both epochs: the first contributes 0, so the second clipped > 0.
    assert stats[2]["clip_fraction"] > 0.0


def test_mini_batches_take_one_update_per_share(tiny_model_dir, tmp_path):
    """miniBatches: 2 on groups [A, B] (constant rate) ends where a step on A then a step on
    B ends: each update is normalised by its own mini-batch."""
    split = trainer_for(
        job(prompts=4, miniBatches=2, learningRateSchedule="constant"),
        tiny_model_dir,
        tmp_path / "split",
    )
    split.train_step(synthetic_groups(0, 4, 4, 64))
    halves = trainer_for(
        job(prompts=2, learningRateSchedule="constant"), tiny_model_dir, tmp_path / "halves"
    )
    groups = synthetic_groups(0, 4, 4, 64)
    halves.train_step(groups[:2])
    halves.train_step(groups[2:])
    for a, b in zip(split.model.parameters(), halves.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_groups_scored_alike_are_left_out_of_the_forward_and_the_update_is_the_same(
    tiny_model_dir, tmp_path
):
    """trainer.skipZeroAdvantage (on by default) against off over two steps of two
    mini-batches, one of them all groups scored alike (a zero gradient, and Adam's step
    on it still moves the weights): the same weights and losses, fewer rows computed."""
    results = {}
    for skip in (True, False):
        spec_job = job(prompts=4, miniBatches=2)
        spec_job.spec.trainer.skipZeroAdvantage = skip
        trainer = trainer_for(spec_job, tiny_model_dir, tmp_path / f"skip-{skip}")
        rows = []
        forward = trainer.policy_logprobs
        trainer.policy_logprobs = lambda batch, forward=forward, rows=rows: (
            rows.append(len(batch)) or forward(batch)
        )
        losses = []
        for step in range(2):
            groups = synthetic_groups(step, 4, 4, 64)
            for group in groups[:2] if step == 0 else groups[1:2]:
                for i in range(group.size):
                    group.samples[i][0].reward = 1.0
            losses.append(trainer.train_step(groups)["loss"])
        results[skip] = trainer.model.state_dict(), losses, rows
    (skipped, skipped_losses, skipped_rows), (every, every_losses, every_rows) = (
        results[True],
        results[False],
    )
    assert sum(skipped_rows) < sum(every_rows) == 4 * 8
    assert 4 in skipped_rows  # the mini-batch scored alike still ran one group
    assert skipped_losses == pytest.approx(every_losses, abs=1e-6)
    # Adam at lr 1e-2 turns rounding-level gradient differences into ~1e-4 on weights
    # whose gradients are near zero (as in test_prefix_sharing)
    worst = max((skipped[n] - t).abs().max().item() for n, t in every.items())
    assert worst < 5e-4, worst


def test_mini_batches_must_divide_each_workers_share():
    with pytest.raises(Exception, match=r"multiple of algorithm\.miniBatches"):
        job(prompts=6, miniBatches=4)


def test_reinforce_pp_normalises_by_the_std_of_every_rank():
    """Two ranks, each with half the groups, get the advantages one process computes on the
    whole batch once their batch statistics are summed (the all-reduce)."""
    torch.manual_seed(0)
    rewards = torch.rand(6, 4)
    whole = ADVANTAGES["reinforce++"](rewards)
    first, second = rewards[:3], rewards[3:]

    def moments(part):
        centered = (part - part.mean(-1, keepdim=True)).double().flatten()
        return [centered.numel(), float(centered.sum()), float((centered**2).sum())]

    def summed_with(other):
        return lambda values: [a + b for a, b in zip(values, moments(other), strict=True)]

    got = torch.cat(
        [
            ADVANTAGES["reinforce++"](first, all_reduce=summed_with(second)),
            ADVANTAGES["reinforce++"](second, all_reduce=summed_with(first)),
        ]
    )
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)
    # Each rank on its own std (the old behaviour) is measurably different here.
    alone = torch.cat([ADVANTAGES["reinforce++"](first), ADVANTAGES["reinforce++"](second)])
    assert (alone - whole).abs().max() > 1e-3


class Message:
    """A consumed bus message: the trainer acks what it drops."""

    acked = 0

    async def ack(self):
        Message.acked += 1


def groups_at(versions: list[int]):
    groups = synthetic_groups(0, len(versions), 2, 64)
    for group, version in zip(groups, versions, strict=True):
        for i, (t, _) in list(group.samples.items()):
            t.token_versions = [version] * len(t.response_ids)
            group.samples[i] = (t, Message())
    return groups


async def test_every_group_of_a_batch_is_within_alpha(tmp_path):
    """A stale group behind a fresh head of the ready queue is dropped, not trained at α + 1."""
    trainer = Trainer(job(prompts=2, alpha=1), None, tmp_path)
    trainer.state["version"] = 5
    fresh, stale, also_fresh = groups_at([5, 3, 4])
    trainer.ready = deque([fresh, stale, also_fresh])
    batch = await trainer.take_batch()
    assert batch == [fresh, also_fresh]
    assert trainer.dropped_here["stale"] == 2 and stale.id in trainer.discarded
    assert await trainer.take_batch() is None  # nothing left


async def test_the_dropped_groups_remembered_stay_bounded(tmp_path, monkeypatch):
    """A long run drops groups all along: only the newest ids are kept (memory stays flat)."""
    from rollfleet_trainer import loop

    monkeypatch.setattr(loop, "DISCARDED_REMEMBERED", 3)
    trainer = Trainer(job(prompts=2, alpha=1), None, tmp_path)
    for group in groups_at([0, 0, 0, 0, 0]):
        await trainer.drop(group, "stale")
    assert list(trainer.discarded) == [g.id for g in groups_at([0, 0, 0, 0, 0])][-3:]
    assert trainer.dropped_here["stale"] == 5 * groups_at([0])[0].size
