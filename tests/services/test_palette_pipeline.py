"""Reasoning Palette through the pipeline: one countdown task goes from the bus through a
real rollout worker (torch engine, a real reward service) to the trainer. Half the group
samples behind a prefix decoded from its latents; the trainer decodes the same prefix from
the latents the trajectory carries, and its log-probs equal the engine's (on-policy ratio
1 within 1e-5), which they do not without the prefix."""

from __future__ import annotations

import shutil

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.methods.palette.stages import VAE_FILE
from rollfleet.methods.palette.vae import PaletteVAE
from rollfleet.models.batching import TrainBatch, token_logprobs
from rollfleet.models.weights import export_state
from rollfleet.protocol import RolloutTask
from rollfleet.spec import RLJob
from rollfleet.tasks import make_task
from rollfleet_reward.app import create_app as create_reward_app
from rollfleet_trainer.loop import Group, Trainer
from tests.conftest import serving
from tests.services import worker_harness as harness
from tests.services.test_rollout_worker import collect

GROUP, PREFIX, STEPS = 4, 3, 10


def palette_job() -> RLJob:
    return RLJob.model_validate(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "palette-pipeline"},
            "spec": {
                "task": {"name": "countdown"},
                "rollout": {
                    "pools": [{"name": "p", "replicas": 1, "maxBatch": 8}],
                    "sampling": {"groupSize": GROUP, "maxNewTokens": 8, "temperature": 1.0},
                },
                "trainer": {"promptsPerStep": 1, "steps": STEPS},
                "methods": {"palette": {"prefixLength": PREFIX, "latentDim": 4}},
            },
        }
    )


async def test_the_trainer_scores_each_sample_behind_the_prefix_it_was_drawn_with(
    nats_server, tiny_model_dir, tmp_path
):
    job = palette_job()
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    vae = PaletteVAE(model.config.hidden_size, 4, 32)
    with torch.no_grad():  # prefixes on the scale of real embeddings
        vae.std.fill_(float(model.get_input_embeddings().weight.std()) * 4)
    vae.save(folder / VAE_FILE)
    example = make_task("countdown", {}).example("train", 3)
    # Issued at version 5 of 10: the linear schedule prefixes half the group.
    task = RolloutTask.for_example(example, index=3, group_id="g3", samples=GROUP, min_version=5)
    with serving(create_reward_app(job.spec.reward_functions())) as reward_url:
        async with harness.running_worker(
            nats_server, "palette", folder, export_state(model), job.spec, reward_url=reward_url
        ) as (trainer_bus, _):
            await harness.publish_weights(trainer_bus, 5, export_state(model))
            await trainer_bus.publish(trainer_bus.subjects.tasks, task)
            got = sorted(await collect(trainer_bus, GROUP), key=lambda t: t.sample_index)

    prefixed = [t for t in got if t.conditioning.palette is not None]
    assert [t.sample_index for t in prefixed] == [0, 1]
    assert all(t.prompt_ids[:PREFIX] == [tok.pad_token_id] * PREFIX for t in prefixed)

    trainer = Trainer(job, None, tmp_path / "run")
    trainer.set_model(model, tok)
    trainer.stages.load_files(folder)
    batch = trainer.stages.build_batch(TrainBatch.from_trajectories(got, GROUP, tok.pad_token_id))
    with torch.no_grad():
        recomputed = trainer.policy_logprobs(batch)
        plain = token_logprobs(model, batch.input_ids, batch.attention_mask)
    on = batch.loss_mask > 0
    ratio = (recomputed - batch.behaviour_logprobs)[on].exp()
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio
    # Without its prefix a prefixed sample is scored differently; the plain ones are not.
    gap = (plain - batch.behaviour_logprobs).abs() * on
    assert float(gap[:2].max()) > 1e-3 and float(gap[2:].max()) < 1e-5

    group = Group(index=3, size=GROUP)
    group.samples = {t.sample_index: (t, None) for t in got}
    stats = trainer.train_step([group])
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert stats["palette_prefixed_share"] == 0.5
