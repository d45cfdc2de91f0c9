"""The torch rollout engine: slot KV cache, continuous batching, versions, abort, pause.

The reference for every log-prob is Hugging Face's own forward over prompt + response on
the same weights, so the engine's hand-written slot forward (per-slot positions, right
padded prefill, batched decode at mixed positions) is checked against an independent
implementation.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from rollfleet.models.tiny import create_tiny_model, tiny_config
from rollfleet.models.weights import export_state
from rollfleet_rollout.engine import GenerationRequest, SamplingParams, complete
from rollfleet_rollout.torch_engine import SlotLlama, TorchEngine, sample

torch.set_num_threads(1)
transformers.utils.logging.set_verbosity_error()

EOS = 2
NO_EOS = -1  # an eos id no token can equal: requests then run to their length
VOCAB = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def load(directory):
    return AutoModelForCausalLM.from_pretrained(str(directory)).eval()


@pytest.fixture(scope="module")
def model(tiny_dir):
    """Shared by tests that never change the weights."""
    return load(tiny_dir)


@pytest.fixture
async def make_engine(model):
    engines: list[TorchEngine] = []

    async def make(engine_model=None, **kwargs) -> TorchEngine:
        kwargs.setdefault("eos_token_id", EOS)
        engine = TorchEngine(engine_model if engine_model is not None else model, **kwargs)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


def request(rid: str, prompt: list[int], **params) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**params))


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [1, *(rng.randrange(4, VOCAB) for _ in range(length - 1))]


def hf_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Log-prob of each response token under HF's forward over the whole sequence."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0]


async def drain(stream):
    """Consume a generate() stream to its end; returns the final output."""
    final = None
    async for output in stream:
        final = output
    return final


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


# --- correctness against Hugging Face ---------------------------------------------------


async def test_logprobs_match_hf_forward_under_continuous_batching(make_engine, model):
    engine = await make_engine(slots=8, max_len=128, seed=0)
    rng = random.Random(0)
    requests = [
        request(f"r{i}", random_prompt(rng, rng.randint(1, 24)), max_new_tokens=rng.randint(3, 16))
        for i in range(8)
    ]
    first_out = asyncio.Event()

    async def run(req: GenerationRequest):
        final = None
        async for output in engine.generate(req):
            if req.request_id == "r0" and len(output.token_ids) >= 2:
                first_out.set()
            final = output
        return final

    # half start together (one right-padded prefill), half join a running batch later
    early = [asyncio.create_task(run(r)) for r in requests[:4]]
    await asyncio.wait_for(first_out.wait(), 10)
    late = [asyncio.create_task(run(r)) for r in requests[4:]]
    outputs = await asyncio.gather(*early, *late)

    for req, out in zip(requests, outputs, strict=True):
        assert out.finished
        n = len(out.token_ids)
        assert 0 < n <= req.params.max_new_tokens
        if out.finish_reason == "length":
            assert n == req.params.max_new_tokens
        else:
            assert out.finish_reason == "stop" and out.token_ids[-1] == EOS
        assert len(out.logprobs) == len(out.versions) == n
        assert out.versions == [0] * n
        expected = hf_logprobs(model, req.prompt_ids, out.token_ids)
        diff = (torch.tensor(out.logprobs) - expected).abs().max().item()
        assert diff < 1e-4, (req.request_id, diff)
    # not every request ran its whole length at once: the test really mixed positions
    assert len({len(r.prompt_ids) for r in requests}) > 4


async def test_a_groups_shared_prompt_is_prefilled_once_and_sampled_as_before(make_engine, model):
    """Four samples of one prompt and two other prompts admitted together: three prompts
    prefilled, the group's KV copied into its other slots; the same seeded samples, token
    for token, as an engine that prefills every request."""
    rng = random.Random(3)
    shared = random_prompt(rng, 18)
    prompts = [shared] * 4 + [random_prompt(rng, 9), random_prompt(rng, 13)]

    async def generate(engine):
        requests = [
            request(f"r{i}", p, max_new_tokens=10, temperature=1.0) for i, p in enumerate(prompts)
        ]
        outputs = await asyncio.gather(*(drain(engine.generate(r)) for r in requests))
        return [(o.token_ids, o.logprobs) for o in outputs]

    sharing = await make_engine(slots=8, max_len=64, seed=5, eos_token_id=NO_EOS)
    alone = await make_engine(slots=8, max_len=64, seed=5, eos_token_id=NO_EOS, share_prompts=False)
    shared_out, alone_out = await generate(sharing), await generate(alone)
    assert (sharing.prefill_tokens, sharing.prefill_tokens_shared) == (18 + 9 + 13, 3 * 18)
    assert (alone.prefill_tokens, alone.prefill_tokens_shared) == (4 * 18 + 9 + 13, 0)
    for (tokens, logprobs), (alone_tokens, alone_logprobs) in zip(
        shared_out, alone_out, strict=True
    ):
        assert tokens == alone_tokens
        assert logprobs == pytest.approx(alone_logprobs, abs=1e-5)
    assert len({tuple(t) for t, _ in shared_out[:4]}) > 1  # the group's samples differ
    for prompt, (tokens, logprobs) in zip(prompts, shared_out, strict=True):
        expected = hf_logprobs(model, prompt, tokens)
        assert (torch.tensor(logprobs) - expected).abs().max().item() < 1e-4


async def test_a_sessions_next_turn_feeds_only_what_the_conversation_added(make_engine, model):
    """Multi-turn: turn 2's prompt is turn 1's conversation plus an env reply. With the
    session kept, only the last sampled token and the reply go through the model, and the
    log-probs are still those of HF's forward over the whole conversation; after
    end_session the next turn prefills everything again."""
    engine = await make_engine(slots=2, max_len=128, seed=0, eos_token_id=NO_EOS)
    prompt = random_prompt(random.Random(4), 12)

    def turn(rid: str, context: list[int]) -> GenerationRequest:
        return GenerationRequest(rid, context, SamplingParams(max_new_tokens=6), session="s")

    first = await complete(engine, turn("t1", prompt))
    conversation = [*prompt, *first.token_ids, 5, 9, 11]  # + the env's reply
    before = engine.prefill_tokens
    second = await complete(engine, turn("t2", conversation))
    assert engine.prefill_tokens - before == 1 + 3  # turn 1's last token, then the reply
    assert engine.prefill_tokens_kept == len(prompt) + len(first.token_ids) - 1
    expected = hf_logprobs(model, conversation, second.token_ids)
    assert (torch.tensor(second.logprobs) - expected).abs().max().item() < 1e-4

    engine.end_session("s")
    longer = [*conversation, *second.token_ids, 7]
    before = engine.prefill_tokens
    third = await complete(engine, turn("t3", longer))
    assert engine.prefill_tokens - before == len(longer)
    expected = hf_logprobs(model, longer, third.token_ids)
    assert (torch.tensor(third.logprobs) - expected).abs().max().item() < 1e-4


async def test_kept_sessions_give_up_their_slot_and_a_weight_swap_drops_them(make_engine, tiny_dir):
    """A kept session never blocks a new request: with one slot, a request without a
    session takes the kept slot (the session then prefills in full). A swap drops kept
    sessions: their keys and values are the old weights'."""
    engine = await make_engine(load(tiny_dir), slots=1, max_len=128, eos_token_id=NO_EOS)
    prompt = random_prompt(random.Random(5), 8)

    def turn(rid: str, context: list[int], session: str | None) -> GenerationRequest:
        return GenerationRequest(rid, context, SamplingParams(max_new_tokens=4), session=session)

    a = await complete(engine, turn("a1", prompt, "a"))
    other = await asyncio.wait_for(complete(engine, turn("x", prompt, None)), 10)
    assert len(other.token_ids) == 4
    before = engine.prefill_tokens
    a_next = [*prompt, *a.token_ids, 6]
    await complete(engine, turn("a2", a_next, "a"))
    assert engine.prefill_tokens - before == len(a_next)  # its slot was given up

    b = await complete(engine, turn("b1", prompt, "b"))
    await engine.load_weights(1, export_state(load(tiny_dir)))
    await wait_until(lambda: engine.policy_version == 1)
    before = engine.prefill_tokens
    b_next = [*prompt, *b.token_ids, 6]
    out = await complete(engine, turn("b2", b_next, "b"))
    assert engine.prefill_tokens - before == len(b_next)
    assert out.versions == [1] * len(out.token_ids)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
