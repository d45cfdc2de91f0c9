"""RecGPT-V2 (rollfleet.tasks.recgpt, the recgpt_* and gated rewards, methods.recgpt): the
team's hand-overs through the coordinator and the agents runner, each agent a segment;
the teacher's turns as warm-up pairs; the rewards on hand-made teams (the gated reward 0
when any gate fails, summed rewards paying for diversity bought with accuracy); the
alignment reward model, trained for real; the senior reviewer's truth table; the
listwise judge's ranks."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest
import torch

from rollfleet.episodes import EPISODES, EpisodeRequest, Generated, Limits
from rollfleet.methods.recgpt import listwise
from rollfleet.models.tokenizer import build_char_tokenizer
from rollfleet.rewards import (
    GRADES,
    RewardModels,
    compose_batch,
    models_needed,
    score,
    senior_review,
)
from rollfleet.spec import RLJobSpec
from rollfleet.tasks import make_task
from rollfleet.tasks.recgpt import (
    AGENTS,
    AlignTask,
    diversity,
    parse_tags,
    recall,
    train_align_model,
)


@pytest.fixture(scope="module")
def task():
    return make_task("recgpt", {}, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = train_align_model(tmp_path_factory.mktemp("align") / "recgpt-align", steps=150)
    return RewardModels({"align": str(folder)})


def team_turns(task, meta, answers: list[str]) -> list[dict]:
    """The transcript the reward sees when the agents answer `answers` in turn."""
    env, turns = task.open_env(meta), []
    for answer in answers:
        turns.append({"role": "model", "text": answer, "tokens": len(answer), "info": {}})
        observation, done, info = env.step(answer)
        turns.append({"role": "env", "text": observation, "tokens": 0, "info": info})
        if done:
            break
    return turns


def teacher_answers(task, example) -> list[str]:
    return [pair.demonstration[0][1] for pair in task.sft_examples(example)]


def item(task, example, answers):
    turns = team_turns(task, example.meta, answers)
    return {"response": answers[-1], "answer": example.answer, "meta": example.meta, "turns": turns}


def test_the_coordinator_hands_over_as_the_teacher_was_shown(task):
    """Every agent's prompt in an episode is the prompt its warm-up pair was shown."""
    for i in range(20):
        ex = task.example("train", i)
        pairs = task.sft_examples(ex)
        assert [p.id.rsplit("-", 1)[1] for p in pairs] == list(AGENTS)
        env = task.open_env(ex.meta)
        prompts = [ex.prompt]
        for pair in pairs:
            observation, done, info = env.step(pair.demonstration[0][1])
            if done:
                break
            prompts.append(observation)
            assert info["agent"] == AGENTS[len(prompts) - 1]
        assert prompts == [p.prompt for p in pairs]
        assert done and info["final"] == parse_tags(pairs[-1].demonstration[0][1])
        assert len(info["experts"]) == 3 and len(info["plan"]) == 2
    assert task.example("train", 3) == task.example("train", 3)  # deterministic
    assert task.example("train", 3) != task.example("heldout", 3)


def test_a_malformed_plan_ends_the_episode_and_fails_the_band(task):
    ex = task.example("train", 0)
    turns = team_turns(task, ex.meta, ["a1", "unused"])
    assert len(turns) == 2 and turns[-1]["info"]["error"] == "the plan is not two intents"
    it = {"response": "a1", "answer": ex.answer, "meta": ex.meta, "turns": turns}
    assert score("recgpt_length", it) == 0.0 and score("recgpt_acc", it) == 0.0


def test_agents_runner_makes_each_agent_a_segment(task):
    """The real runner over the coordinator: five segments, each with its own prompt and
    only its own answer in the loss; the transcript scores as the teacher's team."""
    tok = build_char_tokenizer()
    ex = task.example("train", 5)
    answers = teacher_answers(task, ex)

    async def generate(context, request, turn):
        ids = [*tok.encode(answers[turn], add_special_tokens=False), tok.eos_token_id]
        return Generated(ids, [-0.5] * len(ids), [turn] * len(ids), "stop")

    class Env:
        def __init__(self):
            self.env = task.open_env(ex.meta)

        async def step(self, action):
            return self.env.step(action)

    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    episode = asyncio.run(
        EPISODES["agents"](
            EpisodeRequest([tok.bos_token_id, *encode(ex.prompt)]),
            generate=generate,
            env=Env(),
            limits=Limits(len(AGENTS), 128, tok.eos_token_id),
            decode=tok.decode,
            encode=encode,
        )
    )
    pairs = task.sft_examples(ex)
    assert [s.agent for s in episode.segments] == ["policy", *AGENTS[1:]]
    for segment, pair in zip(episode.segments, pairs, strict=True):
        assert tok.decode(segment.prompt_ids[1:]) == pair.prompt
        assert tok.decode(segment.response_ids[:-1]) == pair.demonstration[0][1]
        assert segment.loss_mask == [1.0] * len(segment.response_ids)
    transcript = [
        {"role": t.role, "text": t.text, "tokens": t.tokens, "info": t.info} for t in episode.turns
    ]
    expected = item(task, ex, answers)
    assert score("recgpt_acc", {**expected, "turns": transcript}) == score("recgpt_acc", expected)


