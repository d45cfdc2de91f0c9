"""The vLLM engine (`engine: vllm`): production GPU generation behind the same interface.

Written against vLLM's V1 async engine (targets vLLM 0.32; `AsyncLLM`):
- generate: `AsyncLLM.generate(prompt, sampling_params, request_id)` streams cumulative
  `RequestOutput`s; `logprobs=0` returns the sampled token's log-prob. The prompt is
  `{"prompt_token_ids": [...]}`, or `{"prompt_embeds": tensor}` (vLLM's `EmbedsPrompt`,
  shape [prompt_len, hidden]) for a request with prompt embeddings, which vLLM accepts
  only when started with `enable_prompt_embeds=True` (a soft prefix shorter than the
  prompt is completed with the rest of the prompt embedded from a CPU copy of the
  policy's embedding table, refreshed with each version);
- abort: `AsyncLLM.abort(request_id)`;
- pause/resume: `pause_generation(mode="keep", clear_cache=...)` freezes in-flight
  requests across a weight swap, `resume_generation()` continues them under the new
  weights. With `async.partialRollout: reprefill` the cache is cleared (prefix cache and
  the kept requests' KV, recomputed under the new weights); with `continue` (the default)
  the kept requests go on from their old KV;
- prefix caching is on, so a group's samples (one task, so one worker and one engine)
  prefill their shared prompt once. Every request carries the policy version it starts
  under as vLLM's `cache_salt`, so no request ever reuses a prefix computed under
  another version (peers saw learning collapse from such stale entries); every swap also
  calls `reset_prefix_cache()` to free the old version's blocks at once (vLLM declines
  while kept requests still hold blocks: the salt keeps them apart until LRU evicts them);
- tensor parallelism: `tensor_parallel_size` is the pool's `gpusPerReplica`; every rank
  receives each chunk (collective_rpc) and its model's `load_weights` keeps its slice;
- load weights: the worker hands over a version it fetched and checked from the weight
  store; `load_weights` pauses, sends the tensors in chunks of at most `chunk_bytes`,
  each as safetensors bytes (vLLM's RPC decodes tensors only for typed signatures), through
  `collective_rpc("rollfleet_load_weights", args=(chunk,))`, which runs
  `WeightLoaderExtension` inside every vLLM worker (`worker_extension_cls`): it moves the
  chunk to the worker's device and calls the model's own `load_weights` with
  (name, tensor) pairs, so the engine is never restarted. Then it resumes;
- a request vLLM ends with finish reason "error" raises VllmRequestFailed: the worker hands
  its task back.

vLLM is imported lazily: it installs only with a CUDA build of torch. None of this module
has run against a real vLLM: not on the development machine, not in CI. Every name,
argument and return shape above was checked against vLLM 0.32.0's source (the PyPI
wheel, commit 5df63a720) on 2026-12-01; README "vLLM" has what that check changed.
`tests/services/test_vllm_engine.py` tests the request/response mapping, the chunked
weight loading and the pause/resume ordering with plain stand-in objects shaped like
vLLM's, and the clear error when vLLM is missing. What the stand-ins cannot show: that
vLLM runs them as read, and that `load_weights` accepts every tensor name the trainer
publishes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator

import safetensors.torch
import torch
from safetensors.torch import load as tensors_from_bytes

from rollfleet.episodes import ends_with_stop
from rollfleet_rollout.engine import (
    Engine,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
)

log = logging.getLogger(__name__)

VLLM_TARGET = "0.32"

# Upper bound on the tensor bytes of one weight RPC. Each chunk is serialised to every
# vLLM worker and staged on its GPU before `load_weights` copies it into the parameters,
# so this also bounds that extra GPU memory.
WEIGHT_CHUNK_BYTES = 256 * 2**20


class VllmNotInstalled(RuntimeError):
    pass


class VllmRequestFailed(RuntimeError):
    """vLLM ended a request with finish reason "error": the task is handed back and
    generated again (by this worker or another)."""


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


def to_vllm_prompt(
    request: GenerationRequest, hidden_size: int | None = None, embed_table=None
) -> dict:
    """Our request -> vLLM's prompt input: token ids, or the prompt embeddings when given.

    The request's embeddings [n, hidden] replace the first n of its prompt positions (a
    soft prefix, or the whole prompt); vLLM takes embeddings for the whole prompt or none,
    so the tokens after the first n are embedded here from `embed_table` (the policy's
    input embeddings, [vocab, hidden]). vLLM's docs warn that embeddings of the wrong
    shape may crash the engine, so the shape is checked here: [1 <= n <= prompt_len,
    hidden] (hidden checked when known). The tensor is detached (a trainable prefix may
    require grad; vLLM serialises it to its engine process) and moved to the CPU, where
    vLLM's input processing puts it anyway.
    """
    if request.decoding is not None:
        raise ValueError(
            f"request {request.request_id!r}: decode mode {type(request.decoding).__name__} "
            "runs on the torch engine only (set the pool's engine: torch)"
        )
    embeds = request.prompt_embeds
    if embeds is None:
        return {"prompt_token_ids": list(request.prompt_ids)}
    shape = tuple(embeds.shape)
    if len(shape) != 2 or not 1 <= shape[0] <= len(request.prompt_ids):
        raise ValueError(
            f"request {request.request_id!r}: prompt_embeds must be [prompt_len, hidden] "
            f"with 1 <= prompt_len <= {len(request.prompt_ids)} prompt tokens, got shape "
            f"{list(shape)}"
        )
    if hidden_size is not None and shape[1] != hidden_size:
        raise ValueError(
            f"request {request.request_id!r}: prompt_embeds hidden size {shape[1]} "
            f"does not match the model's {hidden_size}"
        )
    embeds = embeds.detach().cpu()
    rest = request.prompt_ids[shape[0] :]
    if rest:
        if embed_table is None:
            raise ValueError(
                f"request {request.request_id!r}: prompt_embeds cover {shape[0]} of "
                f"{len(request.prompt_ids)} prompt positions, and this engine has no "
                "embedding table to embed the rest (start it with prompt_embeds=True)"
            )
        embeds = torch.cat([embeds, embed_table[torch.tensor(rest)].to(embeds.dtype)])
    return {"prompt_embeds": embeds}


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
        if completion.finish_reason == "error":  # vLLM's internal, retryable failure
            raise VllmRequestFailed(f"vLLM failed request {request_id!r} (finish reason error)")
        reason = {"stop": "stop", "length": "length", "abort": "abort"}.get(
            completion.finish_reason or "", "stop"
        )
    return GenerationOutput(
        request_id, tokens, logprobs, list(versions), bool(output.finished), reason
    )


def version_salt(version: int) -> str:
    """vLLM's `cache_salt` for requests started under a policy version: prefixes are shared
    only among requests of one version."""
    return f"rollfleet-v{version}"


def tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def chunk_weights(tensors: dict, chunk_bytes: int) -> list[dict]:
    """Split `tensors` into consecutive chunks of at most `chunk_bytes` bytes each.

    Keeps the dict's order and every tensor object as it is (no copies); a tensor larger
    than `chunk_bytes` gets a chunk of its own, since a tensor is never split.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    chunks: list[dict] = []
    current: dict = {}
    size = 0
    for name, tensor in tensors.items():
        n = tensor_bytes(tensor)
        if current and size + n > chunk_bytes:
            chunks.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += n
    if current:
        chunks.append(current)
    return chunks


