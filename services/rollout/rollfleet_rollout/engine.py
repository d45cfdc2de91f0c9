"""The rollout engine interface, shaped after vLLM's async engine.

An engine takes requests (prompt token ids + sampling params), streams cumulative outputs
with per-token log-probs and the policy version that produced each token, and supports
abort, pause/resume and loading new weights without a restart. `torch` (torch_engine.py)
runs here on CPU or GPU; `vllm` (vllm_engine.py) is the production GPU engine.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """`stop_token_ids` end a turn on one token; `stop_sequences` on a run of several (a
    multi-token stop string such as `</search>`, as token ids). Either is kept in the
    output."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete.

    `prompt_embeds` ([n, hidden], or None) replaces the embedded first n prompt positions
    for prefix-based methods (soft prompts, Reasoning Palette's latent prefix): the engine
    feeds these vectors instead of looking up the first n of `prompt_ids`, which stay the
    record of what the prompt was (placeholders there). Both engines take them.

    `decoding` (or None) asks for another decode mode than token by token: NEZHA's
    `rollfleet.models.nezha.ItemDecoding` (one backbone forward, then the model's draft
    head), which the torch engine runs and vLLM refuses.

    `session` (or None) names the episode a multi-turn request belongs to: each turn's
    prompt is the conversation so far, so an engine may keep the session's KV cache
    between turns and compute only what the conversation added (`Engine.end_session`
    releases it).
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # compare=False: a tensor has no single truth value, so it stays out of ==
    prompt_embeds: torch.Tensor | None = field(default=None, compare=False)
    decoding: Any = field(default=None, compare=False)
    session: str | None = None


@dataclass
class GenerationOutput:
    """Cumulative output of one request: every token generated so far."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"


class Engine(abc.ABC):
    """What the rollout worker needs from an engine."""

    policy_version: int = -1

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def generate(
        self, request: GenerationRequest, final_only: bool = False
    ) -> AsyncIterator[GenerationOutput]:
        """Submit a request and stream its cumulative outputs; the last one has finished=True.
        With `final_only` only that last one comes (vLLM's RequestOutputKind.FINAL_ONLY)."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop stepping; in-flight requests keep their state and continue on resume."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def load_weights(self, version: int, tensors: dict) -> None:
        """Swap in new weights between decode steps; tokens after it carry `version`."""

    @abc.abstractmethod
    def free_capacity(self) -> int:
        """How many more sequences the engine can take right now (queue scheduling)."""

    def end_session(self, session: str) -> None:
        """The session's episode ended: release whatever the engine kept for it. vLLM keeps
        nothing per session (its prefix cache serves the next turn's conversation)."""
        return None


async def complete(engine: Engine, request: GenerationRequest) -> GenerationOutput:
    """Run one request to the end and return its final output (the engine sends no other:
    the torch engine then wakes the caller once per request instead of once per token)."""
    final = None
    async for output in engine.generate(request, final_only=True):
        final = output
    assert final is not None and final.finished
    return final