def test_accuracy_diversity_and_length_on_hand_made_teams(task):
    ex = task.example("train", 0)  # history f15 e35 f13 g14 g13 g13; target c2c4e3e4g1g3
    answers = ["fg", "f1f3f5", "g1g3g4", "f1g1g3", "f1f3g1g3"]
    it = item(task, ex, answers)
    assert ex.meta["target"] == ["c2", "c4", "e3", "e4", "g1", "g3"]
    assert score("recgpt_acc", it) == pytest.approx(2 / 6)
    assert recall(["g1", "g3", "k1", "g4"], ["g1", "g3", "c4"]) == pytest.approx(2 / 3)
    pooled = ["f1", "f3", "f5", "g1", "g3", "g4", "f1", "g1", "g3"]
    assert score("recgpt_diversity", it) == pytest.approx(diversity(pooled))
    assert diversity(["a1", "a1"]) == 0 and diversity(["a1", "a2"]) == 0.5
    assert diversity(["a1", "b1", "c1"]) == 1.0
    assert score("recgpt_length", it) == 1.0
    too_long = item(task, ex, ["fg", "f1f2f3f4f5", *answers[2:]])
    repeated = item(task, ex, [*answers[:4], "f1f1g1g3"])
    short_final = item(task, ex, [*answers[:4], "f1f3g1"])
    invented = item(task, ex, [*answers[:4], "f1f3g1c4"])  # c4 no expert proposed
    for bad in (too_long, repeated, short_final, invented):
        assert score("recgpt_length", bad) == 0.0
    assert score("recgpt_acc", item(task, ex, [*answers[:4], "f1f3g1g3c4"])) == score(
        "recgpt_acc", it
    )  # only the top N count


def test_alignment_model_is_trained_for_real_and_scores_tags(task, models):
    align = AlignTask(0)
    examples = [align.example("heldout", i) for i in range(200)]
    p = models.probability("align", [e.prompt for e in examples])
    accuracy = sum((q > 0.5) == (e.answer == "y") for q, e in zip(p, examples, strict=True))
    assert accuracy / len(examples) > 0.9
    ex = task.example("train", 0)
    honest = item(task, ex, teacher_answers(task, ex))
    off = item(task, ex, ["fg", "a1b2c3", "d1h2a3", "b1c2d3", "a1b2c3d1"])  # no history category
    functions = [("recgpt_align", 1.0, {"model": "align"})]
    (h, _, e1), (o, _, e2) = compose_batch(functions, [honest, off], models)
    assert e1 is None and e2 is None and h > 0.8 and o < 0.2
    with pytest.raises(ValueError, match="is a sequence classifier; this function needs a causal"):
        models.answer("align", ["x"], 2)


