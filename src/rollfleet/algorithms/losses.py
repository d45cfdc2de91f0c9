"""Policy losses: per-token losses from the current, behaviour (and proximal) log-probs.

Shapes: `logprobs`, `behaviour_logprobs`, `advantages`, `mask` are [batch, tokens]; mask is
1 on tokens the loss trains (response tokens the model produced) and 0 elsewhere;
per-token credit (advantage weights) is already in `advantages`. Every loss returns
(per-token loss [batch, tokens], metrics); an aggregation (aggregation.py) turns the
per-token losses into the scalar the trainer differentiates. A loss that reads the
proximal policy (`uses_proximal`) gets the log-probs of the trainer's weights before
this batch's first update. A loss marked `zero_at_zero_advantage` gives a token whose
advantage is 0 a loss of exactly 0 and no gradient, so the trainer may leave such rows
out of the forward and backward (`trainer.skipZeroAdvantage`).

With fresh samples (current policy = behaviour policy, ratio 1) every loss here has the
gradient of the vanilla policy gradient, -A·∇log π; they differ in how they treat
off-policy tokens (samples generated α versions ago):

| name | off-policy treatment |
|---|---|
| vanilla_pg | none: REINFORCE with the advantage |
| ppo_clip | clipped ratio π/μ (Schulman et al., 2017) |
| dual_clip_ppo | PPO plus a lower bound c·A on negative-advantage tokens (Ye et al., 2020) |
| tis | truncated importance weight min(π/μ, C), not differentiated (Yao et al., 2025) |
| topr | positive advantages as SFT, negative ones weighted by clip(π/μ, 0, 1) (Le Roux et al., 2025) |
| cispo | clipped importance weight, not differentiated: clipped tokens keep their gradient (MiniMax-M1, 2025) |
| decoupled_ppo | PPO clip against a proximal policy, weighted by π_prox/μ (Hilton et al., 2022) |
| gspo | one length-normalised ratio per sequence, clipped (Zheng et al., 2025) |
| kimi | policy gradient plus (τ/2)(log π − log μ)² (Kimi k1.5, 2025) |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollfleet.algorithms import register_policy_loss


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters the losses read (from `spec.algorithm`)."""

    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float | None = None  # None: the same as clip_low
    dual_clip: float = 3.0  # dual-clip PPO's c (> 1)
    is_cap: float = 2.0  # TIS: importance weights truncated at this value
    kl_coef: float = 0.1  # Kimi's τ for the squared log-ratio

    @property
    def high(self) -> float:
        return self.clip_low if self.clip_high is None else self.clip_high


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all unmasked tokens of the batch (mask may be fractional weights)."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _metrics(logprobs, behaviour, mask, clipped: torch.Tensor | None = None) -> dict[str, float]:
    with torch.no_grad():
        active = mask > 0
        ratio = torch.exp(logprobs - behaviour)
        return {
            "clip_fraction": float(clipped[active].float().mean().nan_to_num(0.0))
            if clipped is not None
            else 0.0,
            "approx_kl": float(token_mean(behaviour - logprobs, mask)),
            "ratio_mean": float(ratio[active].mean().nan_to_num(1.0)),
        }


def _clipped_surrogate(ratio, advantages, cfg: LossConfig):
    """PPO's per-token loss and where the clip is active."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).detach()


@register_policy_loss("vanilla_pg")
def vanilla_pg(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """REINFORCE with the advantage as the return: -A·log π, no correction for staleness."""
    return -advantages * logprobs, _metrics(logprobs, behaviour_logprobs, mask)


@register_policy_loss("ppo_clip")
def ppo_clip(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """PPO's clipped surrogate with the behaviour policy as the old one."""
    ratio = torch.exp(logprobs - behaviour_logprobs)
    loss, clipped = _clipped_surrogate(ratio, advantages, cfg)
    return loss, _metrics(logprobs, behaviour_logprobs, mask, clipped)


