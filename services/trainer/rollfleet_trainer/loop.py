"""The trainer: owns the dataset cursor and the policy version, and turns trajectories into steps.

One loop, in order:
1. keep at most (1+α)·promptsPerStep prompt groups in flight by publishing tasks
   (each carries `min_version`, the version a worker must load before starting it);
2. collect trajectories into their groups; a finished group whose oldest token is more
   than α versions old is dropped and counted, as is a group with an aborted or failed
   sample;
3. once promptsPerStep fresh groups are ready: advantages, policy loss, one AdamW step,
   then publish the new weights, write progress and metrics, and checkpoint every
   `checkpoint.every` steps; the trained samples are acked once a checkpoint holds them.
With α = 0 this is synchronous training: every batch comes from the current version.

A restarted trainer resumes from its newest checkpoint and its journal (journal.py): the
groups it had issued or trained since that checkpoint are in flight again, their samples
redelivered, none lost or trained twice; the policy versions continue after the newest
one published before the crash, so the workers take the resumed weights.

With `trainer.workers` = W > 1 (Ray Train, see ray_train.py) every rank runs this loop on
its own share: it issues its own tasks (dataset indices ≡ rank mod W), consumes the
trajectories of those tasks only, and trains on promptsPerStep / W groups per step; the
ranks meet in the optimizer step (gradients averaged by DDP, or FSDP2's reduce-scatter)
and in a few small all-reduces of counters. Rank 0 (the leader) publishes weights,
writes checkpoints, metrics and progress, and evaluates.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import Counter, Gauge, Histogram

from rollfleet.algorithms import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES
from rollfleet.bus import OUTAGE_ERRORS, TRAJECTORY_ACK_WAIT_S, Bus
from rollfleet.evaluation import heldout_accuracy
from rollfleet.methods import Stages
from rollfleet.models.batching import TrainBatch, token_logprobs
from rollfleet.models.files import publish_model_files
from rollfleet.models.flops import FlopMeter
from rollfleet.models.prefix_sharing import (
    forward_work,
    grouped_token_logprobs,
    pack_groups,
    shared_prefix_groups,
    supports,
)
from rollfleet.models.weights import export_state
from rollfleet.protocol import Progress, RolloutTask, Trajectory, TrajectoryStatus
from rollfleet.routing import Router
from rollfleet.service import IdleMeter
from rollfleet.spec import RLJob
from rollfleet.tasks import make_task
from rollfleet.weight_transport import make_weight_store, publish_version
from rollfleet_trainer.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from rollfleet_trainer.export import export_checkpoint
from rollfleet_trainer.journal import GroupJournal
from rollfleet_trainer.model import build_from_bus, prepare_policy
from rollfleet_trainer.parallel import DataParallel
from rollfleet_trainer.tracking import Trackers

log = logging.getLogger("trainer")

DISCARDED_REMEMBERED = 10_000  # dropped group ids kept (their stragglers arrive soon after)
BACKLOG_REFRESH_S = 0.5  # affinity routing: how often the pools' queues are read from NATS

# Trajectories that end their group, and the reason its samples are counted under.
DROPPED_STATUS = {
    TrajectoryStatus.STALE: "stale",  # aborted by a worker: older than α versions
    TrajectoryStatus.ABORTED: "cancelled",  # a redundant straggler the trainer cancelled
    TrajectoryStatus.FAILED: "failed",
}

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
FLOPS = Gauge(
    "rollfleet_trainer_model_flops_per_second",
    "The leader rank's model FLOPs over its last step's time (forward and backward)",
)
STALENESS = Histogram(
    "rollfleet_trainer_staleness",
    "Policy versions between a sample's oldest token and the trainer",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
)
IDLE = Gauge(
    "rollfleet_trainer_idle_fraction",
    "Share of the time between the last two steps the trainer waited for samples",
)
OFF_POLICY = Gauge(
    "rollfleet_trainer_off_policy_fraction",
    "Share of the last batch's trained tokens generated by an older policy version",
)
ROUTED = Counter(
    "rollfleet_router_tasks_total",
    "Tasks the trainer sent to each pool (affinity routing), by profile; route=fallback "
    "when the pools preferring that profile were saturated",
    ["pool", "profile", "route"],
)
DUPLICATES = Counter(
    "rollfleet_trainer_duplicate_samples_total",
    "Samples that arrived a second time (a redelivered task) and were not kept",
)
PREFILL_RATIO = Gauge(
    "rollfleet_router_prefill_ratio",
    "Affinity routing: running mean of prompt and observation tokens per generated token of "
    "each kind of task's finished episodes (above rollout.prefillRatio: prefill-heavy)",
    ["kind"],
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
    kind: str = ""  # what the router keeps statistics of (meta.kind, else the task)
    task_ids: list[str] = field(default_factory=list)
    # (samples it was computed over, oldest version): samples are only ever added, and a
    # ready group is checked for staleness at every turn of the loop
    _oldest: tuple[int, int | None] = field(default=(-1, None), repr=False)

    @property
    def id(self) -> str:
        return f"g{self.index}"

    def complete(self) -> bool:
        return len(self.samples) == self.size

    def clear(self) -> None:
        self.samples.clear()
        self._oldest = (-1, None)

    def oldest_version(self) -> int | None:
        if self._oldest[0] != len(self.samples):
            versions = [
                v for t, _ in self.samples.values() if (v := t.oldest_version()) is not None
            ]
            self._oldest = (len(self.samples), min(versions) if versions else None)
        return self._oldest[1]


class Trainer:
    def __init__(self, job: RLJob, bus: Bus, run_dir: Path, dp: DataParallel | None = None):
        self.job, self.spec, self.bus, self.run_dir = job, job.spec, bus, run_dir
        self.dp = dp or DataParallel()
        self.weight_store = make_weight_store(self.spec.weights, bus, run_dir)
        self.task = make_task(self.spec.task.name, self.spec.task.params, self.spec.seed)
        self.stages = Stages.for_spec(self.spec)
        self.alpha = self.spec.async_.ratio
        self.prompts_per_step = self.spec.trainer.promptsPerStep // self.dp.world  # this rank's
        self.group_size = self.spec.rollout.sampling.groupSize
        # The job's redundant groups, shared out over the ranks.
        redundant, world = self.spec.async_.redundantGroups, self.dp.world
        self.redundant = redundant // world + (self.dp.rank < redundant % world)
        self.checkpoints = run_dir / "checkpoints"
        self.metrics_file = run_dir / "metrics.jsonl"
        self.state = {
            "step": 0,
            "version": 0,
            "cursor": 0,
            "samples": 0,
            "dropped_stale": 0,
            "dropped_failed": 0,
            "dropped_cancelled": 0,
            "dropped_duplicate": 0,
            "dropped_unknown_group": 0,
            "dropped_regenerated": 0,
            "heldout_before": None,
            "heldout_greedy_before": None,
            "rl_seconds": 0.0,
        }
        self.groups: dict[str, Group] = {}
        self.ready: deque[Group] = deque()
        # Dropped groups, to tell their late trajectories from unknown ones; the oldest are
        # forgotten past DISCARDED_REMEMBERED, so a long run's memory stays flat.
        self.discarded: OrderedDict[str, None] = OrderedDict()
        # Affinity routing: the router, and each pool's waiting tasks as last read from
        # the bus plus those published since (read again every BACKLOG_REFRESH_S).
        self.router = Router(self.spec) if self.spec.rollout.routing == "affinity" else None
        self.backlog: dict[str, int] = {}
        self.backlog_read_at = 0.0
        # Samples not trained on, by reason: this rank's since the last step. A duplicate
        # (its task ran twice) or a sample of a group this trainer does not know (issued by
        # a previous life just before it died) is generated work thrown away.
        # A group taken up after a crash whose samples were too old is generated again:
        # its samples count as regenerated.
        self.dropped_here = dict.fromkeys(
            ("stale", "cancelled", "failed", "duplicate", "unknown_group", "regenerated"), 0
        )
        for reason in self.dropped_here:
            DROPPED.labels(reason)  # exported as 0 from the start
        self.resumed: set[str] = set()  # groups taken up from the journal, not yet sampled anew
        self.to_reissue: deque[Group] = deque()  # their samples were too old: issue them again
        self.journal = GroupJournal(
            self.dp.rank, self.dp.world, log_path=run_dir / f"groups-{self.dp.rank}.jsonl"
        )
        self.acks_after_save: list = []  # acks that must wait for the journal's next write

    # --- helpers ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy as avg@k at the rollout temperature (the policy RL trains), and greedy."""
        common = dict(
            verifier=self.spec.verifier(),
            max_new_tokens=self.spec.rollout.sampling.maxNewTokens,
            limit=self.spec.task.heldoutLimit,
            stages=self.stages,
            max_length=self.spec.model.maxLength,
        )
        sampled = heldout_accuracy(
            self.eval_model,
            self.tokenizer,
            self.task,
            **common,
            temperature=self.spec.rollout.sampling.temperature,
            top_p=self.spec.rollout.sampling.topP,
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

    async def task_subject(self, group: Group, task_id: str, samples: int, multi_turn: bool) -> str:
        """Where a task of `group` goes: the shared queue, or the routed pool's own."""
        group.task_ids.append(task_id)
        if self.router is None:
            return self.bus.subjects.tasks
        if time.monotonic() - self.backlog_read_at > BACKLOG_REFRESH_S:
            names = [p.name for p in self.spec.rollout.pools]
            self.backlog = {k: v for k, v in (await self.bus.task_backlog(names)).items() if k}
            self.backlog_read_at = time.monotonic()
        route = self.router.route(self.router.profile(group.kind, multi_turn), self.backlog)
        self.backlog[route.pool] = self.backlog.get(route.pool, 0) + 1
        self.router.sent(task_id, route.pool, samples)
        ROUTED.labels(
            route.pool, route.profile, "fallback" if route.fallback else "preferred"
        ).inc()
        return self.bus.subjects.tasks_for(route.pool)

    async def issue_tasks(self) -> None:
        """Keep (1+α)·promptsPerStep groups (plus the redundant ones) in flight."""
        limit = (1 + self.alpha) * self.prompts_per_step + self.redundant
        new = []  # (group, example, the cursor after it, or None for a reissued group)
        while len(self.groups) + len(self.ready) < limit:
            if self.to_reissue:  # groups of a previous life come first
                group = self.to_reissue.popleft()
                self.groups[group.id] = group
                new.append((group, self.task.example("train", group.index), None))
                continue
            index = self.state["cursor"]
            self.state["cursor"] += self.dp.world  # this rank's indices: ≡ rank (mod world)
            example = self.task.example("train", index)
            group = Group(index, self.group_size, kind=example.meta.get("kind", self.task.name))
            self.groups[group.id] = group
            new.append((group, example, self.state["cursor"]))
        # Published, then journaled. Unrouted, together (one write, the acknowledgements
        # together); routed, in turn: each routing decision counts the ones before it.
        if self.router is None:
            await asyncio.gather(*(self.publish_tasks(g, example) for g, example, _ in new))
        else:
            for group, example, _ in new:
                await self.publish_tasks(group, example)
        for group, _, cursor in new:
            if cursor is None:
                self.journal.reissued(group.id)
            else:
                self.journal.issued(group.id, group.index, group.kind, cursor)
        IN_FLIGHT.set(len(self.groups) + len(self.ready))

    async def publish_tasks(self, group: Group, example) -> None:
        """The group's tasks, for the current version."""
        multi_turn = self.task.is_multi_turn(example)
        # Prompt replication: n single-sample tasks that any worker may take.
        parts = (
            [(i, 1) for i in range(self.group_size)]
            if self.spec.async_.replicatePrompts
            else [(0, self.group_size)]
        )
        for offset, samples in parts:
            index = group.index
            task_id = f"t{index}" if samples == self.group_size else f"t{index}.{offset}"
            await self.bus.publish(
                await self.task_subject(group, task_id, samples, multi_turn),
                RolloutTask.for_example(
                    example,
                    index=index,
                    task_id=task_id,
                    group_id=group.id,
                    samples=samples,
                    group_size=self.group_size,
                    sample_offset=offset,
                    multi_turn=multi_turn,
                    min_version=self.state["version"],
                    trainer_rank=self.dp.rank,
                ),
            )

    async def stale(self, group: Group) -> None:
        """A group too old to train. One taken up from a previous life (its samples came
        from policies the resumed model never had) is issued again, not dropped, so a
        crash skips no prompt: in turn with new groups, so that staleness stays bounded.
        Any other is dropped."""
        if group.id not in self.resumed:
            await self.drop(group, "stale")
            return
        self.resumed.discard(group.id)
        self.dropped_here["regenerated"] += len(group.samples)
        self.journal.reissue(group.id)  # on the bus before its samples are acked
        self.acks_after_save.extend(raw for _, raw in group.samples.values())
        group.clear()
        self.to_reissue.append(group)

    async def cancel_stragglers(self, batch: list[Group]) -> None:
        """Redundant rollouts: a group still running when a group issued after it has been
        trained is a straggler; drop it and tell the workers to stop sampling it."""
        if not self.redundant:
            return
        newest = max(g.index for g in batch)
        stragglers = [g for g in self.groups.values() if g.index < newest]
        for group in stragglers:
            await self.drop(group, "cancelled")
            if self.router:  # skipped or aborted by the workers: no longer in flight
                for task_id in group.task_ids:
                    self.router.forget(task_id)
        if stragglers:
            await self.bus.cancel_groups([g.id for g in stragglers])
        await self.flush()

    async def drop(self, group: Group, reason: str) -> None:
        """Account for a group we will not train on, and ack what arrived of it."""
        self.groups.pop(group.id, None)
        self.resumed.discard(group.id)
        self.discarded[group.id] = None
        while len(self.discarded) > DISCARDED_REMEMBERED:
            self.discarded.popitem(last=False)
        DROPPED.labels(reason).inc(group.size)
        self.dropped_here[reason] += group.size
        self.journal.dropped(group.id, reason)
        self.acks_after_save.extend(raw for _, raw in group.samples.values())

    async def flush(self) -> None:
        """Write the journal if it changed, then send the acks that waited for it: a sample
        acked before its group's new state is on the bus would be lost in a crash."""
        if self.journal.dirty:
            await self.bus.put_journal(self.dp.rank, self.journal.encode())
            self.journal.dirty = False
        acks, self.acks_after_save = self.acks_after_save, []
        for raw in acks:
            await raw.ack()

    async def keep_unacked_alive(self) -> None:
        """Samples wait unacked until trained and checkpointed, which can take longer than
        the consumer's ack wait: tell NATS they are still being worked on."""
        while True:
            await asyncio.sleep(TRAJECTORY_ACK_WAIT_S / 3)
            waiting = [
                raw for g in (*self.groups.values(), *self.ready) for _, raw in g.samples.values()
            ]
            for raw in waiting + self.journal.unacked():
                with contextlib.suppress(*OUTAGE_ERRORS):  # one missed costs a redelivery
                    await raw.in_progress()

    async def take_batch(self) -> list[Group] | None:
        """promptsPerStep fresh groups, or None while too few are ready. The version moves
        while groups wait, so every ready group is checked again and stale ones dropped."""
        for group in [g for g in self.ready if not self.is_fresh(g)]:
            self.ready.remove(group)
            await self.stale(group)
        if len(self.ready) < self.prompts_per_step:
            return None
        return [self.ready.popleft() for _ in range(self.prompts_per_step)]

    def is_fresh(self, group: Group) -> bool:
        oldest = group.oldest_version()
        return oldest is None or self.state["version"] - oldest <= self.alpha

    async def collect(self, consumer) -> None:
        for traj, raw in await self.bus.fetch(consumer, Trajectory, 256, timeout=0.2):
            if self.router:
                self.router.arrived(traj.task_id)
            if traj.group_id in self.journal.held:
                # Redelivered while its first copy waits for a checkpoint: acking this one
                # would ack that one too.
                DUPLICATES.inc()
                self.dropped_here["duplicate"] += 1
                continue
            group = self.groups.get(traj.group_id)
            if group is None:
                # The rest of a dropped group (its whole size was counted when it was
                # dropped), or a sample issued by a previous life the journal never held.
                if traj.group_id not in self.discarded:
                    DROPPED.labels("unknown_group").inc()
                    self.dropped_here["unknown_group"] += 1
                await raw.ack()
                continue
            if traj.group_size != group.size or not 0 <= traj.sample_index < group.size:
                # Not a sample this group can hold: it would complete the group with a
                # real sample missing.
                await self.bus.dead_letter(
                    raw.subject,
                    raw.data,
                    f"sample_index {traj.sample_index} of group_size {traj.group_size} "
                    f"for group {group.id} of {group.size} samples",
                )
                await raw.ack()
                continue
            if traj.sample_index in group.samples:
                # The same sample again: its task was redelivered (a worker died or stalled
                # after publishing it). The first copy stays; this one is acked and counted.
                DUPLICATES.inc()
                self.dropped_here["duplicate"] += 1
                await raw.ack()
                continue
            group.samples[traj.sample_index] = (traj, raw)
            if self.router and traj.status in (
                TrajectoryStatus.COMPLETED,
                TrajectoryStatus.TRUNCATED,
            ):
                self.router.observe(group.kind, traj)
                PREFILL_RATIO.labels(group.kind).set(self.router.stats[group.kind].ratio)
            if traj.status in DROPPED_STATUS:
                await self.drop(group, DROPPED_STATUS[traj.status])
            elif group.complete():
                self.groups.pop(group.id)
                if self.is_fresh(group):
                    self.ready.append(group)
                else:
                    await self.stale(group)
        await self.flush()

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
        self.meter = FlopMeter(model)  # model FLOPs of each step (rollfleet.models.flops)
        self.flops_recorded = 0.0  # the meter's count at the last metrics record
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
            self.train_model = self.dp.wrap(model)  # DDP gives every rank rank 0's weights
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
    def shared_groups(self, batch: TrainBatch) -> list[list[int]] | None:
        """The batch's groups where each group's shared tokens are computed once, or None."""
        if not self.spec.trainer.sharePrefix or not supports(self.train_model):
            return None
        return shared_prefix_groups(batch)

    def policy_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """The `policy_logprobs` stage: a method's, or the model's sampling log-probs."""
        logprobs = self.stages.policy_logprobs(self.train_model, batch)
        if logprobs is not None:
            return logprobs
        sampling = self.spec.rollout.sampling
        # each group's shared tokens once (rollfleet.models.prefix_sharing)
        groups = self.shared_groups(batch)
        packed = pack_groups(batch, groups) if groups is not None else None
        tokens, pairs = forward_work(batch, packed)
        self.meter.add(tokens, pairs, factor=3 if torch.is_grad_enabled() else 1)
        if packed is not None:
            return grouped_token_logprobs(
                self.train_model, batch, packed, sampling.temperature, sampling.topP
            )
        return token_logprobs(
            self.train_model,
            batch.input_ids,
            batch.attention_mask,
            sampling.temperature,
            sampling.topP,
        )

    def train_step(self, groups: list[Group]) -> dict:
        """One batch: advantages, then `algorithm.epochs` passes of `miniBatches` updates.

        The stages (rollfleet.methods) in order: build_batch, group_rewards, advantages
        (the job's estimator by default), advantage_weights, then per update
        policy_logprobs, the policy loss and extra_loss. Every rank calls it together."""
        algo = self.spec.algorithm
        trajectories = [g.samples[i][0] for g in groups for i in range(g.size)]
        batch = self.stages.build_batch(
            TrainBatch.from_trajectories(
                trajectories, self.group_size, self.tokenizer.pad_token_id, self.device
            )
        )
        rewards = torch.tensor([t.reward for t in trajectories]).view(len(groups), -1)
        rewards = self.stages.group_rewards(self.model, batch, rewards)
        estimate = functools.partial(
            ADVANTAGES[algo.advantage], eps=algo.advantageEpsilon, all_reduce=self.dp.all_reduce
        )
        advantages, method_metrics = self.stages.advantages(self.model, batch, rewards, estimate)
        advantages = batch.row_advantages(advantages, estimate)  # multi-agent segments
        weights = self.stages.advantage_weights(self.model, batch, advantages.view(-1))
        if weights is not None:
            batch.advantage_weights = batch.advantage_weights * weights.detach()
        token_advantages = advantages.view(-1, 1).to(self.device) * batch.advantage_weights
        loss_fn = POLICY_LOSSES[algo.policyLoss]
        updates = algo.epochs * algo.miniBatches
        rows = len(batch) // algo.miniBatches
        # The proximal policy is this batch's starting point: with one update the current
        # forward (detached) is exactly that; with several it is computed once up front.
        proximal = None
        if updates > 1 and getattr(loss_fn, "uses_proximal", False):
            with torch.no_grad():
                self.train_model.eval()
                proximal = self.policy_logprobs(batch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.state["step"])
        totals: dict[str, float] = {}
        for _ in range(algo.epochs):
            for start in range(0, len(batch), rows):
                part = batch.rows(start, start + rows)
                stats = self.update(
                    part,
                    token_advantages[start : start + rows],
                    None if proximal is None else proximal[start : start + rows],
                    loss_fn,
                )
                for name, value in stats.items():
                    totals[name] = totals.get(name, 0.0) + value / updates
        self.train_model.eval()
        version = self.state["version"]
        trained = [row for t in trajectories for row in t.rows()]
        staleness = [
            version - v
            for row in trained
            for v, m in zip(row.token_versions, row.loss_mask, strict=True)
            if m > 0 and v >= 0
        ]
        weighted = batch.advantage_weights[batch.loss_mask > 0]
        amplified = float((weighted != 1.0).float().mean().nan_to_num(0.0))
        share = totals.pop("token_share")
        grad_norm = totals.pop("grad_norm")
        # Batch-wide metrics: token means weighted by each rank's share, sums summed.
        names = list(totals)
        sums = self.dp.all_reduce(
            [totals[n] * (1.0 if n == "loss" else share) for n in names]
            + [
                float(weighted.mean().nan_to_num(1.0)) * share,
                amplified * share,
                rewards.sum().item(),
                rewards.numel(),
                float((rewards.max(-1).values == rewards.min(-1).values).sum()),
                rewards.shape[0],
                sum(staleness),
                len(staleness),
                sum(1 for s in staleness if s > 0),
                sum(len(row.response_ids) for row in trained),
            ]
        )
        weight_mean, weight_share, reward_sum, samples, flat_groups, group_count = sums[
            len(names) : len(names) + 6
        ]
        staleness_sum, staleness_count, off_policy, response_tokens = sums[-4:]
        (max_staleness,) = self.dp.all_reduce([max(staleness, default=0)], op="max")
        method_names = sorted(method_metrics)  # a method's own figures, averaged over ranks
        method_sums = (
            self.dp.all_reduce([method_metrics[n] for n in method_names]) if method_names else []
        )
        return {
            **dict(zip(names, sums, strict=False)),
            **{n: v / self.dp.world for n, v in zip(method_names, method_sums, strict=True)},
            "grad_norm": grad_norm,
            "advantage_weight_mean": weight_mean,
            "advantage_weight_share": weight_share,
            "mean_reward": reward_sum / samples,
            # groups whose samples all scored alike: GRPO gives them no gradient
            "zero_advantage_groups": flat_groups / group_count,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "staleness": staleness_sum / max(staleness_count, 1),
            "off_policy_fraction": off_policy / max(staleness_count, 1),
            "max_staleness": int(max_staleness),
            "response_tokens": int(response_tokens),
        }

    def gradient_rows(self, batch: TrainBatch, advantages, loss_fn) -> list[int] | None:
        """The rows of the groups with a non-zero token advantage (`advantages` [rows,
        tokens]), or None to compute every row: where `trainer.skipZeroAdvantage` is off,
        the policy loss does not vanish with the advantage, a method computes the log-probs
        or adds a loss term, or every group carries a gradient. A group with none
        gets an exactly zero loss and gradient (GRPO gives a group scored alike all
        zeros: half the groups late in the default job). At least one group is kept, so
        that every rank runs its backward (DDP) and the optimizer steps as it would. The
        loss's own metrics (clip fraction, approx KL, ratio) then cover the rows kept."""
        n = batch.group_size
        if (
            not self.spec.trainer.skipZeroAdvantage
            or not getattr(loss_fn, "zero_at_zero_advantage", False)
            or self.stages.in_the_update
            or batch.segmented
            or len(batch) % n
        ):
            return None
        carries = ((advantages != 0) & (batch.loss_mask > 0)).reshape(len(batch) // n, -1).any(-1)
        groups = carries.nonzero().flatten().tolist() or [0]
        if len(groups) == len(carries):
            return None
        return [g * n + i for g in groups for i in range(n)]

    def update(self, batch: TrainBatch, advantages, proximal, loss_fn) -> dict[str, float]:
        """One optimizer update on a mini-batch (this rank's rows of it)."""
        algo = self.spec.algorithm
        self.train_model.train()
        aggregation = AGGREGATIONS[algo.lossAggregation]
        # Rows that add nothing to the loss stay out of the forward and backward, not out
        # of its denominator (every aggregation's numerator is a sum over rows).
        _, denominator = aggregation(torch.zeros_like(batch.loss_mask), batch.loss_mask)
        tokens_here = float(batch.loss_mask.sum())
        kept = self.gradient_rows(batch, advantages, loss_fn)
        if kept is not None:
            batch, advantages = batch.take(kept), advantages[kept]
            proximal = None if proximal is None else proximal[kept]
        logprobs = self.policy_logprobs(batch)
        token_losses, stats = loss_fn(
            logprobs,
            batch.behaviour_logprobs,
            advantages,
            batch.loss_mask,
            algo.loss_config(),
            proximal=logprobs.detach() if proximal is None else proximal,
        )
        # The aggregation's denominator is summed over ranks, and the loss scaled by the
        # world size (DDP and FSDP average gradients): W ranks take exactly the step one
        # process would take on the whole batch.
        numerator, _ = aggregation(token_losses, batch.loss_mask)
        denominator_all, tokens_all = self.dp.all_reduce([float(denominator), tokens_here])
        loss = numerator / max(denominator_all, 1e-8)
        for term, term_stats in self.stages.extra_losses(self.train_model, batch, logprobs):
            loss = loss + term
            stats.update(term_stats)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.dp.world).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), algo.maxGradNorm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        return {
            "loss": loss.item(),
            **stats,
            "grad_norm": float(grad_norm),
            "token_share": tokens_here / max(tokens_all, 1e-8),  # for token-mean metrics
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
            await publish_model_files(self.bus, folder, self.stages.model_files)
            self.start_folder = folder  # its config and tokenizer go with an export
            self.trackers = await asyncio.to_thread(Trackers.open, self.job, self.run_dir)
        await asyncio.to_thread(dp.barrier)
        if not dp.is_leader:
            folder = self.run_dir / "model" / f"rank-{dp.rank}"
            model, tokenizer = await build_from_bus(self.bus, folder, self.stages.model_files)
        self.stages.load_files(folder)
        await asyncio.to_thread(self.set_model, model, tokenizer)
        resumed = await asyncio.to_thread(self.load_latest_checkpoint)
        await self.resume_journal(resumed)
        model_state = await asyncio.to_thread(self.full_model_state)
        if dp.is_leader:
            if self.state["heldout_before"] is None:
                before = await asyncio.to_thread(self.evaluate)
                self.state["heldout_before"] = before["accuracy"]
                self.state["heldout_greedy_before"] = before["greedy"]
                log.info("held-out accuracy before RL: %s", before)
            await self.publish_weights(model_state)
        await asyncio.to_thread(dp.barrier)  # nobody issues tasks before the purge

    async def resume_journal(self, resumed: bool) -> None:
        """Take up the previous life's groups from its journal (every rank together).

        Without one on every rank (or written by another number of ranks) the queued work
        is purged and re-issued from the checkpoint's cursor, as its indices are not known."""
        dp = self.dp
        saved = await self.bus.get_journal(dp.rank)
        previous = None
        if saved is not None:
            previous = self.journal.read(saved)
            if previous["world"] != dp.world:
                log.warning("journal of %d rank(s) ignored on %d", previous["world"], dp.world)
                previous = None
        (missing,) = await asyncio.to_thread(dp.all_reduce, [float(previous is None)])
        if missing:
            if resumed and dp.is_leader:
                await self.bus.purge_work()
            self.state["cursor"] += dp.rank
            in_flight = []
        else:
            in_flight, finished = self.journal.restore(previous, self.state["step"])
            for entry in in_flight:
                group = Group(entry.index, self.group_size, kind=entry.kind)
                if entry.state == "reissue":
                    self.to_reissue.append(group)
                else:
                    self.groups[group.id] = group
            self.resumed = set(self.groups)
            self.discarded.update(dict.fromkeys(finished))
            self.state["cursor"] = self.journal.cursor
            await self.bus.restart_trajectory_consumer(dp.rank)
            log.info(
                "rank %d resumes %d group(s) in flight; %d finished before the crash",
                dp.rank,
                len(in_flight),
                len(finished),
            )
        if resumed or not missing:
            self.journal.resumed(self.state["step"], len(in_flight))
        # Versions only go up: workers ignore an announcement older than what they hold.
        # Past the checkpoint's version, the newest announced weights are from steps the
        # crash undid: the resumed weights get the next version. At it, they are the same.
        latest = await self.bus.latest_weights() if dp.is_leader else None
        version = self.state["version"]
        if latest is not None and latest.version > version:
            version = latest.version + 1
        self.state["version"] = dp.broadcast_json(version)

    # --- the loop -----------------------------------------------------------------------------
    async def run(self) -> dict:
        await self.prepare()
        dp = self.dp
        consumer = await self.bus.trajectory_consumer(dp.rank)
        if dp.is_leader:
            await self.progress("Running")
        heartbeat = asyncio.create_task(self.keep_unacked_alive())
        try:
            await self.train_until_done(consumer)
        finally:
            heartbeat.cancel()
        self.journal.ended(
            [g.index for g in (*self.groups.values(), *self.ready, *self.to_reissue)]
        )
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
        if target := self.spec.checkpoint.exportTo:
            where = target if "://" in target else str(self.run_dir / target)
            result["exported_to"] = await asyncio.to_thread(
                export_checkpoint,
                self.run_dir,
                where,
                self.start_folder,
                job=self.job.metadata.name,
            )
        (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
        await asyncio.to_thread(self.trackers.close, result)
        await self.progress("Succeeded", heldout_after=after["accuracy"])
        log.info("done: %s", result)
        return result

    async def train_until_done(self, consumer) -> None:
        dp, steps = self.dp, self.spec.trainer.steps
        window = deque(maxlen=10)
        started = time.monotonic() - self.state["rl_seconds"]
        idle = IdleMeter()  # waiting for samples is idle; a step and what follows it is not
        while self.state["step"] < steps:
            idle.set_busy(False)
            await self.issue_tasks()
            await self.collect(consumer)
            batch = await self.take_batch()
            await self.flush()  # stale groups take_batch dropped
            if batch is None:
                continue
            idle.set_busy(True)
            await self.cancel_stragglers(batch)
            for group in batch:
                STALENESS.observe(
                    self.state["version"] - (group.oldest_version() or self.state["version"])
                )
            t0 = time.perf_counter()
            stats = await asyncio.to_thread(self.train_step, batch)
            STEP_SECONDS.observe(time.perf_counter() - t0)
            dropped = await asyncio.to_thread(dp.all_reduce, list(self.dropped_here.values()))
            for reason, count in zip(list(self.dropped_here), dropped, strict=True):
                self.state[f"dropped_{reason}"] += int(count)
                self.dropped_here[reason] = 0
            self.state["step"] += 1
            self.state["version"] += 1
            consumed = sum(g.size for g in batch) * dp.world
            self.state["samples"] += consumed
            SAMPLES.inc(consumed)
            for group in batch:  # acked once a checkpoint holds this step
                raws = [raw for _, raw in group.samples.values()]
                self.journal.trained(group.id, self.state["step"], raws)
                self.resumed.discard(group.id)
            self.journal.trained_step(self.state["step"], [g.index for g in batch])
            model_state = await asyncio.to_thread(self.full_model_state)
            if dp.is_leader:
                await self.publish_weights(model_state)
            now = time.monotonic()
            self.state["rl_seconds"] = now - started
            window.append((now, self.state["samples"]))
            rate = (
                (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
                if len(window) > 1
                else None
            )
            stats["trainer_idle_fraction"] = idle.read()
            if dp.is_leader:
                await self.record(stats, rate, time.perf_counter() - t0)
            if self.state["step"] % self.spec.checkpoint.every == 0 or self.state["step"] == steps:
                await self.flush()  # the trained marks are on the bus before the checkpoint
                await asyncio.to_thread(self._checkpoint)
                self.acks_after_save.extend(self.journal.commit(self.state["step"]))
                await self.flush()

    async def record(self, stats: dict, rate: float | None, step_seconds: float) -> None:
        """The leader's metrics line, gauges and progress after a step (and evaluation)."""
        record = {
            "step": self.state["step"],
            "version": self.state["version"],
            "time": round(self.state["rl_seconds"], 3),
            "samples": self.state["samples"],
            "samples_per_second": rate,
            "dropped_stale": self.state["dropped_stale"],
            "dropped_cancelled": self.state["dropped_cancelled"],
            "dropped_failed": self.state["dropped_failed"],
            "dropped_duplicate": self.state["dropped_duplicate"],
            "dropped_unknown_group": self.state["dropped_unknown_group"],
            "dropped_regenerated": self.state["dropped_regenerated"],
            "step_seconds": step_seconds,
            # this rank's model FLOPs of the step over its time (rollfleet.models.flops)
            "model_flops_per_second": (self.meter.flops - self.flops_recorded) / step_seconds
            if step_seconds
            else None,
            **stats,
        }
        every, steps = self.spec.trainer.evalEvery, self.spec.trainer.steps
        if every and self.state["step"] % every == 0 and self.state["step"] < steps:
            evaluated = await asyncio.to_thread(self.evaluate)
            record["heldout_accuracy"] = evaluated["accuracy"]
            record["heldout_greedy"] = evaluated["greedy"]
        self.flops_recorded = self.meter.flops
        if record["model_flops_per_second"] is not None:
            FLOPS.set(record["model_flops_per_second"])
        STEP.set(self.state["step"])
        REWARD.set(stats["mean_reward"])
        LOSS.set(stats["loss"])
        KL.set(stats["approx_kl"])
        IDLE.set(stats["trainer_idle_fraction"])
        OFF_POLICY.set(stats["off_policy_fraction"])
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        await asyncio.to_thread(self.trackers.log, record)
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
