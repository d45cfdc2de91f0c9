"""The rollout worker against a real nats-server and real reward and env services.

A tiny model warmed up for a few seconds on calculator demonstrations calls the tool, so
multi-turn episodes really go through the env service; the test plays the trainer's part
on the bus (model files, weights, tasks) and reads what the worker publishes.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
import transformers
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.bus import Bus
from rollfleet.models.tiny import create_tiny_model
from rollfleet.models.warmup import warmup_sft
from rollfleet.models.weights import export_state
from rollfleet.protocol import RolloutTask, Trajectory, TrajectoryStatus
from rollfleet.spec import RLJobSpec
from rollfleet.tasks import make_task
from rollfleet_env.app import create_app as create_env_app
from rollfleet_reward.app import create_app as create_reward_app
from tests.conftest import serving, until_tasks_acked
from tests.services import worker_harness as harness

JOB = "worker-job"


@pytest.fixture(scope="module")
def calculator_model(tmp_path_factory):
    """A tiny model that has seen 150 steps of calculator demonstrations (a few seconds)."""
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    folder = create_tiny_model(tmp_path_factory.mktemp("model"), seed=0)
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
    )
    warmup_sft(model, tokenizer, make_task("calculator"), steps=150, batch_size=32, lr=3e-3, seed=0)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def env_url():
    with serving(create_env_app(make_task("calculator"), session_timeout=30)) as url:
        yield url


@pytest.fixture
def reward_url():
    with serving(create_reward_app(calculator_spec().reward_functions())) as url:
        yield url


def calculator_spec(group: int = 4) -> RLJobSpec:
    return RLJobSpec.model_validate(
        {
            "task": {"name": "calculator"},
            "async": {"ratio": 1},
            "rollout": {
                "pools": [{"name": "p", "replicas": 1, "maxBatch": 8}],
                "sampling": {"groupSize": group, "maxNewTokens": 8, "temperature": 0.0},
            },
            "model": {"maxLength": 64},
            "reward": {"client": {"attempts": 2, "backoffSeconds": 0.01}},
        }
    )


@contextlib.asynccontextmanager
async def running_worker(
    nats_server, calculator_model, spec: RLJobSpec, reward_url: str, env_url: str
):
    folder, model = calculator_model
    async with harness.running_worker(
        nats_server,
        JOB,
        folder,
        export_state(model),
        spec,
        reward_url=reward_url,
        env_url=env_url,
    ) as (trainer, worker):
        yield trainer, worker


async def collect(bus: Bus, count: int, timeout: float = 60, rank: int = 0) -> list[Trajectory]:
    consumer = await bus.trajectory_consumer(rank)
    got: list[Trajectory] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < count:
        assert asyncio.get_running_loop().time() < deadline, (
            f"only {len(got)} of {count} trajectories arrived"
        )
        for traj, raw in await bus.fetch(consumer, Trajectory, count, timeout=0.5):
            got.append(traj)
            await raw.ack()
    return got


def calculator_task(index: int, group: int) -> RolloutTask:
    example = make_task("calculator").example("heldout", index)
    return RolloutTask.for_example(
        example, index=index, group_id=f"g{index}", samples=group, multi_turn=True
    )


async def test_multi_turn_episodes_go_through_the_env_and_get_scored(
    nats_server, calculator_model, reward_url, env_url
):
    spec = calculator_spec(group=4)
    async with running_worker(nats_server, calculator_model, spec, reward_url, env_url) as (
        trainer,
        worker,
    ):
        for index in range(3):
            await trainer.publish(trainer.subjects.tasks, calculator_task(index, 4))
        trajectories = await collect(trainer, 12)
        engine = worker.engine
    tokenizer = AutoTokenizer.from_pretrained(calculator_model[0])
    assert sorted((t.group_id, t.sample_index) for t in trajectories) == [
        (f"g{i}", s) for i in range(3) for s in range(4)
    ]
    with_tool = [t for t in trajectories if 0.0 in t.loss_mask]
    assert with_tool, "the warmed-up model never called the calculator"
    # each sample's turns were one engine session: a turn after the calculator's reply fed
    # only the reply, not the conversation
    assert engine.prefill_tokens_kept > 0
    for t in with_tool:
        env_positions = [i for i, m in enumerate(t.loss_mask) if m == 0.0]
        env_text = tokenizer.decode([t.response_ids[i] for i in env_positions])
        assert env_text.startswith("=") and env_text.endswith(";")  # the env's reply, e.g. "=408;"
        assert all(
            t.token_versions[i] == -1 and t.behaviour_logprobs[i] == 0.0 for i in env_positions
        )
        # the model's turn before the env reply ended with the tool-call stop token
        assert tokenizer.decode([t.response_ids[env_positions[0] - 1]]) == ";"
    for t in trajectories:
        assert t.status in (TrajectoryStatus.COMPLETED, TrajectoryStatus.TRUNCATED)
        model_versions = [v for v, m in zip(t.token_versions, t.loss_mask, strict=True) if m > 0]
        assert model_versions and set(model_versions) == {0}
        assert t.reward == float(
            t.response_text.startswith("a")
            and t.response_text[1:] == calculator_task(int(t.group_id[1:]), 4).answer
        )


async def test_reward_service_down_marks_samples_failed_and_acks_the_task(
    nats_server, calculator_model, env_url
):
    """After outageWaitSeconds (see test_reward_client for an outage that ends in time)."""
    spec = calculator_spec(group=2)
    spec.reward.client.outageWaitSeconds = 0
    dead_reward = "http://127.0.0.1:9"  # discard port: nothing listens

    def failed(reason: str) -> float:
        labels = {"pool": "p", "reason": reason}
        return REGISTRY.get_sample_value("rollfleet_rollout_reward_failures_total", labels) or 0

    before = {reason: failed(reason) for reason in ("unreachable", "circuit_open")}
    async with running_worker(nats_server, calculator_model, spec, dead_reward, env_url) as (
        trainer,
        _,
    ):
        await trainer.publish(trainer.subjects.tasks, calculator_task(0, 2))
        trajectories = await collect(trainer, 2)
        await until_tasks_acked(trainer)  # acked: its samples are accounted for, not lost
    assert [t.status for t in trajectories] == [TrajectoryStatus.FAILED] * 2
    # Counted under the reason: its two tries found nothing listening.
    assert failed("unreachable") - before["unreachable"] == 2
    assert failed("circuit_open") == before["circuit_open"]


async def test_worker_waits_for_the_task_min_version_and_tags_tokens(
    nats_server, calculator_model, reward_url, env_url
):
    spec = calculator_spec(group=2)
    _folder, model = calculator_model
    async with running_worker(nats_server, calculator_model, spec, reward_url, env_url) as (
        trainer,
        _,
    ):
        task = calculator_task(1, 2).model_copy(update={"min_version": 3})
        await trainer.publish(trainer.subjects.tasks, task)
        await asyncio.sleep(1.0)
        early = await collect_nowait(trainer)
        await harness.publish_weights(trainer, 3, export_state(model))
        trajectories = await collect(trainer, 2)
    assert early == []  # nothing was generated with version 0 for a task that needs 3
    for t in trajectories:
        assert {v for v, m in zip(t.token_versions, t.loss_mask, strict=True) if m > 0} == {3}


async def collect_nowait(bus: Bus, rank: int = 0) -> list[Trajectory]:
    consumer = await bus.trajectory_consumer(rank)
    return [t for t, _ in await bus.fetch(consumer, Trajectory, 10, timeout=0.2)]


async def test_trajectories_go_to_the_trainer_rank_that_issued_the_task(
    nats_server, calculator_model, reward_url, env_url
):
    spec = calculator_spec(group=2)
    async with running_worker(nats_server, calculator_model, spec, reward_url, env_url) as (
        trainer,
        _,
    ):
        await trainer.publish(trainer.subjects.tasks, calculator_task(0, 2))
        issued_by_1 = calculator_task(1, 2).model_copy(update={"trainer_rank": 1})
        await trainer.publish(trainer.subjects.tasks, issued_by_1)
        rank1 = await collect(trainer, 2, rank=1)
        rank0 = await collect(trainer, 2, rank=0)
        stream = await trainer.js.stream_info(trainer.subjects.trajectory_stream)
    assert {t.group_id for t in rank1} == {"g1"}
    assert {t.group_id for t in rank0} == {"g0"}
    assert stream.state.last_seq == 4  # each published once, on its rank's subject only


async def test_a_mixed_jobs_examples_end_their_turns_on_their_own_tasks_stops(
    nats_server, calculator_model
):
    """`task: mixed`: the workers take each example's turn stops from its meta (the mix's
    class has none of its own), so a calculator example's tool call ends at `;` and the
    env answers; a countdown example in the same job is one turn."""
    mix = {"tasks": [{"name": "calculator"}, {"name": "countdown"}]}
    spec = calculator_spec(group=2).model_copy(deep=True)
    spec.task = spec.task.model_copy(update={"name": "mixed", "params": mix})
    task = make_task("mixed", mix)
    calculator = next(
        i for i in range(50) if task.example("heldout", i).meta["kind"] == "calculator"
    )
    countdown = next(i for i in range(50) if task.example("heldout", i).meta["kind"] == "countdown")
    env = create_env_app(task, session_timeout=30)
    with serving(env) as env_url, serving(create_reward_app(spec.reward_functions())) as reward_url:
        async with running_worker(nats_server, calculator_model, spec, reward_url, env_url) as (
            bus,
            _,
        ):
            for index in (calculator, countdown):
                example = task.example("heldout", index)
                await bus.publish(
                    bus.subjects.tasks,
                    RolloutTask.for_example(
                        example,
                        index=index,
                        group_id=f"g{index}",
                        samples=2,
                        multi_turn=task.is_multi_turn(example),
                    ),
                )
            trajectories = await collect(bus, 4)
    tokenizer = AutoTokenizer.from_pretrained(calculator_model[0])
    tools = [t for t in trajectories if t.group_id == f"g{calculator}"]
    assert any(0.0 in t.loss_mask for t in tools), "no calculator turn reached the env"
    for t in tools:
        if 0.0 in t.loss_mask:
            first_env = t.loss_mask.index(0.0)
            assert tokenizer.decode([t.response_ids[first_env - 1]]) == ";"
    for t in trajectories:
        if t.group_id == f"g{countdown}":
            assert 0.0 not in t.loss_mask  # one turn, no env
