"""A group's shared tokens computed once (rollfleet.models.prefix_sharing): the log-probs
and the gradients equal the per-sample forward's, for groups of different prompt and
response lengths, for groups whose samples also share their first turns (a prefix tree
with several branch points, as multi-turn episodes have) and for a group whose samples
differ from the first token, with several trees in one packed row, under sampling
temperature and top-p, with sdpa and eager attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollfleet.models.batching import TrainBatch, token_logprobs
from rollfleet.models.flops import FlopMeter
from rollfleet.models.prefix_sharing import (
    forward_work,
    grouped_token_logprobs,
    pack_groups,
    rows_of_trees,
    shared_prefix_groups,
    tree_layout,
)
from rollfleet.models.tiny import create_tiny_model
from rollfleet_trainer.synthetic import synthetic_groups

GROUP = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return create_tiny_model(
        tmp_path_factory.mktemp("tiny"), seed=0, hidden=32, layers=2, heads=2, max_len=64
    )


def batch_of(groups) -> TrainBatch:
    trajectories = [g.samples[i][0] for g in groups for i in range(g.size)]
    return TrainBatch.from_trajectories(trajectories, GROUP, pad_id=0)


def with_shared_turns(groups):
    """Sample i of each group takes over the first 3·i response tokens of sample 0 (as far
    as its own response reaches): samples sharing their first turns, branching at several
    points. The last group's samples get prompts of their own: nothing shared at all."""
    for group in groups[:-1]:
        first = group.samples[0][0].response_ids
        for i in range(1, group.size):
            response = group.samples[i][0].response_ids
            k = min(3 * i, len(first), len(response) - 1)
            response[:k] = first[:k]
    for i in range(groups[-1].size):
        sample = groups[-1].samples[i][0]
        sample.prompt_ids = [1, 4 + i, *sample.prompt_ids[2:]]
    return groups


def distinct_prefixes(batch: TrainBatch, rows: list[int]) -> int:
    lengths = batch.attention_mask.sum(-1).tolist()
    return len(
        {tuple(batch.input_ids[r, : n + 1].tolist()) for r in rows for n in range(int(lengths[r]))}
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
@pytest.mark.parametrize("shared", ["prompt", "turns"])
def test_grouped_logprobs_and_gradients_equal_the_per_sample_forward(
    folder, attention, temperature, top_p, shared
):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention)
    groups = synthetic_groups(step=3, prompts=6, group_size=GROUP, vocab=64)
    batch = batch_of(with_shared_turns(groups) if shared == "turns" else groups)
    groups = shared_prefix_groups(batch)
    assert groups == [list(range(start, start + GROUP)) for start in range(0, 24, GROUP)]
    packed = pack_groups(batch, groups)
    for (ids, _, _), rows in zip(packed, groups, strict=True):
        assert ids.numel() == distinct_prefixes(batch, rows)  # each shared token once
    meter = FlopMeter(model)
    layout, _ = tree_layout([ids.numel() for ids, _, _ in packed], meter.per_token, meter.per_pair)
    assert sorted(t for row in layout for t in row) == list(range(6))
    # trees sharing a packed row must not see each other
    assert any(len(row) > 1 for row in layout)
    weights = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(0))

    def run(compute):
        model.zero_grad()
        logprobs = compute()
        (logprobs * weights * batch.attention_mask).sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    per_sample, per_sample_grads = run(
        lambda: token_logprobs(model, batch.input_ids, batch.attention_mask, temperature, top_p)
    )
    grouped, grouped_grads = run(
        lambda: grouped_token_logprobs(model, batch, packed, temperature, top_p)
    )
    mask = batch.attention_mask.bool()
    assert torch.allclose(grouped[mask], per_sample[mask], atol=1e-5)
    assert (grouped[~mask] == 0).all()
    for name, grad in per_sample_grads.items():
        assert torch.allclose(grouped_grads[name], grad, atol=1e-5), name


def test_rows_are_widened_where_that_saves_more_tokens_than_it_adds_attention():
    # the default job's trees: most are shorter than the longest, alone in a row they pad
    sizes = [38, 43, 48, 49, 51, 52, 54, 57, 59, 60, 62, 63, 65, 67, 70, 77]
    rows, width = tree_layout(sizes, token_flops=1024.0, pair_flops=1.0)
    assert width > 77 and len(rows) * width < 0.9 * len(sizes) * 77
    assert all(sum(sizes[t] for t in row) <= width for row in rows)
    assert sorted(t for row in rows for t in row) == list(range(len(sizes)))
    # attention dear against the rest: rows as wide as the longest tree
    rows, width = tree_layout(sizes, token_flops=1.0, pair_flops=1.0)
    assert width == 77 and rows == rows_of_trees(sizes)


