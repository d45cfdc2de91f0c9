"""RAVR's math as pure functions: the utility s(z), the exact identities it rests on (used
by the tests on an enumerable latent space), and the advantages of one batch.

    s(z)            = exp( mean_k log π(y*_k | x, z, cue, y*_<k) )   length-normalised
    log π(y*|x)     = log Σ_z π(z|x) s(z)                               (exact: enumerable z)
    π(z|x, y*)      = π(z|x) s(z) / π(y*|x)                             Bayes
    ELBO(q)         = E_q[log s(z)] − KL(q ‖ π(·|x)) ≤ log π(y*|x), equal at q = π(z|x, y*)

(With length normalisation s(z) is a geometric mean over the answer's tokens; the identities
hold for whatever per-trace utility is plugged in, and the tests check them with the
unnormalised s.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def continuation_logprobs(
    model, rows: list[tuple[list[int], list[int]]], pad_id: int, *, mean: bool = True
) -> torch.Tensor:
    """[rows]: each row's log-probability of its continuation ids after its context ids,
    summed over the continuation's tokens, or averaged (`mean`, the length-normalised
    form). One batched forward at temperature 1, no gradient."""
    sequences = [context + continuation for context, continuation in rows]
    width = max(map(len, sequences))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (context, continuation) in enumerate(rows):
        n = len(context) + len(continuation)
        ids[i, :n] = torch.tensor(context + continuation)
        attention[i, :n] = 1
        target[i, len(context) : n] = True
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1).cpu()
    token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p(ids[t+1] | ids[:t+1])
    token = torch.where(target[:, 1:], token, 0.0)
    total = token.sum(-1)
    return total / target.sum(-1).clamp(min=1) if mean else total


def log_marginal(prior_logp: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """log π(y*|x) = log Σ_z π(z|x) s(z), over an enumerated latent space [z]."""
    return torch.logsumexp(prior_logp + log_s, dim=-1)


def bayes_posterior(prior_logp: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """log π(z|x, y*) = log π(z|x) + log s(z) − log π(y*|x) [z]."""
    return prior_logp + log_s - log_marginal(prior_logp, log_s)


def elbo(q_logp: torch.Tensor, prior_logp: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """E_q[log s(z)] − KL(q ‖ π(·|x)) over an enumerated latent space [z]."""
    q = q_logp.exp()
    return (q * (log_s - (q_logp - prior_logp))).sum(-1)


def ravr_advantages(
    rewards: torch.Tensor,
    utilities: torch.Tensor,
    posterior: torch.Tensor,
    estimate: Callable[[torch.Tensor], torch.Tensor],
    pull_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of a batch of groups [G, n] (rewards: the verifier's; utilities: s(z);
    posterior: which samples saw the answer, the same count in every group).

    Prior samples: the estimator (GRPO) over the group's prior samples' rewards. Posterior
    samples: s(z) − the mean s of the group's prior samples. Returns (advantages [G, n],
    the pull rows' advantages [G, k] = pull_weight · s(z) of the k posterior samples, in
    sample order)."""
    groups, n = rewards.shape
    k = int(posterior[0].sum())
    if not torch.equal(posterior.sum(-1), torch.full((groups,), k)):
        raise ValueError("every group must hold the same number of posterior samples")
    prior = ~posterior
    advantages = torch.zeros(groups, n)
    advantages[prior] = estimate(rewards[prior].view(groups, n - k)).reshape(-1).float()
    baseline = utilities[prior].view(groups, n - k).mean(-1, keepdim=True)
    advantages[posterior] = (utilities - baseline)[posterior]
    pull = pull_weight * utilities[posterior].view(groups, k)
    return advantages, pull
