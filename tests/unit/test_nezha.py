"""NEZHA (rollfleet.models.nezha, rollfleet.tasks.recommend, rollfleet.methods.nezha): the
prefix verifier, the recommendation task and its rewards, the draft head's decoding (0
invalid items with the verifier, beam search equal to brute force, one backbone forward
per request in the torch engine) and the trainer scoring the engine's samples on-policy."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollfleet.models.architectures import ARCHITECTURES, architecture_of, import_architectures
from rollfleet.models.nezha import (
    ItemDecoding,
    backbone_states,
    draft_logprobs,
    draft_positions,
    draft_search,
)
from rollfleet.models.tokenizer import build_char_tokenizer
from rollfleet.rewards import score
from rollfleet.spec import RLJobSpec
from rollfleet.tasks import make_task
from rollfleet.tasks.recommend import (
    PrefixVerifier,
    hit_rate,
    item_codes,
    item_text,
    make_catalogue,
    ndcg,
    verifier_for,
)
from rollfleet_rollout.engine import GenerationRequest, SamplingParams, complete
from rollfleet_rollout.torch_engine import TorchEngine

TASK = {"codes": 6, "items": 20, "history": 3}  # small enough to enumerate


@pytest.fixture(scope="module")
def nezha_model(tmp_path_factory):
    """A fresh NEZHA model saved and loaded back through the Auto classes."""
    folder = ARCHITECTURES["nezha"].create(
        tmp_path_factory.mktemp("nezha"), seed=0, hidden=32, layers=2, heads=2, max_len=64
    )
    import_architectures()
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def prompts(task, count: int, split: str = "heldout") -> list[list[int]]:
    tok = build_char_tokenizer()
    return [
        [tok.bos_token_id, *tok.encode(task.example(split, i).prompt, add_special_tokens=False)]
        for i in range(count)
    ]


def teacher_forced(model, batch: list[list[int]], codes: torch.Tensor) -> torch.Tensor:
    """The head's logits [N, L, codes] through the model's forward, as the trainer gets them
    (right-padded prompts)."""
    width = max(map(len, batch))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in batch])
    return model(
        input_ids=ids,
        attention_mask=(ids > 0).long(),
        draft_positions=draft_positions([len(p) for p in batch], 3),
        draft_codes=codes,
    ).draft_logits


# --- the verifier and the task ------------------------------------------------------------


def test_prefixes_pack_into_one_integer_with_their_length():
    verifier = PrefixVerifier([(1, 2, 3)], codes=5)
    assert verifier.pack((1,)) == (1 << 2) | 1
    assert verifier.pack((1, 2)) == ((1 * 5 + 2) << 2) | 2
    assert verifier.pack((1, 2, 3)) == (((1 * 5 + 2) * 5 + 3) << 2) | 3
    assert verifier.valid((1,)) and verifier.valid((1, 2)) and verifier.valid((1, 2, 3))
    # (0, 7) would pack like (1, 2) if codes past the range were not refused
    assert not verifier.valid((0, 7)) and not verifier.valid((1, 2, 4)) and not verifier.valid((2,))


def test_batched_allowed_codes_agree_with_the_set_for_every_prefix():
    catalogue = make_catalogue(3, codes=6, items=20)
    verifier = PrefixVerifier(catalogue.items, catalogue.codes)
    width = 9  # the head may have more outputs than the task has codes
    for length in range(3):
        prefixes = list(itertools.product(range(6), repeat=length))
        allowed = verifier.allowed(torch.tensor(prefixes).view(len(prefixes), length), width)
        for prefix, row in zip(prefixes, allowed.tolist(), strict=True):
            assert row == [verifier.valid((*prefix, c)) for c in range(width)]
    assert set(catalogue.items) == {
        item for item in itertools.product(range(6), repeat=3) if verifier.valid(item)
    }


def test_the_catalogue_is_a_small_share_of_the_code_combinations():
    task = make_task("recommend", {}, seed=0)
    catalogue = task.catalogue
    assert len(catalogue.items) == 256 and len(set(catalogue.items)) == 256
    assert len(catalogue.items) / catalogue.codes**3 < 0.02
    assert make_catalogue(0, 24, 256) is catalogue  # cached: one per (seed, codes, items)
    assert make_catalogue(1, 24, 256).items != catalogue.items
    # every item's successor is another item of its category
    assert all(catalogue.successor[i][0] == i[0] for i in catalogue.items)


def test_examples_are_histories_then_placeholders_and_deterministic():
    task = make_task("recommend", {"history": 4}, seed=0)
    ex = task.example("train", 5)
    assert ex == task.example("train", 5) and ex != task.example("heldout", 5)
    history, tail = ex.prompt.rsplit(" ", 1)
    assert tail == "#%_>" and len(history.split()) == 4
    assert all(task.catalogue.items.count(item_codes(i)) == 1 for i in history.split())
    assert ex.answer == ex.meta["next"][0] and len(ex.meta["next"]) == 3
    assert ex.demonstration == (("model", ex.answer),)
    # the structure makes the next item predictable: mostly the last item's successor
    follows = sum(
        item_text(task.catalogue.successor[item_codes(e.prompt.split()[-2])]) == e.answer
        for e in (task.example("train", i) for i in range(400))
    )
    assert 0.6 < follows / 400 < 0.85


def test_rewards_pay_hits_on_the_next_items_and_check_the_catalogue():
    ex = make_task("recommend", {}, seed=0).example("train", 0)
    item = {"answer": ex.answer, "meta": ex.meta}
    assert score("recommend", item | {"response": ex.meta["next"][0]}) == 1.0
    later = next(i for i in ex.meta["next"][1:] if i != ex.meta["next"][0])
    assert score("recommend", item | {"response": later}) == 0.5
    assert score("recommend", item | {"response": "zzz"}) == 0.0
    assert score("item_valid", item | {"response": ex.answer}) == 1.0
    assert score("item_valid", item | {"response": "zzz"}) == 0.0
    assert score("item_valid", item | {"response": "ab"}) == 0.0


def test_hit_rate_and_ndcg_on_hand_values():
    ranked = ["aaa", "bbb", "ccc"]
    assert hit_rate(ranked, "bbb", 1) == 0.0 and hit_rate(ranked, "bbb", 2) == 1.0
    assert ndcg(ranked, "aaa", 10) == 1.0
    assert ndcg(ranked, "ccc", 10) == pytest.approx(1 / math.log2(4))
    assert ndcg(ranked, "ccc", 2) == 0.0


# --- the model and its decoding -----------------------------------------------------------


def test_the_architecture_round_trips_with_its_head(nezha_model, tmp_path):
    assert architecture_of(nezha_model).name == "nezha"
    assert any(name.startswith("draft.") for name in nezha_model.state_dict())
    nezha_model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in nezha_model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_teacher_forcing_through_forward_equals_step_by_step(nezha_model):
    task = make_task("recommend", TASK, seed=0)
    batch = prompts(task, 4)
    codes = torch.tensor([item_codes(task.example("heldout", i).answer) for i in range(4)])
    with torch.no_grad():
        logits = teacher_forced(nezha_model, batch, codes)
        h0, h_sp = backbone_states(nezha_model, batch)
        head, state = nezha_model.draft, h0
        for level in range(3):
            step = head.logits(level, state, h_sp[:, level])
            assert torch.allclose(step, logits[:, level], atol=1e-5)
            if level < 2:
                state = head.advance(level, state, codes[:, level])


def test_beam_search_at_catalogue_size_equals_brute_force(nezha_model):
    task = make_task("recommend", TASK, seed=0)
    verifier = verifier_for(0, TASK["codes"], TASK["items"])
    items = torch.tensor(task.catalogue.items)
    with torch.no_grad():
        h0, h_sp = backbone_states(nezha_model, prompts(task, 3))
        found, scores, _ = draft_search(
            nezha_model.draft, h0, h_sp, beam=len(items), allowed=verifier.allowed
        )
        for row in range(3):
            every = items
            logits = nezha_model.draft.teacher_forced(
                h0[row].expand(len(every), -1), h_sp[row].expand(len(every), -1, -1), every
            )
            brute = draft_logprobs(logits, every, verifier.allowed).sum(-1)
            order = brute.argsort(descending=True)
            assert found[row].tolist() == every[order].tolist()
            assert torch.allclose(scores[row], brute[order], atol=1e-5)


def test_the_verifier_leaves_no_invalid_item_that_free_decoding_makes(nezha_model):
    task = make_task("recommend", TASK, seed=0)
    verifier = verifier_for(0, TASK["codes"], TASK["items"])
    with torch.no_grad():
        h0, h_sp = backbone_states(nezha_model, prompts(task, 16))
        checked, _, _ = draft_search(nezha_model.draft, h0, h_sp, beam=10, allowed=verifier.allowed)
        free, _, _ = draft_search(nezha_model.draft, h0, h_sp, beam=10)
    invalid = lambda found: [not verifier.valid(i) for i in found.view(-1, 3).tolist()]  # noqa: E731
    assert sum(invalid(checked)) == 0
    assert sum(invalid(free)) / free[..., 0].numel() > 0.5  # an untrained head mostly misses


def test_sampled_items_are_scored_on_policy_by_the_trainers_computation(nezha_model):
    task = make_task("recommend", TASK, seed=0)
    verifier = verifier_for(0, TASK["codes"], TASK["items"])
    batch = prompts(task, 8)
    decoding = ItemDecoding(beam=4, verifier=verifier)
    with torch.no_grad():
        drawn = decoding.items(nezha_model, batch, 0.7, torch.Generator().manual_seed(0))
        table = nezha_model.config.draft_code_token_ids
        codes = torch.tensor([[table.index(t) for t in tokens] for tokens, _ in drawn])
        logits = teacher_forced(nezha_model, batch, codes)
        recomputed = draft_logprobs(logits, codes, verifier.allowed, 0.7)
    assert all(verifier.valid(tuple(c)) for c in codes.tolist())
    assert torch.allclose(recomputed, torch.tensor([lp for _, lp in drawn]), atol=1e-5)


def test_the_engine_runs_one_backbone_forward_per_request(nezha_model):
    task = make_task("recommend", TASK, seed=0)
    decoding = ItemDecoding(beam=5, verifier=verifier_for(0, TASK["codes"], TASK["items"]))
    tok = build_char_tokenizer()

    async def run():
        engine = TorchEngine(nezha_model, slots=4, max_len=64, eos_token_id=2, version=7)
        await engine.start()
        try:
            requests = [
                GenerationRequest(f"r{i}", p, SamplingParams(temperature=t), decoding=decoding)
                for i, (p, t) in enumerate(zip(prompts(task, 6), [0.0, 1.0] * 3, strict=True))
            ]
            outs = await asyncio.gather(*(complete(engine, r) for r in requests))
            plain = await complete(engine, GenerationRequest("text", [1, 5], SamplingParams(4)))
            return outs, plain, engine.backbone_rows
        finally:
            await engine.stop()

    outs, plain, rows = asyncio.run(run())
    assert rows == 6  # six requests, one backbone row each; token-by-token decoding adds none
    assert len(plain.token_ids) >= 1
    for out in outs:
        assert out.finish_reason == "stop" and out.versions == [7, 7, 7]
        text = tok.decode(out.token_ids)
        assert score(
            "item_valid", {"response": text, "answer": "", "meta": task.example("train", 0).meta}
        )


def test_the_method_needs_its_architecture_and_task():
    with pytest.raises(ValueError, match=r"methods\.nezha needs model\.architecture: nezha"):
        RLJobSpec.model_validate({"methods": {"nezha": {}}, "task": {"name": "recommend"}})
    RLJobSpec.model_validate(
        {
            "methods": {"nezha": {}},
            "task": {"name": "recommend"},
            "model": {"architecture": "nezha"},
        }
    )


def test_joint_warmup_trains_the_text_and_the_head_together(tmp_path):
    from rollfleet.methods.nezha.stages import train_jointly

    folder = ARCHITECTURES["nezha"].create(
        tmp_path, seed=0, hidden=32, layers=2, heads=2, max_len=64
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_jointly(
        model,
        build_char_tokenizer(),
        make_task("recommend", TASK, seed=0),
        steps=40,
        batch_size=16,
        lr=3e-3,
        embedding_multiplier=100.0,
        cell_multiplier=10.0,
        seed=0,
    )
    (text_first, head_first), (text_last, head_last) = losses[0], losses[-1]
    assert text_last < text_first and head_last < head_first
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {
        "draft.embed.0.weight",
        "draft.cell_input.0.weight",
        "model.layers.0.mlp.up_proj.weight",
    } <= moved
