"""The vLLM engine's glue, without vLLM: the clear error, and the mapping of requests,
outputs and weights, exercised with plain stand-in objects shaped like vLLM's."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from rollfleet_rollout import vllm_engine
from rollfleet_rollout.engine import GenerationOutput, GenerationRequest, SamplingParams, complete
from rollfleet_rollout.vllm_engine import (
    VLLM_TARGET,
    WEIGHT_CHUNK_BYTES,
    VllmEngine,
    VllmNotInstalled,
    VllmRequestFailed,
    WeightLoaderExtension,
    check_tensor_parallel,
    chunk_weights,
    from_vllm_output,
    require_vllm,
    tensor_bytes,
    to_vllm_prompt,
    to_vllm_sampling,
    version_salt,
)

FAKE_VLLM = SimpleNamespace(SamplingParams=lambda **kw: kw)


def fake_output(tokens, logprobs, finished=False, finish_reason=None):
    """A vLLM RequestOutput as the engine reads it (cumulative, logprobs=0)."""
    entries = [{tok: SimpleNamespace(logprob=lp)} for tok, lp in zip(tokens, logprobs, strict=True)]
    completion = SimpleNamespace(
        token_ids=list(tokens), logprobs=entries, finish_reason=finish_reason
    )
    return SimpleNamespace(outputs=[completion], finished=finished)


# --- without vLLM -----------------------------------------------------------------------


def test_require_vllm_explains_what_is_missing_and_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(VllmNotInstalled) as err:
        require_vllm()
    message = str(err.value)
    assert "'vllm'" in message  # names the engine
    assert f"vLLM {VLLM_TARGET}" in message
    assert "install" in message
    assert "engine: torch" in message  # the alternative
    assert isinstance(err.value, RuntimeError)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_from_model_fails_clearly_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(VllmNotInstalled):
        VllmEngine.from_model(None, None, version=0, max_len=128, seed=0)


def test_require_vllm_returns_the_module_when_present(monkeypatch):
    fake = SimpleNamespace(__name__="vllm")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    assert require_vllm() is fake


# --- sampling params --------------------------------------------------------------------


def test_to_vllm_sampling_maps_every_field():
    params = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=0.9, stop_token_ids=(2, 9))
    assert to_vllm_sampling(params, FAKE_VLLM) == {
        "max_tokens": 48,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop_token_ids": [2, 9],  # a list, as vLLM wants
        "logprobs": 0,  # the sampled token's log-prob only
        "detokenize": False,
    }


def test_to_vllm_sampling_defaults_and_greedy():
    kwargs = to_vllm_sampling(SamplingParams(temperature=0.0), FAKE_VLLM)
    assert kwargs["temperature"] == 0.0
    assert kwargs["max_tokens"] == 16
    assert kwargs["top_p"] == 1.0
    assert kwargs["stop_token_ids"] == []


# --- outputs ----------------------------------------------------------------------------


def test_from_vllm_output_maps_tokens_logprobs_and_reason():
    versions: list[int] = []
    out = from_vllm_output(
        fake_output([5, 6, 7], [-0.5, -1.0, -0.25], finished=True, finish_reason="length"),
        "req-1",
        versions,
        3,
    )
    assert out == GenerationOutput(
        request_id="req-1",
        token_ids=[5, 6, 7],
        logprobs=[-0.5, -1.0, -0.25],
        versions=[3, 3, 3],
        finished=True,
        finish_reason="length",
    )


@pytest.mark.parametrize(
    ("vllm_reason", "ours"),
    [("stop", "stop"), ("length", "length"), ("abort", "abort"), (None, "stop")],
)
def test_finish_reasons(vllm_reason, ours):
    out = from_vllm_output(
        fake_output([4], [-0.1], finished=True, finish_reason=vllm_reason), "r", [], 0
    )
    assert (out.finished, out.finish_reason) == (True, ours)


def test_unfinished_output_has_no_reason():
    out = from_vllm_output(fake_output([4, 5], [-0.1, -0.2]), "r", [], 0)
    assert (out.finished, out.finish_reason) == (False, None)


def test_versions_persist_across_calls_when_the_version_changes():
    versions: list[int] = []
    first = from_vllm_output(fake_output([5, 6], [-0.5, -0.6]), "r", versions, 0)
    assert first.versions == [0, 0]
    second = from_vllm_output(fake_output([5, 6, 7, 8], [-0.5, -0.6, -0.7, -0.8]), "r", versions, 1)
    assert second.versions == [0, 0, 1, 1]  # earlier tokens keep their version
    third = from_vllm_output(
        fake_output([5, 6, 7, 8, 9], [-0.5, -0.6, -0.7, -0.8, -0.9], True, "stop"),
        "r",
        versions,
        2,
    )
    assert third.versions == [0, 0, 1, 1, 2]
    assert third.logprobs == [-0.5, -0.6, -0.7, -0.8, -0.9]
    # each output owns its list: later calls do not rewrite what was handed out
    assert first.versions == [0, 0]
    assert second.versions == [0, 0, 1, 1]


def test_logprob_is_read_for_the_sampled_token():
    completion = SimpleNamespace(
        token_ids=[11, 12],
        # vLLM may return more than the sampled token in each dict
        logprobs=[
            {3: SimpleNamespace(logprob=-9.0), 11: SimpleNamespace(logprob=-0.3)},
            {12: SimpleNamespace(logprob=-0.4), 4: SimpleNamespace(logprob=-8.0)},
        ],
        finish_reason=None,
    )
    out = from_vllm_output(SimpleNamespace(outputs=[completion], finished=False), "r", [], 0)
    assert out.logprobs == [-0.3, -0.4]


# --- weights ----------------------------------------------------------------------------


class RecordingModel:
    """A vLLM model as the extension sees it: records each `load_weights` call."""

    def __init__(self):
        self.calls: list[list] = []

    def load_weights(self, weights):
        self.calls.append(weights)
        return {name for name, _ in weights}


def make_worker(device="cpu"):
    class Worker(WeightLoaderExtension):  # as vLLM mixes it into its GPU worker
        pass

    worker = Worker()
    worker.device = torch.device(device)
    worker.model_runner = runner(RecordingModel())
    return worker


def runner(model):
    """vLLM's model runner as the extension uses it: get_model() is the raw model."""
    return SimpleNamespace(model=model, get_model=lambda: model)


