"""RAVR through the pipeline: one `solve` task goes from the bus through a real rollout
worker (and a real reward service) to the trainer's batch and step. The reference answer
reaches the posterior samples' prompts and nothing the question-only policy is fed: not
the prior samples' prompts, not the rows that train the question-only prompt on posterior
traces."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.models.batching import TrainBatch
from rollfleet.models.weights import export_state
from rollfleet.protocol import RolloutTask
from rollfleet.spec import RLJob
from rollfleet.tasks import make_task
from rollfleet_reward.app import create_app as create_reward_app
from rollfleet_trainer.loop import Group, Trainer
from tests.conftest import serving
from tests.services import worker_harness as harness
from tests.services.test_rollout_worker import collect

GROUP, POSTERIOR = 4, 2


@pytest.fixture
def job() -> RLJob:
    return RLJob.model_validate(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "ravr-pipeline"},
            "spec": {
                "task": {"name": "solve", "params": {"steps": 2}},
                "rollout": {
                    "pools": [{"name": "p", "replicas": 1, "maxBatch": 8}],
                    "sampling": {"groupSize": GROUP, "maxNewTokens": 12, "temperature": 1.0},
                },
                "trainer": {"promptsPerStep": 1},
                "methods": {"ravr": {"posteriorSamples": POSTERIOR}},
            },
        }
    )


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


async def test_the_answer_reaches_posterior_prompts_only(
    nats_server, tiny_model_dir, tmp_path, job
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = make_task("solve", {"steps": 2}).example("train", 5)
    task = RolloutTask.for_example(example, index=5, group_id="g5", samples=GROUP)
    question = [tok.bos_token_id, *tok.encode(example.prompt, add_special_tokens=False)]
    hint = tok.encode(f"[{example.answer}]", add_special_tokens=False)
    with serving(create_reward_app(job.spec.reward_functions())) as reward_url:
        async with harness.running_worker(
            nats_server,
            "ravr",
            tiny_model_dir,
            export_state(model),
            job.spec,
            reward_url=reward_url,
        ) as (trainer_bus, _):
            await trainer_bus.publish(trainer_bus.subjects.tasks, task)
            got = sorted(await collect(trainer_bus, GROUP), key=lambda t: t.sample_index)

    # The worker: the first POSTERIOR samples saw the answer, the others the question only.
    for t in got:
        ravr = t.conditioning.ravr
        assert ravr.question_ids == question
        assert tok.decode(ravr.reference_ids) == example.answer
        if t.sample_index < POSTERIOR:
            assert ravr.posterior and t.prompt_ids == [question[0], *hint, *question[1:]]
        else:
            assert not ravr.posterior and t.prompt_ids == question

    # The trainer: every row but the posterior samples' own starts with the question only.
    trainer = Trainer(job, None, tmp_path)
    trainer.set_model(model, tok)
    batch = trainer.stages.build_batch(TrainBatch.from_trajectories(got, GROUP, tok.pad_token_id))
    posterior = batch.extras["ravr_posterior"]
    assert len(batch) == GROUP + POSTERIOR and batch.extras["ravr_pull"].sum() == POSTERIOR
    for row in range(len(batch)):
        ids = batch.input_ids[row][batch.attention_mask[row] > 0].tolist()
        prompt = ids[: batch.prompt_lengths[row]]
        assert contains(prompt, hint) == bool(posterior[row])
        if not posterior[row]:
            assert prompt == question
    group = Group(index=5, size=GROUP)
    group.samples = {t.sample_index: (t, None) for t in got}
    stats = trainer.train_step([group])
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert 0 < stats["ravr_utility_prior"] < 1
