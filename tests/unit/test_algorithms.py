from __future__ import annotations

import math

import pytest
import torch

from rollfleet.algorithms import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES
from rollfleet.algorithms.advantages import dr_grpo, grpo, reinforce_pp, rloo
from rollfleet.algorithms.aggregation import (
    aggregate,
    seq_mean_token_mean_parts,
    seq_mean_token_sum_parts,
    token_mean_parts,
)
from rollfleet.algorithms.losses import (
    LossConfig,
    cispo,
    decoupled_ppo,
    dual_clip_ppo,
    gspo,
    gspo_ratio,
    kimi,
    ppo_clip,
    tis,
    token_mean,
    topr,
    vanilla_pg,
)

torch.set_num_threads(1)

CLIP_02 = LossConfig(clip_low=0.2)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    # torch.testing.assert_close costs ~0.6 s of lazy imports on first use; this is enough here
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual, expected)


def log(values) -> torch.Tensor:
    return torch.log(torch.tensor(values, dtype=torch.float32))


def run_loss(
    fn, logprobs, behaviour, advantages, mask, cfg=CLIP_02, proximal=None, agg="token-mean"
):
    """(scalar loss, d loss / d logprobs, metrics) of `fn` aggregated with `agg`."""
    leaf = logprobs.detach().clone().requires_grad_(True)
    token_losses, metrics = fn(leaf, behaviour, advantages, mask, cfg=cfg, proximal=proximal)
    assert token_losses.shape == logprobs.shape
    loss = aggregate(agg, token_losses, mask)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


# --------------------------------------------------------------------------- registries


def test_registries_hold_every_function():
    assert dict(ADVANTAGES) == {
        "grpo": grpo,
        "dr_grpo": dr_grpo,
        "rloo": rloo,
        "reinforce++": reinforce_pp,
    }
    assert dict(POLICY_LOSSES) == {
        "vanilla_pg": vanilla_pg,
        "ppo_clip": ppo_clip,
        "dual_clip_ppo": dual_clip_ppo,
        "tis": tis,
        "topr": topr,
        "cispo": cispo,
        "decoupled_ppo": decoupled_ppo,
        "gspo": gspo,
        "kimi": kimi,
    }
    assert dict(AGGREGATIONS) == {
        "token-mean": token_mean_parts,
        "seq-mean-token-mean": seq_mean_token_mean_parts,
        "seq-mean-token-sum": seq_mean_token_sum_parts,
    }


# --------------------------------------------------------------------------- advantages


def test_grpo_matches_hand_computed_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    # row 0: mean 0.5, centered ±0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 1/sqrt(3);
    # eps 1e-4 (TRL's) is added to the std
    s0 = 1 / math.sqrt(3) + 1e-4
    # row 1: mean 0.25, centered [-.25, -.25, -.25, .75], unbiased var = 0.75 / 3 = 0.25, std 0.5
    s1 = 0.5 + 1e-4
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
    assert advantages[0, 0].item() == pytest.approx(0.8658755, abs=1e-5)
    assert advantages[1, 3].item() == pytest.approx(1.4997001, abs=1e-5)


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


def test_rloo_uses_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    # row 0, sum 2: r=1 -> 1 - (2-1)/3 = 2/3; r=0 -> 0 - 2/3 = -2/3
    # row 1, sum 2: r=0 -> 0 - 2/3 = -2/3; r=2 -> 2 - 0/3 = 2
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-2 / 3, -2 / 3, -2 / 3, 2.0]])
    assert_close(rloo(rewards), expected)
    # = n/(n-1) times the centered reward
    assert_close(rloo(rewards), dr_grpo(rewards) * 4 / 3)


def test_rloo_group_of_one_is_zero():
    assert torch.equal(rloo(torch.tensor([[0.7], [0.1]])), torch.zeros(2, 1))


