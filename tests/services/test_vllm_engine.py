"""The vLLM engine's glue, without vLLM: the clear error, and the mapping of requests,
outputs and weights, exercised with plain stand-in objects shaped like vLLM's."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from rollfleet_rollout.engine import GenerationOutput, GenerationRequest, SamplingParams, complete
from rollfleet_rollout.vllm_engine import (
    VLLM_TARGET,
    VllmEngine,
    VllmNotInstalled,
    WeightLoaderExtension,
    from_vllm_output,
    require_vllm,
    to_vllm_sampling,
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


def test_weight_loader_extension_passes_name_tensor_pairs_to_the_model():
    received = []

    class Model:
        def load_weights(self, weights):
            received.append(weights)
            return {name for name, _ in weights}

    class Worker(WeightLoaderExtension):  # as vLLM mixes it into its GPU worker
        model_runner = SimpleNamespace(model=Model())

    tensors = {"model.embed_tokens.weight": torch.ones(3, 2), "model.norm.weight": torch.zeros(2)}
    assert Worker().rollfleet_load_weights(tensors) is None
    assert len(received) == 1
    weights = received[0]
    assert isinstance(weights, list)
    assert [name for name, _ in weights] == list(tensors)
    for name, tensor in weights:
        assert tensor is tensors[name]  # no copies on the way


# --- the engine over a stand-in AsyncLLM ------------------------------------------------


class FakeAsyncLLM:
    """Streams cumulative outputs one token at a time; records every call."""

    def __init__(self, tokens=(7, 8, 9)):
        self.tokens = list(tokens)
        self.calls: list[tuple] = []
        self.on_token = None

    async def generate(self, prompt, sampling_params, request_id):
        self.calls.append(("generate", prompt, sampling_params, request_id))
        for n in range(1, len(self.tokens) + 1):
            if self.on_token:
                await self.on_token(n)
            done = n == len(self.tokens)
            yield fake_output(self.tokens[:n], [-0.1 * i for i in range(1, n + 1)], done, "length")

    async def abort(self, request_id):
        self.calls.append(("abort", request_id))

    async def pause_generation(self, mode, clear_cache):
        self.calls.append(("pause", mode, clear_cache))

    async def resume_generation(self):
        self.calls.append(("resume",))

    async def collective_rpc(self, method, args):
        self.calls.append(("rpc", method, args))

    def shutdown(self):
        self.calls.append(("shutdown",))


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
    assert (name, prompt, rid) == ("generate", {"prompt_token_ids": [1, 4, 5]}, "r1")
    assert sampling["stop_token_ids"] == [2] and sampling["max_tokens"] == 4
    # weights load with the engine paused (requests kept) and resumed afterwards
    assert llm.calls[1:] == [
        ("pause", "keep", False),
        ("rpc", "rollfleet_load_weights", (tensors,)),
        ("resume",),
    ]


async def test_vllm_engine_resumes_and_keeps_version_when_loading_fails():
    llm = FakeAsyncLLM()

    async def failing_rpc(method, args):
        raise RuntimeError("worker died")

    llm.collective_rpc = failing_rpc
    engine = VllmEngine(llm, FAKE_VLLM, version=5, slots=2)
    with pytest.raises(RuntimeError, match="worker died"):
        await engine.load_weights(6, {})
    assert engine.policy_version == 5
    assert llm.calls == [("pause", "keep", False), ("resume",)]


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
