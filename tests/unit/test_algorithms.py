from __future__ import annotations

import math

import pytest
import torch

from rollfleet.algorithms import ADVANTAGES, POLICY_LOSSES
from rollfleet.algorithms.advantages import grpo
from rollfleet.algorithms.losses import ppo_clip, token_mean

torch.set_num_threads(1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    # torch.testing.assert_close costs ~0.6 s of lazy imports on first use; this is enough here
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual, expected)


def test_registries_hold_the_defaults():
    assert ADVANTAGES["grpo"] is grpo
    assert POLICY_LOSSES["ppo_clip"] is ppo_clip


def test_grpo_matches_hand_computed_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    # row 0: mean 0.5, centered ±0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 1/sqrt(3)
    s0 = 1 / math.sqrt(3) + 1e-6
    # row 1: mean 0.25, centered [-.25, -.25, -.25, .75], unbiased var = 0.75 / 3 = 0.25, std 0.5
    s1 = 0.5 + 1e-6
    expected = torch.tensor(
        [
            [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0],
            [-0.25 / s1, -0.25 / s1, -0.25 / s1, 0.75 / s1],
        ]
    )
    advantages = grpo(rewards)
    assert advantages.shape == (2, 4)
    assert_close(advantages, expected)
    # approximately: 0.866 and 1.5
    assert advantages[0, 0].item() == pytest.approx(0.8660239, abs=1e-5)
    assert advantages[1, 3].item() == pytest.approx(1.4999970, abs=1e-5)


def test_grpo_without_std_normalisation_only_centers():
    rewards = torch.tensor([[2.0, 0.0, 1.0, 1.0]])
    assert_close(grpo(rewards, normalize_std=False), torch.tensor([[1.0, -1.0, 0.0, 0.0]]))


def test_grpo_equal_rewards_get_zero_advantage():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    advantages = grpo(rewards)
    assert torch.equal(advantages[0], torch.zeros(4))
    assert advantages[1].abs().min().item() > 0.8


@pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom:UserWarning")
def test_grpo_group_of_one_is_zero_not_nan():
    advantages = grpo(torch.tensor([[0.7], [0.1]]))
    assert torch.equal(advantages, torch.zeros(2, 1))


def test_token_mean_uses_only_masked_tokens():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert token_mean(values, mask).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert token_mean(values, torch.zeros_like(mask)).item() == 0.0


def _fixed_inputs():
    generator = torch.Generator().manual_seed(0)
    behaviour = -torch.rand(2, 4, generator=generator) - 0.1
    advantages = torch.tensor([[1.5, 1.5, 1.5, 1.5], [-0.5, -0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return behaviour, advantages, mask


def test_ppo_clip_at_ratio_one_is_the_policy_gradient():
    behaviour, advantages, mask = _fixed_inputs()
    logprobs = behaviour.clone().requires_grad_(True)
    loss, metrics = ppo_clip(logprobs, behaviour, advantages, mask, clip_eps=0.2)
    # -mean(A) over the 5 masked tokens: (3 * 1.5 - 2 * 0.5) / 5 = 0.7 -> loss -0.7
    assert loss.item() == pytest.approx(-0.7, abs=1e-6)
    assert loss.item() == pytest.approx(-(advantages * mask).sum().item() / mask.sum().item())
    loss.backward()

    plain = behaviour.clone().requires_grad_(True)
    pg_loss = -token_mean(advantages * plain, mask)
    pg_loss.backward()
    assert_close(logprobs.grad, plain.grad)
    assert_close(logprobs.grad, -advantages * mask / 5)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["ratio_mean"] == pytest.approx(1.0)


def test_ppo_clip_zero_gradient_above_clip_with_positive_advantage():
    behaviour = torch.log(torch.tensor([[0.5]]))
    logprobs = torch.log(torch.tensor([[0.75]])).requires_grad_(True)  # ratio 1.5 > 1.2
    loss, metrics = ppo_clip(
        logprobs, behaviour, torch.tensor([[1.0]]), torch.ones(1, 1), clip_eps=0.2
    )
    assert loss.item() == pytest.approx(-1.2)  # clipped surrogate: -(1 + eps) * A
    loss.backward()
    assert logprobs.grad.item() == 0.0
    assert metrics["clip_fraction"] == 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.5)


def test_ppo_clip_keeps_gradient_above_clip_with_negative_advantage():
    behaviour = torch.log(torch.tensor([[0.5]]))
    logprobs = torch.log(torch.tensor([[0.75]])).requires_grad_(True)  # ratio 1.5
    loss, _ = ppo_clip(logprobs, behaviour, torch.tensor([[-1.0]]), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(1.5)  # the unclipped, more pessimistic term
    loss.backward()
    # d/dlogp of -(ratio * A) = -A * ratio = 1.5
    assert logprobs.grad.item() == pytest.approx(1.5)


def test_ppo_clip_below_clip_is_symmetric():
    behaviour = torch.log(torch.tensor([[0.5, 0.5]]))
    logprobs = torch.log(torch.tensor([[0.25, 0.25]])).requires_grad_(True)  # ratio 0.5 < 0.8
    advantages = torch.tensor([[-1.0, 1.0]])
    loss, metrics = ppo_clip(logprobs, behaviour, advantages, torch.ones(1, 2), clip_eps=0.2)
    # token 0: min(-0.5, -0.8) = -0.8 (clipped, constant); token 1: min(0.5, 0.8) = 0.5
    assert loss.item() == pytest.approx(-(-0.8 + 0.5) / 2)
    loss.backward()
    assert logprobs.grad[0, 0].item() == 0.0
    assert logprobs.grad[0, 1].item() == pytest.approx(-1.0 * 0.5 / 2)
    assert metrics["clip_fraction"] == 1.0


def test_ppo_clip_masked_tokens_do_not_contribute():
    behaviour, advantages, mask = _fixed_inputs()
    base = behaviour + 0.05
    noisy = base.clone()
    noisy[mask == 0] += 5.0  # wildly off-policy, but masked out
    clean_lp = base.clone().requires_grad_(True)
    noisy_lp = noisy.clone().requires_grad_(True)
    clean_loss, clean_metrics = ppo_clip(clean_lp, behaviour, advantages, mask)
    noisy_loss, noisy_metrics = ppo_clip(noisy_lp, behaviour, advantages, mask)
    assert noisy_loss.item() == pytest.approx(clean_loss.item())
    assert noisy_metrics["clip_fraction"] == clean_metrics["clip_fraction"]
    assert noisy_metrics["ratio_mean"] == pytest.approx(clean_metrics["ratio_mean"])
    noisy_loss.backward()
    assert torch.all(noisy_lp.grad[mask == 0] == 0)
    assert torch.all(noisy_lp.grad[mask == 1] != 0)


def test_ppo_clip_clip_fraction_counts_active_tokens_only():
    behaviour = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.0, 1.5, 1.1, 3.0]]))  # ratios 1, 1.5, 1.1, 3
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    _, metrics = ppo_clip(logprobs, behaviour, torch.ones(1, 4), mask, clip_eps=0.2)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["ratio_mean"] == pytest.approx((1.0 + 1.5 + 1.1) / 3)
    # approx_kl = mean(behaviour - logprobs) over active tokens
    assert metrics["approx_kl"] == pytest.approx(-(0 + math.log(1.5) + math.log(1.1)) / 3, rel=1e-5)