def test_dr_grpo_only_centers():
    rewards = torch.tensor([[2.0, 0.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
    # row means 1, 3, 0.25; no division by the std (row 0's std sqrt(2/3) would give ±1.22)
    expected = torch.tensor(
        [[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.25, -0.25, -0.25, 0.75]]
    )
    assert_close(dr_grpo(rewards), expected)
    assert torch.equal(dr_grpo(torch.tensor([[0.7], [0.1]])), torch.zeros(2, 1))


def test_reinforce_pp_centers_per_group_and_scales_by_the_batch_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    # centered per group: row 0 [.5, -.5, -.5, .5] (mean .5), row 1 [-.5, -.5, -.5, 1.5] (mean .5)
    # the 8 centered values have mean 0 and sum of squares 4*.25 + 3*.25 + 2.25 = 4
    # unbiased batch variance 4/7 -> std 2/sqrt(7) ~ 0.756 (per-group stds would be 0.577 and 1)
    std = 2 / math.sqrt(7) + 1e-4
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.5, -0.5, -0.5, 1.5]]) / std
    advantages = reinforce_pp(rewards)
    assert_close(advantages, expected)
    assert advantages[1, 3].item() == pytest.approx(1.5 * math.sqrt(7) / 2, rel=2e-4)  # 1.984
    assert not torch.allclose(advantages, grpo(rewards))  # GRPO scales each group by its own std


def test_reinforce_pp_degenerate_batches_are_zero_not_nan():
    assert torch.equal(reinforce_pp(torch.tensor([[0.7], [0.1]])), torch.zeros(2, 1))
    assert torch.equal(reinforce_pp(torch.tensor([[1.0, 1.0], [0.0, 0.0]])), torch.zeros(2, 2))


# --------------------------------------------------------------------------- aggregations


