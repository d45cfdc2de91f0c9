"""NEZHA's self-drafting head on a Llama backbone, and its decoding (arXiv 2511.18793).

A generative recommender answers with an item's L semantic-ID codes. Decoded as text,
that costs one backbone forward per level per beam. NEZHA puts one placeholder per level
at the end of the prompt, runs the backbone once, and lets a small draft head produce
the codes from the hidden states:

    s_1 = h0                                   (the prompt's last hidden state)
    logits_l = W_l(s_l + h_SP_l)               (over level l's codes; h_SP_l at placeholder l)
    s_{l+1} = RNNCell_l(Emb_l(t_l), s_l)       (t_l the code chosen at level l)

Beam search over the head keeps only prefixes a model-free verifier accepts
(rollfleet.tasks.recommend.PrefixVerifier), so every item it returns is real.

    model = NezhaForCausalLM(NezhaConfig(vocab_size=64, hidden_size=128, ...))
    h0, h_sp = backbone_states(model, prompts)              # one backbone forward
    items, scores, _ = draft_search(model.draft, h0, h_sp, beam=10, allowed=verifier.allowed)

The model is an ordinary Llama (its language-model head still decodes text: the
autoregressive baseline) plus `draft`, published with the weights. Importing this module
registers it with transformers' Auto classes (model type `rollfleet_nezha`). The RNN cell
is the paper's Elman cell, tanh(W_x·e + W_s·s), written with Linear layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

# (prefixes [rows, length] of codes, width) -> [rows, width] bool: which next codes are valid
Allowed = Callable[[torch.Tensor, int], torch.Tensor]


class NezhaConfig(LlamaConfig):
    model_type = "rollfleet_nezha"

    def __init__(self, draft_levels: int = 3, draft_code_token_ids: list[int] | None = None, **kw):
        # The token of code c (any level) is draft_code_token_ids[c]: the head's outputs
        # map back to the text a plain decode of the item would produce.
        self.draft_levels = draft_levels
        self.draft_code_token_ids = list(draft_code_token_ids or [])
        super().__init__(**kw)


class DraftHead(nn.Module):
    """The per-level output projections W_l, code embeddings Emb_l and RNN cells."""

    def __init__(self, config: NezhaConfig):
        super().__init__()
        hidden, codes, levels = (
            config.hidden_size,
            len(config.draft_code_token_ids),
            config.draft_levels,
        )
        self.levels, self.codes = levels, codes
        self.out = nn.ModuleList(nn.Linear(hidden, codes) for _ in range(levels))
        self.embed = nn.ModuleList(nn.Embedding(codes, hidden) for _ in range(levels - 1))
        self.cell_input = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(levels - 1))
        self.cell_state = nn.ModuleList(
            nn.Linear(hidden, hidden, bias=False) for _ in range(levels - 1)
        )

    def logits(self, level: int, state: torch.Tensor, h_sp: torch.Tensor) -> torch.Tensor:
        return self.out[level](state + h_sp)

    def advance(self, level: int, state: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return torch.tanh(
            self.cell_input[level](self.embed[level](codes)) + self.cell_state[level](state)
        )

    def teacher_forced(self, h0, h_sp, codes) -> torch.Tensor:
        """Logits [N, L, codes] of every level given the true codes [N, L] before it."""
        state, out = h0, []
        for level in range(self.levels):
            out.append(self.logits(level, state, h_sp[:, level]))
            if level + 1 < self.levels:
                state = self.advance(level, state, codes[:, level])
        return torch.stack(out, dim=1)


@dataclass
class DraftOutput(ModelOutput):
    draft_logits: torch.Tensor | None = None


class NezhaForCausalLM(LlamaForCausalLM):
    """A Llama causal LM with NEZHA's draft head (`draft`)."""

    config_class = NezhaConfig

    def __init__(self, config: NezhaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.draft = DraftHead(config)
        self.post_init()

    def forward(self, *args, draft_positions=None, draft_codes=None, **kwargs):
        """The Llama forward; with `draft_positions` [N, L + 1] (each row's placeholder
        positions, then its last prompt position) and `draft_codes` [N, L], the head's
        teacher-forced logits instead (DraftOutput). Going through forward keeps DDP's and
        FSDP's hooks in the trainer."""
        if draft_positions is None:
            return super().forward(*args, **kwargs)
        hidden = self.model(*args, **kwargs).last_hidden_state
        states = hidden[
            torch.arange(hidden.shape[0], device=hidden.device)[:, None], draft_positions
        ]
        return DraftOutput(
            draft_logits=self.draft.teacher_forced(states[:, -1], states[:, :-1], draft_codes)
        )


AutoConfig.register(NezhaConfig.model_type, NezhaConfig)
AutoModelForCausalLM.register(NezhaConfig, NezhaForCausalLM)


def draft_positions(prompt_lengths, levels: int) -> torch.Tensor:
    """[N, L + 1]: the placeholders sit just before each prompt's last token."""
    last = torch.as_tensor(prompt_lengths)[:, None] - 1
    return torch.cat([last - levels + torch.arange(levels), last], dim=1)


def backbone_states(model, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone forward over right-padded prompts: (h0 [N, hidden], h_SP [N, L, hidden])."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, device=device)
        attention[row, : len(prompt)] = 1
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    positions = draft_positions([len(p) for p in prompts], model.config.draft_levels).to(device)
    states = hidden[torch.arange(len(prompts), device=device)[:, None], positions]
    return states[:, -1], states[:, :-1]


def masked_logprobs(logits: torch.Tensor, allowed: torch.Tensor | None, temperature: float = 1.0):
    """Log-softmax over the allowed codes only (the verifier's renormalised distribution);
    -inf elsewhere, and -inf for a row with nothing allowed. Temperature 0 reads at 1."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if allowed is None:
        return torch.log_softmax(logits, dim=-1)
    logprobs = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.where(allowed, logprobs, torch.full_like(logprobs, float("-inf")))


def draft_logprobs(
    logits: torch.Tensor,
    codes: torch.Tensor,
    allowed: Allowed | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-prob [N, L] of each chosen code under the (verifier-masked, tempered)
    distribution the engine samples from, given teacher-forced logits [N, L, codes]."""
    levels = []
    for level in range(logits.shape[1]):
        mask = None if allowed is None else allowed(codes[:, :level], logits.shape[-1])
        lp = masked_logprobs(logits[:, level], mask, temperature)
        levels.append(lp.gather(-1, codes[:, level, None])[:, 0])
    return torch.stack(levels, dim=1)


@torch.no_grad()
def draft_search(
    head: DraftHead,
    h0: torch.Tensor,
    h_sp: torch.Tensor,
    *,
    beam: int,
    allowed: Allowed | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
):
    """Beam search over the draft head: (items [N, K, L], scores [N, K], per-level
    log-probs [N, K, L]), best first; a slot with no valid item left has score -inf.
    With `temperature` > 0 each of the K beams samples its own path instead (the RL
    policy: K independent draws, scored at that temperature)."""
    n, hidden = h0.shape
    state = h0[:, None]
    prefixes = torch.zeros(n, 1, 0, dtype=torch.long, device=h0.device)
    levels = torch.zeros(n, 1, 0, device=h0.device)
    scores = torch.zeros(n, 1, device=h0.device)
    if temperature > 0:  # independent samples: every beam starts from the same state
        state, prefixes, levels, scores = (
            t.expand(n, beam, *t.shape[2:]) for t in (state, prefixes, levels, scores)
        )
    for level in range(head.levels):
        width = state.shape[1]
        logits = head.logits(level, state, h_sp[:, level, None])  # [N, B, codes]
        mask = None
        if allowed is not None:
            mask = allowed(prefixes.reshape(n * width, level), head.codes).view(n, width, -1)
        logprobs = masked_logprobs(logits, mask, temperature)
        if temperature > 0:
            probs = logprobs.exp().view(n * width, -1)
            code = torch.multinomial(probs, 1, generator=generator).view(n, width)
            picked = logprobs.gather(-1, code[..., None])[..., 0]
            origin = torch.arange(width, device=h0.device).expand(n, width)
        else:
            total = (scores[..., None] + logprobs).view(n, -1)
            _, index = total.topk(min(beam, total.shape[1]), dim=-1)
            origin, code = index // head.codes, index % head.codes
            picked = logprobs.view(n, -1).gather(1, index)
        keep = origin[..., None]
        prefixes = torch.cat([prefixes.gather(1, keep.expand(-1, -1, level)), code[..., None]], -1)
        levels = torch.cat([levels.gather(1, keep.expand(-1, -1, level)), picked[..., None]], -1)
        scores = scores.gather(1, origin) + picked
        if level + 1 < head.levels:
            chosen = state.gather(1, keep.expand(-1, -1, hidden))
            state = head.advance(level, chosen.reshape(-1, hidden), code.reshape(-1)).view(
                n, -1, hidden
            )
    return prefixes, scores, levels


@dataclass(frozen=True)
class ItemDecoding:
    """The torch engine's NEZHA decode mode for one request (`GenerationRequest.decoding`):
    one backbone forward, then the draft head; greedy (temperature 0) is the best of a
    beam search of width `beam`, sampling draws one item. `verifier` (a PrefixVerifier,
    or None) keeps only valid prefixes."""

    beam: int = 1
    verifier: Any = None

    def items(self, model, prompts: list[list[int]], temperature: float, generator=None):
        """[(token ids of the item, log-prob of each level)] for each prompt."""
        h0, h_sp = backbone_states(model, prompts)
        allowed = self.verifier.allowed if self.verifier is not None else None
        codes, _, levels = draft_search(
            model.draft,
            h0,
            h_sp,
            beam=1 if temperature > 0 else self.beam,
            allowed=allowed,
            temperature=temperature,
            generator=generator,
        )
        tokens = torch.tensor(model.config.draft_code_token_ids, device=codes.device)[codes[:, 0]]
        return list(zip(tokens.tolist(), levels[:, 0].tolist(), strict=True))
