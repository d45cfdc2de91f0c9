"""The math of attention-based credit assignment (arXiv 2510.13554), as pure functions.

Attention maps are [rows, positions, positions] (query t, key s), averaged over a group of
heads; `valid` [rows, positions] marks the response tokens the loss trains. Everything
here runs under no_grad: the weights γ it returns multiply advantages and carry no
gradient.

    spans = head_spans(attn, valid)                          # per head: mean look-back distance
    local, global_ = split_heads(spans, share=0.3)
    waad = windowed_attention_distance(attn_local, window=10)  # per query token t
    fai = future_attention_influence(attn_global, valid, near=10, far=100)  # per key token s
    gamma = credit_weights("coupled", waad, fai, valid, quantile=0.4, amplification=1.5, ...)
"""

from __future__ import annotations

import torch


def layer_indices(layers: int, count: int) -> list[int]:
    """`count` layer indices evenly spaced in [⌊L/3⌋, ⌊2L/3⌋] (fewer when L is small)."""
    low, high = layers // 3, (2 * layers) // 3
    if count == 1 or low == high:
        return [low]
    picks = torch.linspace(low, high, count).round().long().tolist()
    return sorted(set(picks))


def _distances(positions: int, device=None) -> torch.Tensor:
    """[t, s] = t − s (negative above the diagonal, where causal attention is 0)."""
    index = torch.arange(positions, device=device)
    return (index[:, None] - index[None, :]).float()


def head_spans(attn: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each head's look-back span d(h): its mean attention distance Σ_s A[t, s]·(t − s),
    averaged over the batch's response tokens t. attn: [rows, heads, T, T] -> [heads]."""
    distance = (attn * _distances(attn.shape[-1], attn.device).clamp_min(0)).sum(-1)  # [B, H, T]
    weight = valid[:, None, :].float()
    return (distance * weight).sum((0, 2)) / weight.sum((0, 2)).clamp_min(1.0)


def split_heads(spans: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the local heads (the `share` with the shortest spans) and the global
    heads (the `share` with the longest); at least one head each."""
    count = max(1, round(share * spans.numel()))
    order = spans.argsort()
    return order[:count], order[-count:]


def windowed_attention_distance(attn: torch.Tensor, window: int) -> torch.Tensor:
    """WAAD_t = Σ_{s ≤ t} A[t, s] · min(t − s, W): how far back token t looks, each
    distance capped at the window W. attn: [rows, T, T] -> [rows, T]."""
    capped = _distances(attn.shape[-1], attn.device).clamp(0, window)
    return (attn * capped).sum(-1)


def future_attention_influence(
    attn: torch.Tensor, valid: torch.Tensor, near: int, far: int
) -> torch.Tensor:
    """FAI_s = mean of A[t, s] over the response tokens t with s + near ≤ t ≤ s + far: how
    much later tokens keep attending to token s. 0 where no such t exists (s too close to
    the end). attn: [rows, T, T], valid: [rows, T] -> [rows, T]."""
    distance = _distances(attn.shape[-1], attn.device)
    in_horizon = (distance >= near) & (distance <= far)  # [t, s]
    queries = in_horizon[None] & valid[:, :, None].bool()  # [rows, t, s]
    total = (attn * queries).sum(1)
    count = queries.sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def waad_change(waad: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Δ_t = |WAAD_t − WAAD_{t+1}| between consecutive response tokens; 0 at a response's
    last token (no successor)."""
    nxt = torch.nn.functional.pad(waad[:, 1:], (0, 1))
    both = valid.bool() & torch.nn.functional.pad(valid[:, 1:], (0, 1)).bool()
    return torch.where(both, (waad - nxt).abs(), torch.zeros_like(waad))


def top_share(scores: torch.Tensor, valid: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per row, the ⌈q · n⌉ highest-scoring of its n valid tokens (ties by position)."""
    picked = torch.zeros_like(valid, dtype=torch.bool)
    for row in range(scores.shape[0]):
        where = valid[row].bool().nonzero().flatten()
        if where.numel() == 0:
            continue
        k = min(where.numel(), max(1, int(torch.tensor(quantile * where.numel()).ceil())))
        best = scores[row, where].topk(k).indices
        picked[row, where[best]] = True
    return picked


def credit_weights(
    strategy: str,
    waad: torch.Tensor,
    fai: torch.Tensor,
    valid: torch.Tensor,
    *,
    quantile: float = 0.4,
    amplification: float = 1.5,
    coupling: float = 0.5,
    lookback: int = 3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """γ [rows, T]: 1 everywhere but on the tokens the strategy selects.

    - local_chunk: γ_amp on pre-plan tokens, the top q of Δ_t (where the local pattern
      changes sharply);
    - global_anchor: γ_amp on anchors, the top q of FAI;
    - coupled: anchors get γ_amp, except an anchor dominated by a pre-plan token just before
      it (WAAD_t at most the row's median: it looks locally; and a pre-plan token among
      the `lookback` tokens before it), which keeps a share 1 − α of its extra credit and
      hands α of it to that pre-plan token, the largest Δ in its look-back window:
      γ = 1 + (γ_amp − 1)·[anchor not dominated] + (1 − α)(γ_amp − 1)·[dominated]
            + α(γ_amp − 1)·[introduces a dominated anchor];
    - random: as many tokens as global_anchor selects, at random positions (the control).
    """
    extra = amplification - 1.0
    gamma = torch.ones_like(waad)
    valid = valid.bool()
    if strategy == "random":
        noise = torch.rand(waad.shape, generator=generator, device=waad.device)
        return gamma + extra * top_share(noise, valid, quantile)
    change = waad_change(waad, valid)
    preplan = top_share(change, valid, quantile)
    if strategy == "local_chunk":
        return gamma + extra * preplan
    anchors = top_share(fai, valid, quantile)
    if strategy == "global_anchor":
        return gamma + extra * anchors
    if strategy != "coupled":
        raise ValueError(f"unknown attention-credit strategy {strategy!r}")
    masked = waad.masked_fill(~valid, float("nan"))
    median = masked.nanmedian(dim=-1, keepdim=True).values
    for row, t in anchors.nonzero().tolist():
        window = range(max(0, t - lookback), t)
        intro = max(window, key=lambda u: (change[row, u].item(), u), default=None)
        dominated = (
            intro is not None
            and bool(preplan[row, list(window)].any())
            and waad[row, t] <= median[row, 0]
        )
        if dominated:
            gamma[row, t] += (1 - coupling) * extra
            gamma[row, intro] += coupling * extra
        else:
            gamma[row, t] += extra
    return gamma
