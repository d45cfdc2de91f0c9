"""The vLLM engine (`engine: vllm`): production GPU generation behind the same interface.

Written against vLLM's V1 async engine (targets vLLM 0.32; `AsyncLLM`):
- generate: `AsyncLLM.generate(prompt={"prompt_token_ids": ...}, sampling_params, request_id)`
  streams cumulative `RequestOutput`s; `logprobs=0` returns the sampled token's log-prob;
- abort: `AsyncLLM.abort(request_id)`;
- pause/resume: `pause_generation(mode="keep")` freezes in-flight requests across a
  weight swap, `resume_generation()` continues them under the new weights;
- load weights: `collective_rpc("rollfleet_load_weights", ...)` runs `WeightLoaderExtension`
  inside each vLLM worker (`worker_extension_cls`), which calls the model's own
  `load_weights` with the tensors, so the engine is never restarted.

vLLM is imported lazily: it installs only with a CUDA build of torch. It is NOT
exercised on the development machine or in CI; `tests/services/test_vllm_engine.py`
tests the request/response mapping with plain objects and the clear error without vLLM.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator

from rollfleet_rollout.engine import Engine, GenerationOutput, GenerationRequest, SamplingParams

VLLM_TARGET = "0.32"


class VllmNotInstalled(RuntimeError):
    pass


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise VllmNotInstalled(
            f"rollout pool engine 'vllm' needs vLLM (targets vLLM {VLLM_TARGET}, CUDA GPUs); "
            "install the rollout image with vLLM, or set spec.rollout.pools[].engine: torch"
        ) from None
    return vllm


def to_vllm_sampling(params: SamplingParams, vllm_module):
    """Our sampling params -> vLLM's; log-prob of the sampled token only (logprobs=0)."""
    return vllm_module.SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop_token_ids=list(params.stop_token_ids),
        logprobs=0,
        detokenize=False,
    )


def from_vllm_output(
    output, request_id: str, versions: list[int], version: int
) -> GenerationOutput:
    """vLLM's cumulative RequestOutput -> ours; new tokens get the current policy version.

    `versions` persists across calls for one request, so tokens keep the version that
    produced them even when weights change mid-request.
    """
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = [
        entry[token].logprob
        for token, entry in zip(tokens, completion.logprobs or [], strict=False)
    ]
    versions.extend([version] * (len(tokens) - len(versions)))
    reason = None
    if output.finished:
        reason = {"stop": "stop", "length": "length", "abort": "abort"}.get(
            completion.finish_reason or "", "stop"
        )
    return GenerationOutput(
        request_id, tokens, logprobs, list(versions), bool(output.finished), reason
    )


class WeightLoaderExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`): receives new weights in place."""

    def rollfleet_load_weights(self, tensors: dict) -> None:
        self.model_runner.model.load_weights(weights=list(tensors.items()))


class VllmEngine(Engine):
    def __init__(self, engine, vllm_module, *, version: int, slots: int):
        self.engine, self.vllm, self.policy_version, self.slots = (
            engine,
            vllm_module,
            version,
            slots,
        )
        self.running = 0

    @classmethod
    def from_model(
        cls, model, tokenizer, *, version: int, max_len: int, seed: int, slots: int = 256
    ):
        """Start AsyncLLM on a folder written from the trainer's model and tokenizer."""
        vllm = require_vllm()
        from vllm.v1.engine.async_llm import AsyncLLM

        folder = tempfile.mkdtemp(prefix="rollfleet-vllm-")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        args = vllm.AsyncEngineArgs(
            model=folder,
            max_model_len=max_len,
            max_num_seqs=slots,
            seed=seed,
            enable_prefix_caching=True,
            worker_extension_cls=f"{__name__}.WeightLoaderExtension",
        )
        return cls(AsyncLLM.from_engine_args(args), vllm, version=version, slots=slots)

    async def start(self) -> None:
        return None  # AsyncLLM starts its engine core on construction

    async def stop(self) -> None:
        self.engine.shutdown()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        versions: list[int] = []
        self.running += 1
        try:
            async for output in self.engine.generate(
                prompt={"prompt_token_ids": request.prompt_ids},
                sampling_params=to_vllm_sampling(request.params, self.vllm),
                request_id=request.request_id,
            ):
                yield from_vllm_output(output, request.request_id, versions, self.policy_version)
        finally:
            self.running -= 1

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def pause(self) -> None:
        await self.engine.pause_generation(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await self.engine.resume_generation()

    async def load_weights(self, version: int, tensors: dict) -> None:
        await self.pause()
        try:
            await self.engine.collective_rpc("rollfleet_load_weights", args=(tensors,))
            self.policy_version = version
        finally:
            await self.resume()

    def free_capacity(self) -> int:
        return self.slots - self.running