async def test_slot_decode_at_mixed_positions_matches_hf(model, kv_heads):
    """SlotLlama directly: two slots prefilled with different prompt lengths, then decoded
    together, each at its own position; slots 0 and 2, below the highest in use, take no
    part (decoding reads the cache of every slot below the highest in place). With two kv
    heads for four query heads (grouped-query attention) on a fresh model of that shape."""
    if kv_heads != model.config.num_key_value_heads:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(VOCAB, heads=4, kv_heads=kv_heads)).eval()
    rng = random.Random(1)
    prompts = [random_prompt(rng, 5), random_prompt(rng, 11)]
    runner = SlotLlama(model, slots=4, max_len=32)
    slots = [3, 1]  # out of order on purpose
    logits = runner.prefill(slots, prompts)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
        assert torch.allclose(logits[row], ref, atol=1e-4)
    nxt = [7, 9]
    decoded = runner.decode(
        torch.tensor(slots), torch.tensor(nxt), torch.tensor([len(p) for p in prompts])
    )
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([[*prompt, nxt[row]]])).logits[0, -1].float()
        assert torch.allclose(decoded[row], ref, atol=1e-4)
    # kept sessions' next turns: three tokens each, behind caches of different lengths
    added = [[5, 6, 8], [10, 4, 12]]
    extended = runner.extend(slots, added, [len(p) + 1 for p in prompts])
    for row, prompt in enumerate(prompts):
        sequence = [*prompt, nxt[row], *added[row]]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([sequence])).logits[0, -1].float()
        assert torch.allclose(extended[row], ref, atol=1e-4)


