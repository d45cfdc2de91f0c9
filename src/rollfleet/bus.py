"""NATS JetStream plumbing for one job: streams, durable consumers, weights and progress.

- tasks: a work-queue stream; the rollout workers share one durable pull consumer, so
  each task goes to exactly one worker, which acks it once its trajectories are out
  (a worker that dies mid-task gets its tasks redelivered after `ack_wait`). With
  affinity routing (rollfleet.routing) each pool has its own subject and consumer.
- trajectories: a work-queue stream, one durable consumer per trainer rank; a trained
  sample is acked once a checkpoint holds it (see rollfleet_trainer.journal), so a
  trainer that dies between checkpoints gets it redelivered.
- dead letters: anything a consumer cannot decode goes here with the reason, counted.
- weights: safetensors bytes in the object store, one object per policy version, plus
  an announcement on the weights subject and the latest version in the KV bucket.
- progress: the trainer's `Progress` in a KV bucket, read by the CLI and the operator.
- inflight: each trainer rank's journal of its groups since the last checkpoint.

    bus = await Bus.connect("nats://127.0.0.1:4222", "countdown")
    await bus.ensure_streams()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from nats.errors import ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
    ServiceUnavailableError,
)
from prometheus_client import Counter

from rollfleet.nats_auth import expiry_problem, read_creds
from rollfleet.protocol import (
    GroupsCancelled,
    M,
    Message,
    Progress,
    ProtocolError,
    Subjects,
    WeightVersion,
    decode,
    encode,
)

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "rollfleet_dead_letters_total", "Messages moved to the dead-letter subject", ["subject"]
)
for _kind in ("tasks", "trajectories", "weights", "cancel"):  # exported as 0 from the start
    DEAD_LETTERS.labels(subject=_kind)

NATS_CREDS_ENV = "ROLLFLEET_NATS_CREDS"
OBJECT_FETCH_TIMEOUT_S = 60.0
TRAJECTORY_ACK_WAIT_S = 600.0
SWAP_LEASE_TTL_S = 120.0  # longer than any weight swap; frees the lease of a dead worker
# A restarting nats-server (or JetStream recovering its store) answers nothing, or 503,
# for a few seconds: writes are tried again for this long before they fail.
OUTAGE_GRACE_S = 60.0
OUTAGE_ERRORS = (
    NatsTimeout,
    TimeoutError,
    NoRespondersError,
    ConnectionReconnectingError,
    ServiceUnavailableError,
)


def cancel_pending() -> bool:
    """Whether this task was asked to stop. nats-py swallows a CancelledError that lands
    inside some of its calls (its flush), so a loop around them checks for itself: a lease
    waiter whose timeout passed kept polling until the lease it waited on expired."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancelled() -> None:
    if cancel_pending():
        raise asyncio.CancelledError


def nats_credentials() -> str | None:
    """The path of this job's NATS creds file (rollfleet.nats_auth): a per-job Secret in a
    cluster, a file in the run directory locally."""
    return os.environ.get(NATS_CREDS_ENV) or None


TASK_CONSUMER = "rollout"  # the durable consumer shared by every rollout worker


def task_consumer_name(pool: str | None) -> str:
    """The durable task consumer of one pool (affinity routing), or the shared one."""
    return TASK_CONSUMER if pool is None else f"{TASK_CONSUMER}-{pool}"


def trajectory_consumer_name(rank: int) -> str:
    return f"trainer-{rank}"


