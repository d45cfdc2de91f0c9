"""A group's shared prompt computed once in the trainer's forward and backward.

The n samples of a GRPO group share one prompt, so a per-sample forward computes the
prompt n times. Here each group is one packed row: the prompt, then every sample's
response after it, each response attending to the prompt's keys and values and to its
own tokens only (a block mask: PrefixGrouper's split, in one sequence), with the
positions it would have alone. The log-probs come back in the per-sample layout
[rows, tokens] `token_logprobs` returns, so the loss code does not change; gradients
flow through the shared prompt once, summed over the group's responses, which is what n
separate forwards add up to.

    if (groups := shared_prompt_groups(batch)) is not None:
        logprobs = grouped_token_logprobs(model, batch, groups, temperature, top_p)

`shared_prompt_groups` says when this is exact: rows in whole groups whose prompts are
the same tokens, one row per sample (no multi-agent segments). The model must take a
custom 4D attention mask and position ids (transformers' Llama does; `supports`).
"""

from __future__ import annotations

import torch

from rollfleet.models.batching import TrainBatch, sampling_logprobs
from rollfleet.models.flops import causal_pairs


def supports(model) -> bool:
    """Whether the model takes a custom 4D mask: a model class of transformers' own (the
    builtin architectures with attention of their own, FusedKV and NEZHA, build their
    masks themselves) with sdpa or eager attention."""
    inner = getattr(model, "module", model)
    # FSDP2 wraps the class in one of torch's own (FSDPLlamaForCausalLM): look behind it
    cls = next(c for c in type(inner).__mro__ if not c.__module__.startswith("torch."))
    own = cls.__module__.startswith("transformers.models.")
    return own and getattr(inner.config, "_attn_implementation", None) in ("sdpa", "eager")


def shared_prompt_groups(batch: TrainBatch) -> list[list[int]] | None:
    """The batch's rows by group when every group's rows share one prompt, else None."""
    n = batch.group_size
    if n < 2 or len(batch) % n or batch.segmented or batch.extras:
        return None
    groups = [list(range(start, start + n)) for start in range(0, len(batch), n)]
    for rows in groups:
        length = batch.prompt_lengths[rows[0]]
        if length < 1 or any(batch.prompt_lengths[r] != length for r in rows):
            return None
        prompt = batch.input_ids[rows[0], :length]
        if any(not torch.equal(batch.input_ids[r, :length], prompt) for r in rows[1:]):
            return None
    return groups


def _packed(batch: TrainBatch, groups: list[list[int]]):
    """Per group: packed ids, positions, and for each row the packed index of each of its
    tokens (the prompt's are shared)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    packed = []
    for rows in groups:
        p = batch.prompt_lengths[rows[0]]
        ids = [batch.input_ids[rows[0], :p]]
        positions = [torch.arange(p)]
        owner = [torch.full((p,), -1)]  # -1: the prompt, seen by every response
        where = {}
        offset = p
        for r in rows:
            length = int(lengths[r]) - p
            ids.append(batch.input_ids[r, p : p + length])
            positions.append(torch.arange(p, p + length))
            owner.append(torch.full((length,), r))
            where[r] = torch.cat([torch.arange(p), torch.arange(offset, offset + length)])
            offset += length
        packed.append((torch.cat(ids), torch.cat(positions), torch.cat(owner), where))
    return packed


def _mask(owner: torch.Tensor, width: int) -> torch.Tensor:
    """[width, width] True where query q may attend key k: causal, and a response's tokens
    see the prompt and their own response only. Padding queries see themselves."""
    length = owner.numel()
    q = torch.arange(width)[:, None]
    k = torch.arange(width)[None, :]
    own = torch.full((width,), -2)
    own[:length] = owner
    same = (own[:, None] == own[None, :]) | (own[None, :] == -1)
    allowed = (k <= q) & same & (q < length) & (k < length)
    return allowed | ((q == k) & (q >= length))


def grouped_token_logprobs(
    model, batch: TrainBatch, groups: list[list[int]], temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """`token_logprobs(model, batch.input_ids, batch.attention_mask, ...)`, each group's
    prompt computed once: [rows, tokens], position 0 and padding 0."""
    packed = _packed(batch, groups)
    width = max(ids.numel() for ids, _, _, _ in packed)
    device = batch.input_ids.device
    ids = torch.full((len(packed), width), batch.pad_id, dtype=torch.long)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    allowed = torch.zeros((len(packed), 1, width, width), dtype=torch.bool)
    for g, (group_ids, group_positions, owner, _) in enumerate(packed):
        ids[g, : group_ids.numel()] = group_ids
        positions[g, : group_positions.numel()] = group_positions
        allowed[g, 0] = _mask(owner, width)
    mask = allowed
    inner = getattr(model, "module", model)
    if inner.config._attn_implementation == "eager":  # eager adds the mask to its scores
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
    ).logits
    out = torch.zeros(batch.input_ids.shape, dtype=logits.dtype, device=device)
    for g, (_, _, _, where) in enumerate(packed):
        for r, index in where.items():
            length = index.numel()
            # token j is predicted at the packed position of token j - 1
            previous = index[:-1].to(device)
            tokens = batch.input_ids[r, 1:length]
            picked = sampling_logprobs(logits[g, previous], tokens, temperature, top_p)
            out[r, 1:length] = picked
    return out


def forward_work(batch: TrainBatch, groups: list[list[int]] | None) -> tuple[int, int]:
    """(tokens, attended (query, key) pairs) of one forward over the batch: each group's
    prompt once with `groups` (grouped_token_logprobs), every row whole without."""
    lengths = [int(n) for n in batch.attention_mask.sum(-1).tolist()]
    if groups is None:
        return sum(lengths), sum(causal_pairs(n) for n in lengths)
    tokens = pairs = 0
    for rows in groups:
        p = batch.prompt_lengths[rows[0]]
        tokens += p
        pairs += causal_pairs(p)
        for r in rows:
            tokens += lengths[r] - p
            pairs += causal_pairs(lengths[r] - p, prefix=p)
    return tokens, pairs