def test_weight_loader_extension_passes_name_tensor_pairs_to_the_model():
    worker = make_worker("cpu")
    tensors = {"model.embed_tokens.weight": torch.ones(3, 2), "model.norm.weight": torch.zeros(2)}
    assert worker.rollfleet_load_weights(safetensors.torch.save(tensors)) is None
    calls = worker.model_runner.model.calls
    assert len(calls) == 1
    weights = calls[0]
    assert isinstance(weights, list)
    assert sorted(name for name, _ in weights) == sorted(tensors)  # safetensors sorts
    for name, tensor in weights:
        assert torch.equal(tensor, tensors[name])


def test_weight_loader_extension_moves_tensors_to_the_worker_device():
    worker = make_worker("meta")  # a device other than the tensors' one, without a GPU
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4, dtype=torch.bfloat16),
        "model.norm.weight": torch.zeros(4),
    }
    worker.rollfleet_load_weights(safetensors.torch.save(tensors))
    (weights,) = worker.model_runner.model.calls
    assert sorted(name for name, _ in weights) == sorted(tensors)
    for name, tensor in weights:
        assert tensor.device.type == "meta"
        assert (tensor.shape, tensor.dtype) == (tensors[name].shape, tensors[name].dtype)


# --- chunking ---------------------------------------------------------------------------


def test_chunk_weights_packs_in_order_and_bounds_each_chunk():
    tensors = {
        "a": torch.zeros(10),  # 40 bytes
        "b": torch.zeros(15),  # 60 -> a+b = 100, exactly the limit
        "c": torch.zeros(1),  # 4 -> would exceed: next chunk
        "d": torch.zeros(30),  # 120 > limit: a chunk of its own
        "e": torch.zeros(5, dtype=torch.float16),  # 10
    }
    chunks = chunk_weights(tensors, 100)
    assert [list(c) for c in chunks] == [["a", "b"], ["c"], ["d"], ["e"]]
    for chunk in chunks:
        for name, tensor in chunk.items():
            assert torch.equal(tensor, tensors[name])


