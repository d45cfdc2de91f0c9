"""FusedKV: a Llama whose top half of layers computes no keys or values (arXiv 2512.03870).

Each top layer attends with its own queries over keys and values rebuilt from two cached
layers: the bottom one (layer 0) and the middle one (the last of the bottom half). So a
KV cache holds only the bottom half's layers: half the bytes of a vanilla model.

    config = FusedKVConfig(kv_fusion="fused", vocab_size=64, hidden_size=128, ...)
    model = FusedKVForCausalLM(config)           # an HF model: save_pretrained, generate

`kv_fusion` chooses how a top layer rebuilds them (`KVFusion`):
- `fused`: a learnable per-channel mix of the post-RoPE keys of both layers and of their
  values. The key weights are tied within each rotary pair (channels i and i + d/2, which
  RoPE rotates together), so a key stays a rotation of its position and attention
  depends on relative positions only; untied (`fusion_tied: false`, an ablation) it leaks
  absolute position. Initialised at the Lite solution;
- `lite`: keys from the middle layer, values from the bottom layer, nothing learned;
- `lite_rev`: keys from the bottom, values from the middle (the paper's ablation).

Importing this module registers the config and model with transformers' Auto classes
(model type `rollfleet_fusedkv`), so a saved folder loads with AutoModelForCausalLM.
Held-out evaluation generates without a cache (each step recomputes the sequence); the
torch engine's `SlotFusedKV` is the cached decoder.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    LlamaConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    rotate_half,
)

FUSIONS = ("fused", "lite", "lite_rev")


class FusedKVConfig(LlamaConfig):
    model_type = "rollfleet_fusedkv"

    def __init__(self, kv_fusion: str = "fused", fusion_tied: bool = True, **kwargs):
        if kv_fusion not in FUSIONS:
            raise ValueError(f"kv_fusion {kv_fusion!r}: choose one of {list(FUSIONS)}")
        self.kv_fusion, self.fusion_tied = kv_fusion, fusion_tied
        super().__init__(**kwargs)
        if self.num_hidden_layers < 2:
            raise ValueError("FusedKV needs at least 2 layers (a bottom half and a top half)")

    @property
    def cached_layers(self) -> int:
        """The bottom half: the layers that compute (and cache) keys and values."""
        return self.num_hidden_layers // 2


class KVFusion(nn.Module):
    """A top layer's keys and values [B, kv heads, T, d] from the bottom and middle layers'."""

    def __init__(self, kind: str, kv_heads: int, head_dim: int, tied: bool):
        super().__init__()
        self.kind, self.tied = kind, tied
        if kind == "fused":
            key_channels = head_dim // 2 if tied else head_dim
            # [source (bottom, middle), kv head, channel]; set to Lite by _init_weights
            self.key_weights = nn.Parameter(torch.zeros(2, kv_heads, key_channels))
            self.value_weights = nn.Parameter(torch.zeros(2, kv_heads, head_dim))

    def lite(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused weights at the Lite solution: keys from the middle, values from the bottom."""
        keys, values = torch.zeros_like(self.key_weights), torch.zeros_like(self.value_weights)
        keys[1], values[0] = 1.0, 1.0
        return keys, values

    def forward(self, k_bottom, v_bottom, k_middle, v_middle):
        if self.kind == "lite":
            return k_middle, v_bottom
        if self.kind == "lite_rev":
            return k_bottom, v_middle
        wk = self.key_weights
        if self.tied:  # one weight per rotary pair (i, i + d/2)
            wk = torch.cat([wk, wk], dim=-1)
        wk, wv = wk[:, None, :, None, :], self.value_weights[:, None, :, None, :]
        return wk[0] * k_bottom + wk[1] * k_middle, wv[0] * v_bottom + wv[1] * v_middle


class Attention(nn.Module):
    """Llama attention; a top layer has a `fusion` instead of k_proj and v_proj."""

    def __init__(self, config: FusedKVConfig, top: bool):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        if top:
            self.fusion = KVFusion(
                config.kv_fusion, self.kv_heads, self.head_dim, config.fusion_tied
            )
        else:
            self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)


class Layer(nn.Module):
    """A decoder layer. It returns its keys and values beside its output (the model keeps
    layer 0's and the middle layer's); a top layer is given those and rebuilds its own.
    Everything goes through arguments and results, not shared state: FSDP gathers a
    layer's weights around its forward and may copy containers passed in."""

    def __init__(self, config: FusedKVConfig, index: int):
        super().__init__()
        self.index, self.top = index, index >= config.cached_layers
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, top=self.top)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, h, cos, sin, mask, sources=None):
        """h [B, T, hidden] -> (h, keys, values); `sources` (k_bottom, v_bottom, k_middle,
        v_middle) for a top layer."""
        attn = self.self_attn
        b, t, _ = h.shape
        x = self.input_layernorm(h)
        q = rope(attn.q_proj(x).view(b, t, attn.heads, attn.head_dim).transpose(1, 2), cos, sin)
        if self.top:
            k, v = attn.fusion(*sources)
        else:
            k = attn.k_proj(x).view(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)
            k = rope(k, cos, sin)
        out = attend(q, k, v, mask, attn.heads, attn.kv_heads)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def attend(q, keys, values, mask, heads: int, kv_heads: int) -> torch.Tensor:
    """Scaled dot-product attention of q [B, H, T, d] over keys and values [B, KVH, S, d]."""
    if heads > kv_heads:
        repeat = heads // kv_heads
        keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class FusedKVModel(nn.Module):
    def __init__(self, config: FusedKVConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = h.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=h.device)
        # Positions count real tokens (left padding in generation starts them at 0), as HF's
        # Llama generate and the torch engine do.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        cos, sin = self.rotary_emb(h, positions)
        cos, sin = cos[:, None], sin[:, None]
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        mask = causal[None] & attention_mask.bool()[:, None, :]
        mask = (mask | torch.eye(t, dtype=torch.bool, device=h.device))[:, None]  # pad rows
        middle, kept = self.config.cached_layers - 1, {}
        for i, layer in enumerate(self.layers):
            sources = (*kept[0], *kept[middle]) if layer.top else None
            h, k, v = layer(h, cos, sin, mask, sources)
            if i in (0, middle):
                kept[i] = (k, v)
        return self.norm(h)


class FusedKVForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FusedKVConfig
    base_model_prefix = "model"
    _tied_weights_keys: ClassVar = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules: ClassVar = ["Layer"]
    _supports_sdpa = True

    def __init__(self, config: FusedKVConfig):
        super().__init__(config)
        self.model = FusedKVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, KVFusion) and module.kind == "fused":
            keys, values = module.lite()
            init.copy_(module.key_weights, keys)
            init.copy_(module.value_weights, values)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        hidden = self.model(input_ids, attention_mask, inputs_embeds)
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No cache: every generation step runs the whole sequence (evaluation only; the
        torch engine decodes with its own cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


AutoConfig.register(FusedKVConfig.model_type, FusedKVConfig)
AutoModelForCausalLM.register(FusedKVConfig, FusedKVForCausalLM)
