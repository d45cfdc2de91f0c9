"""The trainer stage of attention-based credit assignment: advantage weights from the
policy's own attention on the batch it trains on (one extra forward with eager
attention, no gradient)."""

from __future__ import annotations

import torch

from rollfleet.methods import Method
from rollfleet.methods.attention_credit.credit import (
    credit_weights,
    future_attention_influence,
    head_spans,
    layer_indices,
    split_heads,
    windowed_attention_distance,
)


@torch.no_grad()
def attention_maps(model, input_ids, attention_mask, layers: list[int]) -> torch.Tensor:
    """Attention probabilities of `layers`: [rows, layers × heads, T, T] (float32).

    The fused attention kernels never materialise the probabilities, so this pass runs
    the model with eager attention and switches it back afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return torch.cat([out.attentions[i].float() for i in layers], dim=1)


class AttentionCredit(Method):
    name = "attention_credit"

    def __init__(self, params, spec):
        super().__init__(params, spec)
        self.generator = torch.Generator().manual_seed(spec.sampling_seed())  # the random control

    def advantage_weights(self, model, batch, advantages):
        p = self.params
        layers = layer_indices(model.config.num_hidden_layers, p.layers)
        attn = attention_maps(model, batch.input_ids, batch.attention_mask, layers)
        valid = batch.loss_mask > 0
        local, global_ = split_heads(head_spans(attn, valid), p.headShare)
        waad = windowed_attention_distance(attn[:, local].mean(1), p.window)
        fai = future_attention_influence(attn[:, global_].mean(1), valid, *p.horizon)
        gamma = credit_weights(
            p.strategy,
            waad.cpu(),
            fai.cpu(),
            valid.cpu(),
            quantile=p.quantile,
            amplification=p.amplification,
            coupling=p.couplingShare,
            lookback=p.lookback,
            generator=self.generator,
        ).to(batch.loss_mask.device)
        if p.positiveOnly:
            negative = (advantages < 0).view(-1, 1).to(gamma.device)
            gamma = torch.where(negative, torch.ones_like(gamma), gamma)
        return gamma
