"""Reasoning Palette (rollfleet.methods.palette): the prefix hook against a hand-made
inputs_embeds forward, L = 0 as the plain model, the schedule's values, latents as a
function of their key, the VAE's training and file, the prefixed share of a group, and the
SFT behind prior prefixes."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.episodes import EpisodeRequest
from rollfleet.methods import Stages
from rollfleet.methods.palette.stages import VAE_FILE, Palette
from rollfleet.methods.palette.vae import (
    PaletteVAE,
    draw_latents,
    pooled_embedding,
    prefixed_samples,
    prefixed_share,
)
from rollfleet.models.batching import prefix_embeddings, token_logprobs
from rollfleet.models.warmup import warmup_sft
from rollfleet.protocol import RolloutTask
from rollfleet.spec import ManifestError, parse_manifest
from rollfleet.tasks import make_task
from rollfleet.tasks.countdown import strategy


def job(steps: int = 10, group: int = 8, **palette):
    return parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "palette"},
            "spec": {
                "task": {"name": "countdown"},
                "trainer": {"steps": steps},
                "rollout": {"sampling": {"groupSize": group}},
                "methods": {"palette": palette},
            },
        }
    ).spec


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def batch_ids(tok, texts: list[str], width: int = 12):
    ids = torch.full((len(texts), width), tok.pad_token_id)
    for row, text in enumerate(texts):
        encoded = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)][:width]
        ids[row, : len(encoded)] = torch.tensor(encoded)
    return ids, (ids != tok.pad_token_id).long()


# --- the prefix --------------------------------------------------------------------------
def test_prefix_hook_equals_a_forward_on_hand_made_input_embeddings(model, tok):
    ids, attention = batch_ids(tok, ["3 5 7>22:", "1 2 3>6:9"])
    attention[:, :3] = 1  # the placeholder positions are attended
    prefix = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), prefix_embeddings(model, torch.tensor([1]), prefix):
        hooked = model(input_ids=ids, attention_mask=attention).logits
    embeds = model.get_input_embeddings()(ids).detach().clone()
    embeds[1, :3] = prefix[0]
    with torch.no_grad():
        manual = model(inputs_embeds=embeds, attention_mask=attention).logits
    assert torch.equal(hooked, manual)
    # the row without a prefix is the plain model's, the prefixed one is not
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(hooked[0], plain[0]) and not torch.allclose(hooked[1], plain[1])
    assert not model.get_input_embeddings()._forward_hooks  # removed after the block


def test_a_prefix_of_length_zero_is_the_plain_model(model, tok):
    ids, attention = batch_ids(tok, ["3 5 7>22:", "1 2 3>6:9"])
    empty = torch.zeros(2, 0, model.config.hidden_size)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits
        with prefix_embeddings(model, torch.tensor([0, 1]), empty):
            hooked = model(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(hooked, plain)


def test_the_trainer_stage_scores_plain_batches_as_the_default(model, tok):
    from rollfleet.models.batching import TrainBatch
    from rollfleet.protocol import Conditioning
    from tests.unit.test_protocol import make_trajectory

    plain = [make_trajectory(sample_index=i, conditioning=Conditioning()) for i in range(2)]
    batch = TrainBatch.from_trajectories(plain, 2, tok.pad_token_id)
    assert Palette(job().methods.palette, job()).policy_logprobs(model, batch) is None


# --- schedule and latents -----------------------------------------------------------------
def test_the_schedules_values():
    assert [prefixed_share("linear", t) for t in (0.0, 0.25, 0.5, 1.0)] == [1.0, 0.75, 0.5, 0.0]
    assert [prefixed_share("two_phase", t) for t in (0.0, 0.49, 0.5, 0.9)] == [1, 1, 0, 0]
    assert prefixed_share("linear", 1.7) == 0.0 and prefixed_share("linear", -1) == 1.0
    assert [prefixed_samples("linear", t, 8) for t in (0.0, 0.3, 0.5, 0.95, 1.0)] == [8, 6, 4, 0, 0]
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        prefixed_share("cosine", 0.5)


def test_a_latent_drawn_twice_with_the_same_key_gives_the_same_prefix():
    vae = PaletteVAE(hidden=32, latent=4, width=16)
    a, b = draw_latents("0/g1/3", 8, 4), draw_latents("0/g1/3", 8, 4)
    assert torch.equal(a, b) and torch.equal(vae.decode(a), vae.decode(b))
    assert not torch.equal(a, draw_latents("0/g1/4", 8, 4))
    assert a.shape == (8, 4) and abs(float(draw_latents("x", 4000, 4).std()) - 1) < 0.05


def test_manifest_refuses_an_unknown_schedule_naming_the_field():
    with pytest.raises(ManifestError, match=r"spec\.methods\.palette\.schedule"):
        job(schedule="cosine")


# --- the VAE ------------------------------------------------------------------------------
def test_the_vae_learns_the_pooled_embeddings_and_survives_its_file(model, tok, tmp_path):
    task = make_task("countdown", {}, seed=0)
    examples = [task.example("train", i) for i in range(256)]
    h = pooled_embedding(
        model,
        [tok.encode(e.prompt + e.demonstration[0][1], add_special_tokens=False) for e in examples],
    )
    assert h.shape == (256, model.config.hidden_size)
    vae = PaletteVAE(h.shape[-1], latent=8, width=64)
    history = vae.fit(h, steps=300, beta=0.05, seed=0)
    assert history[-1]["recon"] < 0.5 * history[0]["recon"]
    assert torch.allclose(vae.mean, h.mean(0))
    # decoded prior latents spread like the data (no collapse onto its mean)
    decoded = vae.decode(torch.randn(512, 8, generator=torch.Generator().manual_seed(1)))
    assert float((decoded.detach().std(0) / h.std(0)).median()) > 0.3
    vae.save(tmp_path / VAE_FILE)
    again = PaletteVAE.load(tmp_path / VAE_FILE)
    z = draw_latents("k", 3, 8)
    assert torch.equal(again.decode(z), vae.decode(z))


# --- the rollout stage --------------------------------------------------------------------
def palette_with_vae(spec, tmp_path, hidden: int) -> Palette:
    PaletteVAE(hidden, spec.methods.palette.latentDim, 32).save(tmp_path / VAE_FILE)
    stage = Palette(spec.methods.palette, spec)
    stage.load_files(tmp_path)
    return stage


def test_the_first_share_of_a_group_gets_a_prefix_and_records_its_latents(tok, model, tmp_path):
    spec = job(steps=10, group=8, prefixLength=3, latentDim=4)
    stage = palette_with_vae(spec, tmp_path, model.config.hidden_size)
    example = make_task("countdown", {}, seed=0).example("train", 0)
    prompt = [tok.bos_token_id, *tok.encode(example.prompt, add_special_tokens=False)]
    task = RolloutTask.for_example(example, index=0, group_id="g0", samples=8, min_version=5)
    requests = [stage.build_request(task, EpisodeRequest(prompt, sample=i), tok) for i in range(8)]
    prefixed = [r for r in requests if r.conditioning.palette is not None]
    assert len(prefixed) == 4 and all(r.sample < 4 for r in prefixed)  # τ = 5/10: ρ = 0.5
    for r in prefixed:
        assert r.prompt_ids == [tok.pad_token_id] * 3 + prompt
        latents = torch.tensor(r.conditioning.palette.latents)
        assert latents.shape == (3, 4)
        assert torch.equal(r.prompt_embeds, stage.prefix(latents))  # the trainer's decode
    assert len({tuple(map(tuple, r.conditioning.palette.latents)) for r in prefixed}) == 4
    plain = [r for r in requests if r.conditioning.palette is None]
    assert all(r.prompt_ids == prompt and r.prompt_embeds is None for r in plain)
    held_out = stage.build_request(task, EpisodeRequest(prompt), tok)  # no sample index
    assert held_out.prompt_ids == prompt and held_out.conditioning.palette is None


def test_the_vae_file_travels_with_the_model_files():
    assert Stages.for_spec(job()).model_files == (VAE_FILE,)


# --- the warm-up --------------------------------------------------------------------------
def test_the_warmup_trains_the_vae_then_sft_behind_prior_prefixes(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = job(latentDim=4, vaeSteps=20, vaeExamples=64, sftSteps=2, vaeHidden=16)
    task = make_task("countdown", {}, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = Palette(spec.methods.palette, spec)
    stage.warmup(model, tok, task, tmp_path)
    assert (tmp_path / VAE_FILE).is_file() and stage.vae.latent == 4
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # A start model that carries a VAE (a Palette warm-up's folder) is not warmed up again.
    shutil.copytree(tiny_model_dir, tmp_path / "start")
    shutil.copyfile(tmp_path / VAE_FILE, tmp_path / "start" / VAE_FILE)
    again = job(latentDim=4)
    again.model.path = str(tmp_path / "start")
    model_again = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reuse = Palette(again.methods.palette, again)
    (tmp_path / "out").mkdir()
    reuse.warmup(model_again, tok, task, tmp_path / "out")
    z = draw_latents("k", 2, 4)
    assert torch.equal(reuse.prefix(z), stage.prefix(z))
    assert all(
        torch.equal(v, AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()[k])
        for k, v in model_again.state_dict().items()
    )


def test_sft_behind_prefixes_trains_on_the_response_only(model, tok):
    task = make_task("countdown", {}, seed=0)
    seen = []

    def prefixes(batch: int):
        seen.append(batch)
        return torch.zeros(batch, 2, model.config.hidden_size)

    trained = AutoModelForCausalLM.from_config(model.config)
    trained.load_state_dict(model.state_dict())
    losses = warmup_sft(
        trained, tok, task, steps=2, batch_size=4, lr=1e-3, seed=0, prefixes=prefixes
    )
    assert seen == [4, 4] and all(torch.isfinite(torch.tensor(losses)))


# --- the task's strategies ----------------------------------------------------------------
def test_countdown_strategies_are_operator_patterns():
    assert strategy("3*5+7") == strategy("5*3+7.") == "*+"
    assert strategy("7+3*5") == "+*" and strategy("(7+3)*5") == "(+)*"
    assert strategy("3*+5") is None and strategy("") is None


def test_token_logprobs_behind_a_prefix_differ_from_plain(model, tok):
    ids, attention = batch_ids(tok, ["3 5 7>22:3*5+7"])
    prefix = torch.randn(1, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    plain = token_logprobs(model, ids, attention)
    with prefix_embeddings(model, torch.tensor([0]), prefix):
        behind = token_logprobs(model, ids, attention)
    assert not torch.allclose(plain[:, 3:], behind[:, 3:])
