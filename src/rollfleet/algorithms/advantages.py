"""Advantage estimators over groups of samples that share a prompt.

Each takes `rewards` of shape [groups, samples_per_group] and returns advantages of the
same shape; the trainer broadcasts a sample's advantage over its response tokens.

Every estimator takes the same keywords: `eps`, added to a std before dividing by it (for
those that divide), and `all_reduce`. An estimator that needs statistics of the whole batch (REINFORCE++'s std) sums them
over the trainer's data-parallel ranks with `all_reduce` (a list of floats in, their
sums over ranks out; the identity in one process), so W ranks compute the advantages
one process would compute on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rollfleet.algorithms import register_advantage

AllReduce = Callable[[list[float]], list[float]]


def local(values: list[float]) -> list[float]:
    """All-reduce over one process: the values themselves."""
    return list(values)


@register_advantage("grpo")
def grpo(
    rewards: torch.Tensor, *, eps: float = 1e-4, normalize_std: bool = True, all_reduce=local
) -> torch.Tensor:
    """GRPO: reward minus the group mean, divided by the group std (Shao et al., 2024)."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not normalize_std or rewards.shape[-1] < 2:  # a group of one has no spread to scale by
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True, unbiased=True).nan_to_num(0.0) + eps)


@register_advantage("dr_grpo")
def dr_grpo(rewards: torch.Tensor, *, eps: float = 0.0, all_reduce=local) -> torch.Tensor:
    """Dr.GRPO: reward minus the group mean, not divided by the std (Liu et al., 2025):
    dividing by the std over-weights groups that are nearly all right or all wrong.
    Pair it with the seq-mean-token-sum aggregation for the paper's unbiased form."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, *, eps: float = 0.0, all_reduce=local) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024): each sample's baseline is the mean
    reward of the other samples of its group, i.e. n/(n-1) times the centered reward."""
    n = rewards.shape[-1]
    if n < 2:
        return torch.zeros_like(rewards)
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (n - 1)
    return rewards - others


@register_advantage("reinforce++")
def reinforce_pp(rewards: torch.Tensor, *, eps: float = 1e-4, all_reduce=local) -> torch.Tensor:
    """REINFORCE++ with a group baseline (Hu et al., 2025): subtract the group mean, then
    normalise by the std over the whole batch (every group of every trainer rank), not
    per group as GRPO does."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    flat = centered.double().flatten()
    count, total, squares = all_reduce([flat.numel(), float(flat.sum()), float((flat**2).sum())])
    if count < 2:
        return centered
    variance = max(squares - total**2 / count, 0.0) / (count - 1)  # unbiased, as torch.std
    return centered / (variance**0.5 + eps)
