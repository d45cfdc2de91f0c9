"""Turning token sequences into padded tensors and per-token log-probs, for training."""

from __future__ import annotations

import torch


def pad_sequences(
    sequences: list[list[int]], pad_id: int, *values: list[list[float]]
) -> tuple[torch.Tensor, ...]:
    """Right-pad token sequences (and aligned float lists) into [batch, longest] tensors.

    Returns (input_ids, attention_mask, *padded values).
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    padded = [torch.zeros((len(sequences), width)) for _ in values]
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        for target, source in zip(padded, values, strict=True):
            target[row, : len(source[row])] = torch.tensor(source[row], dtype=torch.float32)
    return (ids, attention, *padded)


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
):
    """Log-prob of each token given the ones before it: [batch, seq]; position 0 gets 0."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logprobs.gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(picked, (1, 0))
