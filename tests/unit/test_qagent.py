"""QAgent (rollfleet.tasks.qagent, the qagent_* rewards, rollfleet.methods.qagent): the
knowledge base and its BM25 index, the search env's protocol and round cap, the format
check's truth table, the stage rewards on hand-made episodes, the information blocks
outside the loss, a user corpus, and builtin reward models."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from rollfleet import rewards
from rollfleet.episodes import EpisodeRequest, Generated, Limits, run_turns
from rollfleet.models.tiny import create_tiny_model
from rollfleet.models.tokenizer import build_char_tokenizer
from rollfleet.rewards import RewardModels, compose, compose_batch, score
from rollfleet.spec import RLJobSpec
from rollfleet.tasks import make_task
from rollfleet.tasks.qagent import (
    QUESTIONS,
    follows_protocol,
    parse_answer,
    parse_queries,
    reader_prompt,
    retrieved,
)


@pytest.fixture(scope="module")
def task():
    return make_task("qagent", {}, seed=0)


def turns_of(example, observations=None) -> list[dict]:
    """A demonstration as the transcript the reward sees (env info as the env gives it)."""
    out = []
    for speaker, text in example.demonstration:
        info = {}
        if speaker == "env":
            info = {"passages": [text[3:-4]] if text != "<i></i>" else []}
        out.append({"role": speaker, "text": text, "tokens": len(text), "info": info})
    return out


def test_knowledge_base_splits_people_and_answers_follow_two_hops(task):
    kb = task.kb
    train = {task.example("train", i).meta["question"].split()[0] for i in range(400)}
    heldout = {task.example("heldout", i).meta["question"].split()[0] for i in range(200)}
    assert not train & heldout, "held-out questions ask about people training never sees"
    assert not (train | heldout) & set(kb.bosses), "no question is about a boss"
    for i in range(50):
        ex = task.example("heldout", i)
        person, kind = ex.meta["question"].split(" ", 1)
        first, second = QUESTIONS[kind]
        assert ex.answer == kb.facts[kb.facts[person, first], second]
    assert len(task.index.passages) == len(kb.facts) > 1000


def test_strong_queries_retrieve_the_gold_passage_and_entity_alone_is_ambiguous(task):
    kb = task.kb
    strong = entity_only = 0
    for i in range(200):
        ex = task.example("heldout", i)
        person, kind = ex.meta["question"].split(" ", 1)
        first, second = QUESTIONS[kind]
        bridge = kb.facts[person, first]
        [hop1, hop2, alone] = task.index.search([f"{person} {first}", f"{bridge} {second}", bridge])
        strong += hop1.text == kb.passage(person, first) and hop2.text == kb.passage(bridge, second)
        entity_only += alone.text == kb.passage(bridge, second)
    assert strong == 200
    assert entity_only < 100  # the entity's other passages tie with it under BM25
    assert task.index.search(["qqqq", "the is at", "", "kita"])[:3] == [None, None, None]


def test_demonstrations_replay_in_the_env_until_the_answer(task):
    for i in range(20):
        ex = task.example("train", i)
        env = task.open_env(ex.meta)
        model = [t for s, t in ex.demonstration if s == "model"]
        expected = [t for s, t in ex.demonstration if s == "env"]
        for action, observation in zip(model, expected, strict=False):
            got, done, info = env.step(action)
            assert (got, done) == (observation, False)
            assert info["queries"] == parse_queries(action)
        assert env.step(model[-1]) == ("", True, {"answer": ex.answer})


def test_round_cap_and_query_cap(task):
    env = task.open_env({})
    observation, done, info = env.step("<p>x</p><s>kita;bude works;geza based;zana</s>")
    assert info["queries"] == ["kita", "bude works", "geza based"]  # the first 3 run
    for _ in range(task.max_rounds - 1):
        assert env.step("<r>x</r><s>bude works</s>")[1] is False
    observation, done, info = env.step("<r>x</r><s>bude works</s>")
    assert (observation, done) == ("", True)
    assert "more than 5 search rounds" in info["error"]
    assert task.open_env({}).step("no tags at all")[1] is True


def test_format_check_truth_table(task):
    good = turns_of(task.example("train", 1))
    assert follows_protocol(good, max_rounds=5)

    def edited(index: int, text: str) -> list[dict]:
        turns = [dict(t) for t in good]
        turns[index]["text"] = text
        return turns

    assert not follows_protocol(edited(0, "<s>bude works</s>"), 5)  # no plan
    assert not follows_protocol(edited(0, "<p>a</p><s>a;b;c;d</s>"), 5)  # 4 queries
    assert follows_protocol(edited(0, "<p>a</p><s>a;b;c</s>"), 5)
    assert not follows_protocol(edited(4, "<r>kita</r>kita"), 5)  # no answer block
    assert not follows_protocol(edited(2, "<s>geza based</s>"), 5)  # no reflection
    assert not follows_protocol(good, max_rounds=1)  # two searches over a cap of one
    assert not follows_protocol(good[:1], 5)  # searched, never answered


def test_stage_rewards_on_hand_made_episodes(task):
    ex = task.example("train", 1)
    turns = turns_of(ex)
    item = {"response": turns[-1]["text"], "answer": ex.answer, "meta": ex.meta, "turns": turns}
    assert score("qagent_answer", item) == 1.0
    assert score("qagent_stage1", item) == 1.0
    assert score("qagent_hit", item) == float(ex.answer in turns[3]["text"])
    # A right answer out of format earns nothing in stage 1; the answer alone still counts.
    unformatted = {**item, "turns": [{**t, "text": t["text"].replace("<p>", "<q>")} for t in turns]}
    assert score("qagent_stage1", unformatted) == 0.0
    wrong = {**item, "response": "<r>x</r><a>zzzz</a>"}
    assert score("qagent_answer", wrong) == 0.0
    assert parse_answer("<r>a</r><a> kita </a>") == "kita"
    assert parse_answer("kita") is None


def test_retrieved_passages_and_the_reader_prompt():
    turns = [
        {"role": "model", "text": "", "tokens": 0, "info": {}},
        {"role": "env", "text": "", "tokens": 0, "info": {"passages": ["a b.", "c d."]}},
        {"role": "env", "text": "", "tokens": 0, "info": {"passages": ["a b.", "e f."]}},
    ]
    assert retrieved(turns) == ["a b.", "c d.", "e f."]
    assert reader_prompt("kaz company city", ["p1.", "p2.", "p3."], limit=2) == (
        "q:kaz company city? p2. p3.="
    )


def test_information_blocks_are_outside_the_loss(task):
    """The episode runner masks the env's information blocks; the model's turns train."""
    tok = build_char_tokenizer()
    ex = task.example("train", 1)
    script = iter(t for s, t in ex.demonstration if s == "model")

    async def generate(context, request, turn):
        ids = tok.encode(next(script), add_special_tokens=False)
        if turn == 2:
            ids.append(tok.eos_token_id)
        return Generated(ids, [-1.0] * len(ids), [0] * len(ids), "stop")

    class Env:
        def __init__(self):
            self.env = task.open_env(ex.meta)

        async def step(self, action):
            return self.env.step(action)

    episode = asyncio.run(
        run_turns(
            EpisodeRequest([tok.bos_token_id]),
            generate=generate,
            env=Env(),
            limits=Limits(task.max_rounds + 1, 256, tok.eos_token_id),
            decode=tok.decode,
            encode=lambda s: tok.encode(s, add_special_tokens=False),
        )
    )
    text = [tok.decode([t]) for t in episode.response_ids]
    joined = "".join(text)
    for block in (t for s, t in ex.demonstration if s == "env"):
        start = joined.index(block)
        assert episode.loss_mask[start : start + len(block)] == [0.0] * len(block)
    assert (
        sum(episode.loss_mask) == sum(len(t) for s, t in ex.demonstration if s == "model") + 1
    )  # the model's turns and the end token


def test_a_user_corpus_needs_no_code(tmp_path):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                {"id": "1", "contents": "paris is the capital of france."},
                {"id": "2", "text": "rome is the capital of italy."},
            ]
        )
    )
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "capital of italy", "answer": "rome"}) + "\n")
    task = make_task(
        "qagent", {"corpus": str(corpus), "questions": str(questions), "heldout": str(questions)}
    )
    assert task.size("heldout") == 1
    ex = task.example("train", 0)
    assert (ex.prompt, ex.answer, ex.demonstration) == ("capital of italy?", "rome", ())
    assert task.index.search(["italy capital"])[0].text == "rome is the capital of italy."
    with pytest.raises(ValueError, match="corpus and questions go together"):
        make_task("qagent", {"corpus": str(corpus)})
    with pytest.raises(FileNotFoundError, match=re.escape("task.params.corpus")):
        make_task(
            "qagent",
            {"corpus": "nope.jsonl", "questions": str(questions), "heldout": str(questions)},
        )
    corpus.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="needs a string field 'text'"):
        make_task(
            "qagent",
            {"corpus": str(corpus), "questions": str(questions), "heldout": str(questions)},
        )


def _spec(**methods) -> dict:
    return {"task": {"name": "qagent"}, "model": {"maxLength": 256}, "methods": methods}


def test_method_picks_the_stage_reward_and_checks_the_job():
    stage1 = RLJobSpec.model_validate(_spec(qagent={"stage": 1}))
    assert [f[0] for f in stage1.reward_functions()][:2] == ["qagent_answer", "qagent_stage1"]
    assert stage1.verifier() == "qagent_answer"
    stage2 = RLJobSpec.model_validate(
        {**_spec(qagent={"stage": 2}), "reward": {"models": {"reader": "builtin:qagent-reader"}}}
    )
    assert stage2.reward_functions()[1] == (
        "qagent_reader",
        1.0,
        {"model": "reader", "gold_bonus": 0.5, "passages": 4},
    )
    with pytest.raises(
        ValueError, match=re.escape("stage 2 needs the reader 'reader' in reward.models")
    ):
        RLJobSpec.model_validate(_spec(qagent={"stage": 2}))
    with pytest.raises(ValueError, match=re.escape("methods.qagent needs task.name: qagent")):
        RLJobSpec.model_validate({**_spec(qagent={}), "task": {"name": "countdown"}})
    with pytest.raises(ValueError, match="'builtin:nope' is no builtin model"):
        RLJobSpec.model_validate({**_spec(), "reward": {"models": {"reader": "builtin:nope"}}})


def test_reader_reward_scores_batches_with_a_real_model(task, tmp_path, monkeypatch):
    """The stage-2 reward through a real (untrained, fast) builtin model, trained into the
    cache once: the gold bonus where the answer was retrieved; the reader's exact match
    is 0 for a model that has learnt nothing."""
    built = []

    def untrained(folder):
        built.append(folder)
        create_tiny_model(folder, seed=0, max_len=256)

    monkeypatch.setitem(rewards.BUILTIN_MODELS, "qagent-reader", untrained)
    models = RewardModels({"reader": "builtin:qagent-reader"}, cache=tmp_path)
    items = []
    for i in range(4):
        ex = task.example("train", i)
        turns = turns_of(ex)
        items.append(
            {"response": turns[-1]["text"], "answer": ex.answer, "meta": ex.meta, "turns": turns}
        )
    functions = [("qagent_answer", 0.0, {}), ("qagent_reader", 1.0, {"model": "reader"})]
    results = compose_batch(functions, items, models)
    for item, (total, parts, error) in zip(items, results, strict=True):
        assert error is None and parts["qagent_answer"] == 1.0
        assert total == 0.5 * score("qagent_hit", item)
    assert models.ready  # scoring waited for the background build
    again = RewardModels({"reader": "builtin:qagent-reader"}, cache=tmp_path)
    assert again.ready and len(built) == 1  # cached: loaded, not trained again
    assert (tmp_path / "qagent-reader" / "config.json").is_file()
    with pytest.raises(ValueError, match="model-based"):
        compose(functions, items[0])
    with pytest.raises(ValueError, match=re.escape("reward.models.reader: 'builtin:nope'")):
        RewardModels({"reader": "builtin:nope"}, cache=tmp_path)
