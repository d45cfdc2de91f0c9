"""Multi-agent samples (`Trajectory.segments`): the `agents` episode runner giving each
agent a segment of its own, validation on the wire, one batch row per segment, a sample
cut into segments trained exactly as the same tokens uncut, and per-agent advantages on
hand-computed values."""

from __future__ import annotations

import asyncio
import functools

import msgpack
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.algorithms import ADVANTAGES
from rollfleet.episodes import EpisodeRequest, Generated, Limits, run_agents
from rollfleet.models.batching import TrainBatch
from rollfleet.models.tokenizer import build_char_tokenizer
from rollfleet.protocol import ProtocolError, Segment, Trajectory, decode, encode
from rollfleet.spec import parse_manifest
from rollfleet_trainer.loop import Group, Trainer
from rollfleet_trainer.synthetic import synthetic_groups


def segment(agent: str, prompt: list[int], response: list[int], version=0, reward=None):
    n = len(response)
    return Segment(
        agent=agent,
        prompt_ids=prompt,
        response_ids=response,
        behaviour_logprobs=[-1.0] * n,
        token_versions=[version] * n,
        loss_mask=[1.0] * n,
        reward=reward,
    )


def multi_agent(sample: int, segments: list[Segment], reward: float = 0.0) -> Trajectory:
    return Trajectory(
        task_id="t0",
        group_id="g0",
        sample_index=sample,
        group_size=2,
        worker="w",
        status="completed",
        prompt_ids=[],
        response_ids=[],
        behaviour_logprobs=[],
        token_versions=[],
        loss_mask=[],
        reward=reward,
        segments=segments,
    )


def test_segments_travel_whole_and_are_checked():
    t = multi_agent(0, [segment("planner", [1, 5], [6, 7], 3), segment("expert", [1, 8], [9], 2)])
    back = decode(Trajectory, encode(t))
    assert [s.agent for s in back.rows()] == ["planner", "expert"]
    assert back.oldest_version() == 2  # across every segment
    raw = t.model_dump(mode="json")
    raw["segments"][0]["loss_mask"] = [1.0]
    with pytest.raises(ProtocolError, match=r"segments\.0: .*loss_mask has 1 entries for 2"):
        decode(Trajectory, msgpack.packb(raw))
    with pytest.raises(ValueError, match="carries its tokens in them"):
        Trajectory(**{**t.model_dump(), "response_ids": [3], "behaviour_logprobs": [0.0],
                      "token_versions": [0], "loss_mask": [1.0]})  # fmt: skip
    plain = synthetic_groups(0, 1, 1, 64)[0].samples[0][0]
    [row] = plain.rows()
    assert (row.agent, row.prompt_ids, row.response_ids) == (
        "policy",
        plain.prompt_ids,
        plain.response_ids,
    )


def test_each_segment_is_a_row_of_its_own():
    samples = [
        multi_agent(i, [segment("planner", [1, 5], [6, 7]), segment("expert", [1, 8, 9], [4])])
        for i in range(2)
    ]
    batch = TrainBatch.from_trajectories(samples, 2, 0)
    assert len(batch) == 4 and batch.segmented
    assert batch.row_sample == [0, 0, 1, 1]
    assert batch.row_agent == ["planner", "expert"] * 2
    assert batch.prompt_lengths == [2, 3, 2, 3]
    assert batch.input_ids[1].tolist() == [1, 8, 9, 4]
    assert batch.loss_mask[1].tolist() == [0, 0, 0, 1]
    assert batch.trajectories[1] is samples[0]
    assert batch.rows(2, 4).row_sample == [1, 1]


def test_per_agent_rewards_get_their_own_group_advantages():
    """Sample rewards 1 and 0 (shared by the planner); the experts' own rewards 0.2 and
    0.8. GRPO (mean-centred, std-scaled, eps 0) by hand: the sample's advantages are
    +0.7071 and -0.7071 (std of [1, 0] is 0.7071 unbiased), the experts' -0.7071 and +0.7071."""
    samples = [
        multi_agent(
            0, [segment("planner", [1], [6]), segment("expert", [1], [4], reward=0.2)], 1.0
        ),
        multi_agent(
            1, [segment("planner", [1], [6]), segment("expert", [1], [4], reward=0.8)], 0.0
        ),
    ]
    batch = TrainBatch.from_trajectories(samples, 2, 0)
    estimate = functools.partial(ADVANTAGES["grpo"], eps=0.0)
    sample_adv = estimate(torch.tensor([[1.0, 0.0]])).reshape(-1)
    rows = batch.row_advantages(sample_adv, estimate)
    half = 2**-0.5
    assert rows.tolist() == pytest.approx([half, -half, -half, half], abs=1e-6)
    samples[1].segments[1].reward = None  # one sample without the expert's own reward
    with pytest.raises(ValueError, match="agent 'expert'"):
        TrainBatch.from_trajectories(samples, 2, 0).row_advantages(sample_adv, estimate)


