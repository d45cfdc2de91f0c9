"""The trainer: owns the dataset cursor and the policy version, and turns trajectories into steps.

One loop, in order:
1. keep at most (1+α)·promptsPerStep prompt groups in flight by publishing tasks
   (each carries `min_version`, the version a worker must load before starting it);
2. collect trajectories into their groups; a finished group whose oldest token is more
   than α versions old is dropped and counted, as is a group with an aborted or failed
   sample;
3. once promptsPerStep fresh groups are ready: advantages, policy loss, one AdamW step,
   then publish the new weights, ack the consumed messages, write progress and metrics,
   and checkpoint every `checkpoint.every` steps.
With α = 0 this is synchronous training: every batch comes from the current version.

With `trainer.workers` = W > 1 (Ray Train, see ray_train.py) every rank runs this loop on
its own share: it issues its own tasks (dataset indices ≡ rank mod W), consumes the
trajectories of those tasks only, and trains on promptsPerStep / W groups per step; the
ranks meet in the optimizer step (gradients averaged by DDP, or FSDP2's reduce-scatter)
and in a few small all-reduces of counters. Rank 0 (the leader) publishes weights,
writes checkpoints, metrics and progress, and evaluates.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import Counter, Gauge, Histogram

from rollfleet.algorithms import ADVANTAGES, POLICY_LOSSES
from rollfleet.bus import Bus
from rollfleet.evaluation import heldout_accuracy
from rollfleet.models.batching import pad_sequences, token_logprobs
from rollfleet.models.files import publish_model_files
from rollfleet.models.weights import export_state
from rollfleet.protocol import Progress, Task, Trajectory, TrajectoryStatus
from rollfleet.spec import RLJob
from rollfleet.tasks import make_task
from rollfleet.weight_transport import make_weight_store, publish_version
from rollfleet_trainer.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from rollfleet_trainer.model import build_from_bus, prepare_policy
from rollfleet_trainer.parallel import DataParallel

log = logging.getLogger("trainer")

STEP = Gauge("rollfleet_trainer_step", "Training steps done")
VERSION = Gauge("rollfleet_trainer_policy_version", "Newest published policy version")
REWARD = Gauge("rollfleet_trainer_reward_mean", "Mean reward of the last batch")
LOSS = Gauge("rollfleet_trainer_loss", "Policy loss of the last step")
KL = Gauge("rollfleet_trainer_approx_kl", "Approximate KL(behaviour || current) of the last step")
HELDOUT = Gauge(
    "rollfleet_trainer_heldout_accuracy", "Held-out accuracy at the last evaluation", ["decoding"]
)
IN_FLIGHT = Gauge("rollfleet_trainer_groups_in_flight", "Prompt groups issued and not yet consumed")
SAMPLES = Counter("rollfleet_trainer_samples_total", "Samples consumed by training steps")
DROPPED = Counter("rollfleet_trainer_samples_dropped_total", "Samples not trained on", ["reason"])
STALENESS = Histogram(
    "rollfleet_trainer_staleness",
    "Policy versions between a sample's oldest token and the trainer",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
)
STEP_SECONDS = Histogram(
    "rollfleet_trainer_step_seconds",
    "Wall time of one optimizer step (forward, backward, update)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)


@dataclass
class Group:
    index: int
    size: int
    samples: dict[int, tuple[Trajectory, object]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"g{self.index}"

    def complete(self) -> bool:
        return len(self.samples) == self.size

    def oldest_version(self) -> int | None:
        versions = [v for t, _ in self.samples.values() if (v := t.oldest_version()) is not None]
        return min(versions) if versions else None


class Trainer:
    def __init__(self, job: RLJob, bus: Bus, run_dir: Path, dp: DataParallel | None = None):
        self.job, self.spec, self.bus, self.run_dir = job, job.spec, bus, run_dir
        self.dp = dp or DataParallel()
        self.weight_store = make_weight_store(self.spec.weights, bus, run_dir)
        self.task = make_task(self.spec.task.name, self.spec.task.params, self.spec.seed)
        self.alpha = self.spec.async_.ratio
        self.prompts_per_step = self.spec.trainer.promptsPerStep // self.dp.world  # this rank's
        self.group_size = self.spec.rollout.sampling.groupSize
        self.checkpoints = run_dir / "checkpoints"
        self.metrics_file = run_dir / "metrics.jsonl"
        self.state = {
            "step": 0,
            "version": 0,
            "cursor": 0,
            "samples": 0,
            "dropped_stale": 0,
            "dropped_failed": 0,
            "heldout_before": None,
            "heldout_greedy_before": None,
            "rl_seconds": 0.0,
        }
        self.groups: dict[str, Group] = {}
        self.ready: deque[Group] = deque()
        self.discarded: set[str] = set()
        self.dropped_here = {"stale": 0, "failed": 0}  # this rank's, since the last step

    # --- helpers ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy as avg@k at the rollout temperature (the policy RL trains), and greedy."""
        common = dict(
            verifier=self.spec.verifier(),
            max_new_tokens=self.spec.rollout.sampling.maxNewTokens,
            limit=self.spec.task.heldoutLimit,
        )
        sampled = heldout_accuracy(
            self.eval_model,
            self.tokenizer,
            self.task,
            **common,
            temperature=self.spec.rollout.sampling.temperature,
            samples=self.spec.trainer.evalSamples,
            seed=self.spec.seed,
        )
        greedy = heldout_accuracy(self.eval_model, self.tokenizer, self.task, **common)
        HELDOUT.labels("sampled").set(sampled)
        HELDOUT.labels("greedy").set(greedy)
        return {"accuracy": sampled, "greedy": greedy}

    async def progress(self, phase: str, **extra) -> None:
        s = self.state
        await self.bus.put_progress(
            Progress(
                phase=phase,
                step=s["step"],
                total_steps=self.spec.trainer.steps,
                policy_version=s["version"],
                samples_consumed=s["samples"],
                samples_dropped_stale=s["dropped_stale"],
                heldout_before=s["heldout_before"],
                **extra,
            )
        )

    async def publish_weights(self, model_state: dict) -> None:
        """Publish the version in `self.state` (leader only) from a full model state."""
        await publish_version(
            self.bus,
            self.weight_store,
            self.state["version"],
            self.state["step"],
            export_state(self.model, model_state),
            int(self.spec.weights.bucketMB * 2**20),
        )
        VERSION.set(self.state["version"])
        # Workers only ever need versions within α of the newest; keep a little slack.
        await self.weight_store.delete_before(self.state["version"] - self.alpha - 2)

    async def issue_tasks(self) -> None:
        while len(self.groups) + len(self.ready) < (1 + self.alpha) * self.prompts_per_step:
            index = self.state["cursor"]
            self.state["cursor"] += self.dp.world  # this rank's indices: ≡ rank (mod world)
            example = self.task.example("train", index)
            group = Group(index, self.group_size)
            self.groups[group.id] = group
            await self.bus.publish(
                self.bus.subjects.tasks,
                Task(
                    task_id=f"t{index}",
                    group_id=group.id,
                    index=index,
                    prompt=example.prompt,
                    answer=example.answer,
                    meta=example.meta,
                    samples=self.group_size,
                    group_size=self.group_size,
                    multi_turn=self.task.multi_turn,
                    min_version=self.state["version"],
                    trainer_rank=self.dp.rank,
                ),
            )
        IN_FLIGHT.set(len(self.groups) + len(self.ready))

    async def drop(self, group: Group, reason: str) -> None:
        """Account for a group we will not train on, and ack what arrived of it."""
        self.groups.pop(group.id, None)
        self.discarded.add(group.id)
        DROPPED.labels(reason).inc(group.size)
        self.dropped_here["stale" if reason == "stale" else "failed"] += group.size
        for _, raw in group.samples.values():
            await raw.ack()

    def is_fresh(self, group: Group) -> bool:
        oldest = group.oldest_version()
        return oldest is None or self.state["version"] - oldest <= self.alpha

    async def collect(self, consumer) -> None:
        for traj, raw in await self.bus.fetch(consumer, Trajectory, 256, timeout=0.2):
            group = self.groups.get(traj.group_id)
            if group is None:
                # The rest of a dropped group, or a leftover from before a resume.
                reason = "dropped_group" if traj.group_id in self.discarded else "unknown_group"
                DROPPED.labels(reason).inc()
                await raw.ack()
                continue
            group.samples[traj.sample_index] = (traj, raw)
            if traj.status in (TrajectoryStatus.ABORTED, TrajectoryStatus.FAILED):
                await self.drop(group, traj.status.value)
            elif group.complete():
                if self.is_fresh(group):
                    self.groups.pop(group.id)
                    self.ready.append(group)
                else:
                    await self.drop(group, "stale")

    def learning_rate(self, step: int) -> float:
        """The rate for the step after `step` steps; derived from the step, so resume-safe."""
        algo = self.spec.algorithm
        if algo.learningRateSchedule == "linear":
            return algo.learningRate * (1 - step / self.spec.trainer.steps)
        return algo.learningRate

    # --- model set-up ------------------------------------------------------------------------
    def set_model(self, model, tokenizer) -> None:
        """Take a policy (rank 0's weights win), wrap it for training, make the optimizer.

        Evaluation runs on `eval_model`: the policy itself, or under FSDP a copy on the
        leader's CPU (a sharded model's forward needs every rank)."""
        self.device = self._device()
        self.model, self.tokenizer = model, tokenizer
        if self.dp.sharded:
            self.eval_model = copy.deepcopy(model) if self.dp.is_leader else model
            full = model.state_dict() if self.dp.is_leader else {}
            # FSDP2 moves each layer to the device as it shards it: the whole model never
            # has to fit one device. Rank 0's weights are then broadcast shard by shard.
            self.train_model = self.dp.wrap(model)
            self.dp.load_model_state(model, full)
        else:
            self.eval_model = model
            model.to(self.device)
            self.dp.broadcast_parameters(model)
            self.train_model = self.dp.wrap(model)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.spec.algorithm.learningRate, weight_decay=0.0
        )

    def _device(self) -> torch.device:
        if not self.spec.trainer.gpusPerWorker:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"spec.trainer.gpusPerWorker is {self.spec.trainer.gpusPerWorker} but this "
                "trainer sees no CUDA GPU: schedule it on a GPU node, or set gpusPerWorker: 0"
            )
        return torch.device("cuda", torch.cuda.current_device())  # Ray Train sets it per rank

    def full_model_state(self) -> dict:
        """The full weights on the leader (a collective under FSDP); the eval copy follows."""
        state, _ = self.dp.full_state(self.model)
        if self.dp.sharded and self.dp.is_leader:
            self.eval_model.load_state_dict(state, strict=False)
        return state

    # --- one optimizer step -----------------------------------------------------------------
    def train_step(self, batch: list[Group]) -> dict:
        """One optimizer step on this rank's groups; every rank calls it together."""
        algo = self.spec.algorithm
        trajectories = [g.samples[i][0] for g in batch for i in range(g.size)]
        rewards = torch.tensor([t.reward for t in trajectories]).view(len(batch), -1)
        advantages = ADVANTAGES[algo.advantage](rewards).view(-1)
        sequences, masks, behaviour = [], [], []
        for t in trajectories:
            sequences.append(t.prompt_ids + t.response_ids)
            weights = t.token_weights or [1.0] * len(t.loss_mask)
            masks.append(
                [0.0] * len(t.prompt_ids)
                + [m * w for m, w in zip(t.loss_mask, weights, strict=True)]
            )
            behaviour.append([0.0] * len(t.prompt_ids) + t.behaviour_logprobs)
        ids, attention, mask, behaviour_lp = (
            t.to(self.device)
            for t in pad_sequences(sequences, self.tokenizer.pad_token_id, masks, behaviour)
        )
        advantages = advantages.to(self.device)
        # Losses average over this rank's tokens; scaling by its share of all ranks' tokens
        # (times world, as DDP/FSDP average gradients) makes W ranks take exactly the step
        # one process would take on the whole batch.
        tokens_here = float(mask.sum())
        (tokens_all,) = self.dp.all_reduce([tokens_here])
        share = tokens_here / max(tokens_all, 1e-8)
        self.train_model.train()
        logprobs = token_logprobs(
            self.train_model, ids, attention, self.spec.rollout.sampling.temperature
        )
        loss, stats = POLICY_LOSSES[algo.policyLoss](
            logprobs,
            behaviour_lp,
            advantages[:, None].expand_as(logprobs),
            mask,
            clip_eps=algo.clipEpsilon,
        )
        self.optimizer.zero_grad(set_to_none=True)
        (loss * share * self.dp.world).backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.state["step"])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), algo.maxGradNorm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.train_model.eval()
        version = self.state["version"]
        staleness = [
            version - v
            for t in trajectories
            for v, m in zip(t.token_versions, t.loss_mask, strict=True)
            if m > 0 and v >= 0
        ]
        # Batch-wide metrics: token means weighted by each rank's share, sums summed.
        token_means = {"loss": loss.item(), **stats}
        sums = self.dp.all_reduce(
            [v * share for v in token_means.values()]
            + [
                rewards.sum().item(),
                rewards.numel(),
                sum(staleness),
                len(staleness),
                sum(len(t.response_ids) for t in trajectories),
            ]
        )
        reward_sum, samples, staleness_sum, staleness_count, response_tokens = sums[-5:]
        (max_staleness,) = self.dp.all_reduce([max(staleness, default=0)], op="max")
        return {
            **dict(zip(token_means, sums, strict=False)),
            "grad_norm": float(grad_norm),
            "mean_reward": reward_sum / samples,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "staleness": staleness_sum / max(staleness_count, 1),
            "max_staleness": int(max_staleness),
            "response_tokens": int(response_tokens),
        }

    # --- start and resume ---------------------------------------------------------------------
    def load_latest_checkpoint(self) -> bool:
        """Resume model, optimizer and counters from the newest checkpoint, if there is one.

        The leader reads it and every rank gets its copy, whatever the number of ranks
        that wrote it. Every rank calls this together."""
        dp = self.dp
        checkpoint = latest_checkpoint(self.checkpoints) if dp.is_leader else None
        if not dp.broadcast_json(checkpoint is not None):
            return False
        model_state, optim_state, state = (
            read_checkpoint(checkpoint) if dp.is_leader else ({}, {}, {})
        )
        dp.load_full_state(self.model, self.optimizer, model_state, optim_state)
        self.state.update(dp.broadcast_json(state))
        if dp.is_leader:
            log.info(
                "resumed from %s at step %d (version %d) on %d rank(s)",
                checkpoint.name,
                self.state["step"],
                self.state["version"],
                dp.world,
            )
        return True

    async def prepare(self) -> None:
        """Policy, optimizer and counters on every rank; the leader warms up and publishes
        the model files, the others build the model from those and take its weights."""
        dp = self.dp
        if dp.is_leader:
            await self.bus.ensure_streams()
            await self.progress("WarmingUp", message="preparing the policy")
            model, tokenizer, folder = await asyncio.to_thread(
                prepare_policy, self.spec, self.run_dir
            )
            await publish_model_files(self.bus, folder)
        await asyncio.to_thread(dp.barrier)
        if not dp.is_leader:
            model, tokenizer = await build_from_bus(
                self.bus, self.run_dir / "model" / f"rank-{dp.rank}"
            )
        await asyncio.to_thread(self.set_model, model, tokenizer)
        if await asyncio.to_thread(self.load_latest_checkpoint) and dp.is_leader:
            await self.bus.purge_work()  # in-flight work of the previous life is re-issued
        self.state["cursor"] += dp.rank
        model_state = await asyncio.to_thread(self.full_model_state)
        if dp.is_leader:
            if self.state["heldout_before"] is None:
                before = await asyncio.to_thread(self.evaluate)
                self.state["heldout_before"] = before["accuracy"]
                self.state["heldout_greedy_before"] = before["greedy"]
                log.info("held-out accuracy before RL: %s", before)
            await self.publish_weights(model_state)
        await asyncio.to_thread(dp.barrier)  # nobody issues tasks before the purge

    # --- the loop -----------------------------------------------------------------------------
    async def run(self) -> dict:
        await self.prepare()
        dp = self.dp
        consumer = await self.bus.trajectory_consumer(dp.rank)
        if dp.is_leader:
            await self.progress("Running")
        steps = self.spec.trainer.steps
        window = deque(maxlen=10)
        started = time.monotonic() - self.state["rl_seconds"]
        while self.state["step"] < steps:
            await self.issue_tasks()
            await self.collect(consumer)
            # Re-check freshness at consumption: the version may have moved since completion.
            while self.ready and not self.is_fresh(self.ready[0]):
                stale = self.ready.popleft()
                await self.drop(stale, "stale")
            if len(self.ready) < self.prompts_per_step:
                continue
            batch = [self.ready.popleft() for _ in range(self.prompts_per_step)]
            for group in batch:
                STALENESS.observe(
                    self.state["version"] - (group.oldest_version() or self.state["version"])
                )
            t0 = time.perf_counter()
            stats = await asyncio.to_thread(self.train_step, batch)
            STEP_SECONDS.observe(time.perf_counter() - t0)
            dropped_stale, dropped_failed = await asyncio.to_thread(
                dp.all_reduce, [self.dropped_here["stale"], self.dropped_here["failed"]]
            )
            self.dropped_here = {"stale": 0, "failed": 0}
            self.state["dropped_stale"] += int(dropped_stale)
            self.state["dropped_failed"] += int(dropped_failed)
            self.state["step"] += 1
            self.state["version"] += 1
            consumed = sum(g.size for g in batch) * dp.world
            self.state["samples"] += consumed
            SAMPLES.inc(consumed)
            model_state = await asyncio.to_thread(self.full_model_state)
            if dp.is_leader:
                await self.publish_weights(model_state)
            for group in batch:
                for _, raw in group.samples.values():
                    await raw.ack()
            now = time.monotonic()
            self.state["rl_seconds"] = now - started
            window.append((now, self.state["samples"]))
            rate = (
                (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
                if len(window) > 1
                else None
            )
            if dp.is_leader:
                await self.record(stats, rate, time.perf_counter() - t0)
            if self.state["step"] % self.spec.checkpoint.every == 0 or self.state["step"] == steps:
                await asyncio.to_thread(self._checkpoint)
        if not dp.is_leader:
            return {}
        after = await asyncio.to_thread(self.evaluate)
        result = {
            "heldout_before": self.state["heldout_before"],
            "heldout_after": after["accuracy"],
            "heldout_greedy_before": self.state["heldout_greedy_before"],
            "heldout_greedy_after": after["greedy"],
            "steps": self.state["step"],
            "samples": self.state["samples"],
            "samples_dropped_stale": self.state["dropped_stale"],
            "rl_seconds": round(self.state["rl_seconds"], 1),
            "trainer_workers": dp.world,
        }
        (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
        await self.progress("Succeeded", heldout_after=after["accuracy"])
        log.info("done: %s", result)
        return result

    async def record(self, stats: dict, rate: float | None, step_seconds: float) -> None:
        """The leader's metrics line, gauges and progress after a step (and evaluation)."""
        record = {
            "step": self.state["step"],
            "version": self.state["version"],
            "time": round(self.state["rl_seconds"], 3),
            "samples": self.state["samples"],
            "samples_per_second": rate,
            "dropped_stale": self.state["dropped_stale"],
            "step_seconds": step_seconds,
            **stats,
        }
        every, steps = self.spec.trainer.evalEvery, self.spec.trainer.steps
        if every and self.state["step"] % every == 0 and self.state["step"] < steps:
            evaluated = await asyncio.to_thread(self.evaluate)
            record["heldout_accuracy"] = evaluated["accuracy"]
            record["heldout_greedy"] = evaluated["greedy"]
        STEP.set(self.state["step"])
        REWARD.set(stats["mean_reward"])
        LOSS.set(stats["loss"])
        KL.set(stats["approx_kl"])
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        await self.progress(
            "Running",
            mean_reward=stats["mean_reward"],
            samples_per_second=rate,
            staleness=stats["staleness"],
            loss=stats["loss"],
        )

    def _checkpoint(self) -> None:
        """Every rank calls it (the states are gathered under FSDP); the leader writes."""
        (cursor,) = self.dp.all_reduce([self.state["cursor"]], op="max")
        model_state, optim_state = self.dp.full_state(self.model, self.optimizer)
        if self.dp.is_leader:
            save_checkpoint(
                self.checkpoints,
                self.state["step"],
                export_state(self.model, model_state),
                optim_state,
                # On resume rank r starts at cursor + r: some indices are skipped, none repeated.
                {**self.state, "cursor": int(cursor)},
                self.spec.checkpoint.keep,
            )