def test_chunk_weights_random_sizes_every_tensor_once_and_chunks_full():
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    tensors = {
        f"layer.{i}.w": torch.empty(rng.randint(1, 400), dtype=rng.choice(dtypes))
        for i in range(200)
    }
    limit = 1000
    chunks = chunk_weights(tensors, limit)
    # every tensor exactly once, in the original order
    assert [name for chunk in chunks for name in chunk] == list(tensors)
    sizes = [sum(tensor_bytes(t) for t in chunk.values()) for chunk in chunks]
    for chunk, size in zip(chunks, sizes, strict=True):
        assert size <= limit or len(chunk) == 1  # only a lone oversized tensor may exceed
    # greedy: a chunk ends only where the next tensor would not have fit
    for size, following in zip(sizes, chunks[1:], strict=False):
        first = next(iter(following.values()))
        assert size + tensor_bytes(first) > limit
    assert any(len(chunk) > 1 for chunk in chunks)  # the test does exercise packing


def test_chunk_weights_edge_cases():
    assert chunk_weights({}, 100) == []
    one = {"w": torch.zeros(1000)}
    assert [list(c) for c in chunk_weights(one, 1)] == [["w"]]
    with pytest.raises(ValueError, match="positive"):
        chunk_weights(one, 0)
    assert WEIGHT_CHUNK_BYTES > 0


# --- the engine over a stand-in AsyncLLM ------------------------------------------------


class FakeAsyncLLM:
    """Streams cumulative outputs one token at a time; records every call."""

    def __init__(self, tokens=(7, 8, 9)):
        self.tokens = list(tokens)
        self.calls: list[tuple] = []
        self.on_token = None
        self.on_rpc = None  # async (method, args) -> None, may raise

    async def generate(self, prompt, sampling_params, request_id):
        self.calls.append(("generate", prompt, sampling_params, request_id))
        for n in range(1, len(self.tokens) + 1):
            if self.on_token:
                await self.on_token(n)
            done = n == len(self.tokens)
            yield fake_output(self.tokens[:n], [-0.1 * i for i in range(1, n + 1)], done, "length")

    async def abort(self, request_id):
        self.calls.append(("abort", request_id))

    async def pause_generation(self, *, mode, clear_cache):  # keyword-only, as in vLLM
        self.calls.append(("pause", mode, clear_cache))

    async def resume_generation(self):
        self.calls.append(("resume",))

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("rpc", method, args))
        if self.on_rpc:
            await self.on_rpc(method, args)

    async def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset", reset_running_requests))
        return self.resets_succeed

    resets_succeed = True  # vLLM returns False while requests still hold blocks

    def shutdown(self):
        self.calls.append(("shutdown",))


def rpc_chunks(calls) -> list[dict]:
    """The chunk each weight RPC carried, in call order."""
    chunks = []
    for call in calls:
        if call[0] == "rpc":
            assert call[1] == "rollfleet_load_weights"
            (chunk,) = call[2]
            assert isinstance(chunk, bytes)  # vLLM's RPC carries bytes, not tensors
            chunks.append(safetensors.torch.load(chunk))
    return chunks


async def test_vllm_engine_generate_and_version_switch():
    llm = FakeAsyncLLM(tokens=(7, 8, 9, 10))
    engine = VllmEngine(llm, FAKE_VLLM, version=2, slots=4)
    tensors = {"w": torch.ones(1)}
    seen_capacity = []

    async def on_token(n):
        seen_capacity.append(engine.free_capacity())
        if n == 3:
            await engine.load_weights(3, tensors)

    llm.on_token = on_token
    req = GenerationRequest("r1", [1, 4, 5], SamplingParams(max_new_tokens=4, stop_token_ids=(2,)))
    out = await complete(engine, req)

    assert out.token_ids == [7, 8, 9, 10]
    assert out.versions == [2, 2, 3, 3]
    assert out.finish_reason == "length"
    assert engine.policy_version == 3
    assert seen_capacity == [3, 3, 3, 3]  # one request running out of 4
    assert engine.free_capacity() == 4
    name, prompt, sampling, rid = llm.calls[0]
    assert (name, rid) == ("generate", "r1")
    assert prompt == {"prompt_token_ids": [1, 4, 5], "cache_salt": version_salt(2)}
    assert sampling["stop_token_ids"] == [2] and sampling["max_tokens"] == 4
    # weights load with the engine paused (requests kept), the prefix cache is reset once
    # they all loaded, and generation resumes
    assert [call[0] for call in llm.calls[1:]] == ["pause", "rpc", "reset", "resume"]
    assert llm.calls[1] == ("pause", "keep", False)
    [chunk] = rpc_chunks(llm.calls)
    assert list(chunk) == ["w"] and torch.equal(chunk["w"], tensors["w"])


