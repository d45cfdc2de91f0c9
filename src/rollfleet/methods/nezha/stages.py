"""NEZHA's stages: backbone and head trained together on demonstrations (warmup), the
engine's draft decode mode on every request (build_request), and the drawn codes scored
by the same verifier-masked head in the trainer (policy_logprobs)."""

from __future__ import annotations

import dataclasses
import logging
import random

import torch
import torch.nn.functional as F

from rollfleet.methods import Method
from rollfleet.models.batching import TrainBatch
from rollfleet.models.nezha import ItemDecoding, draft_logprobs, draft_positions
from rollfleet.models.warmup import sft_batch, sft_loss
from rollfleet.tasks import make_task
from rollfleet.tasks.recommend import item_codes, verifier_for

log = logging.getLogger("trainer")


class Nezha(Method):
    name = "nezha"

    def __init__(self, params, spec):
        super().__init__(params, spec)
        task = make_task(spec.task.name, spec.task.params, spec.seed)
        self.verifier = verifier_for(task.seed, task.codes, task.items)  # the reward's too
        self.decoding = ItemDecoding(
            beam=params.beam, verifier=self.verifier if params.verifier else None
        )

    @property
    def allowed(self):
        return self.verifier.allowed if self.params.verifier else None

    # --- rollout side -------------------------------------------------------------------
    def build_request(self, task, request, tokenizer):
        """Every sample decodes in the engine's draft mode (one backbone forward)."""
        return dataclasses.replace(request, decoding=self.decoding)

    # --- trainer side -------------------------------------------------------------------
    def warmup(self, model, tokenizer, task, folder) -> None:
        p = self.params
        losses = train_jointly(
            model,
            tokenizer,
            task,
            steps=p.warmupSteps,
            batch_size=p.warmupBatchSize,
            lr=p.warmupLearningRate,
            embedding_multiplier=p.embeddingMultiplier,
            cell_multiplier=p.cellMultiplier,
            seed=self.spec.seed,
        )
        if losses:
            log.info(
                "NEZHA: %d joint SFT steps, text loss %.3f, head loss %.3f",
                len(losses),
                *losses[-1],
            )

    def policy_logprobs(self, model, batch: TrainBatch):
        """Each sample's codes scored by the draft head (teacher-forced, verifier-masked, at
        the rollout temperature), at the positions of its response tokens."""
        config = getattr(model, "module", model).config
        levels = config.draft_levels
        table = {token: code for code, token in enumerate(config.draft_code_token_ids)}
        codes = torch.zeros(len(batch), levels, dtype=torch.long)
        rows = []
        for row, t in enumerate(batch.trajectories):
            if (found := _codes(t.response_ids, table, levels)) is not None:
                codes[row] = torch.tensor(found)
                rows.append(row)
        device = batch.input_ids.device
        codes = codes.to(device)
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            draft_positions=draft_positions(batch.prompt_lengths, levels).to(device),
            draft_codes=codes,
        ).draft_logits
        picked = draft_logprobs(logits, codes, self.allowed, self.spec.rollout.sampling.temperature)
        out = torch.zeros(batch.input_ids.shape, dtype=picked.dtype, device=device)
        for row in rows:  # a response that is not an item has no loss tokens to score
            start = batch.prompt_lengths[row]
            out[row, start : start + levels] = picked[row]
        return out


def _codes(token_ids: list[int], table: dict[int, int], levels: int) -> tuple[int, ...] | None:
    """The codes of a response that is one item's code tokens (`table`: token -> code),
    else None."""
    if len(token_ids) != levels or any(t not in table for t in token_ids):
        return None
    return tuple(table[t] for t in token_ids)


def train_jointly(
    model,
    tokenizer,
    task,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    embedding_multiplier: float,
    cell_multiplier: float,
    seed: int,
) -> list[tuple[float, float]]:
    """SFT of backbone and head together on the task's demonstrations: the text loss of the
    answer (what the autoregressive decode needs) plus the head's teacher-forced
    cross-entropy, from one forward (the placeholders precede the answer). The backbone
    and the head's output layers learn at `lr`, the code embeddings and the RNN cells at
    the paper's multiples. Returns (text loss, head loss) per step."""
    head = model.draft
    fast = {
        id(p): multiplier
        for part, multiplier in (
            (head.embed, embedding_multiplier),
            (head.cell_input, cell_multiplier),
            (head.cell_state, cell_multiplier),
        )
        for p in part.parameters()
    }
    groups = [{"params": [p for p in model.parameters() if id(p) not in fast], "lr": lr}]
    groups += [
        {"params": [p for p in model.parameters() if fast.get(id(p)) == m], "lr": lr * m}
        for m in sorted(set(fast.values()))
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    levels = model.config.draft_levels
    losses = []
    model.train()
    for _ in range(steps):
        examples = [task.example("train", rng.randrange(1_000_000)) for _ in range(batch_size)]
        ids, attention, mask = sft_batch(tokenizer, examples)
        codes = torch.tensor([item_codes(ex.answer) for ex in examples])
        prompt_lengths = [
            1 + len(tokenizer.encode(ex.prompt, add_special_tokens=False)) for ex in examples
        ]
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        text_loss = sft_loss(model.lm_head(hidden).float(), ids, mask)
        positions = draft_positions(prompt_lengths, levels)
        states = hidden[torch.arange(len(examples))[:, None], positions]
        draft = head.teacher_forced(states[:, -1], states[:, :-1], codes)
        head_loss = F.cross_entropy(draft.reshape(-1, head.codes).float(), codes.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        (text_loss + head_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append((text_loss.item(), head_loss.item()))
    model.eval()
    return losses
