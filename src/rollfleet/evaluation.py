"""Held-out evaluation: the verifier's mean score on held-out prompts.

Two readings: `temperature=0` is greedy decoding (one answer per prompt); with a
temperature and `samples=k` it is avg@k, the mean over k sampled answers per prompt, i.e.
the expected reward of the sampling policy that RL trains. Runs in the trainer's process with Hugging Face `generate`, independently of the rollout
engines, so it also cross-checks them. Multi-turn tasks play their episodes against the
task's own env logic (the same code the env service runs).
"""

from __future__ import annotations

import torch

from rollfleet.rewards import REWARDS
from rollfleet.tasks import Task


@torch.inference_mode()
def _generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float,
):
    width = max(len(p) for p in prompts)
    # Left padding so that every prompt ends where generation starts.
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        attention[row, width - len(p) :] = 1
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=attention.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        **(
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        ),
        pad_token_id=tokenizer.pad_token_id,
    )[:, width:]
    results = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    return results


def heldout_accuracy(
    model,
    tokenizer,
    task: Task,
    verifier: str,
    *,
    max_new_tokens: int,
    limit: int | None = None,
    temperature: float = 0.0,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Share of held-out answers (`samples` per prompt) that the reward function `verifier` scores 1."""
    model.eval()
    torch.manual_seed(seed)  # the same sampled answers for the same weights
    count = task.size("heldout") or 0
    count = min(count, limit) if limit else count
    examples = [task.example("heldout", i) for i in range(count) for _ in range(samples)]
    count = len(examples)
    stop_ids = [
        tokenizer.eos_token_id,
        *(tokenizer.convert_tokens_to_ids(t) for t in task.turn_stop),
    ]
    correct = 0
    for start in range(0, count, batch_size):
        chunk = examples[start : start + batch_size]
        contexts = [
            [tokenizer.bos_token_id, *tokenizer.encode(ex.prompt, add_special_tokens=False)]
            for ex in chunk
        ]
        final = [""] * len(chunk)
        live = list(range(len(chunk)))
        turn = 0
        while live:
            outputs = _generate(
                model, tokenizer, [contexts[i] for i in live], max_new_tokens, stop_ids, temperature
            )
            still = []
            for i, tokens in zip(live, outputs, strict=True):
                text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
                final[i] = text
                contexts[i] = contexts[i] + tokens
                ended = not tokens or tokens[-1] == tokenizer.eos_token_id or not task.multi_turn
                if not ended:
                    observation, ended = task.env_step(chunk[i].meta, turn, text)
                    contexts[i] += tokenizer.encode(observation, add_special_tokens=False)
                if (
                    not ended
                    and len(contexts[i]) + max_new_tokens < model.config.max_position_embeddings
                ):
                    still.append(i)
            live, turn = still, turn + 1
        for ex, response in zip(chunk, final, strict=True):
            correct += REWARDS[verifier](response, ex.answer, ex.meta) >= 1.0
    return correct / max(count, 1)