async def test_final_only_yields_the_last_output_with_every_tokens_version():
    llm = FakeAsyncLLM(tokens=(7, 8, 9))
    engine = VllmEngine(llm, FAKE_VLLM, version=0, slots=2)

    async def on_token(n):
        if n == 2:
            await engine.load_weights(engine.policy_version + 1, {"w": torch.ones(1)})

    llm.on_token = on_token
    req = GenerationRequest("r", [1], SamplingParams(max_new_tokens=3))
    streamed = [out async for out in engine.generate(req)]
    final = [out async for out in engine.generate(req, final_only=True)]
    assert [len(o.token_ids) for o in streamed] == [1, 2, 3]
    assert len(final) == 1 and final[0].finished and final[0].token_ids == [7, 8, 9]
    assert streamed[-1].versions == [0, 1, 1]  # a swap before each request's second token
    assert final[0].versions == [1, 2, 2]


async def test_a_stop_sequence_aborts_the_vllm_request_where_it_ends():
    llm = FakeAsyncLLM(tokens=(7, 8, 9, 10, 11))
    engine = VllmEngine(llm, FAKE_VLLM, version=0, slots=2)
    req = GenerationRequest("r1", [1], SamplingParams(max_new_tokens=5, stop_sequences=((8, 9),)))
    out = await complete(engine, req)
    assert out.token_ids == [7, 8, 9] and out.finish_reason == "stop"
    assert ("abort", "r1") in llm.calls
    assert engine.free_capacity() == 2


async def test_load_weights_sends_bounded_chunks_between_pause_and_resume():
    llm = FakeAsyncLLM()
    engine = VllmEngine(llm, FAKE_VLLM, version=4, slots=2, chunk_bytes=64)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(n, generator=generator)
        for i, n in enumerate([8, 8, 4, 20, 3, 13])  # float32: 32, 32, 16, 80, 12, 52 bytes
    }
    versions_during_rpc = []

    async def on_rpc(method, args):
        versions_during_rpc.append(engine.policy_version)

    llm.on_rpc = on_rpc
    await engine.load_weights(5, tensors)

    kinds = [call[0] for call in llm.calls]
    assert kinds == ["pause", "rpc", "rpc", "rpc", "rpc", "reset", "resume"]
    assert llm.calls[0] == ("pause", "keep", False)
    chunks = rpc_chunks(llm.calls)
    names = list(tensors)
    assert [sorted(c) for c in chunks] == [names[0:2], names[2:3], names[3:4], names[4:6]]
    assert sorted(name for chunk in chunks for name in chunk) == names  # each once
    for chunk in chunks:
        assert sum(tensor_bytes(t) for t in chunk.values()) <= 64 or len(chunk) == 1
        for name, tensor in chunk.items():
            assert torch.equal(tensor, tensors[name])
    assert versions_during_rpc == [4, 4, 4, 4]  # the new version only once all loaded
    assert engine.policy_version == 5


async def test_load_weights_failure_resumes_and_keeps_the_version(caplog):
    llm = FakeAsyncLLM()
    engine = VllmEngine(llm, FAKE_VLLM, version=5, slots=2, chunk_bytes=4)
    tensors = {name: torch.zeros(1) for name in ("a", "b", "c")}  # one chunk each

    async def on_rpc(method, args):
        if "b" in safetensors.torch.load(args[0]):
            raise RuntimeError("worker died")

    llm.on_rpc = on_rpc
    with (
        caplog.at_level(logging.ERROR, logger=vllm_engine.__name__),
        pytest.raises(RuntimeError, match="worker died"),
    ):
        await engine.load_weights(6, tensors)
    assert engine.policy_version == 5
    # chunk "c" is never sent after "b" failed, and generation resumes
    assert [call[0] for call in llm.calls] == ["pause", "rpc", "rpc", "resume"]
    assert [list(c) for c in rpc_chunks(llm.calls)] == [["a"], ["b"]]
    assert "chunk 2/3 failed" in caplog.text and "1 of 3 tensors" in caplog.text


