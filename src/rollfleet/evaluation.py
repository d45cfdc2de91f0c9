"""Held-out evaluation: the verifier's mean score on held-out prompts.

Two readings: `temperature=0` is greedy decoding (one answer per prompt); with a
temperature and `samples=k` it is avg@k, the mean over k sampled answers per prompt, i.e.
the expected reward of the sampling policy that RL trains. Runs in the trainer's process
with Hugging Face `generate`, independently of the rollout engines, so it also
cross-checks them; but each answer is an episode of the same runner and stages as the
workers' (rollfleet.episodes, rollfleet.methods: build_request, the episode runner,
reward_input), so it scores what the workers sample. Multi-turn tasks play against the
task's own env logic (the code the env service runs).
"""

from __future__ import annotations

import asyncio

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rollfleet.episodes import (
    EPISODES,
    Episode,
    EpisodeRequest,
    Generated,
    Limits,
    ends_with_stop,
    turn_stops,
)
from rollfleet.methods import Stages
from rollfleet.protocol import RolloutTask
from rollfleet.rewards import GRADED, reward_item, score
from rollfleet.tasks import Task


@torch.inference_mode()
def _generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float,
    top_p: float = 1.0,
    embeds: list | None = None,
    stop_sequences: tuple[tuple[int, ...], ...] = (),
):
    """Batched HF generate; `embeds[i]` ([n, hidden] or None) replaces the embedded first
    n tokens of prompt i, as the engines' `prompt_embeds` do. A row ends at its first stop
    token or stop sequence (kept)."""
    width = max(len(p) for p in prompts)
    # Left padding so that every prompt ends where generation starts.
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        attention[row, width - len(p) :] = 1
    device = next(model.parameters()).device
    inputs = {}
    if embeds and any(e is not None for e in embeds):
        table = model.get_input_embeddings()
        inputs["inputs_embeds"] = table(ids.to(device))
        for row, (p, e) in enumerate(zip(prompts, embeds, strict=True)):
            if e is not None:
                start = width - len(p)
                inputs["inputs_embeds"][row, start : start + len(e)] = e.to(
                    device, table.weight.dtype
                )
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        **(
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
            if temperature > 0
            else {"do_sample": False}
        ),
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([_StopSequences(stop_sequences, width)]),
    )[:, width:]
    results = []
    for row in out.tolist():
        cut = next(
            (
                i + 1
                for i, t in enumerate(row)
                if t in stop_ids or ends_with_stop(row[: i + 1], stop_sequences)
            ),
            len(row),
        )
        results.append(row[:cut])
    return results


class _StopSequences(StoppingCriteria):
    """Per row: done once its generated tokens end with one of the stop sequences."""

    def __init__(self, sequences: tuple[tuple[int, ...], ...], start: int):
        self.sequences, self.start = sequences, start

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor(
            [ends_with_stop(row[self.start :].tolist(), self.sequences) for row in input_ids],
            device=input_ids.device,
        )


class BatchedGenerate:
    """The episodes' `generate` for a whole chunk of concurrent episodes: it waits until
    every live episode has asked for its next turn, then runs them as one batched HF
    generate, in the order they asked (so a seed gives the same answers)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        live: int,
        max_new_tokens: int,
        max_length: int,
        stop_ids: list[int],
        stop_sequences: tuple[tuple[int, ...], ...] = (),
        temperature: float,
        top_p: float,
    ):
        self.model, self.tokenizer, self.live = model, tokenizer, live
        self.max_new_tokens, self.max_length = max_new_tokens, max_length
        self.stop_ids, self.stop_sequences = stop_ids, stop_sequences
        self.temperature, self.top_p = temperature, top_p
        self.pending: list[tuple[list[int], EpisodeRequest, asyncio.Future]] = []

    async def __call__(self, context: list[int], request: EpisodeRequest, turn: int) -> Generated:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((context, request, future))
        self._flush_when_all_asked()
        return await future

    def episode_ended(self) -> None:
        self.live -= 1
        self._flush_when_all_asked()

    def _flush_when_all_asked(self) -> None:
        if not self.pending or len(self.pending) < self.live:
            return
        batch, self.pending = self.pending, []
        decoding = batch[0][1].decoding
        if decoding is not None:  # a draft decode mode (NEZHA), as the torch engine runs it
            items = decoding.items(self.model, [c for c, _, _ in batch], self.temperature)
            for (_, _, future), (tokens, logprobs) in zip(batch, items, strict=True):
                future.set_result(Generated(tokens, logprobs, [0] * len(tokens), "stop"))
            return
        outputs = _generate(
            self.model,
            self.tokenizer,
            [context for context, _, _ in batch],
            self.max_new_tokens,
            self.stop_ids,
            self.temperature,
            self.top_p,
            [request.prompt_embeds for _, request, _ in batch],
            self.stop_sequences,
        )
        for (context, _, future), tokens in zip(batch, outputs, strict=True):
            room = self.max_length - len(context)  # as the engines: the context is the limit
            tokens = tokens[:room]
            stopped = bool(tokens) and (
                tokens[-1] in self.stop_ids or ends_with_stop(tokens, self.stop_sequences)
            )
            future.set_result(
                Generated(
                    tokens, [0.0] * len(tokens), [0] * len(tokens), "stop" if stopped else "length"
                )
            )


class LocalEnvSession:
    """The task's own env in-process (what the env service runs), as an EnvSession."""

    def __init__(self, task: Task, meta: dict):
        self.env = task.open_env(meta)

    async def step(self, action: str) -> tuple[str, bool, dict]:
        return self.env.step(action)