def check_tensor_parallel(config, tensor_parallel: int) -> None:
    """vLLM splits attention heads (and key/value heads) over the tensor-parallel ranks;
    say so here, naming the field, rather than from deep inside vLLM's start-up."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or tensor_parallel == 1:
        return
    if heads % tensor_parallel or (kv_heads % tensor_parallel and tensor_parallel % kv_heads):
        raise ValueError(
            f"spec.rollout.pools[].gpusPerReplica: {tensor_parallel} GPUs cannot share the "
            f"model's {heads} attention heads ({kv_heads} key/value heads) evenly: choose a "
            "divisor of the head count"
        )


class WeightLoaderExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`): receives new weights in place.

    `self.device` and `self.model_runner.model` are the worker's (vLLM's RLHF examples use
    the same two attributes). The model's `load_weights` takes (name, tensor) pairs under
    Hugging Face names, maps q/k/v and gate/up onto its fused parameters and shards them
    for tensor parallelism, so each worker gets whole tensors. Tied embeddings: the
    trainer leaves `lm_head.weight` out when `tie_word_embeddings` is true, and vLLM's
    `LlamaForCausalLM.load_weights` skips the `lm_head.` prefix in that case anyway (its
    lm_head is tied to `embed_tokens`), so updating `model.embed_tokens.weight` updates both.
    """

    def rollfleet_load_weights(self, chunk: bytes) -> None:
        """`chunk`: safetensors bytes. vLLM's RPC serialiser decodes tensors only where the
        receiving signature is typed, so tensors sent as they are arrive as lists."""
        tensors = tensors_from_bytes(chunk)  # safetensors: no pickle
        weights = [(name, tensor.to(self.device)) for name, tensor in tensors.items()]
        self.model_runner.get_model().load_weights(weights=weights)


