"""Policy losses: per-token log-probs under the current policy against the behaviour policy.

Shapes: `logprobs`, `behaviour_logprobs`, `advantages`, `mask` are [batch, tokens]; mask is
1 on tokens the loss trains (response tokens the model produced) and 0 elsewhere, and may
carry per-token weights (credit assignment). Every loss returns (loss, metrics dict).
"""

from __future__ import annotations

import torch

from rollfleet.algorithms import register_policy_loss


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all unmasked tokens of the batch (mask may be fractional weights)."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@register_policy_loss("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al., 2017) with the behaviour policy as the old one.

    With one gradient step per batch of fresh samples the ratio is 1 and this is the plain
    policy gradient; with stale samples (α > 0) the clip bounds the off-policy update.
    """
    ratio = torch.exp(logprobs - behaviour_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = token_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        active = mask > 0
        clip_fraction = ((ratio - 1).abs() > clip_eps)[active].float().mean().nan_to_num(0.0)
        approx_kl = token_mean(behaviour_logprobs - logprobs, mask)
    return loss, {
        "clip_fraction": float(clip_fraction),
        "approx_kl": float(approx_kl),
        "ratio_mean": float(ratio.detach()[active].mean().nan_to_num(1.0)),
    }
