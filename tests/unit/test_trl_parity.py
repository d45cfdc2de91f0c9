"""rollfleet's step against TRL's GRPOTrainer on one identical batch (no TRL needed here).

`data/trl_reference.json` holds a batch (the tiny model with seed 0, countdown prompts
0-3, 8 completions each sampled from that model, fixed 0/1 rewards, one group all equal)
and what TRL 1.16's GRPOTrainer computed on it with its own code (loss "dapo", β = 0,
ε = 0.2, lr 4e-4 linear, gradient norm clipped at 1): written by scripts/trl_reference.py.
The synchronous trainer, on the same batch with the same algorithm (grpo, ppo_clip,
token-mean), must compute the same advantages, log-probs, loss, gradient and update.

Adam's first step moves each weight by about lr·sign(grad), whatever the gradient's
scale, so the gradient is compared directly and the update only as a check of the rate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.algorithms import ADVANTAGES
from rollfleet.models.batching import TrainBatch
from rollfleet.protocol import Trajectory, TrajectoryStatus
from rollfleet.spec import parse_manifest
from rollfleet_trainer.loop import Group, Trainer

TRL = json.loads((Path(__file__).parent / "data" / "trl_reference.json").read_text())
BATCH = TRL["batch"]
GROUP = BATCH["group_size"]


def groups() -> list[Group]:
    """The recorded batch as the trainer receives it; behaviour log-probs are TRL's (its
    single iteration is on-policy: ratio 1)."""
    out = []
    for g, prompt in enumerate(BATCH["prompt_ids"]):
        group = Group(index=g, size=GROUP)
        for i in range(GROUP):
            row = g * GROUP + i
            response = BATCH["completion_ids"][row]  # up to and with the first <eos>
            n = len(response)
            assert sum(TRL["completion_mask"][row]) == n  # TRL trains exactly these tokens
            group.samples[i] = (
                Trajectory(
                    task_id=f"t{g}",
                    group_id=group.id,
                    sample_index=i,
                    group_size=GROUP,
                    worker="trl-reference",
                    status=TrajectoryStatus.TRUNCATED
                    if BATCH["truncated"][row]
                    else TrajectoryStatus.COMPLETED,
                    prompt_ids=prompt,
                    response_ids=response,
                    behaviour_logprobs=TRL["logprobs"][row][:n],
                    token_versions=[0] * n,
                    loss_mask=[1.0] * n,
                    reward=BATCH["rewards"][row],
                ),
                None,
            )
        out.append(group)
    return out


@pytest.fixture
def trainer(tiny_model_dir, tmp_path):
    settings = TRL["settings"]
    job = parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "trl-parity"},
            "spec": {
                "async": {"ratio": 0},
                "trainer": {
                    "steps": settings["max_steps"],
                    "promptsPerStep": len(BATCH["prompts"]),
                },
                "rollout": {
                    "sampling": {
                        "groupSize": GROUP,
                        "maxNewTokens": settings["max_completion_length"],
                        "temperature": settings["temperature"],
                        "topP": settings["top_p"],
                    }
                },
                "algorithm": {
                    "advantage": "grpo",
                    "policyLoss": "ppo_clip",
                    "lossAggregation": "token-mean",
                    "clipEpsilon": settings["epsilon"],
                    "learningRate": settings["learning_rate"],
                    "learningRateSchedule": settings["lr_scheduler_type"],
                    "maxGradNorm": settings["max_grad_norm"],
                },
            },
        }
    )
    trainer = Trainer(job, None, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer.set_model(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    return trainer


def test_advantages_match_trl():
    rewards = torch.tensor(BATCH["rewards"]).view(-1, GROUP)
    ours = ADVANTAGES["grpo"](rewards, eps=1e-4).flatten()
    torch.testing.assert_close(ours, torch.tensor(TRL["advantages"]), rtol=1e-5, atol=1e-6)
    zero = BATCH["zero_advantage_group"]
    assert ours.view(-1, GROUP)[zero].abs().max() == 0


def test_log_probs_match_trl(trainer):
    trajectories = [g.samples[i][0] for g in groups() for i in range(GROUP)]
    batch = TrainBatch.from_trajectories(trajectories, GROUP, trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = trainer.policy_logprobs(batch)
    for row, t in enumerate(trajectories):
        start = len(t.prompt_ids)
        ours = logprobs[row, start : start + len(t.response_ids)]
        torch.testing.assert_close(ours, torch.tensor(t.behaviour_logprobs), rtol=0, atol=2e-6)
    assert int(batch.loss_mask.sum()) == TRL["num_items_in_batch"]


def test_loss_gradient_and_update_match_trl(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stats = trainer.train_step(groups())
    assert stats["loss"] == pytest.approx(TRL["loss"], rel=1e-5, abs=1e-7)
    assert stats["grad_norm"] == pytest.approx(TRL["grad_norm_before_clip"], rel=1e-5)
    assert stats["learning_rate"] == TRL["learning_rate"]
    # TRL recorded its gradient before clipping the norm to 1; ours is clipped in place.
    scale = min(1.0, TRL["settings"]["max_grad_norm"] / TRL["grad_norm_before_clip"])
    for name, parameter in trainer.model.named_parameters():
        want = TRL["params"][name]
        grad = parameter.grad.flatten()
        update = (parameter.detach() - before[name]).flatten()
        norm = float(grad.double().norm())
        assert norm == pytest.approx(want["grad_norm"] * scale, rel=1e-4, abs=1e-8), name
        index = torch.tensor(want["indices"]) if "indices" in want else torch.arange(grad.numel())
        torch.testing.assert_close(
            grad[index], torch.tensor(want["grad"]) * scale, rtol=1e-3, atol=1e-7
        )
        torch.testing.assert_close(update[index], torch.tensor(want["update"]), rtol=0, atol=2e-7)
