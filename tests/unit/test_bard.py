"""BARD (rollfleet.methods.bard): the chain_sum task and its compressed chains, the budget
in the prompt and in what the reward sees, the reward's two forms, and phase 1's data."""

from __future__ import annotations

import dataclasses

import pytest

from rollfleet.episodes import Episode, EpisodeRequest, Turn
from rollfleet.methods import Stages
from rollfleet.methods.bard.stages import BudgetedTask
from rollfleet.models.tokenizer import build_char_tokenizer
from rollfleet.protocol import RolloutTask
from rollfleet.rewards import compose, reward_item
from rollfleet.spec import parse_manifest
from rollfleet.tasks import make_task
from rollfleet.tasks.chain_sum import chain


def tokens(text: str) -> int:
    return len(text) + 1  # the char tokenizer: one token a character, and the end token


def test_chain_keeps_evenly_spread_totals_and_always_the_last():
    totals = [16, 19, 23, 31, 40]
    assert [chain(totals, k) for k in range(1, 6)] == [
        "40",
        "19,40",
        "19,23,40",
        "16,19,31,40",
        "16,19,23,31,40",
    ]


def test_compressed_chains_fit_their_budget_and_keep_the_answer():
    task = make_task("chain_sum", {}, 0)
    for i in range(50):
        example = task.example("train", i)
        assert example.demonstration[0][1].split(",")[-1] == example.answer
        for budget in (3, 6, 9, 15):
            text = task.budgeted_demonstration(example, budget, tokens)
            assert text.split(",")[-1] == example.answer
            assert tokens(text) <= budget or text == example.answer
        # a bigger budget never writes fewer totals
        lengths = [len(task.budgeted_demonstration(example, b, tokens)) for b in (3, 6, 9, 15)]
        assert lengths == sorted(lengths)


def test_splits_never_share_a_digit_list():
    task = make_task("chain_sum", {}, 0)
    train = {task.example("train", i).prompt for i in range(2000)}
    held_out = {task.example("heldout", i).prompt for i in range(500)}
    assert not train & held_out


def job(**bard):
    return parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "bard"},
            "spec": {"task": {"name": "chain_sum"}, "methods": {"bard": bard}},
        }
    ).spec


def rollout_task(index: int, meta: dict | None = None) -> RolloutTask:
    example = make_task("chain_sum", {}, 0).example("train", index)
    example = dataclasses.replace(example, meta={**example.meta, **(meta or {})})
    return RolloutTask.for_example(example, index=index, group_id=f"g{index}", samples=8)


def test_the_budget_leads_the_prompt_and_reaches_the_reward():
    tok = build_char_tokenizer()
    stages = Stages.for_spec(job(budgets=[3, 9]))
    plain = [tok.bos_token_id, *tok.encode("1 2 3:", add_special_tokens=False)]
    for index, budget in ((0, 3), (1, 9), (2, 3)):
        task = rollout_task(index)
        request = stages.build_request(task, EpisodeRequest(list(plain)), tok)
        assert tok.decode(request.prompt_ids[1:]) == f"b{budget}#1 2 3:"
        assert request.prompt_ids[0] == tok.bos_token_id
        assert request.conditioning.budget == budget
        episode = Episode(request, turns=[Turn("model", "3,6", 4)])
        item = stages.reward_input(task, episode, reward_item(task, episode))
        assert item["meta"]["budget"] == budget and item["response_tokens"] == 4
    # A task may fix its own budget (the benchmark evaluates one budget at a time).
    fixed = stages.build_request(rollout_task(0, {"budget": 15}), EpisodeRequest(plain), tok)
    assert fixed.conditioning.budget == 15


def test_the_job_reward_is_accuracy_times_budget_fidelity():
    spec = job(budgets=[6])
    functions = spec.reward_functions()
    assert spec.verifier() == "chain_sum"  # held-out accuracy stays plain accuracy
    item = {"answer": "40", "meta": {"budget": 6}}
    right_on_budget = {**item, "response": "19,40", "response_tokens": 6}
    right_too_long = {**item, "response": "16,19,23,31,40", "response_tokens": 15}
    wrong_on_budget = {**item, "response": "19,41", "response_tokens": 6}
    assert compose(functions, right_on_budget)[0] == 1.0
    assert compose(functions, right_too_long)[0] == 0.0  # 9 tokens over a budget of 6
    assert compose(functions, wrong_on_budget)[0] == 0.0
    additive = job(budgets=[6], reward="additive").reward_functions()
    assert compose(additive, wrong_on_budget)[0] == 0.5  # a wrong answer still earns half
    within = {**item, "response": "40", "response_tokens": 5}  # 1 short: outside ±10 %
    assert compose(functions, within)[0] == pytest.approx(1 - (1 - 0.6) / 6)


def test_phase_one_data_is_every_example_at_every_budget():
    task = make_task("chain_sum", {}, 0)
    budgeted = BudgetedTask(task, [3, 9], tokens)
    first, second = budgeted.example("train", 0), budgeted.example("train", 1)
    base = task.example("train", 0)
    assert first.prompt == "b3#" + base.prompt and second.prompt == "b9#" + base.prompt
    assert first.demonstration == (("model", base.answer),)
    assert tokens(second.demonstration[0][1]) <= 9
    with pytest.raises(ValueError, match="no compressed chains"):
        BudgetedTask(make_task("countdown", {}, 0), [3], tokens)