def test_aggregations_hand_computed_parts():
    losses = torch.tensor([[1.0, 3.0, 100.0], [4.0, 8.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # 100.0 is padding
    # token-mean: (1 + 3 + 4 + 8 + 6) / 5 = 22 / 5
    # seq-mean-token-mean: row means 4/2 = 2 and 18/3 = 6 -> (2 + 6) / 2 sequences
    # seq-mean-token-sum: row sums 4 and 18 -> (4 + 18) / 2 sequences
    expected = {
        "token-mean": (22.0, 5.0),
        "seq-mean-token-mean": (8.0, 2.0),
        "seq-mean-token-sum": (22.0, 2.0),
    }
    for name, (numerator, denominator) in expected.items():
        num, den = AGGREGATIONS[name](losses, mask)
        assert num.item() == pytest.approx(numerator), name
        assert den.item() == pytest.approx(denominator), name
        assert aggregate(name, losses, mask).item() == pytest.approx(numerator / denominator), name


def test_aggregations_skip_sequences_without_trained_tokens():
    losses = torch.tensor([[1.0, 3.0, 100.0], [4.0, 8.0, 6.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    # the third row trains no token: same parts as without it (it is not a third sequence)
    expected = {
        "token-mean": (22.0, 5.0),
        "seq-mean-token-mean": (8.0, 2.0),
        "seq-mean-token-sum": (22.0, 2.0),
    }
    for name, (numerator, denominator) in expected.items():
        num, den = AGGREGATIONS[name](losses, mask)
        assert (num.item(), den.item()) == pytest.approx((numerator, denominator)), name

    # gradients stay finite: seq-mean-token-mean weighs a token 1 / (its row's tokens * rows)
    leaf = losses.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(aggregate("seq-mean-token-mean", leaf, mask), leaf)
    expected_grad = torch.tensor([[1 / 4, 1 / 4, 0.0], [1 / 6, 1 / 6, 1 / 6], [0.0, 0.0, 0.0]])
    assert_close(grad, expected_grad)


def test_aggregations_of_an_empty_batch_are_zero():
    losses = torch.tensor([[1.0, 2.0]], requires_grad=True)
    for name in AGGREGATIONS:
        loss = aggregate(name, losses, torch.zeros(1, 2))
        (grad,) = torch.autograd.grad(loss, losses)
        assert loss.item() == 0.0, name
        assert torch.equal(grad, torch.zeros(1, 2)), name


def test_token_mean_uses_only_masked_tokens():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert token_mean(values, mask).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert token_mean(values, torch.zeros_like(mask)).item() == 0.0


# --------------------------------------------------------------------------- on-policy: every loss


def _fixed_inputs():
    behaviour = torch.tensor([[-0.5, -1.0, -2.0, -0.3], [-0.7, -1.5, -0.2, -0.9]])
    advantages = torch.tensor([[1.5, 1.5, 1.5, 1.5], [-0.5, -0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return behaviour, advantages, mask


# value at ratio 1: -mean(A) for the ratio-based losses, -mean(A·log π) for the log π forms
RATIO_FORM = {"ppo_clip", "dual_clip_ppo", "decoupled_ppo", "gspo"}
LOGPROB_FORM = {"vanilla_pg", "tis", "topr", "cispo", "kimi"}  # kimi's penalty is 0 at ratio 1


def test_every_loss_has_a_value_form_at_ratio_one():
    assert set(POLICY_LOSSES) == RATIO_FORM | LOGPROB_FORM


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_is_the_vanilla_policy_gradient_at_ratio_one(name):
    behaviour, advantages, mask = _fixed_inputs()
    proximal = behaviour if name == "decoupled_ppo" else None
    loss, grad, metrics = run_loss(
        POLICY_LOSSES[name], behaviour, behaviour, advantages, mask, proximal=proximal
    )
    _, vanilla_grad, _ = run_loss(vanilla_pg, behaviour, behaviour, advantages, mask)

    # -A·∇log π / n on the 5 trained tokens, exactly 0 on the 3 masked ones
    expected_grad = torch.tensor([[-0.3, -0.3, -0.3, 0.0], [0.1, 0.1, 0.0, 0.0]])
    assert_close(vanilla_grad, expected_grad)
    assert_close(grad, expected_grad)
    assert torch.all(grad[mask == 0] == 0)

    if name in RATIO_FORM:
        # -mean(A) over the 5 trained tokens: -(3 * 1.5 - 2 * 0.5) / 5 = -0.7
        assert loss.item() == pytest.approx(-0.7, abs=1e-6)
    else:
        # -mean(A·log π): row 0: -1.5 * (-0.5 - 1 - 2) = 5.25; row 1: 0.5 * (-0.7 - 1.5) = -1.1
        # (5.25 - 1.1) / 5 = 0.83
        assert loss.item() == pytest.approx(0.83, abs=1e-6)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["ratio_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_a_loss_marked_zero_at_zero_advantage_gives_such_tokens_no_loss_and_no_gradient(name):
    """The mark lets the trainer leave groups with all-zero advantages out of the forward
    (trainer.skipZeroAdvantage): it must hold wherever ratios are far from 1."""
    generator = torch.Generator().manual_seed(0)
    behaviour = -torch.rand(3, 5, generator=generator) * 3
    logprobs = (behaviour + torch.randn(3, 5, generator=generator)).requires_grad_()
    advantages = torch.zeros(3, 5)
    mask = torch.ones(3, 5)
    proximal = behaviour + 0.3 if name == "decoupled_ppo" else None
    loss, _ = POLICY_LOSSES[name](
        logprobs, behaviour, advantages, mask, LossConfig(), proximal=proximal
    )
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    vanishes = bool(torch.all(loss == 0) and torch.all(grad == 0))
    assert getattr(POLICY_LOSSES[name], "zero_at_zero_advantage", False) == vanishes
    assert vanishes == (name != "kimi")  # kimi's squared log-ratio penalty remains


# --------------------------------------------------------------------------- PPO


def test_ppo_clip_zero_gradient_above_clip_with_positive_advantage():
    behaviour = log([[0.5]])
    logprobs = log([[0.75]])  # ratio 1.5 > 1.2
    loss, grad, metrics = run_loss(
        ppo_clip, logprobs, behaviour, torch.tensor([[1.0]]), torch.ones(1, 1)
    )
    assert loss.item() == pytest.approx(-1.2)  # clipped surrogate: -(1 + eps) * A
    assert grad.item() == 0.0
    assert metrics["clip_fraction"] == 1.0  # the clipped branch is the active one
    assert metrics["ratio_mean"] == pytest.approx(1.5)


def test_ppo_clip_keeps_gradient_above_clip_with_negative_advantage():
    behaviour = log([[0.5]])
    logprobs = log([[0.75]])  # ratio 1.5, outside the range
    loss, grad, metrics = run_loss(
        ppo_clip, logprobs, behaviour, torch.tensor([[-1.0]]), torch.ones(1, 1)
    )
    assert loss.item() == pytest.approx(1.5)  # the unclipped, more pessimistic term
    # d/dlogp of -(ratio * A) = -A * ratio = 1.5
    assert grad.item() == pytest.approx(1.5)
    # outside [0.8, 1.2], but the clip did not change the loss: not counted
    assert metrics["clip_fraction"] == 0.0


def test_ppo_clip_below_clip_is_symmetric():
    behaviour = log([[0.5, 0.5]])
    logprobs = log([[0.25, 0.25]])  # ratio 0.5 < 0.8
    advantages = torch.tensor([[-1.0, 1.0]])
    loss, grad, metrics = run_loss(ppo_clip, logprobs, behaviour, advantages, torch.ones(1, 2))
    # token 0: min(-0.5, -0.8) = -0.8 (clipped, constant); token 1: min(0.5, 0.8) = 0.5
    assert loss.item() == pytest.approx(-(-0.8 + 0.5) / 2)
    assert grad[0, 0].item() == 0.0
    assert grad[0, 1].item() == pytest.approx(-1.0 * 0.5 / 2)
    # both ratios are outside the range, only token 0's loss is the clipped one
    assert metrics["clip_fraction"] == 0.5


def test_ppo_clip_masked_tokens_do_not_contribute():
    behaviour, advantages, mask = _fixed_inputs()
    base = behaviour + 0.05
    noisy = base.clone()
    noisy[mask == 0] += 5.0  # wildly off-policy, but masked out
    clean_loss, _, clean_metrics = run_loss(ppo_clip, base, behaviour, advantages, mask)
    noisy_loss, noisy_grad, noisy_metrics = run_loss(ppo_clip, noisy, behaviour, advantages, mask)
    assert noisy_loss.item() == pytest.approx(clean_loss.item())
    assert noisy_metrics["clip_fraction"] == clean_metrics["clip_fraction"]
    assert noisy_metrics["ratio_mean"] == pytest.approx(clean_metrics["ratio_mean"])
    assert torch.all(noisy_grad[mask == 0] == 0)
    assert torch.all(noisy_grad[mask == 1] != 0)


def test_ppo_clip_clip_fraction_counts_trained_tokens_only():
    behaviour = torch.zeros(1, 4)
    logprobs = log([[1.0, 1.5, 1.1, 3.0]])  # ratios 1, 1.5, 1.1, 3
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    _, _, metrics = run_loss(ppo_clip, logprobs, behaviour, torch.ones(1, 4), mask)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)  # the ratio 3 token is masked
    assert metrics["ratio_mean"] == pytest.approx((1.0 + 1.5 + 1.1) / 3)
    # approx_kl = mean(behaviour - logprobs) over trained tokens
    assert metrics["approx_kl"] == pytest.approx(-(0 + math.log(1.5) + math.log(1.1)) / 3, rel=1e-5)


def test_ppo_clip_asymmetric_clip_high():
    behaviour = torch.zeros(1, 2)
    logprobs = log([[1.25, 1.3]])  # ratios 1.25 and 1.3, A = 1
    cfg = LossConfig(clip_low=0.2, clip_high=0.28)  # range [0.8, 1.28]
    loss, grad, metrics = run_loss(
        ppo_clip, logprobs, behaviour, torch.ones(1, 2), torch.ones(1, 2), cfg=cfg
    )
    # token 0 inside: loss -1.25, grad -1.25 / 2; token 1 clipped at 1.28: loss -1.28, grad 0
    assert loss.item() == pytest.approx(-(1.25 + 1.28) / 2, rel=1e-6)
    assert_close(grad, torch.tensor([[-0.625, 0.0]]))
    assert metrics["clip_fraction"] == 0.5


# --------------------------------------------------------------------------- CISPO


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    behaviour = log([[0.5, 0.5]])
    logprobs = log([[0.75, 0.5]])  # ratios 1.5 (outside [0.8, 1.2]) and 1
    advantages = torch.ones(1, 2)
    mask = torch.ones(1, 2)
    loss, grad, metrics = run_loss(cispo, logprobs, behaviour, advantages, mask)
    _, ppo_grad, _ = run_loss(ppo_clip, logprobs, behaviour, advantages, mask)
    # token 0: weight clip(1.5) = 1.2 held fixed: grad -1.2 * A / n = -0.6 (PPO: 0)
    # token 1: weight 1: grad -1 / 2
    assert_close(grad, torch.tensor([[-0.6, -0.5]]))
    assert_close(ppo_grad, torch.tensor([[0.0, -0.5]]))
    # value -(1.2 log 0.75 + log 0.5) / 2
    assert loss.item() == pytest.approx(-(1.2 * math.log(0.75) + math.log(0.5)) / 2, rel=1e-6)
    assert metrics["clip_fraction"] == 0.5


# --------------------------------------------------------------------------- TOPR


def test_topr_positive_advantages_are_the_sft_loss_whatever_the_ratio():
    behaviour = log([[0.4, 0.2]])
    logprobs = log([[0.2, 0.6]])  # ratios 0.5 and 3
    advantages = torch.ones(1, 2)
    mask = torch.ones(1, 2)
    loss, grad, metrics = run_loss(topr, logprobs, behaviour, advantages, mask)

    nll_leaf = logprobs.clone().requires_grad_(True)
    nll = aggregate("token-mean", -nll_leaf, mask)  # -mean(log π)
    (nll_grad,) = torch.autograd.grad(nll, nll_leaf)
    # -(log 0.2 + log 0.6) / 2 = (1.6094 + 0.5108) / 2 = 1.0601; grad -1/2 on both tokens
    assert loss.item() == pytest.approx(nll.item(), rel=1e-6)
    assert loss.item() == pytest.approx(-(math.log(0.2) + math.log(0.6)) / 2, rel=1e-6)
    assert_close(grad, nll_grad)
    assert_close(grad, torch.tensor([[-0.5, -0.5]]))
    assert metrics["clip_fraction"] == 0.0


def test_topr_negative_advantages_are_weighted_by_the_ratio_clipped_to_one():
    behaviour = log([[0.3, 0.4]])
    logprobs = log([[0.6, 0.2]])  # ratios 2 and 0.5
    advantages = -torch.ones(1, 2)
    loss, grad, metrics = run_loss(topr, logprobs, behaviour, advantages, torch.ones(1, 2))
    # weights clip(2, 0, 1) = 1 and clip(0.5, 0, 1) = 0.5, held fixed
    # per-token loss -w·A·log π = w·log π; grad -w·A / n = [1/2, 0.5/2]
    assert_close(grad, torch.tensor([[0.5, 0.25]]))
    assert loss.item() == pytest.approx((math.log(0.6) + 0.5 * math.log(0.2)) / 2, rel=1e-6)
    assert metrics["clip_fraction"] == 0.5  # only the ratio 2 token's weight was cut


# --------------------------------------------------------------------------- decoupled PPO


def _off_policy_row():
    behaviour = log([[0.5, 0.5, 0.5, 0.5]])
    logprobs = log([[0.25, 0.55, 0.8, 0.25]])  # ratios 0.5, 1.1, 1.6, 0.5
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    return logprobs, behaviour, advantages, torch.ones(1, 4)


def test_decoupled_ppo_with_proximal_equal_to_behaviour_is_ppo():
    logprobs, behaviour, advantages, mask = _off_policy_row()
    loss, grad, metrics = run_loss(
        decoupled_ppo, logprobs, behaviour, advantages, mask, proximal=behaviour
    )
    ppo_loss, ppo_grad, ppo_metrics = run_loss(ppo_clip, logprobs, behaviour, advantages, mask)
    # r=0.5 A=+1: min(0.5, 0.8) = 0.5 -> loss -0.5, grad -A·r = -0.5
    # r=1.1 A=-1: min(-1.1, -1.1) -> loss 1.1, grad 1.1
    # r=1.6 A=+1: min(1.6, 1.2) = 1.2 clipped -> loss -1.2, grad 0
    # r=0.5 A=-1: min(-0.5, -0.8) = -0.8 clipped -> loss 0.8, grad 0
    # mean loss (-0.5 + 1.1 - 1.2 + 0.8) / 4 = 0.05; grads / 4
    assert ppo_loss.item() == pytest.approx(0.05, abs=1e-6)
    assert_close(ppo_grad, torch.tensor([[-0.125, 0.275, 0.0, 0.0]]))
    assert loss.item() == pytest.approx(ppo_loss.item(), abs=1e-7)
    assert_close(grad, ppo_grad)
    assert metrics == pytest.approx(ppo_metrics)
    assert metrics["clip_fraction"] == 0.5


def test_decoupled_ppo_weights_the_proximal_ppo_loss_by_prox_over_behaviour():
    behaviour = log([[0.4, 0.5]])
    proximal = log([[0.5, 0.25]])  # π_prox/μ = 1.25 and 0.5
    logprobs = log([[0.75, 0.225]])  # π/π_prox = 1.5 and 0.9 (π/μ = 1.875 and 0.45)
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, grad, metrics = run_loss(
        decoupled_ppo, logprobs, behaviour, advantages, mask, proximal=proximal
    )
    # token 0: PPO vs prox r=1.5 A=+1 -> -1.2 (clipped, grad 0); x1.25 -> -1.5
    # token 1: PPO vs prox r=0.9 A=-1 -> 0.9 (grad 0.9);           x0.5  -> 0.45 (grad 0.45)
    # mean (-1.5 + 0.45) / 2 = -0.525; grad [0, 0.45 / 2]
    assert loss.item() == pytest.approx(-0.525, abs=1e-6)
    assert_close(grad, torch.tensor([[0.0, 0.225]]))
    assert metrics["clip_fraction"] == 0.5

    # = (π_prox/μ) · PPO(π, π_prox), per token
    leaf = logprobs.clone().requires_grad_(True)
    ppo_vs_prox, _ = ppo_clip(leaf, proximal, advantages, mask, cfg=CLIP_02)
    weighted = aggregate("token-mean", torch.exp(proximal - behaviour) * ppo_vs_prox, mask)
    (weighted_grad,) = torch.autograd.grad(weighted, leaf)
    assert loss.item() == pytest.approx(weighted.item(), abs=1e-7)
    assert_close(grad, weighted_grad)

    # and it is not PPO against the behaviour policy: token 1 (π/μ = 0.45, A<0) would be clipped
    ppo_loss, ppo_grad, _ = run_loss(ppo_clip, logprobs, behaviour, advantages, mask)
    assert ppo_loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert_close(ppo_grad, torch.zeros(1, 2))


def test_decoupled_ppo_needs_the_proximal_logprobs():
    behaviour, advantages, mask = _fixed_inputs()
    with pytest.raises(ValueError, match="proximal"):
        decoupled_ppo(behaviour, behaviour, advantages, mask)


# --------------------------------------------------------------------------- GSPO


def test_gspo_ratio_is_the_length_normalised_sequence_ratio():
    behaviour = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -4.0]])
    # log π - log μ: sequence 0 [0.1, 0.2, 0.3]; sequence 1 [0.4, -0.2, (5.0 padding)]
    logprobs = behaviour + torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # sequence 0: exp((0.1 + 0.2 + 0.3) / 3) = exp(0.2); sequence 1: exp((0.4 - 0.2) / 2) = exp(0.1)
    expected = torch.tensor([[math.exp(0.2)], [math.exp(0.1)]])
    assert_close(gspo_ratio(logprobs, behaviour, mask), expected, tol=1e-5)


def test_gspo_clips_whole_sequences():
    behaviour = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -4.0]])
    # sequence 0: log-ratios [0.1, 0.3, 0.5], s = exp(0.3) = 1.35 > 1.2 (its token 0 alone: 1.105)
    # sequence 1: log-ratios [0.4, -0.2, (padding)], s = exp(0.1) = 1.105 inside [0.8, 1.2]
    logprobs = behaviour + torch.tensor([[0.1, 0.3, 0.5], [0.4, -0.2, 5.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, grad, metrics = run_loss(gspo, logprobs, behaviour, advantages, mask)
    s1 = math.exp(0.1)
    # sequence 0: clipped at 1.2 with A>0 -> every token -1.2, gradient 0 on all of them
    # sequence 1: -A·s per token; d/dlog π_t of s·π_t/sg(π_t) is s -> grad -A·s / 5
    assert loss.item() == pytest.approx((3 * -1.2 + 2 * -2.0 * s1) / 5, rel=1e-5)
    expected_grad = torch.tensor([[0.0, 0.0, 0.0], [-2.0 * s1 / 5, -2.0 * s1 / 5, 0.0]])
    assert_close(grad, expected_grad, tol=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(3 / 5)

    # token-level PPO would still train sequence 0's token 0 (its own ratio 1.105 is inside)
    _, ppo_grad, _ = run_loss(ppo_clip, logprobs, behaviour, advantages, mask)
    assert ppo_grad[0, 0].item() == pytest.approx(-math.exp(0.1) / 5, rel=1e-5)


def test_gspo_clip_fraction_counts_only_active_clips():
    behaviour = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), -0.5)  # s = exp(-0.5) = 0.61 < 0.8 with A = +1
    _, grad, metrics = run_loss(gspo, logprobs, behaviour, torch.ones(1, 2), torch.ones(1, 2))
    # min(0.61, 0.8) = 0.61: the unclipped branch is active and the tokens keep their gradient
    assert_close(grad, torch.full((1, 2), -math.exp(-0.5) / 2))
    assert metrics["clip_fraction"] == 0.0


# --------------------------------------------------------------------------- dual-clip PPO


def test_dual_clip_bounds_negative_advantage_tokens():
    behaviour = log([[0.1, 0.25]])
    logprobs = log([[0.5, 0.5]])  # ratios 5 and 2
    advantages = -torch.ones(1, 2)
    mask = torch.ones(1, 2)
    cfg = LossConfig(clip_low=0.2, dual_clip=3.0)
    loss, grad, metrics = run_loss(dual_clip_ppo, logprobs, behaviour, advantages, mask, cfg=cfg)
    ppo_loss, ppo_grad, ppo_metrics = run_loss(ppo_clip, logprobs, behaviour, advantages, mask)
    # PPO: token 0 min(-5, -1.2) = -5 -> loss 5, grad -A·r = 5; token 1 -> loss 2, grad 2
    assert ppo_loss.item() == pytest.approx((5 + 2) / 2, rel=1e-6)
    assert_close(ppo_grad, torch.tensor([[2.5, 1.0]]), tol=1e-5)
    # dual clip: token 0 -> min(5, -c·A = 3) = 3, constant; token 1: 2 < 3 unchanged
    assert loss.item() == pytest.approx((3 + 2) / 2, rel=1e-6)
    assert_close(grad, torch.tensor([[0.0, 1.0]]), tol=1e-5)
    assert metrics["clip_fraction"] == 0.5
    assert ppo_metrics["clip_fraction"] == 0.0


def test_dual_clip_leaves_positive_advantages_to_ppo():
    behaviour = log([[0.1, 0.5]])
    logprobs = log([[0.5, 0.5]])  # ratios 5 and 1, A = +1
    args = (logprobs, behaviour, torch.ones(1, 2), torch.ones(1, 2))
    loss, grad, _ = run_loss(dual_clip_ppo, *args)
    ppo_loss, ppo_grad, _ = run_loss(ppo_clip, *args)
    assert loss.item() == pytest.approx(ppo_loss.item())
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2, rel=1e-6)
    assert_close(grad, ppo_grad)


# --------------------------------------------------------------------------- TIS


def test_tis_truncates_and_does_not_differentiate_the_weight():
    behaviour = log([[0.2, 0.4]])
    logprobs = log([[0.6, 0.2]])  # ratios 3 and 0.5
    advantages = torch.tensor([[1.0, -1.0]])
    cfg = LossConfig(is_cap=2.0)
    loss, grad, metrics = run_loss(tis, logprobs, behaviour, advantages, torch.ones(1, 2), cfg=cfg)
    # token 0: weight min(3, 2) = 2 -> grad -2·A / n = -1
    # token 1: weight 0.5 held fixed -> grad -0.5·A / n = 0.25
    #   (a differentiated weight would add -A·w·log π / n = 0.5·log 0.2 / 2 = -0.40)
    assert_close(grad, torch.tensor([[-1.0, 0.25]]), tol=1e-5)
    assert loss.item() == pytest.approx((-2 * math.log(0.6) + 0.5 * math.log(0.2)) / 2, rel=1e-5)
    assert metrics["clip_fraction"] == 0.5


# --------------------------------------------------------------------------- Kimi


def test_kimi_adds_the_squared_log_ratio():
    behaviour = torch.tensor([[-1.0, -1.0]])
    logprobs = torch.tensor([[-0.5, 3.0]])  # ratio e^0.5; token 1 is masked
    advantages = torch.ones(1, 2)
    mask = torch.tensor([[1.0, 0.0]])
    cfg = LossConfig(kl_coef=0.4)  # τ
    leaf = logprobs.clone().requires_grad_(True)
    token_losses, _ = kimi(leaf, behaviour, advantages, mask, cfg=cfg)
    # -A·log π + τ/2·0.5² = 0.5 + 0.2·0.25 = 0.55
    assert token_losses[0, 0].item() == pytest.approx(0.55, rel=1e-6)
    (grad,) = torch.autograd.grad(aggregate("token-mean", token_losses, mask), leaf)
    # -A + τ·0.5 = -1 + 0.2 = -0.8 (n = 1); the masked token gets none
    assert_close(grad, torch.tensor([[-0.8, 0.0]]))

    default_loss, default_grad, _ = run_loss(kimi, logprobs, behaviour, advantages, mask)
    # τ = 0.1 by default: 0.5 + 0.05·0.25 = 0.5125, grad -1 + 0.05 = -0.95
    assert default_loss.item() == pytest.approx(0.5125, rel=1e-6)
    assert_close(default_grad, torch.tensor([[-0.95, 0.0]]))