def cut(t: Trajectory, at: int) -> Trajectory:
    """The same tokens as two segments: the response's first `at` tokens, then the rest
    with everything before it as the second segment's prompt."""
    first = Segment(
        agent="a",
        prompt_ids=t.prompt_ids,
        response_ids=t.response_ids[:at],
        behaviour_logprobs=t.behaviour_logprobs[:at],
        token_versions=t.token_versions[:at],
        loss_mask=t.loss_mask[:at],
    )
    second = Segment(
        agent="b",
        prompt_ids=t.prompt_ids + t.response_ids[:at],
        response_ids=t.response_ids[at:],
        behaviour_logprobs=t.behaviour_logprobs[at:],
        token_versions=t.token_versions[at:],
        loss_mask=t.loss_mask[at:],
    )
    empty = {k: [] for k in ("prompt_ids", "response_ids", "behaviour_logprobs", "token_versions", "loss_mask")}  # fmt: skip
    return t.model_copy(update={**empty, "segments": [first, second]})


def test_a_sample_cut_into_segments_trains_exactly_as_uncut(tiny_model_dir, tmp_path):
    """With a shared reward and token-mean aggregation, the loss and every gradient of a
    step are those of the same tokens as one row per sample."""
    job = parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "segments"},
            "spec": {
                "trainer": {"steps": 10, "promptsPerStep": 4},
                "rollout": {"sampling": {"groupSize": 4}},
                "algorithm": {"lossAggregation": "token-mean"},
            },
        }
    )
    grads = []
    for segmented in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(job, None, tmp_path)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trainer.set_model(model, AutoTokenizer.from_pretrained(tiny_model_dir))
        groups = synthetic_groups(0, 4, 4, model.config.vocab_size, response_len=(2, 10))
        if segmented:
            groups = [
                Group(g.index, g.size, {i: (cut(t, 1), None) for i, (t, _) in g.samples.items()})
                for g in groups
            ]
        stats = trainer.train_step(groups)
        grads.append((stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (seg, seg_grads) = grads
    assert seg["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert seg["response_tokens"] == plain["response_tokens"]
    for name, grad in plain_grads.items():
        torch.testing.assert_close(seg_grads[name], grad, rtol=1e-4, atol=1e-6)


class Relay:
    """A coordinator env: the planner's word goes to two experts in turn, the second
    expert also gets one observation of its own, then the episode ends."""

    def __init__(self):
        self.steps = []

    async def step(self, action: str):
        self.steps.append(action)
        if len(self.steps) == 1:
            return f"e1:{action}>", False, {"agent": "expert1"}
        if len(self.steps) == 2:
            return "e2>", False, {"agent": "expert2"}
        if len(self.steps) == 3:
            return "=7;", False, {"tool": "calc"}
        return "", True, {"final": action}


def test_agents_runner_gives_each_agent_a_segment_of_its_own():
    tok = build_char_tokenizer()
    eos = tok.eos_token_id
    replies = iter(["ab", "cd", "ef", "gh"])

    async def generate(context, request, turn):
        ids = [*tok.encode(next(replies), add_special_tokens=False), eos]
        generate.contexts.append(tok.decode(context[1:]))
        return Generated(ids, [-0.5] * len(ids), [turn] * len(ids), "stop")

    generate.contexts = []
    request = EpisodeRequest([tok.bos_token_id, *tok.encode("q>", add_special_tokens=False)])
    request.agent = "planner"
    episode = asyncio.run(
        run_agents(
            request,
            generate=generate,
            env=Relay(),
            limits=Limits(5, 64, eos),
            decode=tok.decode,
            encode=lambda s: tok.encode(s, add_special_tokens=False),
        )
    )
    assert [s.agent for s in episode.segments] == ["planner", "expert1", "expert2"]
    # Each agent saw only its own prompt and turns, never another agent's.
    assert generate.contexts == ["q>", "e1:ab>", "e2>", "e2>ef<eos>=7;"]
    expert2 = episode.segments[2]
    assert tok.decode(expert2.prompt_ids[1:]) == "e2>"
    assert expert2.loss_mask == [1.0] * 3 + [0.0] * 3 + [1.0] * 3  # the env reply masked
    assert expert2.versions == [2, 2, 2, -1, -1, -1, 3, 3, 3]
    assert episode.response_ids == [] and episode.all_versions[:3] == [0, 0, 0]
    assert episode.turns[-1].info == {"final": "gh"}
    assert [t.info.get("agent") for t in episode.turns if t.role == "model"] == [
        "planner",
        "expert1",
        "expert2",
        "expert2",
    ]
