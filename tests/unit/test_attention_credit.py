"""Attention-based credit assignment (rollfleet.methods.attention_credit): WAAD and FAI on
hand-built attention maps, the strategies' token selection, and the trainer stage: γ ≡ 1
is GRPO exactly, and γ enters the loss as a constant (no gradient through it)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.methods.attention_credit.credit import (
    credit_weights,
    future_attention_influence,
    head_spans,
    layer_indices,
    split_heads,
    waad_change,
    windowed_attention_distance,
)
from rollfleet.spec import parse_manifest
from rollfleet_trainer.loop import Trainer
from rollfleet_trainer.synthetic import synthetic_groups


def causal(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None]


def test_waad_weighs_each_distance_capped_at_the_window():
    attn = causal(
        [
            [1.0, 0, 0, 0, 0],
            [0.5, 0.5, 0, 0, 0],
            [0.2, 0.3, 0.5, 0, 0],
            [1.0, 0, 0, 0, 0],
            [0.1, 0.2, 0.3, 0.2, 0.2],
        ]
    )
    # t=2: 0.2·2 + 0.3·1; t=3: 1·3 capped at 2; t=4: 0.1·2 (4 capped) + 0.2·2 (3 capped) + 0.3·2 + 0.2·1
    expected = [0.0, 0.5, 0.7, 2.0, 0.1 * 2 + 0.2 * 2 + 0.3 * 2 + 0.2 * 1]
    assert windowed_attention_distance(attn, window=2)[0].tolist() == pytest.approx(expected)


def test_fai_averages_attention_received_from_the_horizon_only():
    attn = torch.zeros(1, 6, 6)
    attn[0, 3, 0], attn[0, 4, 0], attn[0, 5, 0] = 0.6, 0.2, 0.9
    attn[0, 4, 1], attn[0, 5, 1] = 0.4, 0.8
    valid = torch.tensor([[0, 1, 1, 1, 1, 0]])  # token 5 is padding: it reads nothing
    fai = future_attention_influence(attn, valid, near=3, far=4)[0]
    # s=0: t in {3, 4} (5 is not valid): (0.6 + 0.2) / 2; s=1: t in {4} -> 0.4; s>=2: none
    assert fai.tolist() == pytest.approx([0.4, 0.4, 0.0, 0.0, 0.0, 0.0])


def test_heads_split_by_their_look_back_span():
    t = 4
    near = torch.eye(t)  # every token attends to itself: span 0
    far = torch.zeros(t, t)
    far[:, 0] = 1.0  # every token attends to the first: span t
    mid = torch.zeros(t, t)
    mid[0, 0] = 1.0
    for i in range(1, t):
        mid[i, i - 1] = 1.0  # span 1
    attn = torch.stack([mid, far, near])[None]  # [1 row, 3 heads, T, T]
    spans = head_spans(attn, torch.ones(1, t))
    assert spans.tolist() == pytest.approx([0.75, 1.5, 0.0])
    local, global_ = split_heads(spans, share=0.3)
    assert local.tolist() == [2] and global_.tolist() == [1]


def test_layers_are_taken_from_the_middle_third():
    assert layer_indices(24, 5) == [8, 10, 12, 14, 16]
    assert layer_indices(4, 5) == [1, 2]


def test_strategies_select_their_tokens():
    valid = torch.tensor([[0, 1, 1, 1, 1, 1]])  # a prompt token, then 5 response tokens
    waad = torch.tensor([[0.0, 1.0, 1.1, 3.0, 0.2, 0.3]])
    fai = torch.tensor([[9.0, 0.1, 0.2, 0.1, 0.7, 0.3]])
    # Δ over response tokens: |1-1.1|, |1.1-3|, |3-0.2|, |0.2-0.3|, 0 (last)
    assert waad_change(waad, valid)[0].tolist() == pytest.approx([0, 0.1, 1.9, 2.8, 0.1, 0])
    common = dict(quantile=0.4, amplification=1.5)
    local = credit_weights("local_chunk", waad, fai, valid, **common)[0]
    assert local.tolist() == [1, 1, 1.5, 1.5, 1, 1]  # the 2 largest Δ (⌈0.4·5⌉ = 2)
    anchor = credit_weights("global_anchor", waad, fai, valid, **common)[0]
    assert anchor.tolist() == [1, 1, 1, 1, 1.5, 1.5]  # top FAI; the prompt token never counts
    # Coupled: anchor 4 looks locally (WAAD 0.2 <= median 1.0) with pre-plan token 3 just
    # before it: it keeps half its extra credit and hands half to token 3. Anchor 5 has
    # WAAD 0.3 <= median too and pre-plan 3 within its look-back of 3: intro = 3 (largest Δ).
    coupled = credit_weights("coupled", waad, fai, valid, coupling=0.5, lookback=3, **common)[0]
    assert coupled.tolist() == pytest.approx([1, 1, 1, 1.5, 1.25, 1.25])
    rand = credit_weights(
        "random", waad, fai, valid, generator=torch.Generator().manual_seed(0), **common
    )[0]
    assert sorted(rand.tolist()) == [1, 1, 1, 1, 1.5, 1.5] and rand[0] == 1


def job(methods: dict | None = None, **algorithm):
    return parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "credit"},
            "spec": {
                "trainer": {"steps": 10, "promptsPerStep": 4},
                "rollout": {"sampling": {"groupSize": 4}},
                "algorithm": {"learningRate": 1e-2, **algorithm},
                "methods": methods or {},
            },
        }
    )


def step(spec_job, model_dir, run_dir, groups=None):
    """(stats, gradients) of one train_step from the tiny model."""
    trainer = Trainer(spec_job, None, run_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer.set_model(model, AutoTokenizer.from_pretrained(model_dir))
    groups = groups or synthetic_groups(0, 4, 4, model.config.vocab_size)
    stats = trainer.train_step(groups)
    return stats, [p.grad.clone() for p in model.parameters()]


def test_gamma_of_one_is_grpo_exactly(tiny_model_dir, tmp_path):
    plain, plain_grads = step(job(), tiny_model_dir, tmp_path / "a")
    credit = {"attention_credit": {"amplification": 1.0, "horizon": [1, 8], "window": 3}}
    ones, ones_grads = step(job(credit), tiny_model_dir, tmp_path / "b")
    assert ones["loss"] == plain["loss"]
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ones_grads, strict=True))
    assert ones["advantage_weight_share"] == 0.0


def test_gamma_is_a_constant_factor_on_the_advantages(tiny_model_dir, tmp_path):
    """The step with the method equals a plain step whose trajectories carry the same γ as
    fixed advantage weights: γ adds no gradient path of its own."""
    credit = {"attention_credit": {"strategy": "coupled", "horizon": [1, 8], "window": 3}}
    with_method, grads = step(job(credit), tiny_model_dir, tmp_path / "a")
    assert 0 < with_method["advantage_weight_share"] < 1
    assert with_method["advantage_weight_mean"] > 1
    # Recompute γ on the start model and hand it over as the trajectories' own weights.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    groups = synthetic_groups(0, 4, 4, model.config.vocab_size)
    fresh = Trainer(job(credit), None, tmp_path / "c")
    fresh.set_model(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    from rollfleet.models.batching import TrainBatch

    trajectories = [g.samples[i][0] for g in groups for i in range(g.size)]
    batch = TrainBatch.from_trajectories(trajectories, 4, fresh.tokenizer.pad_token_id)
    gamma = fresh.stages.advantage_weights(model, batch, torch.zeros(len(trajectories)))
    assert not gamma.requires_grad
    for row, t in enumerate(trajectories):
        t.advantage_weights = gamma[
            row, len(t.prompt_ids) : len(t.prompt_ids) + len(t.response_ids)
        ].tolist()
    fixed, fixed_grads = step(job(), tiny_model_dir, tmp_path / "b", groups)
    assert fixed["loss"] == pytest.approx(with_method["loss"], rel=1e-6)
    for a, b in zip(grads, fixed_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_advantage_weights_are_not_cancelled_by_the_loss_normalisation(tiny_model_dir, tmp_path):
    """Weights multiply the advantages, not the mask: a uniform weight of 2 doubles the
    token-mean loss (as a mask weight it would cancel in the denominator)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = synthetic_groups(0, 4, 4, model.config.vocab_size)
    doubled = synthetic_groups(0, 4, 4, model.config.vocab_size)
    for g in doubled:
        for t, _ in g.samples.values():
            t.advantage_weights = [2.0] * len(t.response_ids)
    plain, _ = step(job(policyLoss="vanilla_pg"), tiny_model_dir, tmp_path / "a", base)
    twice, _ = step(job(policyLoss="vanilla_pg"), tiny_model_dir, tmp_path / "b", doubled)
    assert twice["loss"] == pytest.approx(2 * plain["loss"], rel=1e-5)
