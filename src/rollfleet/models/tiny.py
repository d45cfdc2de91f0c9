"""The builtin tiny model: a ~1 M-parameter Llama with the character tokenizer.

    from rollfleet.models.tiny import create_tiny_model
    create_tiny_model("runs/x/model/init", seed=0)

It is created from scratch here (nothing is downloaded) and saved as an ordinary HF folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollfleet.models.tokenizer import save_char_tokenizer


def tiny_config(
    vocab_size: int,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    max_len: int = 128,
    intermediate: int | None = None,
):
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,  # fewer: grouped-query attention
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def create_tiny_model(directory: str | Path, seed: int = 0, build=None, **config) -> Path:
    """A fresh tiny model with the character tokenizer, saved in `directory`. `build`
    (vocab size -> model) makes another architecture's; `config` sizes the Llama."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = save_char_tokenizer(directory)
    torch.manual_seed(seed)
    if build is None:
        model = LlamaForCausalLM(tiny_config(len(tokenizer), **config))
    else:
        model = build(len(tokenizer))
    model.save_pretrained(str(directory))
    return directory