async def _score_one(
    index: int, example, task, tokenizer, verifier, stages, generate, max_length
) -> tuple[float, Episode]:
    """One held-out answer as the workers would sample it, scored by the verifier."""
    message = RolloutTask.for_example(
        example,
        index=index,
        task_id=f"heldout-{index}",
        group_id=f"heldout-{index}",
        samples=1,
        multi_turn=task.is_multi_turn(example),
    )
    prompt = [tokenizer.bos_token_id, *tokenizer.encode(example.prompt, add_special_tokens=False)]
    request = stages.build_request(message, EpisodeRequest(prompt), tokenizer)
    try:
        episode = await EPISODES[stages.episode](
            request,
            generate=generate,
            env=LocalEnvSession(task, example.meta) if message.multi_turn else None,
            limits=Limits(
                int(example.meta.get("max_turns", 1)), max_length, tokenizer.eos_token_id
            ),
            decode=tokenizer.decode,
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        )
    finally:
        generate.episode_ended()
    item = stages.reward_input(message, episode, reward_item(message, episode))
    return score(verifier, item), episode


async def _score_chunk(chunk, task, tokenizer, verifier, stages, generate, max_length):
    return await asyncio.gather(
        *(
            _score_one(i, ex, task, tokenizer, verifier, stages, generate, max_length)
            for i, ex in chunk
        )
    )


def heldout_episodes(
    model,
    tokenizer,
    task: Task,
    verifier: str,
    *,
    max_new_tokens: int,
    limit: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    stages: Stages | None = None,
    max_length: int | None = None,
) -> list[tuple[float, Episode]]:
    """(verifier score, episode) of every held-out answer, `samples` per prompt."""
    model.eval()
    torch.manual_seed(seed)  # the same sampled answers for the same weights
    count = task.size("heldout") or 0
    count = min(count, limit) if limit else count
    examples = [(i, task.example("heldout", i)) for i in range(count) for _ in range(samples)]
    turn_ids, stop_sequences = turn_stops(tokenizer, task.turn_stop)
    stop_ids = [tokenizer.eos_token_id, *turn_ids]
    stages = stages or Stages([])
    limits_length = max_length or model.config.max_position_embeddings
    scored = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        generate = BatchedGenerate(
            model,
            tokenizer,
            live=len(chunk),
            max_new_tokens=max_new_tokens,
            max_length=limits_length,
            stop_ids=stop_ids,
            stop_sequences=stop_sequences,
            temperature=temperature,
            top_p=top_p,
        )
        scored += asyncio.run(
            _score_chunk(chunk, task, tokenizer, verifier, stages, generate, limits_length)
        )
    return scored


def heldout_accuracy(model, tokenizer, task: Task, verifier: str, **options) -> float:
    """Share of held-out answers (`samples` per prompt) that the reward function `verifier`
    scores 1, or their mean score for a graded verifier (a recall: `rewards.GRADED`);
    `options` as for `heldout_episodes`."""
    scored = heldout_episodes(model, tokenizer, task, verifier, **options)
    if verifier in GRADED:
        return sum(value for value, _ in scored) / max(len(scored), 1)
    return sum(value >= 1.0 for value, _ in scored) / max(len(scored), 1)
