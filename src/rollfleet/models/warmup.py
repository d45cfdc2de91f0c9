"""Warm-up SFT: teach a fresh model the task's format from its demonstrations.

The trainer runs this once before RL when the model is the builtin tiny one, and caches
the result in the run directory (`model/warmup/`), so a resumed run skips it. The number
of steps is deliberately small: RL is meant to find the headroom SFT leaves.
"""

from __future__ import annotations

import contextlib
import random

import torch

from rollfleet.models.batching import pad_sequences, prefix_embeddings
from rollfleet.tasks import Example, Task


def encode_turns(tokenizer, prompt: str, turns) -> tuple[list[int], list[float]]:
    """[bos] prompt turn... [eos] -> (token ids, loss mask over the model's own tokens)."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    mask = [0.0] * len(ids)
    for speaker, text in turns:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [1.0 if speaker == "model" else 0.0] * len(piece)
    ids.append(tokenizer.eos_token_id)
    mask.append(1.0)
    return ids, mask


def sft_batch(tokenizer, examples: list[Example]):
    encoded = [encode_turns(tokenizer, ex.prompt, ex.demonstration) for ex in examples]
    ids, attention, mask = pad_sequences(
        [e[0] for e in encoded], tokenizer.pad_token_id, [e[1] for e in encoded]
    )
    return ids, attention, mask


def warmup_sft(
    model,
    tokenizer,
    task: Task,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    examples: int | None = None,
    on_step=None,
    prefixes=None,
) -> list[float]:
    """Train on demonstrations of train examples (each one's `task.sft_examples`: every
    agent's turn for a task of several agents); returns the loss of every step.

    `examples` limits SFT to the first N train examples (a small demonstration set, as
    when demonstrations are expensive); None samples the whole train split. `prefixes`,
    a function of the batch size returning soft prefixes [batch, L, hidden], puts one in
    front of every example (Reasoning Palette's SFT): L placeholder tokens whose
    embeddings it replaces, outside the loss.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Linear decay to zero: the result then depends on the step count, not on where the
    # last noisy step of a constant-rate run happened to land.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    losses = []
    for step in range(steps):
        pool = examples or 1_000_000
        batch = [task.example("train", rng.randrange(pool)) for _ in range(batch_size)]
        batch = [pair for example in batch for pair in task.sft_examples(example)]
        ids, attention, mask = sft_batch(tokenizer, batch)
        context = contextlib.nullcontext()
        if prefixes is not None:
            prefix = prefixes(len(batch))
            ids, attention, mask = _with_placeholders(
                ids, attention, mask, prefix.shape[1], tokenizer.pad_token_id
            )
            context = prefix_embeddings(model, torch.arange(len(batch)), prefix)
        with context:
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
        loss = sft_loss(logits, ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses


def sft_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens `mask` marks (the model's own turns)."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


def _with_placeholders(ids, attention, mask, length: int, pad_id: int):
    """`length` placeholder positions in front of every row (attended, outside the loss)."""
    rows = ids.shape[0]
    return (
        torch.cat([torch.full((rows, length), pad_id, dtype=ids.dtype), ids], dim=1),
        torch.cat([torch.ones(rows, length, dtype=attention.dtype), attention], dim=1),
        torch.cat([torch.zeros(rows, length), mask], dim=1),
    )
