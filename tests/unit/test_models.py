from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.models.batching import pad_sequences, token_logprobs
from rollfleet.models.tiny import create_tiny_model
from rollfleet.models.tokenizer import ALPHABET, SPECIAL_TOKENS, build_char_tokenizer
from rollfleet.models.warmup import encode_turns, sft_batch, warmup_sft
from rollfleet.tasks import make_task

torch.set_num_threads(1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-6) -> None:
    # torch.testing.assert_close costs ~0.6 s of lazy imports on first use; this is enough here
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual, expected)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def load(directory):
    return AutoModelForCausalLM.from_pretrained(str(directory)).eval()


# --- tokenizer ------------------------------------------------------------------------


def test_char_tokenizer_vocabulary(tokenizer):
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(ALPHABET) == 64
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3
    # one token per character, in alphabet order after the 4 specials
    assert tokenizer.encode("3*5", add_special_tokens=False) == [7, 43, 9]
    assert tokenizer.encode("0a ", add_special_tokens=False) == [4, 14, 40]


@pytest.mark.parametrize(
    "text",
    ["3 5 7>22:", "3*5+7", "c12*34;=408;a413", "12*34+5?", "hello, world. (x-1)/2 = y!", "a\nb"],
)
def test_char_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_char_tokenizer_unknown_characters_map_to_unk(tokenizer):
    assert tokenizer.encode("A", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_char_tokenizer_consecutive_newlines(tokenizer):
    ids = tokenizer.encode("a\n\nb", add_special_tokens=False)
    assert ids == [14, 63, 63, 15]


def test_char_tokenizer_saves_and_loads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(tokenizer)
    for text in ["3 5 7>22:3*5+7", "c12*34;=408;a413", "x, y. z?"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


# --- tiny model -----------------------------------------------------------------------


def test_tiny_model_size_and_config(tiny_dir):
    model = load(tiny_dir)
    n = sum(p.numel() for p in model.parameters())
    assert 0.9e6 < n < 1.2e6
    # hand count: embedding 64*128 (tied with lm_head) + 4 layers of (4*128*128 attention
    # + 3*128*512 MLP + 2*128 norms) + 128 final norm
    assert n == 64 * 128 + 4 * (4 * 128 * 128 + 3 * 128 * 512 + 2 * 128) + 128
    assert model.config.vocab_size == 64
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (tiny_dir / "config.json").is_file()
    assert (tiny_dir / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert tok.encode("3*5", add_special_tokens=False) == [7, 43, 9]


def test_tiny_model_is_deterministic_in_seed(tiny_dir, tmp_path):
    same = load(create_tiny_model(tmp_path / "same", seed=0)).state_dict()
    other = load(create_tiny_model(tmp_path / "other", seed=1)).state_dict()
    reference = load(tiny_dir).state_dict()
    assert same.keys() == reference.keys()
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    key = "model.embed_tokens.weight"
    assert not torch.equal(other[key], reference[key])


# --- batching -------------------------------------------------------------------------


def test_pad_sequences():
    ids, attention, weights, extra = pad_sequences(
        [[5, 6, 7], [8]], 0, [[0.5, 0.25, 1.0], [2.0]], [[1.0, 1.0, 1.0], [3.0]]
    )
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert ids.dtype == torch.long
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert weights.tolist() == [[0.5, 0.25, 1.0], [2.0, 0.0, 0.0]]
    assert extra.tolist() == [[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]]
    ids, attention = pad_sequences([[1], [2, 3]], 9)
    assert ids.tolist() == [[1, 9], [2, 3]]
    assert attention.tolist() == [[1, 0], [1, 1]]


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits)


def test_token_logprobs_hand_computed():
    # vocab 2; the logits at position t predict token t+1
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])
    ids = torch.tensor([[0, 1, 0]])
    out = token_logprobs(FixedLogits(logits), ids, torch.ones_like(ids))
    assert out.shape == (1, 3)
    # position 0 has no context: 0; position 1 is token 1 under softmax [1/4, 3/4];
    # position 2 is token 0 under [1/2, 1/2]
    assert_close(out, torch.tensor([[0.0, math.log(0.75), math.log(0.5)]]))
    # temperature 2 halves the logits: softmax(0, ln3 / 2) = [1/(1+sqrt3), sqrt3/(1+sqrt3)]
    hot = token_logprobs(FixedLogits(logits), ids, torch.ones_like(ids), temperature=2.0)
    s3 = math.sqrt(3.0)
    assert_close(hot, torch.tensor([[0.0, math.log(s3 / (1 + s3)), math.log(0.5)]]))


def test_token_logprobs_match_log_softmax_gathered_by_hand(tiny_dir, tokenizer):
    model = load(tiny_dir)
    seqs = [[1, *tokenizer.encode("3 5 7>22:3*5+7", add_special_tokens=False), 2], [1, 7, 43, 9, 2]]
    ids, attention = pad_sequences(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        got = token_logprobs(model, ids, attention)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
    assert got.shape == ids.shape
    for b, seq in enumerate(seqs):
        assert got[b, 0].item() == 0.0
        for t in range(1, len(seq)):
            expected = torch.log_softmax(logits[b, t - 1], dim=-1)[seq[t]]
            assert got[b, t].item() == pytest.approx(expected.item(), abs=1e-5)
    assert (got[:, 1:] < 0).all()


# --- warm-up SFT ----------------------------------------------------------------------


def test_encode_turns_masks(tokenizer):
    ids, mask = encode_turns(
        tokenizer, "1+2?", [("model", "c1+2;"), ("env", "=3;"), ("model", "a3")]
    )
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert ids == [1, *enc("1+2?"), *enc("c1+2;"), *enc("=3;"), *enc("a3"), 2]
    assert ids[:5] == [1, 5, 41, 6, 54]
    # bos + prompt: 0; model turn: 1; env turn: 0; model turn: 1; eos: 1
    assert mask == [0.0] * 5 + [1.0] * 5 + [0.0] * 3 + [1.0] * 2 + [1.0]
    assert len(ids) == len(mask)


def test_sft_batch_pads_ids_and_mask(tokenizer):
    task = make_task("countdown", seed=0)
    examples = [task.example("train", i) for i in range(3)]
    ids, attention, mask = sft_batch(tokenizer, examples)
    lengths = [1 + len(ex.prompt) + len(ex.demonstration[0][1]) + 1 for ex in examples]
    assert ids.shape == (3, max(lengths))
    assert attention.sum(dim=1).tolist() == lengths
    assert mask.sum(dim=1).tolist() == [len(ex.demonstration[0][1]) + 1 for ex in examples]
    assert (mask * (1 - attention)).sum().item() == 0  # no loss on padding


def test_warmup_sft_lowers_the_loss(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = load(tiny_dir)
    task = make_task("countdown", seed=0)
    steps = []
    losses = warmup_sft(
        model,
        tokenizer,
        task,
        steps=30,
        batch_size=16,
        lr=3e-3,
        seed=0,
        on_step=lambda s, v: steps.append(s),
    )
    assert len(losses) == 30
    assert steps == list(range(30))
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first
    assert last < 0.75 * first  # a clear drop, not noise (about 3.4 -> 1.6 here)
    assert first > math.log(64) * 0.5  # starts near chance (ln 64 ≈ 4.16)
    assert not model.training  # left in eval mode