async def test_load_weights_first_chunk_failure_still_resumes():
    llm = FakeAsyncLLM()

    async def on_rpc(method, args):
        raise RuntimeError("rpc timed out")

    llm.on_rpc = on_rpc
    engine = VllmEngine(llm, FAKE_VLLM, version=1, slots=2)
    with pytest.raises(RuntimeError, match="rpc timed out"):
        await engine.load_weights(2, {"w": torch.zeros(2)})
    assert engine.policy_version == 1
    assert [call[0] for call in llm.calls] == ["pause", "rpc", "resume"]


async def test_load_weights_refuses_an_empty_version_without_pausing():
    llm = FakeAsyncLLM()
    engine = VllmEngine(llm, FAKE_VLLM, version=1, slots=2)
    with pytest.raises(ValueError, match="no tensors"):
        await engine.load_weights(2, {})
    assert engine.policy_version == 1
    assert llm.calls == []


def test_engine_refuses_a_non_positive_chunk_size():
    with pytest.raises(ValueError, match="positive"):
        VllmEngine(FakeAsyncLLM(), FAKE_VLLM, version=0, slots=1, chunk_bytes=0)


async def test_chunks_reach_every_worker_through_the_extension():
    """Engine and extension together: each vLLM worker's model sees every tensor once."""
    workers = [make_worker("cpu"), make_worker("cpu")]  # e.g. tensor parallel 2
    llm = FakeAsyncLLM()

    async def on_rpc(method, args):
        for worker in workers:  # collective: the same call on every worker
            getattr(worker, method)(*args)

    llm.on_rpc = on_rpc
    engine = VllmEngine(llm, FAKE_VLLM, version=0, slots=1, chunk_bytes=16)
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}  # 12 bytes each
    await engine.load_weights(1, tensors)
    for worker in workers:
        calls = worker.model_runner.model.calls
        assert len(calls) == 5  # 12 + 12 > 16: one tensor per chunk
        received = [pair for call in calls for pair in call]
        assert sorted(name for name, _ in received) == sorted(tensors)
        for name, tensor in received:
            assert torch.equal(tensor, tensors[name])
    assert engine.policy_version == 1


class ShardedModel:
    """One tensor-parallel rank's model, as vLLM's parallel layers load: it keeps its rows
    (a column-parallel weight) of each whole tensor it is given."""

    def __init__(self, rank: int, ranks: int):
        self.rank, self.ranks, self.shards = rank, ranks, {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.shards[name] = tensor.chunk(self.ranks, dim=0)[self.rank].clone()


async def test_every_tensor_parallel_rank_keeps_its_slice_of_each_version():
    ranks = 2
    workers = [make_worker("cpu") for _ in range(ranks)]
    for rank, worker in enumerate(workers):
        worker.model_runner = runner(ShardedModel(rank, ranks))
    llm = FakeAsyncLLM()

    async def on_rpc(method, args):
        for worker in workers:
            getattr(worker, method)(*args)

    llm.on_rpc = on_rpc
    engine = VllmEngine(llm, FAKE_VLLM, version=0, slots=1, chunk_bytes=64)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"layers.{i}.q_proj.weight": torch.randn(8, 4, generator=generator) for i in range(3)
    }
    await engine.load_weights(1, tensors)
    for name, tensor in tensors.items():
        shards = [w.model_runner.model.shards[name] for w in workers]
        assert [s.shape for s in shards] == [(4, 4), (4, 4)]
        assert torch.equal(torch.cat(shards), tensor)  # the ranks' slices make the whole