class Bus:
    def __init__(self, nc, job: str):
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(job)
        self._weights_store = None
        self._progress_kv = None
        self._swap_kv = None
        self._inflight_kv = None

    @classmethod
    async def connect(
        cls,
        url: str,
        job: str,
        name: str = "rollfleet",
        token: str | None = None,
        credentials: str | Path | RawCredentials | None = None,
    ) -> Bus:
        """Connect as the job's NATS user: `credentials` is its creds file (a path, or the
        text as RawCredentials; rollfleet.nats_auth), `token` a plain server's token."""
        claims = read_creds(credentials) if credentials is not None else None
        errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            if "permissions violation" in str(e).lower():
                # The server drops what this job's user may not do; the caller would see
                # only a timeout, so say what was refused.
                log.error("NATS refused an operation of job %s: %s", job, e)
                return
            errors.append(e)
            if "authorization" in str(e).lower():
                raise ConnectionRefusedError(
                    str(e)
                )  # a wrong token will not fix itself: stop retrying

        nc = NATS()
        try:
            await nc.connect(
                url,
                name=name,
                token=token,
                user_credentials=credentials,
                inbox_prefix=Subjects(job).inbox,  # the only replies this job's user may read
                connect_timeout=5,
                max_reconnect_attempts=10,  # a server that is not there fails in seconds
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                error_cb=on_error,
            )
        except Exception as e:
            await nc.close()
            denied = [x for x in errors if "authorization" in str(x).lower()]
            cause = (denied or errors or [e])[-1]
            hint = ""
            if claims is not None and (denied or isinstance(cause, ConnectionResetError)):
                problem = expiry_problem(claims) or (
                    f"the NATS user {claims.get('name')!r} is not accepted: was it minted "
                    "with the account signing key this server trusts (rollfleet nats-keys)?"
                )
                hint = f" ({problem})"
            elif not denied and isinstance(cause, ConnectionResetError):
                # The server may close the socket before its "Authorization Violation" arrives.
                hint = " (the server closed the connection: check the NATS token)"
            raise ConnectionError(f"cannot connect to NATS at {url}: {cause}{hint}") from None
        # Once connected, ride out a restart of the server for OUTAGE_GRACE_S (nats-py
        # reads this option at each reconnect attempt).
        nc.options["max_reconnect_attempts"] = int(OUTAGE_GRACE_S / 0.5)
        return cls(nc, job)

    async def close(self) -> None:
        # Not drain(): it waits out open pull requests; every ack is sent by flush().
        if not self.nc.is_closed:
            await self.nc.flush()
            await self.nc.close()

    # --- set-up ------------------------------------------------------------------------
    async def ensure_streams(self) -> None:
        """Create what is missing of the job's streams and buckets; safe to call again
        (idempotent). With per-job NATS users only whoever starts the job may create, change
        or delete streams (rollfleet.nats_auth): it calls this first, and the job's own
        processes then find everything in place and only look it up."""
        s = self.subjects
        configs = [
            api.StreamConfig(
                name=s.task_stream,
                subjects=[s.tasks, f"{s.tasks}.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
            ),
            api.StreamConfig(
                name=s.trajectory_stream,
                subjects=[f"{s.trajectories}.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
            ),
            api.StreamConfig(name=s.deadletter_stream, subjects=[f"{s.deadletter}.>"]),
        ]
        for config in configs:
            try:
                info = await self.js.stream_info(config.name)
            except NotFoundError:
                await self.js.add_stream(config)
                continue
            retention = config.retention or api.RetentionPolicy.LIMITS
            if info.config.subjects != config.subjects or info.config.retention != retention:
                await self.js.update_stream(config)  # made by an older version of rollfleet
        await self._buckets(create=True)
        await self._key_value(s.swap_bucket, ttl=SWAP_LEASE_TTL_S)
        await self._key_value(s.inflight_bucket)

    async def _key_value(self, bucket: str, ttl: float | None = None):
        """A KV bucket, looked up, and created only if it is missing."""
        try:
            return await self.js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            return await self.js.create_key_value(bucket=bucket, history=1, ttl=ttl)

    async def delete_streams(self) -> None:
        """Remove everything ensure_streams created (the operator's finalizer)."""
        s = self.subjects
        for name in (s.task_stream, s.trajectory_stream, s.deadletter_stream):
            with contextlib.suppress(NotFoundError):
                await self.js.delete_stream(name)
        buckets = [
            (self.js.delete_object_store, s.weight_bucket),
            (self.js.delete_key_value, s.progress_bucket),
            (self.js.delete_key_value, s.swap_bucket),
            (self.js.delete_key_value, s.inflight_bucket),
        ]
        for delete, bucket in buckets:
            with contextlib.suppress(NotFoundError, BucketNotFoundError):
                await delete(bucket)

    async def purge_work(self) -> None:
        """Drop queued tasks and unconsumed trajectories (a trainer resumed on another number
        of ranks, or without a journal, re-issues its work)."""
        for name in (self.subjects.task_stream, self.subjects.trajectory_stream):
            await self.js.purge_stream(name)

    async def _buckets(self, create: bool = False):
        if self._weights_store is None or self._progress_kv is None:
            s = self.subjects
            if create:
                try:
                    store = await self.js.object_store(s.weight_bucket)
                except (BucketNotFoundError, NotFoundError):
                    store = await self.js.create_object_store(s.weight_bucket)
                kv = await self._key_value(s.progress_bucket)
            else:
                store = await self.js.object_store(s.weight_bucket)
                kv = await self.js.key_value(s.progress_bucket)
            self._weights_store, self._progress_kv = store, kv
        return self._weights_store, self._progress_kv

    # --- publishing and consuming ------------------------------------------------------
    async def publish(self, subject: str, message: Message) -> None:
        """Store a message in its stream, riding out a NATS restart; a message id makes the
        tries after a lost acknowledgement land once (JetStream's duplicate window)."""
        data, headers = encode(message), {"Nats-Msg-Id": uuid.uuid4().hex}
        await self.retrying(
            f"publish on {subject}", lambda: self.js.publish(subject, data, headers=headers)
        )

    async def retrying(self, what: str, call: Callable[[], Awaitable]):
        """`call()`, tried again while NATS is unreachable, up to OUTAGE_GRACE_S."""
        deadline = time.monotonic() + OUTAGE_GRACE_S
        while True:
            try:
                return await call()
            except OUTAGE_ERRORS as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("%s: NATS unavailable (%s); trying again", what, type(e).__name__)
                await asyncio.sleep(0.5)

    async def task_consumer(self, pool: str | None = None, ack_wait: float = 30.0):
        """The consumer of one pool's own tasks (affinity routing), or of the shared queue.
        A task not acked within `ack_wait` (its worker died) goes to another worker; a
        worker that is still on it says so (`in_progress`) more often than that."""
        return await self.js.pull_subscribe(
            self.subjects.tasks_for(pool),
            durable=task_consumer_name(pool),
            stream=self.subjects.task_stream,
            config=api.ConsumerConfig(ack_wait=ack_wait, max_ack_pending=-1),
        )

    async def trajectory_consumer(self, rank: int = 0):
        """The durable consumer of one trainer rank: the trajectories of the tasks it issued."""
        return await self.js.pull_subscribe(
            self.subjects.trajectories_for(rank),
            durable=trajectory_consumer_name(rank),
            stream=self.subjects.trajectory_stream,
            config=api.ConsumerConfig(ack_wait=TRAJECTORY_ACK_WAIT_S, max_ack_pending=-1),
        )

    async def restart_trajectory_consumer(self, rank: int) -> None:
        """Make the next `trajectory_consumer(rank)` deliver every trajectory not acked yet
        at once, instead of after the previous consumer's ack wait (a restarted trainer)."""
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(
                self.subjects.trajectory_stream, trajectory_consumer_name(rank)
            )

    async def get_journal(self, rank: int) -> bytes | None:
        """A trainer rank's journal (rollfleet_trainer.journal), or None if it has none."""
        try:
            return (await (await self._inflight()).get(f"rank-{rank}")).value
        except KeyNotFoundError:
            return None

    async def put_journal(self, rank: int, data: bytes) -> None:
        kv = await self._inflight()
        await self.retrying("journal", lambda: kv.put(f"rank-{rank}", data))

    async def _inflight(self):
        if self._inflight_kv is None:
            self._inflight_kv = await self._key_value(self.subjects.inflight_bucket)
        return self._inflight_kv

    async def task_backlog(self, pools: list[str] | None = None) -> dict[str | None, int]:
        """Tasks no worker has pulled yet, per pool's own queue (or None: the shared one).
        A consumer no worker has made yet holds the whole backlog of its subject."""
        backlog: dict[str | None, int] = {}
        for pool in pools or [None]:
            try:
                info = await self.js.consumer_info(
                    self.subjects.task_stream, task_consumer_name(pool)
                )
                backlog[pool] = info.num_pending
            except NotFoundError:
                with contextlib.suppress(NotFoundError):
                    state = await self.js.stream_info(
                        self.subjects.task_stream, subjects_filter=self.subjects.tasks_for(pool)
                    )
                    backlog[pool] = sum((state.state.subjects or {}).values())
        return backlog

    async def pending(self, ranks: int = 1, pools: list[str] | None = None) -> dict[str, int]:
        """Messages waiting per stream: tasks no worker has pulled (of every pool's queue
        with affinity routing), trajectories no trainer rank has pulled, dead letters
        stored. A stream or consumer not made yet is left out."""
        js, s = self.js, self.subjects
        pending: dict[str, int] = {}
        if backlog := await self.task_backlog(pools):
            pending["tasks"] = sum(backlog.values())
        for rank in range(ranks):
            with contextlib.suppress(NotFoundError):
                info = await js.consumer_info(s.trajectory_stream, trajectory_consumer_name(rank))
                pending["trajectories"] = pending.get("trajectories", 0) + info.num_pending
        with contextlib.suppress(NotFoundError):
            pending["deadletter"] = (await js.stream_info(s.deadletter_stream)).state.messages
        return pending

    async def fetch(
        self, subscription, cls: type[M], batch: int, timeout: float
    ) -> list[tuple[M, object]]:
        """Pull up to `batch` messages; valid ones come back as (message, raw) for a later ack,
        invalid ones are dead-lettered and acked here."""
        try:
            raws = await subscription.fetch(batch, timeout=timeout)
        except (NatsTimeout, TimeoutError):  # nats-py raises either when nothing arrives
            return []
        except OUTAGE_ERRORS:  # NATS restarting: nothing arrives until it is back
            await asyncio.sleep(timeout)
            return []
        valid = []
        for raw in raws:
            try:
                valid.append((decode(cls, raw.data), raw))
            except ProtocolError as e:
                await self.dead_letter(raw.subject, raw.data, str(e))
                await raw.ack()
        return valid

    async def dead_letter(self, subject: str, data: bytes, reason: str) -> None:
        kind = subject.removeprefix(f"rollfleet.{self.subjects.job}.").split(".")[0]
        log.warning("dead letter on %s: %s", subject, reason)
        DEAD_LETTERS.labels(subject=kind).inc()
        await self.js.publish(
            f"{self.subjects.deadletter}.{kind}", data, headers={"Rollfleet-Reason": reason[:500]}
        )

    # --- weights -------------------------------------------------------------------------
    @staticmethod
    async def _put_once(store, name: str, data: bytes) -> None:
        """Put an object unless it already holds exactly these bytes: objects are immutable,
        so a restarted trainer never rewrites one under a worker that is reading it."""
        digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        try:
            if (await store.get_info(name)).digest == digest:
                return
        except (ObjectNotFoundError, NotFoundError):
            pass
        await store.put(name, data)

    async def put_object(self, name: str, data: bytes) -> None:
        store, _ = await self._buckets()
        await self._put_once(store, name, data)

    async def get_object(self, name: str) -> bytes:
        return await self._get(name)

    async def object_names(self, prefix: str) -> list[str]:
        store, _ = await self._buckets()
        try:
            infos = await store.list()
        except NotFoundError:  # nats-py raises it for an empty store
            return []
        return [i.name for i in infos if i.name.startswith(prefix) and not i.deleted]

    async def delete_object(self, name: str) -> None:
        store, _ = await self._buckets()
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await store.delete(name)

    async def announce_weights(self, announcement: WeightVersion) -> None:
        """Make a stored version the latest and tell the workers (again is harmless)."""
        _, kv = await self._buckets()
        await kv.put("weights", encode(announcement))
        await self.nc.publish(self.subjects.weights, encode(announcement))

    async def latest_weights(self) -> WeightVersion | None:
        """The newest announced version; None before the trainer has published one."""
        try:
            _, kv = await self._buckets()
            entry = await kv.get("weights")
        except (KeyNotFoundError, BucketNotFoundError, NotFoundError):
            return None
        return decode(WeightVersion, entry.value)

    @contextlib.asynccontextmanager
    async def swap_lease(self, pool: str, slots: int, holder: str, poll_s: float = 0.02):
        """Hold one of a pool's `slots` weight-swap leases for the block (rolling updates).

        A lease is a KV key created only if absent; one left by a worker that died expires
        with the bucket's max age (SWAP_LEASE_TTL_S)."""
        if self._swap_kv is None:
            self._swap_kv = await self._key_value(self.subjects.swap_bucket, SWAP_LEASE_TTL_S)
        kv = self._swap_kv
        while True:
            for slot in range(slots):
                key = f"{pool}.{slot}"
                try:
                    revision = await kv.create(key, holder.encode())
                except KeyWrongLastSequenceError:
                    raise_if_cancelled()
                    continue
                if cancel_pending():  # our deadline passed during the create: give it back
                    await kv.delete(key, last=revision)
                    raise asyncio.CancelledError
                try:
                    yield slot
                finally:
                    await kv.delete(key, last=revision)
                return
            raise_if_cancelled()
            await asyncio.sleep(poll_s)

    async def put_file(self, name: str, data: bytes) -> None:
        """Store a model file (config, tokenizer) next to the weights, for workers elsewhere."""
        store, _ = await self._buckets()
        await self._put_once(store, f"model/{name}", data)

    async def get_file(self, name: str) -> bytes:
        return await self._get(f"model/{name}")

    async def _get(self, name: str) -> bytes:
        """An object's bytes; a read that stalls (say, the object was deleted under it) fails."""
        store, _ = await self._buckets()
        try:
            return (await asyncio.wait_for(store.get(name), OBJECT_FETCH_TIMEOUT_S)).data
        except TimeoutError:
            raise ProtocolError(
                f"{name}: not fetched within {OBJECT_FETCH_TIMEOUT_S:.0f}s"
            ) from None
        except (ObjectNotFoundError, NotFoundError):
            raise ProtocolError(f"{name}: no such object") from None

    async def _subscribe(self, subject: str, cls: type[M], callback) -> object:
        """Core-NATS subscription delivering decoded messages (invalid ones dead-lettered)."""

        async def handler(msg):
            try:
                message = decode(cls, msg.data)
            except ProtocolError as e:
                await self.dead_letter(msg.subject, msg.data, str(e))
                return
            await callback(message)

        return await self.nc.subscribe(subject, cb=handler)

    async def on_weights(self, callback: Callable[[WeightVersion], Awaitable[None]]):
        """Call `callback` for each announced version (invalid announcements are dead-lettered)."""
        return await self._subscribe(self.subjects.weights, WeightVersion, callback)

    async def cancel_groups(self, group_ids: list[str]) -> None:
        """Tell the workers to drop these groups (core NATS: only running workers care)."""
        await self.nc.publish(self.subjects.cancel, encode(GroupsCancelled(group_ids=group_ids)))

    async def on_cancel(self, callback: Callable[[GroupsCancelled], Awaitable[None]]):
        return await self._subscribe(self.subjects.cancel, GroupsCancelled, callback)

    # --- progress ------------------------------------------------------------------------
    async def put_progress(self, progress: Progress) -> None:
        _, kv = await self._buckets()
        await self.retrying("progress", lambda: kv.put("trainer", encode(progress)))

    async def get_progress(self) -> Progress | None:
        try:
            _, kv = await self._buckets()
            entry = await kv.get("trainer")
        except (KeyNotFoundError, BucketNotFoundError, NotFoundError):
            return None
        return decode(Progress, entry.value)