async def test_greedy_matches_hf_generate(make_engine, model):
    engine = await make_engine(slots=4, max_len=128)
    rng = random.Random(2)
    prompt = random_prompt(rng, 9)
    out = await complete(engine, request("g", prompt, max_new_tokens=20, temperature=0.0))
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
            eos_token_id=EOS,
            pad_token_id=0,
        )
    assert out.token_ids == generated[0, len(prompt) :].tolist()
    # greedy log-probs are reported at temperature 1
    expected = hf_logprobs(model, prompt, out.token_ids)
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


async def test_sampling_is_reproducible_for_a_seed(make_engine):
    prompt = random_prompt(random.Random(3), 6)
    results = []
    for seed in (5, 5, 6):
        engine = await make_engine(slots=2, max_len=128, seed=seed, eos_token_id=NO_EOS)
        results.append((await complete(engine, request("s", prompt, max_new_tokens=24))).token_ids)
    assert results[0] == results[1]
    assert results[0] != results[2]


async def test_final_only_sends_one_output_equal_to_the_streams_last(make_engine):
    prompt = random_prompt(random.Random(4), 7)
    outputs = {}
    for final_only in (False, True):
        engine = await make_engine(slots=4, max_len=128, seed=9, eos_token_id=NO_EOS)
        stream = engine.generate(request("f", prompt, max_new_tokens=10), final_only=final_only)
        outputs[final_only] = [out async for out in stream]
    streamed, final = outputs[False], outputs[True]
    assert [len(o.token_ids) for o in streamed] == list(range(1, 11))
    assert not any(o.finished for o in streamed[:-1])
    assert len(final) == 1 and final[0] == streamed[-1] and final[0].finished


# --- scheduling -------------------------------------------------------------------------


async def test_more_requests_than_slots_all_finish_and_join_while_others_run(make_engine):
    engine = await make_engine(slots=3, max_len=128, eos_token_id=NO_EOS)
    rng = random.Random(4)
    lengths = [4, 30, 6, 25, 3, 18, 9, 12]
    requests = [
        request(f"r{i}", random_prompt(rng, rng.randint(2, 10)), max_new_tokens=n)
        for i, n in enumerate(lengths)
    ]
    progress: dict[str, int] = {}
    done: set[str] = set()
    joined_mid_run: list[str] = []
    max_running = 0

    async def run(req: GenerationRequest):
        nonlocal max_running
        final = None
        async for output in engine.generate(req):
            rid = req.request_id
            if rid not in progress:
                others = [q for q, n in progress.items() if q not in done and n >= 2]
                if others:
                    joined_mid_run.append(rid)
            progress[rid] = len(output.token_ids)
            max_running = max(max_running, len(set(progress) - done))
            if output.finished:
                done.add(rid)
            final = output
        return final

    outputs = await asyncio.gather(*(run(r) for r in requests))
    for req, out in zip(requests, outputs, strict=True):
        assert out.finish_reason == "length"
        assert len(out.token_ids) == req.params.max_new_tokens
    assert max_running <= 3  # never more sequences than slots
    assert joined_mid_run, "no request joined while another was running"
    # continuous batching: far fewer engine steps than tokens (sequential would be one each)
    assert engine.tokens_generated == sum(lengths)
    assert engine.steps < sum(lengths) / 2
    assert engine.free_capacity() == 3