@pytest.mark.parametrize(
    ("heads", "kv_heads", "ranks", "ok"),
    [(28, 4, 2, True), (28, 4, 4, True), (28, 4, 8, False), (32, 8, 8, True), (12, 12, 5, False)],
)
def test_tensor_parallel_must_divide_the_heads(heads, kv_heads, ranks, ok):
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
    if ok:
        check_tensor_parallel(config, ranks)
    else:
        with pytest.raises(ValueError, match=r"gpusPerReplica: .* divisor of the head count"):
            check_tensor_parallel(config, ranks)


async def test_vllm_engine_capacity_recovers_when_a_stream_is_abandoned():
    engine = VllmEngine(FakeAsyncLLM(), FAKE_VLLM, version=0, slots=2)
    stream = engine.generate(GenerationRequest("r", [1], SamplingParams()))
    await anext(stream)
    assert engine.free_capacity() == 1
    await stream.aclose()
    assert engine.free_capacity() == 2
    await engine.abort("r")
    await engine.stop()
    assert engine.engine.calls[-2:] == [("abort", "r"), ("shutdown",)]


# --- prompt embeddings ------------------------------------------------------------------


def test_to_vllm_prompt_uses_token_ids_without_embeddings():
    req = GenerationRequest("r", [1, 4, 5], SamplingParams())
    assert to_vllm_prompt(req) == {"prompt_token_ids": [1, 4, 5]}
    assert req.prompt_embeds is None  # the default


def test_to_vllm_prompt_maps_embeddings_detached_on_cpu():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 8, generator=generator, requires_grad=True)  # a trainable prefix
    req = GenerationRequest("r", [1, 4, 5], SamplingParams(), embeds)
    prompt = to_vllm_prompt(req, hidden_size=8)
    assert list(prompt) == ["prompt_embeds"]  # the embeddings replace the token ids
    sent = prompt["prompt_embeds"]
    assert torch.equal(sent, embeds.detach())
    assert sent.device.type == "cpu" and not sent.requires_grad


@pytest.mark.parametrize("shape", [(8,), (1, 3, 8), (0, 8)])
def test_to_vllm_prompt_refuses_embeddings_of_the_wrong_rank_or_length(shape):
    req = GenerationRequest("bad", [1], SamplingParams(), torch.zeros(shape))
    with pytest.raises(ValueError, match=r"\[prompt_len, hidden\]"):
        to_vllm_prompt(req)


def test_to_vllm_prompt_refuses_the_wrong_hidden_size():
    req = GenerationRequest("bad", [1, 2], SamplingParams(), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="hidden size 6 does not match the model's 8"):
        to_vllm_prompt(req, hidden_size=8)


def test_requests_with_embeddings_still_compare_by_their_other_fields():
    a = GenerationRequest("r", [1], SamplingParams(), torch.zeros(2, 4))
    b = GenerationRequest("r", [1], SamplingParams(), torch.ones(2, 4))
    assert a == b  # no "ambiguous truth value" from comparing tensors
    assert a != GenerationRequest("other", [1], SamplingParams())


async def test_vllm_engine_generates_from_prompt_embeddings():
    llm = FakeAsyncLLM(tokens=(7, 8))
    engine = VllmEngine(llm, FAKE_VLLM, version=0, slots=2, hidden_size=4)
    embeds = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    out = await complete(engine, GenerationRequest("e", [1, 2, 3], SamplingParams(), embeds))
    assert out.token_ids == [7, 8]
    name, prompt, _, rid = llm.calls[0]
    assert (name, rid, sorted(prompt)) == ("generate", "e", ["cache_salt", "prompt_embeds"])
    assert torch.equal(prompt["prompt_embeds"], embeds)


async def test_vllm_engine_checks_embeddings_before_submitting():
    llm = FakeAsyncLLM()
    engine = VllmEngine(llm, FAKE_VLLM, version=0, slots=2, hidden_size=4)
    req = GenerationRequest("e", [1, 2], SamplingParams(), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="hidden size 5"):
        await complete(engine, req)
    assert llm.calls == [] and engine.free_capacity() == 2


async def test_vllm_engine_started_without_embeddings_refuses_them():
    llm = FakeAsyncLLM()
    engine = VllmEngine(llm, FAKE_VLLM, version=0, slots=2, prompt_embeds=False)
    req = GenerationRequest("e", [1], SamplingParams(), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="without enable_prompt_embeds"):
        await complete(engine, req)
    assert llm.calls == [] and engine.free_capacity() == 2


