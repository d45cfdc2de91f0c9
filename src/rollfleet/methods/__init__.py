"""Method modules: published methods that plug into named stages of the worker and trainer.

A method is switched on in a manifest under `spec.methods.<name>` with typed parameters:

    spec:
      methods:
        attention_credit: {strategy: coupled, amplification: 1.5}

Each method is a small folder here. Its `__init__.py` holds the parameters (a
`MethodParams` model, light: the operator and the CRD generator read it without torch)
and registers them; the stages it overrides live in a module loaded only by the
processes that run them (`register_method(..., stages="module:Class")`).

The stages, each with the platform's own behaviour as the default (`Method` below):

| side | stage | default |
|---|---|---|
| rollout | `build_request(task, request, tokenizer)` | `<bos>` + the prompt's tokens, no prefix embeddings, no conditioning |
| rollout | `episode` (a runner name in rollfleet.episodes) | `turns`: one model turn, or the env loop of a multi-turn task |
| rollout | `reward_input(task, episode, item)` | the final model turn's text, the answer, the task's meta, the episode's turns and token count |
| both | `load_files(folder)` | nothing; a method reads its own `model_files` from the model folder |
| trainer | `warmup(model, tokenizer, task, folder)` | nothing (the builtin model's SFT warm-up runs before) |
| trainer | `build_batch(batch)` | the trajectories' tokens, masks and behaviour log-probs |
| trainer | `policy_logprobs(model, batch)` | the model's tempered (top-p) log-probs of the batch's tokens |
| trainer | `group_rewards(model, batch, rewards)` | the rewards the reward service gave |
| trainer | `advantages(model, batch, rewards, estimate)` | `estimate(rewards)`: the job's estimator (GRPO, ...) over each group |
| trainer | `advantage_weights(model, batch, advantages)` | none (every token's weight 1); several methods' weights multiply |
| trainer | `extra_loss(model, batch, logprobs)` | none; several methods' terms add up |

A method that trains a network of its own in its warm-up (Reasoning Palette's VAE) saves
it in the model folder under the names in `model_files`: the folder's files travel with
the model's config to the workers and the other trainer ranks, and a resumed run finds
them in the cached warm-up; `load_files` reads them in every process.

`Stages` runs the enabled methods' stages in name order. A stage that replaces
rather than composes (`episode`, `policy_logprobs`, `advantages`) may be overridden by one enabled
method only; two that both do are refused when the job starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from rollfleet.spec import RLJobSpec


class MethodParams(BaseModel):
    """Base of a method's parameters: unknown fields are errors, as everywhere in the spec."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # CEL rules on the whole RLJob spec that mirror `check_job` (the CRD carries them).
    __job_cel__: ClassVar[tuple] = ()
    # Why the method cannot share a job with another, or "" when it can (the spec refuses
    # such a job, and the CRD carries the rule).
    __alone__: ClassVar[str] = ""

    def reward_functions(self, verifier: str) -> list[tuple[str, float, dict]] | None:
        """The job's reward when the manifest lists none (`spec.reward.functions` empty):
        None keeps the task's `verifier`. The first function listed decides held-out
        accuracy."""
        return None

    def check_job(self, spec: RLJobSpec) -> None:
        """Refuse a job these parameters do not fit (ValueError naming the fields)."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    params: type[MethodParams]
    stages: str  # "module:Class" of its `Method` subclass, imported when a job runs it
    summary: str  # one line for the CRD's description and `rollfleet validate`


METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, params: type[MethodParams], stages: str, summary: str) -> None:
    METHODS[name] = MethodInfo(name, params, stages, summary)


class Method:
    """A method's stages. Every default is the platform's own behaviour; a method overrides
    the stages it changes. `self.params` is its `MethodParams`, `self.spec` the job's spec."""

    name: ClassVar[str] = ""  # the name it is registered under
    episode: ClassVar[str | None] = None  # an episode runner of rollfleet.episodes, or the default
    model_files: ClassVar[tuple[str, ...]] = ()  # files its warm-up adds to the model folder

    def __init__(self, params: MethodParams, spec: RLJobSpec):
        self.params, self.spec = params, spec

    # --- rollout side -------------------------------------------------------------------
    def build_request(self, task, request, tokenizer):
        """The request for one sample of `task` (an `EpisodeRequest`): prompt tokens, prefix
        embeddings, and the `Conditioning` that travels with the trajectory."""
        return request

    def reward_input(self, task, episode, item: dict[str, Any]) -> dict[str, Any]:
        """What the reward service scores for one finished episode (a ScoreItem's fields)."""
        return item

    def load_files(self, folder) -> None:
        """Read this method's `model_files` from the model folder (every process, once the
        folder is there)."""

    # --- trainer side -------------------------------------------------------------------
    def warmup(self, model, tokenizer, task, folder) -> None:
        """Stages before RL (SFT on the method's data, auxiliary networks), in place; the
        method's own networks are saved in the model folder `folder` (`model_files`)."""

    def build_batch(self, batch):
        """The `TrainBatch` the step trains on (e.g. other inputs than the sampled ones)."""
        return batch

    def policy_logprobs(self, model, batch):
        """The policy's per-token log-probs [batch, tokens], or None for the default."""
        return None

    def group_rewards(self, model, batch, rewards):
        """Rewards [groups, samples] after model-based scoring in the trainer."""
        return rewards

    def advantages(self, model, batch, rewards, estimate):
        """(advantages [batch rows], metrics) in place of `estimate(rewards)` (the job's
        estimator over rewards [groups, samples]), or None for the default."""
        return None

    def advantage_weights(self, model, batch, advantages):
        """Per-token weights [batch, tokens] that multiply the advantages (detached), or None.
        `advantages` [batch] are the samples' advantages before weighting."""
        return None

    def extra_loss(self, model, batch, logprobs):
        """(scalar loss term, metrics) added to the policy loss, or None."""
        return None