def test_only_whole_groups_are_packed():
    groups = synthetic_groups(step=0, prompts=2, group_size=GROUP, vocab=64)
    trajectories = [g.samples[i][0] for g in groups for i in range(g.size)]
    assert shared_prefix_groups(TrainBatch.from_trajectories(trajectories[:6], GROUP, 0)) is None
    assert shared_prefix_groups(batch_of(groups[:1])) == [[0, 1, 2, 3]]


def test_a_trainer_step_with_shared_prompts_ends_where_the_per_sample_step_ends(
    tiny_model_dir, tmp_path
):
    """trainer.sharePrefix (on by default) against off: the same weights after two steps
    of two mini-batch updates, the same step metrics."""
    from transformers import AutoTokenizer

    from rollfleet.spec import parse_manifest
    from rollfleet_trainer.loop import Trainer

    def trained(share: bool):
        job = parse_manifest(
            {
                "apiVersion": "rollfleet.io/v1alpha1",
                "kind": "RLJob",
                "metadata": {"name": "share"},
                "spec": {
                    "trainer": {"steps": 2, "promptsPerStep": 4, "sharePrefix": share},
                    "rollout": {"sampling": {"groupSize": GROUP}},
                    "algorithm": {"learningRate": 1e-2, "miniBatches": 2},
                },
            }
        )
        trainer = Trainer(job, None, tmp_path / f"run-{share}")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trainer.set_model(model, AutoTokenizer.from_pretrained(tiny_model_dir))
        stats = [
            trainer.train_step(synthetic_groups(step, 4, GROUP, vocab=64)) for step in range(2)
        ]
        return trainer.model.state_dict(), stats

    shared, shared_stats = trained(True)
    alone, alone_stats = trained(False)
    # gradients agree to ~1e-7 (above); Adam at lr 1e-2 turns that into ~1e-4 on weights
    # whose gradients are near zero, as summing in another order does (test_ray_trainer)
    worst = max((shared[n] - t).abs().max().item() for n, t in alone.items())
    assert worst < 5e-4, worst
    for a, b in zip(shared_stats, alone_stats, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["response_tokens"] == b["response_tokens"]


def test_the_work_counted_is_the_prompt_once_per_group():
    groups = synthetic_groups(step=1, prompts=2, group_size=GROUP, vocab=64)
    batch = batch_of(groups)
    prompts = [len(g.samples[0][0].prompt_ids) for g in groups]
    responses = [[len(g.samples[i][0].response_ids) for i in range(GROUP)] for g in groups]
    alone_tokens, alone_pairs = forward_work(batch, None)
    packed = pack_groups(batch, shared_prefix_groups(batch))
    shared_tokens, shared_pairs = forward_work(batch, packed)
    assert alone_tokens == sum(GROUP * p + sum(r) for p, r in zip(prompts, responses, strict=True))
    assert shared_tokens == sum(p + sum(r) for p, r in zip(prompts, responses, strict=True))
    assert alone_tokens - shared_tokens == sum((GROUP - 1) * p for p in prompts)
    # a response attends to the prompt and to itself either way: the prompt's own pairs are
    # what is saved
    saved = sum((GROUP - 1) * p * (p + 1) // 2 for p in prompts)
    assert alone_pairs - shared_pairs == saved


def test_flops_count_two_per_matmul_weight_per_token(folder):
    from rollfleet.models.flops import FlopMeter, matmul_weights

    model = AutoModelForCausalLM.from_pretrained(folder)
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    # the input embedding is a lookup; a tied lm_head multiplies by that same table
    assert matmul_weights(model) == weights - embedding + (
        embedding if config.tie_word_embeddings else 0
    )
    meter = FlopMeter(model)
    meter.add(10, 55, factor=3)
    meter.busy_seconds = 2.0
    expected = 3 * (
        2 * matmul_weights(model) * 10 + 4 * config.num_hidden_layers * config.hidden_size * 55
    )
    assert meter.flops == expected and meter.per_second() == expected / 2