async def test_stop_token_ends_with_stop_and_max_new_tokens_with_length(make_engine):
    engine = await make_engine(slots=2, max_len=128, eos_token_id=NO_EOS)
    prompt = random_prompt(random.Random(5), 7)
    free = await complete(engine, request("a", prompt, max_new_tokens=12, temperature=0.0))
    assert free.finish_reason == "length"
    assert len(free.token_ids) == 12

    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    stopped = await complete(
        engine,
        request("b", prompt, max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_at,)),
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]  # the stop token is included


async def test_a_stop_sequence_of_several_tokens_ends_the_turn_here_and_in_evaluation(
    make_engine, model
):
    engine = await make_engine(slots=2, max_len=128, eos_token_id=NO_EOS)
    prompt = random_prompt(random.Random(7), 6)
    free = await complete(engine, request("a", prompt, max_new_tokens=12, temperature=0.0))
    run = tuple(free.token_ids[4:6])  # ends at its first occurrence, the run included
    end = next(i + 2 for i in range(11) if tuple(free.token_ids[i : i + 2]) == run)
    stopped = await complete(
        engine,
        request("b", prompt, max_new_tokens=12, temperature=0.0, stop_sequences=(run,)),
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:end]

    class Tok:
        pad_token_id = 0

    from rollfleet.evaluation import _generate

    (evaluated,) = _generate(model, Tok, [prompt], 12, [NO_EOS], 0.0, stop_sequences=(run,))
    assert evaluated == stopped.token_ids


async def test_eos_ends_with_stop(make_engine, model):
    prompt = random_prompt(random.Random(6), 5)
    probe = await make_engine(slots=1, max_len=128, eos_token_id=NO_EOS)
    greedy = await complete(probe, request("p", prompt, max_new_tokens=8, temperature=0.0))
    engine = await make_engine(slots=1, max_len=128, eos_token_id=greedy.token_ids[2])
    out = await complete(engine, request("e", prompt, max_new_tokens=8, temperature=0.0))
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == greedy.token_ids[2]
    assert len(out.token_ids) <= 3


async def test_sequence_is_cut_at_max_len(make_engine):
    engine = await make_engine(slots=2, max_len=32, eos_token_id=NO_EOS)
    prompt = random_prompt(random.Random(7), 28)
    out = await complete(engine, request("m", prompt, max_new_tokens=50))
    assert out.finish_reason == "length"
    assert len(prompt) + len(out.token_ids) == 32

    edge = random_prompt(random.Random(8), 31)  # max_len - 1: room for exactly one token
    out = await complete(engine, request("edge", edge, max_new_tokens=50))
    assert (out.finish_reason, len(out.token_ids)) == ("length", 1)


async def test_prompt_longer_than_max_len_is_refused(make_engine):
    engine = await make_engine(slots=2, max_len=32)
    with pytest.raises(ValueError, match="max_len=32"):
        await complete(engine, request("long", [1] * 32, max_new_tokens=4))
    # the engine still serves after refusing
    out = await complete(engine, request("ok", [1, 5, 6], max_new_tokens=3))
    assert out.finished


async def test_prompt_embeddings_of_the_prompts_tokens_give_the_same_answer(make_engine, model):
    """Embeddings equal to the prompt's own token embeddings change nothing; other
    embeddings (a learned prefix) are what the model reads."""
    engine = await make_engine(slots=2, max_len=64, eos_token_id=NO_EOS)
    prompt = random_prompt(random.Random(4), 7)
    with torch.no_grad():
        own = model.model.embed_tokens(torch.tensor(prompt))
    plain = await complete(engine, request("ids", prompt, max_new_tokens=12, temperature=0.0))
    embedded = await complete(
        engine,
        GenerationRequest(
            "emb", prompt, SamplingParams(max_new_tokens=12, temperature=0.0), own.clone()
        ),
    )
    assert embedded.token_ids == plain.token_ids
    torch.testing.assert_close(torch.tensor(embedded.logprobs), torch.tensor(plain.logprobs))
    # A prefix the vocabulary cannot spell: HF's forward on inputs_embeds agrees.
    prefix = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds = torch.cat([prefix, own[3:]])
    out = await complete(  # the prefix alone: the engine embeds the rest of the prompt
        engine,
        GenerationRequest("pre", prompt, SamplingParams(max_new_tokens=8, temperature=0.0), prefix),
    )
    with torch.no_grad():
        tokens = model.model.embed_tokens(torch.tensor(out.token_ids))
        logits = model(inputs_embeds=torch.cat([embeds, tokens])[None]).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    expected = expected.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0)
    assert out.token_ids != plain.token_ids[:8]


