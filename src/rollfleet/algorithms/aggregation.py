"""Loss aggregation: per-token losses [batch, tokens] -> (numerator, denominator).

The loss is numerator / denominator. Returning the two parts lets data-parallel trainer
ranks sum the denominators across ranks first, so W ranks take the step one process
takes on the whole batch (see rollfleet_trainer/loop.py).

| name | loss |
|---|---|
| token-mean | mean over every trained token of the batch (long answers weigh more) |
| seq-mean-token-mean | mean over sequences of each sequence's token mean |
| seq-mean-token-sum | mean over sequences of each sequence's token sum (Dr.GRPO's unbiased form) |
"""

from __future__ import annotations

import torch

from rollfleet.algorithms import register_aggregation


@register_aggregation("token-mean")
def token_mean_parts(losses: torch.Tensor, mask: torch.Tensor):
    return (losses * mask).sum(), mask.sum()


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean_parts(losses: torch.Tensor, mask: torch.Tensor):
    tokens = mask.sum(-1)
    trained = tokens > 0  # a sequence with no trained token does not count
    per_sequence = (losses * mask).sum(-1) / tokens.clamp_min(1e-8)
    return per_sequence[trained].sum(), trained.sum().to(losses.dtype)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum_parts(losses: torch.Tensor, mask: torch.Tensor):
    trained = mask.sum(-1) > 0
    return (losses * mask).sum(-1)[trained].sum(), trained.sum().to(losses.dtype)


def aggregate(name: str, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scalar loss of one process's batch."""
    from rollfleet.algorithms import AGGREGATIONS

    numerator, denominator = AGGREGATIONS[name](losses, mask)
    return numerator / denominator.clamp_min(1e-8)
