"""Advantage estimators over groups of samples that share a prompt.

Each takes `rewards` of shape [groups, samples_per_group] and returns advantages of the
same shape; the trainer broadcasts a sample's advantage over its response tokens.
"""

from __future__ import annotations

import torch

from rollfleet.algorithms import register_advantage


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True) -> torch.Tensor:
    """GRPO: reward minus the group mean, divided by the group std (Shao et al., 2024)."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not normalize_std or rewards.shape[-1] < 2:  # a group of one has no spread to scale by
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True, unbiased=True).nan_to_num(0.0) + eps)