def input_embeddings(model) -> tuple[str, torch.Tensor]:
    """(state-dict name, CPU copy) of an HF model's input embedding table."""
    table = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is table)
    return name, table.detach().cpu().clone()


class VllmEngine(Engine):
    def __init__(
        self,
        engine,
        vllm_module,
        *,
        version: int,
        slots: int,
        chunk_bytes: int = WEIGHT_CHUNK_BYTES,
        prompt_embeds: bool = True,
        hidden_size: int | None = None,
        embeddings: tuple[str, torch.Tensor] | None = None,
        reprefill: bool = False,
    ):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.engine, self.vllm = engine, vllm_module
        self.policy_version, self.slots = version, slots
        self.chunk_bytes = chunk_bytes
        self.prompt_embeds = prompt_embeds  # whether vLLM was started to accept them
        self.hidden_size = hidden_size
        # (tensor name, CPU copy) of the input embeddings, to embed a prompt's tokens after
        # a soft prefix (to_vllm_prompt); refreshed with every version that carries them.
        self.embeddings = embeddings
        self.reprefill = reprefill  # clear the KV cache on a swap (see the module's docstring)
        self.running = 0

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer,
        *,
        version: int,
        max_len: int,
        seed: int,
        slots: int = 256,
        chunk_bytes: int = WEIGHT_CHUNK_BYTES,
        prompt_embeds: bool = True,
        tensor_parallel: int = 1,
        reprefill: bool = False,
    ):
        """Start AsyncLLM on a folder written from the trainer's model and tokenizer,
        sharded over `tensor_parallel` GPUs (the pool's gpusPerReplica)."""
        vllm = require_vllm()
        check_tensor_parallel(model.config, tensor_parallel)
        from vllm.v1.engine.async_llm import AsyncLLM

        folder = tempfile.mkdtemp(prefix="rollfleet-vllm-")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        args = vllm.AsyncEngineArgs(
            model=folder,
            max_model_len=max_len,
            max_num_seqs=slots,
            seed=seed,
            # Each rank holds a slice of every layer; weight swaps send every rank the whole
            # tensors and the model's load_weights keeps its slice (WeightLoaderExtension).
            tensor_parallel_size=tensor_parallel,
            # A group's samples share their prompt's blocks; the version salt of every
            # request (generate) keeps versions apart.
            enable_prefix_caching=True,
            # EngineArgs.enable_prompt_embeds: accept {"prompt_embeds": ...} prompts
            enable_prompt_embeds=prompt_embeds,
            # Sampled tokens' log-probs after temperature and top-k/top-p (renormalised over
            # what is kept): the distribution they were drawn from, which the trainer scores
            # too. The default, raw_logprobs, is the untempered full softmax.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightLoaderExtension",
        )
        return cls(
            AsyncLLM.from_engine_args(args),
            vllm,
            version=version,
            slots=slots,
            chunk_bytes=chunk_bytes,
            prompt_embeds=prompt_embeds,
            hidden_size=getattr(model.config, "hidden_size", None),
            embeddings=input_embeddings(model) if prompt_embeds else None,
            reprefill=reprefill,
        )

    async def start(self) -> None:
        return None  # AsyncLLM starts its engine core on construction

    async def stop(self) -> None:
        self.engine.shutdown()

    async def generate(
        self, request: GenerationRequest, final_only: bool = False
    ) -> AsyncIterator[GenerationOutput]:
        if request.prompt_embeds is not None and not self.prompt_embeds:
            raise ValueError(
                f"request {request.request_id!r} has prompt embeddings, but this vLLM "
                "engine was started without enable_prompt_embeds"
            )
        prompt = to_vllm_prompt(
            request, self.hidden_size, self.embeddings[1] if self.embeddings else None
        )
        prompt["cache_salt"] = version_salt(self.policy_version)
        versions: list[int] = []
        self.running += 1
        try:
            async for output in self.engine.generate(
                prompt=prompt,
                sampling_params=to_vllm_sampling(request.params, self.vllm),
                request_id=request.request_id,
            ):
                out = from_vllm_output(output, request.request_id, versions, self.policy_version)
                # vLLM stops on single tokens or on strings (which need detokenizing): a
                # run of stop tokens is checked here and the request aborted at it.
                if not out.finished and ends_with_stop(
                    out.token_ids, request.params.stop_sequences
                ):
                    await self.engine.abort(request.request_id)
                    out.finished, out.finish_reason = True, "stop"
                # vLLM's own outputs keep streaming: each token's version is the one
                # current when it arrived (from_vllm_output).
                if out.finished or not final_only:
                    yield out
                if out.finished:
                    return
        finally:
            self.running -= 1

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def pause(self) -> None:
        await self.engine.pause_generation(mode="keep", clear_cache=self.reprefill)

    async def resume(self) -> None:
        await self.engine.resume_generation()

    async def load_weights(self, version: int, tensors: dict) -> None:
        """Swap in a version's tensors, chunk by chunk, with generation paused (kept).

        The version changes only after every chunk loaded. If a chunk fails, generation
        resumes, the error is raised and the engine keeps reporting the old version; the
        chunks sent before it stay loaded, so the weights are then a mix until the next
        version loads (every version carries every tensor).
        """
        if not tensors:
            raise ValueError(f"weights v{version} have no tensors")
        chunks = chunk_weights(tensors, self.chunk_bytes)
        await self.pause()
        try:
            for i, chunk in enumerate(chunks):
                try:
                    await self.engine.collective_rpc(
                        "rollfleet_load_weights", args=(safetensors.torch.save(chunk),)
                    )
                except Exception:
                    log.error(
                        "weights v%d: chunk %d/%d failed; %d of %d tensors were loaded, "
                        "keeping v%d",
                        version,
                        i + 1,
                        len(chunks),
                        sum(len(c) for c in chunks[:i]),
                        len(tensors),
                        self.policy_version,
                    )
                    raise
            self.policy_version = version
            if self.embeddings and self.embeddings[0] in tensors:
                name = self.embeddings[0]
                self.embeddings = (name, tensors[name].detach().cpu())
            if not await self.engine.reset_prefix_cache():
                log.debug("weights v%d: kept requests hold blocks, prefix cache not reset", version)
        finally:
            await self.resume()

    def free_capacity(self) -> int:
        return self.slots - self.running
