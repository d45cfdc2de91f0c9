"""The rollout worker: pulls tasks when it has room, samples, scores, publishes trajectories.

Queue scheduling: the worker fetches a task only when its engine has free slots for the
task's samples, so fast workers take more work. For each task it samples the group's
responses (driving env sessions turn by turn for multi-turn tasks), scores them with the
reward service, publishes one Trajectory per sample and only then acks the task.

New weights are announced on the bus as a manifest of buckets; the worker fetches and
verifies every bucket in the background (a bad version is rejected and counted; the
worker keeps its current one), then takes one of its pool's swap leases, so that never
all workers of a pool pause at once (rolling update), and the engine swaps the weights
in between decode steps. A sample whose oldest
token is more than α versions behind the newest announced policy is aborted (checked
per turn) and published with status `stale`, so the trainer can account for its group.

Each sample runs through the job's stages (rollfleet.methods): `build_request`, the
episode runner (rollfleet.episodes, shared with the held-out evaluation) and
`reward_input`, what the reward service scores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httpx
from prometheus_client import Counter, Gauge, Histogram

from rollfleet.bus import OUTAGE_ERRORS, Bus
from rollfleet.episodes import EPISODES, Episode, EpisodeRequest, Generated, Limits, turn_stops
from rollfleet.methods import Stages
from rollfleet.models.architectures import import_architectures
from rollfleet.models.files import fetch_model_files
from rollfleet.models.weights import export_state
from rollfleet.plan import ServiceEnv
from rollfleet.protocol import (
    GroupsCancelled,
    ProtocolError,
    RolloutTask,
    Segment,
    Trajectory,
    TrajectoryStatus,
    WeightVersion,
)
from rollfleet.rewards import reward_item
from rollfleet.service import IdleMeter, auth_headers, make_app, serve_in_background
from rollfleet.spec import PoolSpec, RLJobSpec
from rollfleet.weight_transport import (
    WeightsRejected,
    check_tensors,
    fetch_version,
    make_weight_store,
)
from rollfleet_rollout.engine import Engine, GenerationRequest, SamplingParams, complete
from rollfleet_rollout.env_client import FAILED_SAMPLES as ENV_FAILURES
from rollfleet_rollout.env_client import EnvFailed, HttpEnvSession, export_failures
from rollfleet_rollout.reward_client import (
    FAILED_SAMPLES,
    BatchedScoring,
    RewardClient,
    RewardUnavailable,
)

log = logging.getLogger("rollout")

TOKENS = Counter("rollfleet_rollout_tokens_total", "Tokens generated", ["pool"])
ENGINE_FLOPS = Gauge(
    "rollfleet_rollout_engine_model_flops_per_second",
    "The torch engine's model FLOPs (prefill and decode) over its busy time so far",
    ["pool"],
)
SAMPLES = Counter("rollfleet_rollout_samples_total", "Trajectories published", ["pool", "status"])
TASKS_RUNNING = Gauge(
    "rollfleet_rollout_tasks_running", "Tasks in progress on this worker", ["pool"]
)
SLOTS_BUSY = Gauge("rollfleet_rollout_batch_occupancy", "Engine slots reserved / slots", ["pool"])
QUEUE_DEPTH = Gauge(
    "rollfleet_rollout_queue_depth",
    "Tasks waiting for this pool: its own queue with affinity routing, else the shared one",
    ["pool"],
)
TASKS_DONE = Counter(
    "rollfleet_rollout_tasks_completed_total", "Tasks whose trajectories were published", ["pool"]
)
VERSION = Gauge("rollfleet_rollout_policy_version", "Policy version loaded in the engine", ["pool"])
WEIGHT_SYNC = Histogram(
    "rollfleet_rollout_weight_sync_seconds",
    "Fetch, verify and hand over one weight version",
    ["pool"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
WEIGHT_REJECTIONS = Counter(
    "rollfleet_rollout_weight_rejections_total",
    "Announced weight versions rejected (missing, partial or corrupt buckets)",
    ["pool"],
)
SWAP_WAIT = Histogram(
    "rollfleet_rollout_swap_lease_wait_seconds",
    "Time a verified version waited for the pool's rolling-update lease",
    ["pool"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
IDLE = Gauge(
    "rollfleet_rollout_idle_fraction",
    "Share of the time since the last reading this worker had no task to run",
    ["pool"],
)
CANCELLED = Counter(
    "rollfleet_rollout_samples_cancelled_total",
    "Samples of groups the trainer cancelled (redundant stragglers), skipped or aborted",
    ["pool"],
)
ERRORS = Counter(
    "rollfleet_rollout_errors_total", "Tasks that failed and were handed back", ["pool"]
)


CANCELLED_REMEMBERED = 10_000  # cancelled group ids kept to skip their queued tasks


class TurnGate:
    """Env lockstep (`async.envAsync: false`): a group's sessions start each turn together,
    the synchronous baseline of environment-level asynchrony. A session that ends leaves."""

    def __init__(self, sessions: int):
        self.active = sessions
        self.arrived: dict[int, int] = {}
        self.changed = asyncio.Condition()

    async def arrive(self, turn: int) -> None:
        async with self.changed:
            self.arrived[turn] = self.arrived.get(turn, 0) + 1
            self.changed.notify_all()
            await self.changed.wait_for(lambda: self.arrived[turn] >= self.active)

    async def leave(self) -> None:
        async with self.changed:
            self.active -= 1
            self.changed.notify_all()


class RolloutWorker:
    def __init__(self, spec: RLJobSpec, pool: PoolSpec, env: ServiceEnv, bus: Bus, name: str):
        self.spec, self.pool, self.env, self.bus, self.name = spec, pool, env, bus, name
        self.engine: Engine | None = None
        self.tokenizer = None
        self.expected: dict[str, tuple] = {}  # tensor name -> shape every version must carry
        self.reserved = 0  # engine slots promised to running tasks
        self.latest_announced = -1
        self._weights_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.running: set[str] = set()  # task ids being worked on here
        # Redundant rollouts: groups the trainer cancelled (recent ones), and the engine
        # requests running for each group, to abort them.
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self._requests: dict[str, set[str]] = {}
        self.http = httpx.AsyncClient(timeout=30.0, headers=auth_headers())
        self.reward = RewardClient(
            self.http,
            env.reward_url,
            spec.reward.client,
            pool.name,
            rng=random.Random(f"{spec.sampling_seed()}/{name}"),  # jitter differs per worker
        )
        self.scoring = BatchedScoring(self.reward)
        export_failures(pool.name)  # env failures, by reason
        self.weight_store = make_weight_store(spec.weights, bus, env.run_dir)
        self.swap_slots = spec.weights.swap_slots(pool.replicas)
        sampling = spec.rollout.sampling
        self.max_new_tokens = sampling.maxNewTokens
        self.temperature, self.top_p = sampling.temperature, sampling.topP
        self.stages = Stages.for_spec(spec)

    # --- model and weights ---------------------------------------------------------------
    async def load_model(self, workdir: Path):
        """Fetch config and tokenizer from the bus, build the model, load the newest weights."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        while True:  # the trainer publishes v0 after its warm-up
            announcement = await self.bus.latest_weights()
            if announcement is not None:
                try:
                    tensors = await fetch_version(self.weight_store, announcement)
                    break
                except ProtocolError as e:  # gone or corrupt: wait for the next
                    log.warning("initial weights: %s; retrying", e)
            await asyncio.sleep(0.2)
        await fetch_model_files(self.bus, workdir, self.stages.model_files)
        self.stages.load_files(workdir)
        self.tokenizer = AutoTokenizer.from_pretrained(workdir)
        import_architectures()
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(workdir))
        # Every version must carry exactly these tensors (a tied lm_head is the embedding).
        self.expected = {name: tuple(t.shape) for name, t in export_state(model).items()}
        check_tensors(announcement.version, tensors, self.expected)
        model.load_state_dict(tensors, strict=False)
        self.latest_announced = announcement.version
        return model, announcement.version

    async def on_weights(self, announcement: WeightVersion) -> None:
        self.latest_announced = max(self.latest_announced, announcement.version)
        async with self._weights_lock:
            if (
                announcement.version <= self.engine.policy_version
                or announcement.version < self.latest_announced
            ):
                return  # older than what we have, or a newer one is already announced
            started = time.perf_counter()
            try:
                tensors = await fetch_version(self.weight_store, announcement)
                check_tensors(announcement.version, tensors, self.expected)
            except WeightsRejected as e:  # keep serving the previous version
                WEIGHT_REJECTIONS.labels(self.pool.name).inc()
                log.error("weights v%d rejected: %s", announcement.version, e)
                return
            waited = time.perf_counter()
            async with self.bus.swap_lease(self.pool.name, self.swap_slots, self.name):
                SWAP_WAIT.labels(self.pool.name).observe(time.perf_counter() - waited)
                await self.engine.load_weights(announcement.version, tensors)
                await self.wait_for_version(announcement.version)
            WEIGHT_SYNC.labels(self.pool.name).observe(time.perf_counter() - started)

    async def wait_for_version(self, version: int) -> None:
        # The engine swaps weights in its own thread between steps; polling is the simple way.
        while self.engine.policy_version < version:
            await asyncio.sleep(0.005)

    # --- one task --------------------------------------------------------------------------
    def _stale(self, versions: list[int]) -> bool:
        produced = [v for v in versions if v >= 0]
        return bool(produced) and self.latest_announced - min(produced) > self.spec.async_.ratio

    def _prompt_ids(self, task: RolloutTask) -> list[int]:
        """`<bos>` + the task's prompt, as the engine is fed it."""
        tok = self.tokenizer
        return [tok.bos_token_id, *tok.encode(task.prompt, add_special_tokens=False)]

    async def _sample(
        self, task: RolloutTask, prompt_ids: list[int], index: int, gate: TurnGate | None = None
    ) -> tuple[Trajectory, dict]:
        """One sample of `task` (whose prompt is `prompt_ids`, tokenized once per task)
        through the stages: build_request, the episode runner, and reward_input (returned
        beside the trajectory for scoring)."""
        tok = self.tokenizer
        request = self.stages.build_request(
            task,
            EpisodeRequest(list(prompt_ids), sample=task.sample_offset + index),
            tok,
        )
        # A task's examples may carry their own turn stops (each task of a `mixed` job).
        stops = tuple(task.meta.get("turn_stop", self._turn_stop)) if task.multi_turn else ()
        stop_ids, stop_sequences = turn_stops(tok, stops)
        params = SamplingParams(
            self.max_new_tokens, self.temperature, self.top_p, stop_ids, stop_sequences
        )

        # A multi-turn sample's turns are one engine session: the torch engine keeps the
        # conversation's KV cache between them.
        session = f"{task.task_id}/{index}" if task.multi_turn else None

        async def generate(context: list[int], request: EpisodeRequest, turn: int) -> Generated:
            request_id = f"{task.task_id}/{index}/{turn}"
            running = self._requests.setdefault(task.group_id, set())
            running.add(request_id)
            try:
                out = await complete(
                    self.engine,
                    GenerationRequest(
                        request_id,
                        context,
                        params,
                        request.prompt_embeds,
                        request.decoding,
                        session,
                    ),
                )
            finally:
                running.discard(request_id)
                if not running:
                    self._requests.pop(task.group_id, None)
            if out.finish_reason == "abort":
                CANCELLED.labels(self.pool.name).inc()
            TOKENS.labels(self.pool.name).inc(len(out.token_ids))
            if (meter := getattr(self.engine, "meter", None)) is not None:
                ENGINE_FLOPS.labels(self.pool.name).set(meter.per_second())
            return Generated(out.token_ids, out.logprobs, out.versions, out.finish_reason)

        async def check(turn: int | None, episode: Episode) -> TrajectoryStatus | None:
            if turn and gate is not None:
                await gate.arrive(turn)  # env lockstep: wait for the group's other sessions
            if self._stale(episode.all_versions):
                return TrajectoryStatus.STALE
            if turn is not None and task.group_id in self.cancelled:
                CANCELLED.labels(self.pool.name).inc()
                return TrajectoryStatus.ABORTED
            return None

        # A session lives on one env replica: every request of this sample goes there.
        env = HttpEnvSession(
            self.http,
            self.env.env_replica_url(f"{task.task_id}/{index}"),
            self.spec.env.stepTimeoutSeconds,
        )
        try:
            if task.multi_turn:
                await env.open(task.meta)
            episode = await EPISODES[self.stages.episode](
                request,
                generate=generate,
                env=env if task.multi_turn else None,
                limits=Limits(
                    int(task.meta.get("max_turns", 1)), self.spec.model.maxLength, tok.eos_token_id
                ),
                decode=tok.decode,
                encode=lambda text: tok.encode(text, add_special_tokens=False),
                check=check,
            )
        except EnvFailed as e:  # rollfleet_rollout.env_client: the sample fails, counted
            log.warning("task %s sample %d: env failed: %s", task.task_id, index, e)
            ENV_FAILURES.labels(self.pool.name, e.reason).inc()
            episode = Episode(request, TrajectoryStatus.FAILED)
        finally:
            if gate is not None:
                await gate.leave()
            await env.close()
            if session is not None:
                self.engine.end_session(session)
        trajectory = Trajectory(
            task_id=task.task_id,
            group_id=task.group_id,
            sample_index=task.sample_offset + index,
            group_size=task.group_size,
            worker=self.name,
            status=episode.status,
            prompt_ids=[] if episode.segments else request.prompt_ids,
            response_ids=episode.response_ids,
            behaviour_logprobs=episode.logprobs,
            token_versions=episode.versions,
            loss_mask=episode.loss_mask,
            response_text=episode.final_text,
            conditioning=request.conditioning,
            segments=[
                Segment(
                    agent=s.agent,
                    prompt_ids=s.prompt_ids,
                    response_ids=s.response_ids,
                    behaviour_logprobs=s.logprobs,
                    token_versions=s.versions,
                    loss_mask=s.loss_mask,
                )
                for s in episode.segments
            ],
        )
        return trajectory, self.stages.reward_input(task, episode, reward_item(task, episode))

    async def _score(self, samples: list[tuple[Trajectory, dict]]) -> None:
        """Ask the reward service for every usable sample (rollfleet_rollout.reward_client),
        waiting out an outage; when it cannot score them they are marked failed, counted
        under the reason."""
        scored = [
            (t, item)
            for t, item in samples
            if t.status in (TrajectoryStatus.COMPLETED, TrajectoryStatus.TRUNCATED)
        ]
        if not scored:
            return
        try:
            # Per sample ("as soon as it finishes"): a call each; else groups finishing
            # together share calls (BatchedScoring).
            score = (
                self.reward.score_through_outage
                if self.spec.async_.rewardPerSample
                else self.scoring.score
            )
            rewards = await score([item for _, item in scored])
            for (t, _), r in zip(scored, rewards, strict=True):
                t.reward, t.reward_parts = r["reward"], r["parts"]
        except (RewardUnavailable, KeyError, TypeError) as e:
            reason = getattr(e, "reason", "bad_reply")
            log.warning("%d samples not scored: %s", len(scored), e)
            FAILED_SAMPLES.labels(self.pool.name, reason).inc(len(scored))
            for t, _ in scored:
                t.status = TrajectoryStatus.FAILED

    async def _publish(self, task: RolloutTask, trajectory: Trajectory) -> None:
        await self.bus.publish(self.bus.subjects.trajectories_for(task.trainer_rank), trajectory)
        SAMPLES.labels(self.pool.name, trajectory.status.value).inc()

    async def _sample_score_publish(self, task: RolloutTask, prompt_ids, index: int, gate) -> None:
        """Queue scheduling: a sample is scored and published as soon as it finishes."""
        sample = await self._sample(task, prompt_ids, index, gate)
        await self._score([sample])
        await self._publish(task, sample[0])

    async def heartbeat(self, raw) -> None:
        """Tell JetStream the task is still being worked on (resets its ack wait)."""
        every = self.spec.rollout.taskAckWaitSeconds / 3
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):  # a lost heartbeat costs a duplicate at worst
                await raw.in_progress()

    async def handle(self, task: RolloutTask, raw) -> None:
        alive = asyncio.create_task(self.heartbeat(raw))
        try:
            if task.group_id in self.cancelled:  # the trainer dropped it while it was queued
                CANCELLED.labels(self.pool.name).inc(task.samples)
                await raw.ack()
                return
            await self.wait_for_version(task.min_version)
            lockstep = task.multi_turn and task.samples > 1 and not self.spec.async_.envAsync
            gate = TurnGate(task.samples) if lockstep else None
            prompt_ids = self._prompt_ids(task)
            if self.spec.async_.rewardPerSample:
                await asyncio.gather(
                    *(
                        self._sample_score_publish(task, prompt_ids, i, gate)
                        for i in range(task.samples)
                    )
                )
            else:
                samples = await asyncio.gather(
                    *(self._sample(task, prompt_ids, i, gate) for i in range(task.samples))
                )
                await self._score(samples)
                # Published together: the client writes them in one go and JetStream's
                # acknowledgements come back together (in order: one connection).
                await asyncio.gather(*(self._publish(task, t) for t, _ in samples))
            await raw.ack()
            TASKS_DONE.labels(self.pool.name).inc()
        except Exception:
            log.exception("task %s failed; handing it back", task.task_id)
            ERRORS.labels(self.pool.name).inc()
            await raw.nak(delay=1.0)
        finally:
            alive.cancel()
            self.running.discard(task.task_id)
            self.reserved -= task.samples
            TASKS_RUNNING.labels(self.pool.name).dec()

    async def on_cancel(self, message: GroupsCancelled) -> None:
        """Abort the engine requests of cancelled groups; their queued tasks get skipped."""
        for group_id in message.group_ids:
            self.cancelled[group_id] = None
            for request_id in list(self._requests.get(group_id, ())):
                await self.engine.abort(request_id)  # the sample counts itself as cancelled
        while len(self.cancelled) > CANCELLED_REMEMBERED:
            self.cancelled.popitem(last=False)

    # --- main loop -------------------------------------------------------------------------
    async def run(self, engine_factory) -> None:
        from rollfleet.tasks import TASKS

        self._turn_stop = TASKS[self.spec.task.name].turn_stop
        # Serve /healthz and /metrics from the start: loading waits for the trainer's warm-up.
        app = make_app(
            "rollout",
            health=lambda: {"policy_version": self.engine.policy_version if self.engine else None},
        )
        await serve_in_background(app, self.env.http_port, self.env.http_host)
        with tempfile.TemporaryDirectory(prefix="rollfleet-model-") as workdir:
            model, version = await self.load_model(Path(workdir))
        self.engine = engine_factory(model, self.tokenizer, version)
        await self.engine.start()
        await self.bus.on_weights(self.on_weights)
        await self.bus.on_cancel(self.on_cancel)
        if (latest := await self.bus.latest_weights()) and latest.version > version:
            await self.on_weights(latest)
        routed = self.spec.rollout.routing == "affinity"  # each pool pulls its own queue
        consumer = await self.bus.task_consumer(
            self.pool.name if routed else None, self.spec.rollout.taskAckWaitSeconds
        )
        log.info("worker %s ready at policy version %d", self.name, version)
        slots = self.pool.maxBatch
        # A task is a whole group, or one sample of it with prompt replication.
        task_size = 1 if self.spec.async_.replicatePrompts else self.spec.rollout.sampling.groupSize
        last_queue_check = 0.0
        idle = IdleMeter()
        while True:
            idle.set_busy(self.reserved > 0)
            VERSION.labels(self.pool.name).set(self.engine.policy_version)
            SLOTS_BUSY.labels(self.pool.name).set(self.reserved / slots)
            if time.monotonic() - last_queue_check > 2:
                with contextlib.suppress(*OUTAGE_ERRORS):  # NATS restarting: read it next time
                    info = await consumer.consumer_info()
                    QUEUE_DEPTH.labels(self.pool.name).set(info.num_pending)
                IDLE.labels(self.pool.name).set(idle.read())
                last_queue_check = time.monotonic()
            room = min(slots - self.reserved, self.engine.free_capacity()) // task_size
            if room <= 0:
                await asyncio.sleep(0.01)
                continue
            for task, raw in await self.bus.fetch(consumer, RolloutTask, room, timeout=0.5):
                if task.task_id in self.running:
                    # Redelivered while still running here (a heartbeat came late): the
                    # running copy acks it; a second copy would only duplicate the work.
                    log.warning("task %s redelivered while running here; kept once", task.task_id)
                    continue
                self.reserved += task.samples
                self.running.add(task.task_id)
                TASKS_RUNNING.labels(self.pool.name).inc()
                job = asyncio.create_task(self.handle(task, raw))
                self._tasks.add(job)
                job.add_done_callback(self._tasks.discard)
