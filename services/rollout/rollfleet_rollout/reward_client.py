"""The rollout worker's client of the reward service: timeouts, retries, a circuit breaker.

The reward service is serverless (a Knative Service): it scales, cold-starts, and may be
down for a while. Each call has its own timeout; a failed call is retried with
exponential backoff and full jitter (so a pool's workers do not retry in step); after
`breakerFailures` failed calls in a row the circuit opens and calls fail at once, with
no request sent, for `breakerOpenSeconds`; then one trial call goes through (half-open):
success closes the circuit, failure opens it again. While the service is
out (unreachable, timing out, 502-504) the worker keeps its samples and tries again each
time the circuit would let a trial through, for up to `outageWaitSeconds`
(`score_through_outage`): the trainer waits for them, so an outage costs its seconds, not
prompts. A sample whose scoring fails for good is marked failed, counted under the
reason, and the trainer drops its group.

In a cluster the URL is the Knative Service's, which spreads requests over its replicas.
Locally `rollfleet run` starts `reward.replicas` processes and passes their URLs
comma-separated; the client sends each call to the one with the fewest of its calls in
flight.

    client = RewardClient(http, url, spec.reward.client, pool="default")
    rewards = await client.score(items)   # raises RewardUnavailable(reason)
    rewards = await client.score_through_outage(items)   # the same, after waiting it out
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from collections import deque

import httpx
from prometheus_client import Counter, Gauge, Histogram

from rollfleet.spec import RewardClientSpec

log = logging.getLogger("rollout")

FAILED_SAMPLES = Counter(
    "rollfleet_rollout_reward_failures_total",
    "Samples marked failed because the reward service could not score them, by reason",
    ["pool", "reason"],
)
RETRIES = Counter(
    "rollfleet_rollout_reward_retries_total", "Reward calls tried again after a failure", ["pool"]
)
CALL_SECONDS = Histogram(
    "rollfleet_rollout_reward_call_seconds",
    "Reward calls as the worker sees them (queueing, scale-up and retries included)",
    ["pool"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
OUTAGE_WAITS = Counter(
    "rollfleet_rollout_reward_outage_waits_total",
    "Times a worker held samples the reward service could not score, to try again",
    ["pool"],
)
CIRCUIT = Gauge(
    "rollfleet_rollout_reward_circuit_state",
    "This worker's circuit breaker on the reward service: 0 closed, 1 half-open, 2 open",
    ["pool"],
)


class Circuit(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class RewardUnavailable(Exception):
    """Scoring failed for good; `reason` is the label the samples are counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# Reasons that say the service is out, not that these items cannot be scored.
OUTAGE_REASONS = frozenset(
    {"circuit_open", "unreachable", "timeout", "http_502", "http_503", "http_504"}
)


def failure_reason(error: Exception) -> str:
    if isinstance(error, httpx.TimeoutException):
        return "timeout"
    if isinstance(error, httpx.HTTPStatusError):
        return f"http_{error.response.status_code}"
    if isinstance(error, httpx.TransportError):
        return "unreachable"
    return "bad_reply"  # not the JSON the service promises


class RewardClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        settings: RewardClientSpec,
        pool: str,
        rng: random.Random | None = None,
        clock=time.monotonic,
    ):
        self.http, self.settings, self.pool = http, settings, pool
        self.replicas = {u.strip(): 0 for u in url.split(",") if u.strip()}  # URL -> in flight
        self.rng = rng or random.Random(0)
        self.clock = clock
        self.state = Circuit.CLOSED
        self.failures = 0  # failed calls in a row
        self.opened_at = 0.0
        self.trial: asyncio.Lock = asyncio.Lock()  # one call at a time while half-open
        CIRCUIT.labels(pool).set(self.state)
        for reason in ("circuit_open", "timeout", "unreachable", "bad_reply"):
            FAILED_SAMPLES.labels(pool, reason)  # exported as 0 from the start
        OUTAGE_WAITS.labels(pool)

    def _set(self, state: Circuit) -> None:
        if state != self.state:
            log.warning("reward circuit %s -> %s", self.state.name, state.name)
        self.state = state
        CIRCUIT.labels(self.pool).set(state)

    def _record(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            self._set(Circuit.CLOSED)
            return
        self.failures += 1
        if self.state == Circuit.HALF_OPEN or self.failures >= self.settings.breakerFailures:
            self.opened_at = self.clock()
            self._set(Circuit.OPEN)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base · 2^attempt)]."""
        ceiling = min(self.settings.maxBackoffSeconds, self.settings.backoffSeconds * 2**attempt)
        return self.rng.uniform(0, ceiling)

    async def _call(self, items: list[dict]) -> list[dict]:
        url = min(self.replicas, key=self.replicas.__getitem__)
        self.replicas[url] += 1
        try:
            reply = await self.http.post(
                f"{url}/score", json={"items": items}, timeout=self.settings.timeoutSeconds
            )
        finally:
            self.replicas[url] -= 1
        reply.raise_for_status()
        rewards = reply.json()["rewards"]
        if len(rewards) != len(items):
            raise ValueError(f"{len(rewards)} rewards for {len(items)} items")
        # Python's JSON reads NaN and Infinity; a trainer must never see one.
        if not all(math.isfinite(r["reward"]) for r in rewards):
            raise ValueError(f"a reward that is not a finite number: {rewards}")
        return rewards

    async def score(self, items: list[dict]) -> list[dict]:
        """Each item's {reward, parts}; RewardUnavailable once retries are spent or while
        the circuit is open."""
        started = time.perf_counter()
        try:
            return await self._score(items)
        finally:
            CALL_SECONDS.labels(self.pool).observe(time.perf_counter() - started)

    async def _score(self, items: list[dict]) -> list[dict]:
        reason = None  # of this call's last failed try
        for attempt in range(self.settings.attempts):
            if self.state == Circuit.OPEN:
                if self.clock() - self.opened_at < self.settings.breakerOpenSeconds:
                    # Failing fast: this call's own failure if it had one, else the circuit.
                    raise RewardUnavailable(reason or "circuit_open", "the circuit is open")
                self._set(Circuit.HALF_OPEN)
            if attempt:
                RETRIES.labels(self.pool).inc()
            half_open = self.state == Circuit.HALF_OPEN
            try:
                if half_open:  # one trial call; the others wait for its verdict
                    async with self.trial:
                        if self.state == Circuit.OPEN:  # the trial call failed
                            raise RewardUnavailable("circuit_open", "the trial call failed")
                        rewards = await self._call(items)
                else:
                    rewards = await self._call(items)
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
                reason = failure_reason(e)
                self._record(ok=False)
                log.warning("reward call failed (attempt %d, %s): %s", attempt + 1, reason, e)
                if attempt + 1 < self.settings.attempts:
                    await asyncio.sleep(self.backoff(attempt))
                continue
            self._record(ok=True)
            return rewards
        raise RewardUnavailable(reason, f"{self.settings.attempts} attempts")

    async def score_through_outage(self, items: list[dict]) -> list[dict]:
        """`score`, tried again while the service is out, for up to outageWaitSeconds."""
        deadline = self.clock() + self.settings.outageWaitSeconds
        while True:
            try:
                return await self.score(items)
            except RewardUnavailable as e:
                left = deadline - self.clock()
                if e.reason not in OUTAGE_REASONS or left <= 0:
                    raise
                OUTAGE_WAITS.labels(self.pool).inc()
                log.warning("reward service out (%s); trying again in up to %.0f s", e, left)
                # until the circuit lets a trial call through
                reopens = self.opened_at + self.settings.breakerOpenSeconds - self.clock()
                await asyncio.sleep(min(left, max(reopens, self.settings.backoffSeconds)))


class BatchedScoring:
    """Scoring requests that arrive while calls are out go together in the next call.

    A worker asks for each group's rewards as the group finishes; groups finish in bursts
    (every sequence that ends in one engine step is handed over at once), and an HTTP call
    costs both sides more than scoring a countdown answer does. So a worker keeps at most
    one call out per reward replica it knows (in a cluster: one, to the Knative Service),
    and whatever is asked for meanwhile (up to `max_items`) goes in the next call, as a
    database commits a group of transactions together. Each request gets its own slice of
    the rewards. Outages are waited out for the whole call
    (`RewardClient.score_through_outage`); any other failure of a call of several requests
    is retried request by request, so one request's bad item fails only that request, as
    it would have alone. On the default job this halved the reward service's CPU and took
    a tenth off each worker's (benchmarks/RESULTS.md, "Where the default job's CPU goes").

        scoring = BatchedScoring(client)
        rewards = await scoring.score(items)   # or RewardUnavailable(reason)
    """

    def __init__(self, client: RewardClient, max_items: int = 256):
        self.client, self.max_items = client, max_items
        self.calls_out = len(client.replicas)  # at most this many calls at once
        self.waiting: deque[tuple[list[dict], asyncio.Future]] = deque()
        self.senders: set[asyncio.Task] = set()

    async def score(self, items: list[dict]) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((items, future))
        if len(self.senders) < self.calls_out:
            self.senders.add(asyncio.create_task(self._send()))
        return await future

    async def _send(self) -> None:
        """Call after call until nothing waits. A sender leaves `senders` in the same step
        as its last look at `waiting`, not in a done callback: that runs a turn later, and
        a request made in between (its caller woken by the last call) found no free
        sender and waited forever."""
        batch = []
        try:
            await asyncio.sleep(0)  # requests made in this turn of the loop join the first call
            while self.waiting:
                batch, size = [], 0
                while self.waiting and (
                    not batch or size + len(self.waiting[0][0]) <= self.max_items
                ):
                    batch.append(self.waiting.popleft())
                    size += len(batch[-1][0])
                try:
                    await self._call(batch)
                except Exception as e:  # this call's requests fail; the next ones go on
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
        except BaseException as e:  # cancelled: no request may wait on a sender that is gone
            others = self.senders - {asyncio.current_task()}
            for _, future in [*batch, *(() if others else self.waiting)]:
                if not future.done():
                    future.set_exception(RuntimeError(f"reward calls stopped: {e!r}"))
            raise
        finally:
            self.senders.discard(asyncio.current_task())

    async def _call(self, batch: list[tuple[list[dict], asyncio.Future]]) -> None:
        try:
            rewards = await self.client.score_through_outage(
                [item for items, _ in batch for item in items]
            )
        except RewardUnavailable as e:
            if len(batch) == 1 or e.reason in OUTAGE_REASONS:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RewardUnavailable(e.reason, e.detail))
                return
            for one in batch:  # each request's own verdict
                await self._call([one])
            return
        start = 0
        for items, future in batch:
            if not future.done():  # its caller may have been cancelled
                future.set_result(rewards[start : start + len(items)])
            start += len(items)