# --- from_model over a stand-in vllm module ----------------------------------------------


def fake_vllm_modules(monkeypatch, created):
    class AsyncLLM:
        @classmethod
        def from_engine_args(cls, args):
            created.append(args)
            return FakeAsyncLLM()

    vllm = SimpleNamespace(
        __name__="vllm",
        AsyncEngineArgs=lambda **kw: kw,
        SamplingParams=lambda **kw: kw,
    )
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.v1", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.v1.engine", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.async_llm", SimpleNamespace(AsyncLLM=AsyncLLM))
    return vllm


class Saves(torch.nn.Module):
    """A model or tokenizer that records where it was saved; the model part has an input
    embedding table of its hidden size."""

    def __init__(self, **config):
        super().__init__()
        self.config = SimpleNamespace(**config)
        self.saved_to = None
        self.embed = torch.nn.Embedding(4, config.get("hidden_size", 1))

    def get_input_embeddings(self):
        return self.embed

    def save_pretrained(self, folder):
        self.saved_to = folder


def test_from_model_starts_vllm_with_prompt_embeds_and_the_weight_extension(monkeypatch, tmp_path):
    created: list[dict] = []
    vllm = fake_vllm_modules(monkeypatch, created)
    monkeypatch.setattr(vllm_engine.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    model, tokenizer = Saves(hidden_size=16), Saves()
    engine = VllmEngine.from_model(
        model, tokenizer, version=3, max_len=256, seed=7, slots=8, chunk_bytes=1024
    )
    (args,) = created
    assert args["model"] == str(tmp_path)
    assert model.saved_to == tokenizer.saved_to == str(tmp_path)
    assert (args["max_model_len"], args["max_num_seqs"], args["seed"]) == (256, 8, 7)
    assert args["enable_prompt_embeds"] is True
    assert args["tensor_parallel_size"] == 1
    # log-probs of the distribution sampled from (temperature, top-p), as the trainer scores
    assert args["logprobs_mode"] == "processed_logprobs"
    module, _, cls = args["worker_extension_cls"].rpartition(".")
    assert getattr(sys.modules[module], cls) is WeightLoaderExtension
    assert engine.vllm is vllm
    assert (engine.policy_version, engine.slots, engine.chunk_bytes) == (3, 8, 1024)
    assert (engine.prompt_embeds, engine.hidden_size) == (True, 16)
    name, table = engine.embeddings  # a CPU copy, to embed the prompt after a soft prefix
    assert name == "embed.weight" and torch.equal(table, model.embed.weight.detach())


def test_from_model_can_leave_prompt_embeds_off(monkeypatch, tmp_path):
    created: list[dict] = []
    fake_vllm_modules(monkeypatch, created)
    monkeypatch.setattr(vllm_engine.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    engine = VllmEngine.from_model(
        Saves(hidden_size=16), Saves(), version=0, max_len=64, seed=0, prompt_embeds=False
    )
    assert created[0]["enable_prompt_embeds"] is False
    assert engine.prompt_embeds is False and engine.embeddings is None
    assert engine.chunk_bytes == WEIGHT_CHUNK_BYTES


def test_to_vllm_prompt_completes_a_soft_prefix_with_the_embedded_rest():
    table = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    prefix = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    req = GenerationRequest("r", [0, 0, 1, 7, 3], SamplingParams(), prefix)
    sent = to_vllm_prompt(req, hidden_size=4, embed_table=table)["prompt_embeds"]
    assert torch.equal(sent, torch.cat([prefix, table[torch.tensor([1, 7, 3])]]))
    with pytest.raises(ValueError, match="cover 2 of 5 prompt positions"):
        to_vllm_prompt(req, hidden_size=4)
    too_long = GenerationRequest("r", [1, 2], SamplingParams(), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"1 <= prompt_len <= 2"):
        to_vllm_prompt(too_long, embed_table=table)


async def test_the_embedding_copy_follows_each_loaded_version():
    """The engine embeds a prefixed prompt's tokens with the weights it serves."""
    llm = FakeAsyncLLM()
    old = torch.zeros(6, 4)
    engine = VllmEngine(
        llm, FAKE_VLLM, version=0, slots=2, hidden_size=4, embeddings=("embed.weight", old)
    )
    new = torch.ones(6, 4)
    await engine.load_weights(1, {"embed.weight": new, "other": torch.zeros(2)})
    prefix = torch.full((1, 4), 5.0)
    await complete(engine, GenerationRequest("r", [0, 3, 4], SamplingParams(), prefix))
    sent = llm.calls[-1][1]["prompt_embeds"]
    assert torch.equal(sent, torch.cat([prefix, new[:2]]))


def test_input_embeddings_finds_the_table_by_identity(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rollfleet_rollout.vllm_engine import input_embeddings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name, table = input_embeddings(model)
    assert name == "model.embed_tokens.weight"
    assert torch.equal(table, model.get_input_embeddings().weight.detach())


def test_from_model_shards_over_the_pools_gpus_per_replica(monkeypatch, tmp_path):
    created: list[dict] = []
    fake_vllm_modules(monkeypatch, created)
    monkeypatch.setattr(vllm_engine.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    model = Saves(hidden_size=16, num_attention_heads=4, num_key_value_heads=2)
    VllmEngine.from_model(model, Saves(), version=0, max_len=64, seed=0, tensor_parallel=2)
    assert created[0]["tensor_parallel_size"] == 2
    with pytest.raises(ValueError, match="gpusPerReplica"):
        VllmEngine.from_model(model, Saves(), version=0, max_len=64, seed=0, tensor_parallel=3)


def test_a_request_vllm_fails_raises_so_the_task_is_handed_back():
    failed = fake_output([7, 8], [-0.1, -0.2], True, "error")
    with pytest.raises(VllmRequestFailed, match="finish reason error"):
        from_vllm_output(failed, "r9", [], 3)


async def test_reprefill_clears_the_cache_at_a_swap_and_caches_prefixes(monkeypatch, tmp_path):
    """partialRollout: reprefill -> the kept requests' KV is cleared with the prefix cache
    at every swap; continue -> kept requests go on from their KV. Prefix caching is on in
    both, reset at every swap."""
    for reprefill in (False, True):
        created: list[dict] = []
        fake_vllm_modules(monkeypatch, created)
        monkeypatch.setattr(vllm_engine.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
        engine = VllmEngine.from_model(
            Saves(hidden_size=4), Saves(), version=0, max_len=64, seed=0, reprefill=reprefill
        )
        assert created[0]["enable_prefix_caching"] is True
        await engine.load_weights(1, {"w": torch.ones(2)})
        assert engine.engine.calls[0] == ("pause", "keep", reprefill)


async def test_a_group_shares_its_prompt_within_a_version_and_never_across_versions():
    """A group is one task, so one worker and one engine: its samples reach vLLM as
    requests with the same prompt and the same version salt, so vLLM's prefix cache
    prefills the prompt once for all of them. After a swap the next group carries the new
    version's salt: no request reuses blocks computed under older weights, even when the
    reset is declined because kept requests still hold blocks."""
    llm = FakeAsyncLLM(tokens=(7, 8))
    engine = VllmEngine(llm, FAKE_VLLM, version=3, slots=8)

    async def group(name: str) -> None:
        await asyncio.gather(
            *(
                complete(engine, GenerationRequest(f"{name}-{i}", [1, 5, 6], SamplingParams()))
                for i in range(4)
            )
        )

    def salts(name: str) -> set[str]:
        return {
            call[1]["cache_salt"]
            for call in llm.calls
            if call[0] == "generate" and call[3].startswith(name)
        }

    await group("g0")
    prompts = [call[1] for call in llm.calls if call[0] == "generate"]
    assert len(prompts) == 4 and all(p == prompts[0] for p in prompts)
    llm.resets_succeed = False
    await engine.load_weights(4, {"w": torch.ones(1)})
    await group("g1")
    assert salts("g0") == {version_salt(3)} and salts("g1") == {version_salt(4)}
    assert version_salt(3) != version_salt(4)
    assert ("reset", False) in llm.calls and engine.policy_version == 4
