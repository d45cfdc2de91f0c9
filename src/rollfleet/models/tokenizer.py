"""Character-level tokenizer built with the `tokenizers` library and saved as tokenizer.json.

One token per character of a fixed alphabet (digits, lowercase letters, arithmetic and
punctuation), plus <pad>, <bos>, <eos> and <unk>. Loads back with AutoTokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*/=()<>:;,.?!'\"_#%[]\n"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character (newlines too, hence not ".") is its own "word"; Fuse joins them back.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def save_char_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