async def test_evaluation_generate_behind_a_prefix_matches_the_engine(make_engine, model):
    """Held-out evaluation (HF generate, left-padded batch) feeds a soft prefix as the
    engine does: the same greedy answers, for a prefixed row beside a plain longer one."""
    from rollfleet.evaluation import _generate

    engine = await make_engine(slots=2, max_len=64, eos_token_id=NO_EOS)
    prompts = [random_prompt(random.Random(4), 7), random_prompt(random.Random(5), 9)]
    prefix = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    answers = [
        (
            await complete(engine, GenerationRequest(f"r{i}", p, SamplingParams(10, 0.0), e))
        ).token_ids
        for i, (p, e) in enumerate(zip(prompts, [prefix, None], strict=True))
    ]

    class Tok:
        pad_token_id = 0

    generated = _generate(model, Tok, prompts, 10, [NO_EOS], 0.0, embeds=[prefix, None])
    assert generated == answers
    assert _generate(model, Tok, prompts, 10, [NO_EOS], 0.0)[0] != answers[0]


async def test_prompt_embeddings_of_the_wrong_shape_are_refused(make_engine, model):
    engine = await make_engine(slots=2, max_len=32)
    hidden = model.config.hidden_size
    for shape in ((4, hidden), (2, hidden + 1), (hidden,)):  # longer than the prompt, etc.
        req = GenerationRequest(
            "emb", [1, 5, 6], SamplingParams(max_new_tokens=3), torch.zeros(shape)
        )
        with pytest.raises(ValueError, match=r"prompt_embeds must be \[n, hidden\]"):
            await complete(engine, req)
    assert engine.free_capacity() == 2  # nothing was queued


async def test_duplicate_request_id_is_refused(make_engine):
    engine = await make_engine(slots=2, max_len=1024, eos_token_id=NO_EOS)
    stream = engine.generate(request("dup", [1, 5], max_new_tokens=1000))
    await anext(stream)
    with pytest.raises(ValueError, match="already running"):
        await complete(engine, request("dup", [1, 6], max_new_tokens=3))
    await engine.abort("dup")
    assert (await drain(stream)).finish_reason == "abort"


# --- abort, pause, weights, capacity ----------------------------------------------------


async def test_abort_ends_a_running_request(make_engine):
    engine = await make_engine(slots=2, max_len=1024, eos_token_id=NO_EOS)
    outputs = []
    async for output in engine.generate(request("long", [1, 5, 6], max_new_tokens=1000)):
        outputs.append(output)
        if len(outputs) == 3:
            await engine.abort("long")
    final = outputs[-1]
    assert final.finished and final.finish_reason == "abort"
    assert 3 <= len(final.token_ids) < 1000
    assert not any(o.finished for o in outputs[:-1])
    await engine.abort("long")  # aborting a finished request is harmless
    assert engine.free_capacity() == 2


async def test_abort_of_a_waiting_request(make_engine):
    engine = await make_engine(slots=1, max_len=1024, eos_token_id=NO_EOS)
    running = engine.generate(request("running", [1, 5], max_new_tokens=1000))
    await anext(running)
    waiting = asyncio.create_task(complete(engine, request("waiting", [1, 6], max_new_tokens=5)))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await engine.abort("waiting")
    out = await asyncio.wait_for(waiting, 5)
    assert (out.finish_reason, out.token_ids) == ("abort", [])
    await engine.abort("running")
    assert (await drain(running)).finish_reason == "abort"