@register_policy_loss("dual_clip_ppo")
def dual_clip_ppo(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """PPO whose loss on negative-advantage tokens is at most -c·A: a huge ratio on a bad
    token can no longer dominate the batch."""
    ratio = torch.exp(logprobs - behaviour_logprobs)
    loss, clipped = _clipped_surrogate(ratio, advantages, cfg)
    bound = -cfg.dual_clip * advantages
    dual = (advantages < 0) & (loss > bound)
    loss = torch.where(dual, torch.minimum(loss, bound), loss)
    return loss, _metrics(logprobs, behaviour_logprobs, mask, clipped | dual)


@register_policy_loss("tis")
def tis(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """Policy gradient weighted by the truncated importance weight min(π/μ, C), held fixed."""
    ratio = torch.exp(logprobs - behaviour_logprobs).detach()
    weight = ratio.clamp(max=cfg.is_cap)
    return -weight * advantages * logprobs, _metrics(
        logprobs, behaviour_logprobs, mask, ratio > cfg.is_cap
    )


@register_policy_loss("topr")
def topr(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """Tapered off-policy REINFORCE: tokens with A >= 0 get -A·log π (SFT scaled by A,
    no importance weight); tokens with A < 0 get the weight clip(π/μ, 0, 1), held fixed."""
    ratio = torch.exp(logprobs - behaviour_logprobs).detach()
    weight = torch.where(advantages >= 0, torch.ones_like(ratio), ratio.clamp(0.0, 1.0))
    return -weight * advantages * logprobs, _metrics(
        logprobs, behaviour_logprobs, mask, (advantages < 0) & (ratio > 1)
    )


@register_policy_loss("cispo")
def cispo(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """CISPO: the importance weight is clipped and held fixed, so unlike PPO a clipped
    token still contributes its gradient -w·A·∇log π."""
    ratio = torch.exp(logprobs - behaviour_logprobs).detach()
    weight = ratio.clamp(1 - cfg.clip_low, 1 + cfg.high)
    return -weight * advantages * logprobs, _metrics(
        logprobs, behaviour_logprobs, mask, weight != ratio
    )


@register_policy_loss("decoupled_ppo")
def decoupled_ppo(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """Decoupled PPO: trust region around the proximal policy π_prox (the trainer's weights
    before this batch's first update), off-policy correction by the fixed weight π_prox/μ.
    With π_prox = μ it is PPO."""
    if proximal is None:
        raise ValueError("decoupled_ppo needs the proximal log-probs (the trainer computes them)")
    ratio = torch.exp(logprobs - proximal)
    loss, clipped = _clipped_surrogate(ratio, advantages, cfg)
    behaviour_weight = torch.exp(proximal - behaviour_logprobs).detach()
    return behaviour_weight * loss, _metrics(logprobs, behaviour_logprobs, mask, clipped)


decoupled_ppo.uses_proximal = True


def gspo_ratio(logprobs, behaviour_logprobs, mask) -> torch.Tensor:
    """Per sequence, exp of the mean over its tokens of log π − log μ: [batch, 1]."""
    tokens = mask.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.exp(((logprobs - behaviour_logprobs) * mask).sum(-1, keepdim=True) / tokens)


@register_policy_loss("gspo")
def gspo(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """GSPO: one clipped ratio per sequence (its length-normalised likelihood ratio); the
    per-token form sg(s)·π_t/sg(π_t) spreads its gradient over the sequence's tokens."""
    sequence = gspo_ratio(logprobs, behaviour_logprobs, mask)
    ratio = sequence.detach() * torch.exp(logprobs - logprobs.detach())
    loss, clipped = _clipped_surrogate(ratio, advantages, cfg)
    return loss, _metrics(logprobs, behaviour_logprobs, mask, clipped)


@register_policy_loss("kimi")
def kimi(logprobs, behaviour_logprobs, advantages, mask, cfg=LossConfig(), proximal=None):
    """Kimi k1.5's policy mirror descent: -A·log π + (τ/2)(log π − log μ)², a squared
    penalty that keeps the policy near the one that sampled."""
    penalty = 0.5 * cfg.kl_coef * (logprobs - behaviour_logprobs) ** 2
    return -advantages * logprobs + penalty, _metrics(logprobs, behaviour_logprobs, mask)


# Every loss above but Kimi's (its squared penalty does not vanish with the advantage).
for _loss in (vanilla_pg, ppo_clip, dual_clip_ppo, tis, topr, cispo, decoupled_ppo, gspo):
    _loss.zero_at_zero_advantage = True
