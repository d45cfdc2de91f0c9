"""Turning token sequences into padded tensors and per-token log-probs, for training.

`TrainBatch` is what one trainer step works on: the trajectories of its prompt groups as
right-padded tensors, built by `TrainBatch.from_trajectories` (the trainer's default
`build_batch` stage; method modules may change it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rollfleet.protocol import Trajectory


def pad_sequences(
    sequences: list[list[int]], pad_id: int, *values: list[list[float]]
) -> tuple[torch.Tensor, ...]:
    """Right-pad token sequences (and aligned float lists) into [batch, longest] tensors.

    Returns (input_ids, attention_mask, *padded values).
    """
    width = max(len(s) for s in sequences)

    def pad(rows, fill, dtype):  # one tensor from padded lists: no torch call per row
        return torch.tensor([[*row, *[fill] * (width - len(row))] for row in rows], dtype=dtype)

    ids = pad(sequences, pad_id, torch.long)
    attention = pad([[1] * len(s) for s in sequences], 0, torch.long)
    return (ids, attention, *(pad(v, 0.0, torch.float32) for v in values))


def sampling_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """Log-prob of `tokens` under the distribution the rollout engines sample from.

    logits [..., vocab] are divided by the temperature (0 is greedy: read at 1), and with
    top_p < 1 renormalised over the nucleus, the smallest set of most likely tokens whose
    mass reaches top_p, exactly as the torch engine's sampler and vLLM's processed
    log-probs do. A token outside the nucleus (possible only off-policy: the engine never
    samples one) is scored as if the nucleus held it too, so its log-prob stays finite.
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, tokens[..., None])[..., 0]
    if top_p >= 1.0:
        return picked
    with torch.no_grad():  # the nucleus is a choice of tokens, not differentiated
        probs = logprobs.exp()
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        keep = torch.ones_like(probs, dtype=torch.bool).scatter(-1, order, ~outside)
        keep.scatter_(-1, tokens[..., None], True)
    kept_mass = torch.logsumexp(logprobs.masked_fill(~keep, float("-inf")), dim=-1)
    return picked - kept_mass


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
):
    """Log-prob of each token given the ones before it: [batch, seq]; position 0 gets 0."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    picked = sampling_logprobs(logits[:, :-1], input_ids[:, 1:], temperature, top_p)
    return torch.nn.functional.pad(picked, (1, 0))


@contextlib.contextmanager
def prefix_embeddings(model, rows: torch.Tensor, prefixes: torch.Tensor):
    """Within the block, the model's input embeddings of the first L positions of `rows`
    (indices into the batch) are `prefixes` [len(rows), L, hidden] instead of the embedded
    tokens there: soft prefixes, as the engines' `prompt_embeds` feed them.

    A forward hook on the embedding layer does it, so it works unchanged inside a DDP or
    FSDP wrapper (the layer's weights are gathered when the hook runs) and for any
    caller (`token_logprobs`, SFT). Gradients reach the model's parameters everywhere but
    at the replaced positions; `prefixes` is used as given (detach it to keep its
    network frozen)."""
    layer = getattr(model, "module", model).get_input_embeddings()
    length = prefixes.shape[1]

    def replace_prefix(module, inputs, output):
        mask = torch.zeros(output.shape[:2], dtype=torch.bool, device=output.device)
        mask[rows.to(output.device), :length] = True
        full = torch.zeros_like(output)
        full[rows.to(output.device), :length] = prefixes.to(output.device, output.dtype)
        return torch.where(mask[..., None], full, output)

    handle = layer.register_forward_hook(replace_prefix)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class TrainBatch:
    """One step's samples as [rows, tokens] tensors, rows in group order (the samples of
    group g are rows g·n … g·n + n − 1 for groups of n).

    A multi-agent sample (`Trajectory.segments`) is several rows, one per segment, next
    to each other; `row_sample[r]` is the sample (its index in group order) that row r
    belongs to and `row_agent[r]` its agent, and `trajectories[r]` is that sample's
    trajectory. Without segments rows and samples are one and the same.

    `loss_mask` is 1 on the tokens the loss trains (the model's response tokens) and 0
    elsewhere; `advantage_weights` scales each token's advantage (1 by default, credit
    assignment changes it) and never enters the loss's denominator. `extras` holds what a
    method module adds for its own stages (e.g. prefix embeddings), keyed by its name.
    """

    trajectories: list[Trajectory]
    group_size: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantage_weights: torch.Tensor
    prompt_lengths: list[int]
    pad_id: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    row_sample: list[int] = field(default_factory=list)
    row_agent: list[str] = field(default_factory=list)
    row_reward: list[float | None] = field(default_factory=list)  # a segment's own reward

    @classmethod
    def from_trajectories(
        cls, trajectories: list[Trajectory], group_size: int, pad_id: int, device=None
    ) -> TrainBatch:
        sequences, masks, behaviour, weights, prompts = [], [], [], [], []
        row_trajectories, row_sample, row_agent, row_reward = [], [], [], []
        for index, t in enumerate(trajectories):
            for row in t.rows():
                prompt = [0.0] * len(row.prompt_ids)
                sequences.append(row.prompt_ids + row.response_ids)
                masks.append(prompt + row.loss_mask)
                behaviour.append(prompt + row.behaviour_logprobs)
                own = t.advantage_weights if not t.segments else None
                weights.append([1.0] * len(row.prompt_ids) + (own or [1.0] * len(row.loss_mask)))
                prompts.append(len(row.prompt_ids))
                row_trajectories.append(t)
                row_sample.append(index)
                row_agent.append(row.agent)
                row_reward.append(row.reward)
        tensors = pad_sequences(sequences, pad_id, masks, behaviour, weights)
        ids, attention, mask, behaviour_lp, advantage_weights = (t.to(device) for t in tensors)
        return cls(
            row_trajectories,
            group_size,
            ids,
            attention,
            mask,
            behaviour_lp,
            advantage_weights,
            prompts,
            pad_id,
            row_sample=row_sample,
            row_agent=row_agent,
            row_reward=row_reward,
        )

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def segmented(self) -> bool:
        """Whether some sample is several rows (multi-agent segments)."""
        return len(set(self.row_sample)) != len(self.row_sample)

    def row_advantages(self, sample_advantages: torch.Tensor, estimate) -> torch.Tensor:
        """Advantages per row from the samples' [samples in group order]: each row gets
        its sample's, except the rows of an agent whose segments carry their own reward,
        which get the estimator (`estimate`, over [groups, samples]) applied to that
        agent's rewards: per-agent credit within each group."""
        if not self.segmented:
            return sample_advantages
        out = sample_advantages.reshape(-1)[torch.tensor(self.row_sample)].clone()
        agents = sorted(
            {a for a, r in zip(self.row_agent, self.row_reward, strict=True) if r is not None}
        )
        for agent in agents:
            rows = [i for i, a in enumerate(self.row_agent) if a == agent]
            samples = [self.row_sample[i] for i in rows]
            if sorted(samples) != list(range(len(sample_advantages.reshape(-1)))) or any(
                self.row_reward[i] is None for i in rows
            ):
                raise ValueError(
                    f"agent {agent!r}: a per-agent reward needs exactly one rewarded segment "
                    "of that agent in every sample"
                )
            rewards = torch.tensor([self.row_reward[i] for i in rows])
            order = torch.tensor(samples).argsort()  # rows in sample order
            estimated = estimate(rewards[order].view(-1, self.group_size)).reshape(-1)
            out[torch.tensor(rows)[order]] = estimated.to(out.dtype)
        return out

    def rows(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop) as a batch of their own (a mini-batch of whole groups)."""
        return self.take(slice(start, stop))

    def take(self, rows: slice | list[int]) -> TrainBatch:
        """The rows `rows` (a slice, or row numbers in order) as a batch of their own."""

        def pick(values: list) -> list:
            if isinstance(rows, slice):
                return values[rows]
            return [values[r] for r in rows] if values else values  # unset stays unset

        tensors = {
            name: getattr(self, name)[rows]
            for name in (
                "input_ids",
                "attention_mask",
                "loss_mask",
                "behaviour_logprobs",
                "advantage_weights",
            )
        }
        extras = {
            k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (len(self),) else v
            for k, v in self.extras.items()
        }
        return replace(
            self,
            trajectories=pick(self.trajectories),
            prompt_lengths=pick(self.prompt_lengths),
            row_sample=pick(self.row_sample),
            row_agent=pick(self.row_agent),
            row_reward=pick(self.row_reward),
            extras=extras,
            **tensors,
        )