_REPLACING = ("policy_logprobs", "advantages")  # stages at most one method may override


class Stages:
    """The enabled methods of a job, stage by stage, in name order."""

    def __init__(self, methods: list[Method]):
        self.methods = methods
        for stage in _REPLACING:
            owners = [
                m.name for m in methods if getattr(type(m), stage) is not getattr(Method, stage)
            ]
            if len(owners) > 1:
                raise ValueError(f"methods {owners} all replace the {stage} stage; enable one")
        episodes = [m.name for m in methods if m.episode]
        if len(episodes) > 1:
            raise ValueError(f"methods {episodes} each bring their own episode runner; enable one")
        self.episode = next((m.episode for m in methods if m.episode), "turns")

    @property
    def warms_up(self) -> bool:
        """Whether any enabled method has a warm-up stage."""
        return any(type(m).warmup is not Method.warmup for m in self.methods)

    @property
    def in_the_update(self) -> bool:
        """Whether a method runs a stage inside each update on its rows: its own policy
        log-probs, or an extra loss term."""
        return any(
            type(m).policy_logprobs is not Method.policy_logprobs
            or type(m).extra_loss is not Method.extra_loss
            for m in self.methods
        )

    @classmethod
    def for_spec(cls, spec: RLJobSpec) -> Stages:
        return cls([load_method(name, params, spec) for name, params in spec.enabled_methods()])

    def build_request(self, task, request, tokenizer):
        for m in self.methods:
            request = m.build_request(task, request, tokenizer)
        return request

    def reward_input(self, task, episode, item):
        for m in self.methods:
            item = m.reward_input(task, episode, item)
        return item

    @property
    def model_files(self) -> tuple[str, ...]:
        return tuple(name for m in self.methods for name in m.model_files)

    def load_files(self, folder) -> None:
        for m in self.methods:
            m.load_files(folder)

    def warmup(self, model, tokenizer, task, folder) -> None:
        for m in self.methods:
            m.warmup(model, tokenizer, task, folder)

    def build_batch(self, batch):
        for m in self.methods:
            batch = m.build_batch(batch)
        return batch

    def policy_logprobs(self, model, batch):
        for m in self.methods:
            if (logprobs := m.policy_logprobs(model, batch)) is not None:
                return logprobs
        return None

    def group_rewards(self, model, batch, rewards):
        for m in self.methods:
            rewards = m.group_rewards(model, batch, rewards)
        return rewards

    def advantages(self, model, batch, rewards, estimate):
        for m in self.methods:
            if (out := m.advantages(model, batch, rewards, estimate)) is not None:
                return out
        return estimate(rewards).reshape(-1), {}

    def advantage_weights(self, model, batch, advantages):
        weights = None
        for m in self.methods:
            if (w := m.advantage_weights(model, batch, advantages)) is not None:
                weights = w if weights is None else weights * w
        return weights

    def extra_losses(self, model, batch, logprobs) -> list[tuple[Any, dict[str, float]]]:
        return [
            term for m in self.methods if (term := m.extra_loss(model, batch, logprobs)) is not None
        ]


def load_method(name: str, params: MethodParams, spec: RLJobSpec) -> Method:
    module, _, cls = METHODS[name].stages.partition(":")
    return getattr(importlib.import_module(module), cls)(params, spec)


# Registration happens on import of each method's folder.
from rollfleet.methods import (  # noqa: E402, F401
    attention_credit,
    bard,
    nezha,
    palette,
    qagent,
    ravr,
    recgpt,
)
