"""NEZHA through the pipeline: one recommendation task goes from the bus through a real
rollout worker (torch engine in its draft decode mode, a real reward service) to the
trainer. Every sampled item is in the catalogue (the verifier), the reward service
reports it valid, the trainer's draft-head log-probs equal the engine's (on-policy ratio
1 within 1e-5), and a train step runs on the group."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.models.architectures import ARCHITECTURES, import_architectures
from rollfleet.models.batching import TrainBatch
from rollfleet.models.weights import export_state
from rollfleet.protocol import RolloutTask
from rollfleet.spec import RLJob
from rollfleet.tasks import make_task
from rollfleet.tasks.recommend import item_codes, verifier_for
from rollfleet_reward.app import create_app as create_reward_app
from rollfleet_trainer.loop import Group, Trainer
from tests.conftest import serving
from tests.services import worker_harness as harness
from tests.services.test_rollout_worker import collect

GROUP = 6
TASK = {"codes": 8, "items": 40, "history": 4}


def nezha_job() -> RLJob:
    return RLJob.model_validate(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "nezha-pipeline"},
            "spec": {
                "task": {"name": "recommend", "params": TASK},
                "model": {"architecture": "nezha"},
                "rollout": {
                    "pools": [{"name": "p", "replicas": 1, "maxBatch": 8}],
                    "sampling": {"groupSize": GROUP, "maxNewTokens": 3, "temperature": 1.0},
                },
                "trainer": {"promptsPerStep": 1, "steps": 4},
                "methods": {"nezha": {}},
            },
        }
    )


async def test_sampled_items_are_valid_and_trained_on_policy(nats_server, tmp_path):
    job = nezha_job()
    folder = ARCHITECTURES["nezha"].create(
        tmp_path / "model", seed=0, hidden=32, layers=2, heads=2, max_len=64
    )
    import_architectures()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    example = make_task("recommend", TASK).example("train", 2)
    task = RolloutTask.for_example(example, index=2, group_id="g2", samples=GROUP)
    with serving(create_reward_app(job.spec.reward_functions())) as reward_url:
        async with harness.running_worker(
            nats_server, "nezha", folder, export_state(model), job.spec, reward_url=reward_url
        ) as (trainer_bus, _):
            await trainer_bus.publish(trainer_bus.subjects.tasks, task)
            got = sorted(await collect(trainer_bus, GROUP), key=lambda t: t.sample_index)

    verifier = verifier_for(0, TASK["codes"], TASK["items"])
    assert all(len(t.response_ids) == 3 and t.loss_mask == [1.0] * 3 for t in got)
    assert all(verifier.valid(item_codes(t.response_text)) for t in got)
    assert all(t.reward_parts["item_valid"] == 1.0 for t in got)
    assert all(t.reward == t.reward_parts["recommend"] for t in got)

    trainer = Trainer(job, None, tmp_path / "run")
    trainer.set_model(model, tok)
    batch = trainer.stages.build_batch(TrainBatch.from_trajectories(got, GROUP, tok.pad_token_id))
    with torch.no_grad():
        recomputed = trainer.policy_logprobs(batch)
    on = batch.loss_mask > 0
    ratio = (recomputed - batch.behaviour_logprobs)[on].exp()
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio

    # The policy's log-probs reach the head and the backbone (RL trains both).
    (recomputed := trainer.policy_logprobs(batch))[on].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "draft.out" in n)
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    model.zero_grad(set_to_none=True)

    group = Group(index=2, size=GROUP)
    group.samples = {t.sample_index: (t, None) for t in got}
    stats = trainer.train_step([group])
    assert torch.isfinite(torch.tensor(stats["loss"]))
