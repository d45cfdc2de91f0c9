"""A group's shared tokens computed once in the trainer's forward and backward.

The n samples of a GRPO group share one prompt, and in multi-turn episodes often their
first turns too, so a per-sample forward computes that shared part n times. Here each
group is packed as the prefix tree of its samples (AReaL's tree training; PrefixGrouper's
split where only the prompt is shared), several trees to a row: every token the samples
share from the start appears once, each sample's own tokens follow, and a block mask lets every
token attend to exactly the tokens before it in its own sample, at the position it would
have alone. The log-probs come back in the per-sample layout [rows, tokens]
`token_logprobs` returns, so the loss code does not change; a shared token's log-prob is
computed once and used by every sample that holds it, so gradients flow through the
shared part once, summed over the group, which is what n separate forwards add up to.

    if (groups := shared_prefix_groups(batch)) is not None:
        packed = pack_groups(batch, groups)
        logprobs = grouped_token_logprobs(model, batch, packed, temperature, top_p)

`shared_prefix_groups` says when this applies: rows in whole groups, one row per sample
(no multi-agent segments, no per-row extras). It is exact for any rows (rows that share
nothing just share nothing); the model must take a custom 4D attention mask and
position ids (transformers' Llama does; `supports`).
"""

from __future__ import annotations

import torch

from rollfleet.models.batching import TrainBatch, sampling_logprobs
from rollfleet.models.flops import FlopMeter, causal_pairs


def supports(model) -> bool:
    """Whether the model takes a custom 4D mask: a model class of transformers' own (the
    builtin architectures with attention of their own, FusedKV and NEZHA, build their
    masks themselves) with sdpa or eager attention."""
    inner = getattr(model, "module", model)
    # FSDP2 wraps the class in one of torch's own (FSDPLlamaForCausalLM): look behind it
    cls = next(c for c in type(inner).__mro__ if not c.__module__.startswith("torch."))
    own = cls.__module__.startswith("transformers.models.")
    return own and getattr(inner.config, "_attn_implementation", None) in ("sdpa", "eager")


def shared_prefix_groups(batch: TrainBatch) -> list[list[int]] | None:
    """The batch's rows by group, or None where a group cannot be packed as one tree."""
    n = batch.group_size
    if n < 2 or len(batch) % n or batch.segmented or batch.extras:
        return None
    return [list(range(start, start + n)) for start in range(0, len(batch), n)]


# Per group: its packed tokens, their positions, and each batch row's packed indices.
Packed = list[tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]]


def pack_groups(batch: TrainBatch, groups: list[list[int]]) -> Packed:
    """Per group, its prefix tree packed in one row: the tokens, their positions, and for
    each batch row the packed index of each of its tokens (shared ones appear once)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    rows_ids = batch.input_ids.tolist()  # one copy off the device, not one per row
    packed = []
    for rows in groups:
        ids: list[int] = []
        positions: list[int] = []
        node: dict[tuple[int, int], int] = {}  # (parent's packed index, token) -> packed index
        where = {}
        for r in rows:
            parent, path = -1, []
            for position, token in enumerate(rows_ids[r][: int(lengths[r])]):
                index = node.get((parent, token))
                if index is None:
                    index = node[(parent, token)] = len(ids)
                    ids.append(token)
                    positions.append(position)
                path.append(index)
                parent = index
            where[r] = torch.tensor(path)
        packed.append((torch.tensor(ids), torch.tensor(positions), where))
    return packed


def rows_of_trees(sizes: list[int], width: int | None = None) -> list[list[int]]:
    """The trees (by index) in rows of `width` positions (the longest tree's by default),
    first fit by decreasing size: a row per tree would pad every tree to the longest (a
    third of the positions on the default job)."""
    width = width or max(sizes)
    rows: list[list[int]] = []
    room: list[int] = []
    for tree in sorted(range(len(sizes)), key=lambda t: -sizes[t]):
        row = next((r for r, free in enumerate(room) if sizes[tree] <= free), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(tree)
        room[row] -= sizes[tree]
    return rows


def tree_layout(sizes: list[int], token_flops: float, pair_flops: float):
    """(rows of trees, width): the row width of least model FLOPs among 1 to 2x the longest
    tree's. Rows as wide as the longest tree leave most trees alone in a row, the rest
    padding (a quarter of the positions with the default job's small trees); wider rows
    hold several trees, but the dense mask makes every row attend over width² pairs. A
    width costs rows · width · (token_flops + width · pair_flops)."""
    longest = max(sizes)
    best = None
    for eighths in range(9):
        width = longest + longest * eighths // 8
        rows = rows_of_trees(sizes, width)
        cost = len(rows) * width * (token_flops + width * pair_flops)
        if best is None or cost < best[0]:
            best = (cost, rows, width)
    return best[1], best[2]


def grouped_token_logprobs(
    model, batch: TrainBatch, packed: Packed, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    """`token_logprobs(model, batch.input_ids, batch.attention_mask, ...)`, each group's
    shared tokens computed once: [rows, tokens], position 0 and padding 0.

    Several trees share a packed row (`tree_layout`); a token attends to exactly the
    tokens before it on its own paths, so trees in one row never see each other."""
    meter = FlopMeter(model)
    layout, width = tree_layout(
        [ids.numel() for ids, _, _ in packed], meter.per_token, meter.per_pair
    )
    device = batch.input_ids.device
    ids = torch.full((len(layout), width), batch.pad_id, dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    allowed = torch.zeros((len(layout), 1, width, width), dtype=torch.bool)
    # for every (batch row, token j >= 1): the packed row and position predicting it
    rows, columns, packed_rows, previous = [], [], [], []
    for p, trees in enumerate(layout):
        offset = 0
        for tree in trees:
            tree_ids, tree_positions, where = packed[tree]
            n = tree_ids.numel()
            ids[p, offset : offset + n] = tree_ids
            positions[p, offset : offset + n] = tree_positions
            for r, path in where.items():
                q, k = torch.tril_indices(path.numel(), path.numel())
                allowed[p, 0, path[q] + offset, path[k] + offset] = True
                length = path.numel()
                rows.append(torch.full((length - 1,), r))
                columns.append(torch.arange(1, length))
                packed_rows.append(torch.full((length - 1,), p))
                previous.append(path[:-1] + offset)  # token j is predicted at token j - 1
            offset += n
        unused = torch.arange(offset, width)
        allowed[p, 0, unused, unused] = True  # padding queries see themselves
    mask = allowed
    inner = getattr(model, "module", model)
    if inner.config._attn_implementation == "eager":  # eager adds the mask to its scores
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=False,
    ).logits
    rows, columns = torch.cat(rows).to(device), torch.cat(columns).to(device)
    picked = sampling_logprobs(
        logits[torch.cat(packed_rows).to(device), torch.cat(previous).to(device)],
        batch.input_ids[rows, columns],
        temperature,
        top_p,
    )
    out = torch.zeros(batch.input_ids.shape, dtype=logits.dtype, device=device)
    return out.index_put((rows, columns), picked)


def forward_work(batch: TrainBatch, packed: Packed | None) -> tuple[int, int]:
    """(tokens, attended (query, key) pairs) of one forward over the batch: each group's
    prefix tree with `packed` (grouped_token_logprobs), every row whole without."""
    if packed is None:
        lengths = [int(n) for n in batch.attention_mask.sum(-1).tolist()]
        return sum(lengths), sum(causal_pairs(n) for n in lengths)
    tokens = pairs = 0
    for _, positions, _ in packed:
        tokens += positions.numel()
        pairs += int(positions.sum()) + positions.numel()  # a token at p attends to p + 1
    return tokens, pairs
