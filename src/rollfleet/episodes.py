"""Episodes: one sample's turns, run the same way by the rollout workers and the evaluation.

An episode runner drives the model through one sample: generate a model turn, hand its
text to the env, append the env's observation, and again, until the model ends the
episode (end-of-sequence), the env says done, the turn limit or the context limit. It
knows no engine and no transport: `generate` is the worker's engine (or the trainer's
batched Hugging Face generate during evaluation) and `env` the env service over HTTP (or
the task's own env logic in-process), so the evaluation scores exactly the episodes the
workers sample.

    request = EpisodeRequest(prompt_ids=[bos, *tokens])
    episode = await EPISODES["turns"](request, generate=..., env=None, limits=..., decode=...)
    episode.response_ids, episode.loss_mask, episode.final_text

Runners are registered by name; a method module that needs another kind of episode
(several agents, say) registers its own and names it in `Method.episode`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rollfleet.protocol import Conditioning, TrajectoryStatus


@dataclass
class EpisodeRequest:
    """What one sample starts from (the `build_request` stage's output): the prompt's token
    ids, optional prefix embeddings the engine feeds instead of the embedded prompt, and
    the conditioning the trajectory carries to the trainer (`Trajectory.conditioning`).
    `sample` is the sample's index in its group, None in held-out evaluation, which samples
    as a deployed model would (RAVR's answer-guided samples key on it). `decoding`
    selects an engine decode mode other than token by token (NEZHA's `ItemDecoding`),
    None for plain generation. `agent` names who answers the prompt when a runner plays
    several agents (`run_agents`)."""

    prompt_ids: list[int]
    prompt_embeds: Any = None
    sample: int | None = None
    conditioning: Conditioning = field(default_factory=Conditioning)
    decoding: Any = None
    agent: str = "policy"  # who answers the prompt, for runners of several agents


@dataclass
class Generated:
    """One model turn as an engine returns it."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop", "length" or "abort"


@dataclass
class Turn:
    """One turn of the transcript: the model's or the env's."""

    role: str  # "model" or "env"
    text: str
    tokens: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Segment:
    """One agent's part of a multi-agent episode, as `protocol.Segment` carries it: the
    agent's own prompt and everything after it, aligned lists as in `Episode`."""

    agent: str
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    loss_mask: list[float] = field(default_factory=list)


@dataclass
class Episode:
    """A finished (or stopped) sample: every token after the prompt, aligned lists as the
    Trajectory carries them, and the transcript for the reward. A multi-agent runner
    fills `segments` instead (one per agent turn owner, each with its own prompt) and
    leaves the episode's own lists empty; `turns` is then every agent's transcript, each
    model turn's `info` naming its agent."""

    request: EpisodeRequest
    status: TrajectoryStatus = TrajectoryStatus.COMPLETED
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    loss_mask: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    @property
    def final_text(self) -> str:
        """The last model turn's text (what a single-answer verifier scores)."""
        return next((t.text for t in reversed(self.turns) if t.role == "model"), "")

    @property
    def response_tokens(self) -> int:
        """Tokens the model generated (env observations not counted)."""
        return sum(t.tokens for t in self.turns if t.role == "model")

    @property
    def all_versions(self) -> list[int]:
        """The policy version of every token so far, the segments' included (-1: env)."""
        return self.versions + [v for s in self.segments for v in s.versions]


class EnvSession(Protocol):
    async def step(self, action: str) -> tuple[str, bool, dict[str, Any]]:
        """The env's observation after the model's action, whether the episode ended, info."""


@dataclass(frozen=True)
class Limits:
    max_turns: int  # 1 for single-turn tasks
    max_length: int  # prompt + response tokens the model's context holds
    eos_token_id: int


def turn_stops(tokenizer, strings) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """A task's turn stops (`Task.turn_stop`, strings) as the engines take them: the ids of
    one-token stops, and the token runs of longer ones (`</search>`)."""
    encoded = [tuple(tokenizer.encode(s, add_special_tokens=False)) for s in strings]
    return (
        tuple(e[0] for e in encoded if len(e) == 1),
        tuple(e for e in encoded if len(e) > 1),
    )


def ends_with_stop(tokens: list[int], sequences: tuple[tuple[int, ...], ...]) -> bool:
    """Whether `tokens` end with one of the stop sequences."""
    return any(len(tokens) >= len(s) and tuple(tokens[-len(s) :]) == s for s in sequences)


Generate = Callable[[list[int], EpisodeRequest, int], Awaitable[Generated]]
# Called before each turn (with its index) and once after the last (with None): a status
# to stop the episode with (stale, cancelled), or None to go on.
Check = Callable[[int | None, Episode], Awaitable[TrajectoryStatus | None]]


async def _go_on(turn: int | None, episode: Episode) -> None:
    return None


def _append_model(tokens: Episode | Segment, out: Generated) -> None:
    """A model turn's tokens onto an episode's or a segment's lists, in the loss."""
    tokens.response_ids += out.token_ids
    tokens.logprobs += out.logprobs
    tokens.versions += out.versions
    tokens.loss_mask += [1.0] * len(out.token_ids)


def _append_env(tokens: Episode | Segment, ids: list[int]) -> None:
    """An env observation's tokens onto an episode's or a segment's lists, out of the loss."""
    tokens.response_ids += ids
    tokens.logprobs += [0.0] * len(ids)
    tokens.versions += [-1] * len(ids)
    tokens.loss_mask += [0.0] * len(ids)


async def run_turns(
    request: EpisodeRequest,
    *,
    generate: Generate,
    env: EnvSession | None,
    limits: Limits,
    decode: Callable[[list[int]], str],
    encode: Callable[[str], list[int]],
    check: Check = _go_on,
) -> Episode:
    """Single-turn (env None) or the env loop of a multi-turn task."""
    episode = Episode(request)
    for turn in range(limits.max_turns if env is not None else 1):
        if (stop := await check(turn, episode)) is not None:
            episode.status = stop
            return episode
        context = request.prompt_ids + episode.response_ids
        if len(context) + 1 >= limits.max_length:
            episode.status = TrajectoryStatus.TRUNCATED
            break
        out = await generate(context, request, turn)
        if out.finish_reason == "abort":  # cancelled while generating
            episode.status = TrajectoryStatus.ABORTED
            return episode
        text = decode([t for t in out.token_ids if t != limits.eos_token_id])
        _append_model(episode, out)
        episode.turns.append(Turn("model", text, len(out.token_ids)))
        if out.finish_reason == "length":
            episode.status = TrajectoryStatus.TRUNCATED
        if env is None or not out.token_ids or out.token_ids[-1] == limits.eos_token_id:
            break
        observation, done, info = await env.step(text)
        tokens = encode(observation)
        _append_env(episode, tokens)
        episode.turns.append(Turn("env", observation, len(tokens), info))
        if done:
            break
    if (stop := await check(None, episode)) is not None:
        episode.status = stop
    return episode


async def run_agents(
    request: EpisodeRequest,
    *,
    generate: Generate,
    env: EnvSession | None,
    limits: Limits,
    decode: Callable[[list[int]], str],
    encode: Callable[[str], list[int]],
    check: Check = _go_on,
) -> Episode:
    """Several agents of one policy, coordinated by the env (RecGPT-V2's planner, experts
    and arbiter). The first agent answers the request's prompt; after each model turn
    the env's reply either hands over to the next agent (`info["agent"]`: the
    observation is that agent's whole prompt, a segment of its own) or is an observation
    for the same agent (appended, outside the loss). `limits.max_turns` counts model
    turns across agents. The episode's tokens are in `segments`."""
    if env is None:
        raise ValueError("the agents episode runner needs the task's env (a multi-turn task)")
    if request.prompt_embeds is not None:
        raise ValueError(
            "the agents episode runner takes no prefix embeddings (each agent has its own prompt)"
        )
    episode = Episode(request)
    current = Segment(request.agent, list(request.prompt_ids))
    episode.segments.append(current)
    for turn in range(limits.max_turns):
        if (stop := await check(turn, episode)) is not None:
            episode.status = stop
            return episode
        context = current.prompt_ids + current.response_ids
        if len(context) + 1 >= limits.max_length:
            episode.status = TrajectoryStatus.TRUNCATED
            break
        out = await generate(context, request, turn)
        if out.finish_reason == "abort":
            episode.status = TrajectoryStatus.ABORTED
            return episode
        text = decode([t for t in out.token_ids if t != limits.eos_token_id])
        _append_model(current, out)
        episode.turns.append(Turn("model", text, len(out.token_ids), {"agent": current.agent}))
        if out.finish_reason == "length":
            episode.status = TrajectoryStatus.TRUNCATED
        observation, done, info = await env.step(text)
        if done:
            episode.turns.append(Turn("env", observation, 0, info))
            break
        if "agent" in info:  # the next agent starts from its own prompt
            current = Segment(str(info["agent"]), [request.prompt_ids[0], *encode(observation)])
            episode.segments.append(current)
            episode.turns.append(Turn("env", observation, 0, info))
            continue
        tokens = encode(observation)
        _append_env(current, tokens)
        episode.turns.append(Turn("env", observation, len(tokens), info))
    if (stop := await check(None, episode)) is not None:
        episode.status = stop
    return episode


EPISODES: dict[str, Callable[..., Awaitable[Episode]]] = {"turns": run_turns, "agents": run_agents}