async def test_load_weights_mid_generation_switches_versions(make_engine, tiny_dir, tmp_path):
    engine_model = load(tiny_dir)  # its own copy: this test changes the weights
    other = load(create_tiny_model(tmp_path / "other", seed=1))
    new_state = export_state(other)
    engine = await make_engine(engine_model, slots=2, max_len=1024, eos_token_id=NO_EOS)
    assert engine.policy_version == 0

    final = None
    loaded = False
    async for output in engine.generate(request("w", [1, 5, 6, 7], max_new_tokens=1000)):
        final = output
        if len(output.token_ids) >= 5 and not loaded:
            await engine.load_weights(7, new_state)
            loaded = True
        if output.versions and output.versions[-1] == 7 and len(output.token_ids) >= 3:
            await engine.abort("w")
    versions = final.versions
    switch = versions.index(7)
    assert switch >= 5
    assert versions == [0] * switch + [7] * (len(versions) - switch)
    assert engine.policy_version == 7
    for name, tensor in new_state.items():
        assert torch.equal(engine_model.state_dict()[name], tensor), name
    # the tied output head follows the embedding
    assert torch.equal(engine_model.lm_head.weight, other.model.embed_tokens.weight)

    # a new request now matches the new model's forward exactly
    prompt = random_prompt(random.Random(9), 8)
    out = await complete(engine, request("after", prompt, max_new_tokens=6))
    assert out.versions == [7] * len(out.token_ids)
    expected = hf_logprobs(other, prompt, out.token_ids)
    assert torch.allclose(torch.tensor(out.logprobs), expected, atol=1e-4)


@pytest.mark.parametrize("reprefill", [False, True])
async def test_partial_rollout_keeps_tokens_and_versions_across_a_swap(
    make_engine, tiny_dir, tmp_path, reprefill
):
    """Tokens from before a swap keep their versions; with reprefill, tokens after it are
    exactly what the new weights give reading the whole context (the KV cache was
    recomputed), while continuing on the old KV cache gives something else."""
    engine_model = load(tiny_dir)
    other = load(create_tiny_model(tmp_path / "other", seed=1))
    engine = await make_engine(
        engine_model, slots=2, max_len=256, eos_token_id=NO_EOS, reprefill_on_swap=reprefill
    )
    prompt = [1, 5, 6, 7, 8, 9]
    seen: list[list[int]] = []
    final = None
    async for output in engine.generate(request("r", prompt, max_new_tokens=40)):
        final = output
        seen.append(list(output.token_ids))
        if len(output.token_ids) == 10:
            await engine.load_weights(7, export_state(other))
    switch = final.versions.index(7)
    assert switch >= 10
    assert final.versions == [0] * switch + [7] * (len(final.versions) - switch)
    assert final.token_ids[:switch] == seen[switch - 1][:switch]  # earlier tokens kept as they were
    after = hf_logprobs(other, prompt, final.token_ids)[switch:]
    matches = torch.allclose(torch.tensor(final.logprobs[switch:]), after, atol=1e-4)
    assert matches == reprefill


async def test_pause_stops_progress_and_resume_continues(make_engine):
    engine = await make_engine(slots=2, max_len=1024, eos_token_id=NO_EOS)
    stream = engine.generate(request("p", [1, 5, 6], max_new_tokens=1000))
    await anext(stream)
    await engine.pause()
    await asyncio.sleep(0.05)  # let an in-flight step finish
    paused_at = engine.tokens_generated
    steps_at = engine.steps
    await asyncio.sleep(0.2)
    assert engine.tokens_generated == paused_at
    assert engine.steps == steps_at
    assert paused_at < 1000

    await engine.resume()
    await wait_until(lambda: engine.tokens_generated > paused_at + 5)
    await engine.abort("p")
    final = await drain(stream)
    assert final.finish_reason == "abort"
    assert len(final.token_ids) > paused_at


async def test_free_capacity_drops_while_requests_run(make_engine):
    engine = await make_engine(slots=4, max_len=1024, eos_token_id=NO_EOS)
    assert engine.free_capacity() == 4
    streams = [engine.generate(request(f"c{i}", [1, 5 + i], max_new_tokens=1000)) for i in range(3)]
    for i, stream in enumerate(streams):
        await anext(stream)
        assert engine.free_capacity() == 4 - (i + 1)
    for i in range(3):
        await engine.abort(f"c{i}")
    for stream in streams:
        await drain(stream)
    assert engine.free_capacity() == 4


