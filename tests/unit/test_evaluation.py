"""Held-out evaluation: greedy and avg@k scoring with the verifier, on a model that learned a
trivial task for a few seconds and on one that learned nothing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.evaluation import heldout_accuracy
from rollfleet.models.tiny import create_tiny_model
from rollfleet.models.warmup import warmup_sft
from rollfleet.tasks import make_task


@pytest.fixture(scope="module")
def constant_task(tmp_path_factory):
    """'12=' -> 'ok' for every number: 40 rows, the last 10 held out; learnable in seconds."""
    path = tmp_path_factory.mktemp("data") / "constant.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{n}=", "answer": "ok"}) + "\n" for n in range(10, 50))
    )
    return make_task("jsonl", {"path": str(path), "heldout_fraction": 0.25})


@pytest.fixture(scope="module")
def models(tmp_path_factory, constant_task):
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    folder = create_tiny_model(tmp_path_factory.mktemp("model"), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    untrained = AutoModelForCausalLM.from_pretrained(folder)
    trained = AutoModelForCausalLM.from_pretrained(folder)
    warmup_sft(trained, tokenizer, constant_task, steps=120, batch_size=32, lr=3e-3, seed=0)
    return tokenizer, untrained, trained


def test_greedy_accuracy_separates_a_trained_from_an_untrained_model(models, constant_task):
    tokenizer, untrained, trained = models
    assert (
        heldout_accuracy(trained, tokenizer, constant_task, "exact_match", max_new_tokens=4) == 1.0
    )
    assert (
        heldout_accuracy(untrained, tokenizer, constant_task, "exact_match", max_new_tokens=4)
        == 0.0
    )


def test_sampled_accuracy_is_deterministic_per_seed_and_bounded_by_greedy_for_a_sharp_model(
    models, constant_task
):
    tokenizer, _, trained = models
    kwargs = dict(max_new_tokens=4, temperature=1.0, samples=4)
    first = heldout_accuracy(trained, tokenizer, constant_task, "exact_match", seed=1, **kwargs)
    again = heldout_accuracy(trained, tokenizer, constant_task, "exact_match", seed=1, **kwargs)
    assert first == again
    assert 0.5 < first <= 1.0
    # 10 prompts x 4 samples: the score is a multiple of 1/40
    assert round(first * 40) == pytest.approx(first * 40)


def test_limit_evaluates_only_the_first_prompts(models, constant_task):
    tokenizer, _, trained = models
    assert (
        heldout_accuracy(
            trained, tokenizer, constant_task, "exact_match", max_new_tokens=4, limit=3
        )
        == 1.0
    )


def test_turn_stops_split_into_single_tokens_and_runs():
    from rollfleet.episodes import ends_with_stop, turn_stops
    from rollfleet.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    ids, runs = turn_stops(tok, (";", "</s>"))
    assert ids == (tok.convert_tokens_to_ids(";"),)
    assert runs == (tuple(tok.encode("</s>", add_special_tokens=False)),) and len(runs[0]) == 4
    assert ends_with_stop([5, *runs[0]], runs) and not ends_with_stop(list(runs[0][:3]), runs)


def test_a_graded_verifier_reports_its_mean_and_a_pass_mark_its_share(monkeypatch):
    """Recall (RecGPT-V2's tag hit rate) averages; exact match counts the answers at 1."""
    import rollfleet.evaluation as evaluation

    values = [1.0, 0.5, 0.25, 0.0]
    monkeypatch.setattr(evaluation, "heldout_episodes", lambda *a, **k: [(v, None) for v in values])
    assert heldout_accuracy(None, None, None, "recgpt_acc") == pytest.approx(1.75 / 4)
    assert heldout_accuracy(None, None, None, "exact_match") == pytest.approx(1 / 4)