def test_gated_is_zero_when_any_gate_fails_and_summed_pays_for_diversity(task, models):
    """The paper's small checks: a team that buys diversity with accuracy earns more under
    the weighted sum, less (its accuracy) under the gates; a failed gate zeroes it."""
    ex = task.example("train", 0)
    honest = item(task, ex, teacher_answers(task, ex))
    # The experts spread over every category of the history (so alignment holds) and
    # the arbiter picks across them: more diverse, fewer hits.
    hacked = item(task, ex, ["fg", "e3f1g1", "e5f5g4", "e1f3g3", "e5f1f5g1"])
    spec = lambda reward: RLJobSpec.model_validate(  # noqa: E731
        {
            "task": {"name": "recgpt"},
            "methods": {"recgpt": {"reward": reward, "diversityWeight": 2.0}},
            "reward": {"models": {"align": "builtin:recgpt-align"}},
        }
    )
    summed, gated = spec("summed").reward_functions(), spec("gated").reward_functions()
    (hs, hp, _), (ks, kp, _) = compose_batch(summed, [honest, hacked], models)
    assert kp["recgpt_diversity"] > hp["recgpt_diversity"] and kp["recgpt_acc"] < hp["recgpt_acc"]
    assert ks > hs, "the weighted sum pays more for the hacked team"
    (hg, hgp, _), (kg, kgp, _) = compose_batch(gated, [honest, hacked], models)
    assert hg == pytest.approx(hgp["recgpt_acc"]) and kg == pytest.approx(kgp["recgpt_acc"])
    assert kg < hg, "past its gate, diversity earns nothing under the gates"
    # Each gate alone zeroes the reward, at a threshold no team reaches.
    for gate in ("recgpt_align", "recgpt_diversity", "recgpt_length"):
        params = {
            "main": "recgpt_acc",
            "gates": {gate: 1.01},
            "params": {"recgpt_align": {"model": "align"}},
        }
        ((total, _, error),) = compose_batch([("gated", 1.0, params)], [honest], models)
        assert error is None and total == 0.0, gate
    ((total, _, error),) = compose_batch(
        [("gated", 1.0, {"main": "nope", "gates": {}})], [honest], models
    )
    assert total == 0.0 and "unknown reward functions ['nope']" in error


def test_senior_reviewer_truth_table():
    for relevant, well_formed, diverse, covering in itertools.product([False, True], repeat=4):
        grade = senior_review(relevant, well_formed, diverse, covering)
        if not (relevant and well_formed):
            assert grade == "B"
        elif diverse and covering:
            assert grade == "S"
        else:
            assert grade == "A"
    assert GRADES["S"] > GRADES["A"] > GRADES["B"]


def test_judge_grades_teams_and_listwise_ranks_them(task, models):
    ex = task.example("train", 0)
    s_team = item(task, ex, teacher_answers(task, ex))
    a_team = item(task, ex, ["fg", "f1f3f5", "g1g3g4", "f1f3f4", "f1f3f4f5"])  # g not covered
    b_team = item(task, ex, ["fg", "a1b2c3", "d1h2a3", "b1c2d3", "a1b2c3d1"])  # irrelevant
    params = {"model": "align", "align": 0.75, "diversity": 0.5}
    grades = [
        r[0]
        for r in compose_batch([("recgpt_judge", 1.0, params)], [b_team, s_team, a_team], models)
    ]
    assert grades == [GRADES["B"], GRADES["S"], GRADES["A"]]
    ranked = listwise(torch.tensor([grades, [1.0, 1.0, 0.0]]))
    assert ranked[0].tolist() == [0.0, 1.0, 0.5]  # S > A > B
    assert ranked[1].tolist() == [0.75, 0.75, 0.0]  # ties share their ranks


def test_method_checks_the_job():
    base = {"task": {"name": "recgpt"}, "methods": {"recgpt": {}}}
    with pytest.raises(
        ValueError, match=re.escape("alignment reward model 'align' must be in reward.models")
    ):
        RLJobSpec.model_validate(base)
    models = {"models": {"align": "builtin:recgpt-align"}}
    spec = RLJobSpec.model_validate({**base, "reward": models})
    assert spec.verifier() == "recgpt_acc" and spec.reward_functions()[1][0] == "gated"
    with pytest.raises(ValueError, match=re.escape("methods.recgpt needs task.name: recgpt")):
        RLJobSpec.model_validate({**base, "reward": models, "task": {"name": "countdown"}})
    with pytest.raises(
        ValueError, match=re.escape("methods.recgpt runs alone: the other methods' stages")
    ):
        RLJobSpec.model_validate(
            {**base, "reward": models, "methods": {"recgpt": {}, "bard": {"budgets": [8]}}}
        )


def test_the_reward_service_finds_the_models_a_gated_reward_needs():
    gated = {"main": "recgpt_acc", "gates": {"recgpt_align": 0.5, "recgpt_length": 1.0}}
    assert models_needed("gated", {**gated, "params": {"recgpt_align": {"model": "align"}}}) == [
        "align"
    ]
    assert models_needed("gated", gated) == [None]  # the service refuses: no model named
    assert models_needed("recgpt_judge", {"model": "judge"}) == ["judge"]
    assert models_needed("recgpt_acc", {}) == []