async def test_stop_aborts_everything_in_flight(model):
    engine = TorchEngine(model, slots=1, max_len=1024, eos_token_id=NO_EOS)
    await engine.start()
    running = engine.generate(request("a", [1, 5], max_new_tokens=1000))
    await anext(running)
    waiting = asyncio.create_task(complete(engine, request("b", [1, 6], max_new_tokens=5)))
    await asyncio.sleep(0.02)
    await engine.stop()
    assert (await drain(running)).finish_reason == "abort"
    assert (await asyncio.wait_for(waiting, 5)).finish_reason == "abort"


# --- sample -----------------------------------------------------------------------------


def test_sample_small_top_p_picks_the_argmax_with_logprob_zero():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=gen) * 3
    tokens, logprobs = sample(logits, torch.ones(5), torch.full((5,), 1e-3), gen)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, torch.zeros(5), atol=1e-6)


def test_sample_full_top_p_reports_the_softmax_logprob():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen)
    temperature = torch.tensor([1.0, 0.5, 2.0, 0.0])
    tokens, logprobs = sample(logits, temperature, torch.ones(4), gen)
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0])[:, None]  # greedy: reported at temperature 1
    expected = torch.log_softmax(logits / scale, -1).gather(-1, tokens[:, None])[:, 0]
    assert torch.allclose(logprobs, expected, atol=1e-6)
    assert tokens[3] == logits[3].argmax()


def test_sample_top_p_stays_in_the_nucleus_and_renormalises():
    gen = torch.Generator().manual_seed(2)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -2.0]]).repeat(400, 1)
    probs = torch.softmax(logits[0], -1)
    top_p = 0.8
    # the smallest prefix (sorted by probability) whose mass reaches top_p
    keep = int((probs.cumsum(-1) < top_p).sum()) + 1
    tokens, logprobs = sample(logits, torch.ones(400), torch.full((400,), top_p), gen)
    assert int(tokens.max()) < keep  # tokens are already sorted by probability here
    assert len(set(tokens.tolist())) == keep  # every nucleus token shows up in 400 draws
    renormalised = torch.log(probs[:keep] / probs[:keep].sum())
    assert torch.allclose(logprobs, renormalised[tokens], atol=1e-6)


def test_sample_is_deterministic_for_a_seeded_generator():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(3))
    args = (logits, torch.ones(8), torch.full((8,), 0.9))
    a = sample(*args, torch.Generator().manual_seed(42))
    b = sample(*args, torch.Generator().manual_seed(42))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


async def test_on_policy_ratio_is_one_with_temperature_and_top_p(make_engine, model):
    """The trainer scores the engine's samples under the distribution they were drawn from
    (tempered, renormalised over the top-p nucleus): on the engine's own weights every
    ratio π/μ is 1, here at temperature 0.7 and top-p 0.9."""
    from rollfleet.models.batching import token_logprobs

    engine = await make_engine(slots=8, max_len=64, eos_token_id=NO_EOS, seed=5)
    rng = random.Random(3)
    prompts = [random_prompt(rng, rng.randint(3, 9)) for _ in range(8)]
    outs = await asyncio.gather(
        *(
            complete(engine, request(f"r{i}", p, max_new_tokens=20, temperature=0.7, top_p=0.9))
            for i, p in enumerate(prompts)
        )
    )
    width = max(len(p) + len(o.token_ids) for p, o in zip(prompts, outs, strict=True))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        ids[row, : len(p) + len(o.token_ids)] = torch.tensor(p + o.token_ids)
        attention[row, : len(p) + len(o.token_ids)] = 1
    with torch.no_grad():
        trainer = token_logprobs(model, ids, attention, temperature=0.7, top_p=0.9)
        full_softmax = token_logprobs(model, ids, attention, temperature=0.7)
    ratios, truncated = [], 0
    for row, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        scored = trainer[row, len(p) : len(p) + len(o.token_ids)]
        ratios += torch.exp(scored - torch.tensor(o.logprobs)).tolist()
        full = full_softmax[row, len(p) : len(p) + len(o.token_ids)]
        truncated += int((scored - full).abs().gt(1e-3).sum())
    assert len(ratios) == 160
    assert max(abs(r - 1) for r in ratios) < 1e-4
    assert truncated > 0  # top-p did cut the distribution here: the check has teeth
