"""The workers' reward client against a real reward service (uvicorn) that goes away, and
its batched scoring (requests made while a call is out share the next call).

Retries with jittered backoff ride out a short outage; a long one opens the circuit,
after which calls fail at once (no request sent) with the reason counted; once the
service is back on its port, one trial call closes the circuit again.
"""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client import REGISTRY

from rollfleet.spec import RewardClientSpec
from rollfleet_reward.app import create_app
from rollfleet_rollout.reward_client import (
    BatchedScoring,
    Circuit,
    RewardClient,
    RewardUnavailable,
)
from tests.conftest import serving

ITEM = {"response": "7", "answer": "7", "meta": {}}
FAST = RewardClientSpec(
    timeoutSeconds=2,
    attempts=3,
    backoffSeconds=0.01,
    maxBackoffSeconds=0.02,
    breakerFailures=2,
    breakerOpenSeconds=0.5,
)


def app():
    return create_app([("exact_match", 1.0, {})])


def failed(reason: str) -> float:
    labels = {"pool": "rc", "reason": reason}
    return REGISTRY.get_sample_value("rollfleet_rollout_reward_failures_total", labels) or 0.0


def test_backoff_is_fully_jittered_and_capped():
    client = RewardClient(None, "", RewardClientSpec(backoffSeconds=0.2, maxBackoffSeconds=1), "rc")
    waits = {attempt: [client.backoff(attempt) for _ in range(400)] for attempt in (0, 1, 5)}
    assert min(waits[0]) >= 0 and max(waits[0]) <= 0.2
    assert max(waits[1]) <= 0.4 and max(waits[1]) > 0.3  # doubled
    assert max(waits[5]) <= 1.0 and max(waits[5]) > 0.9  # capped, not 6.4
    assert len(set(waits[0])) == 400  # spread out, not in step


async def test_circuit_opens_while_the_service_is_down_and_closes_once_it_is_back():
    with serving(app()) as url:
        port = urlparse(url).port
        async with httpx.AsyncClient() as http:
            client = RewardClient(http, url, FAST, "rc", rng=random.Random(0))
            assert (await client.score([ITEM]))[0]["reward"] == 1.0
    # The service is gone: the first call retries and fails; two failed calls open the circuit.
    async with httpx.AsyncClient() as http:
        client.http = http
        with pytest.raises(RewardUnavailable) as first:
            await client.score([ITEM])
        assert first.value.reason == "unreachable" and client.state == Circuit.OPEN
        # Open: fail fast, nothing sent.
        sent = []

        async def record(request):
            sent.append(request)

        http.event_hooks["request"].append(record)
        started = time.perf_counter()
        with pytest.raises(RewardUnavailable) as fast:
            await client.score([ITEM])
        assert fast.value.reason == "circuit_open" and not sent
        assert time.perf_counter() - started < 0.1
        # The service comes back on its port; after breakerOpenSeconds one trial closes it.
        with serving(app(), port=port):
            await asyncio.sleep(FAST.breakerOpenSeconds)
            rewards = await asyncio.gather(*(client.score([ITEM]) for _ in range(4)))
        assert [r[0]["reward"] for r in rewards] == [1.0] * 4
        assert client.state == Circuit.CLOSED and client.failures == 0


async def test_a_short_outage_is_ridden_out_by_retries():
    with serving(app()) as url:
        port = urlparse(url).port
    settings = FAST.model_copy(
        update={
            "backoffSeconds": 0.3,
            "maxBackoffSeconds": 0.3,
            "attempts": 6,
            "breakerFailures": 6,
        }
    )
    async with httpx.AsyncClient() as http:
        client = RewardClient(http, url, settings, "rc", rng=random.Random(1))

        async def come_back():
            await asyncio.sleep(0.05)  # after the first try failed
            with serving(app(), port=port):
                await asyncio.sleep(2)

        back = asyncio.create_task(asyncio.to_thread(asyncio.run, come_back()))
        rewards = await client.score([ITEM])
        await back
    assert rewards[0]["reward"] == 1.0
    assert client.state == Circuit.CLOSED


def outage_waits() -> float:
    return (
        REGISTRY.get_sample_value("rollfleet_rollout_reward_outage_waits_total", {"pool": "rc"})
        or 0.0
    )


async def test_samples_are_held_through_an_outage_longer_than_the_retries():
    """The retries are spent and the circuit opens, yet the samples wait for the service."""
    with serving(app()) as url:
        port = urlparse(url).port
    settings = FAST.model_copy(update={"outageWaitSeconds": 20})
    waits_before = outage_waits()
    async with httpx.AsyncClient() as http:
        client = RewardClient(http, url, settings, "rc", rng=random.Random(2))

        async def come_back():
            await asyncio.sleep(1.5)  # three breaker periods: score() alone fails well before
            with serving(app(), port=port):
                await asyncio.sleep(3)

        back = asyncio.create_task(asyncio.to_thread(asyncio.run, come_back()))
        started = time.perf_counter()
        rewards = await client.score_through_outage([ITEM])
        waited = time.perf_counter() - started
        await back
    assert rewards[0]["reward"] == 1.0 and client.state == Circuit.CLOSED
    assert waited >= 1.5
    assert outage_waits() - waits_before >= 2  # it tried again each time the circuit let it


async def test_held_samples_fail_once_the_outage_wait_is_over():
    settings = FAST.model_copy(update={"outageWaitSeconds": 1.0})
    async with httpx.AsyncClient() as http:
        client = RewardClient(http, "http://127.0.0.1:9", settings, "rc", rng=random.Random(3))
        waits_before = outage_waits()
        with pytest.raises(RewardUnavailable) as error:
            await client.score_through_outage([ITEM])
    # it held the samples and tried again before giving up, rather than failing at once
    assert outage_waits() - waits_before >= 1
    assert error.value.reason in ("unreachable", "circuit_open")


async def test_a_bad_reply_is_not_waited_for():
    """A service that answers, wrongly, is not out: its samples fail at once."""
    import fastapi

    wrong = fastapi.FastAPI()

    @wrong.post("/score")
    async def score():
        return {"rewards": []}

    settings = FAST.model_copy(update={"outageWaitSeconds": 30})
    with serving(wrong) as url:
        async with httpx.AsyncClient() as http:
            client = RewardClient(http, url, settings, "rc")
            started = time.perf_counter()
            with pytest.raises(RewardUnavailable) as error:
                await client.score_through_outage([ITEM])
    assert error.value.reason in ("bad_reply", "circuit_open")
    assert time.perf_counter() - started < 5


async def test_a_slow_service_times_out_with_the_reason_counted():
    import fastapi

    slow = fastapi.FastAPI()

    @slow.post("/score")
    async def score():
        await asyncio.sleep(1)
        return {"rewards": [{"reward": 1.0, "parts": {}}]}

    settings = FAST.model_copy(update={"timeoutSeconds": 0.1, "attempts": 2})
    with serving(slow) as url:
        async with httpx.AsyncClient() as http:
            client = RewardClient(http, url, settings, "rc")
            with pytest.raises(RewardUnavailable) as error:
                await client.score([ITEM])
    assert error.value.reason == "timeout"


async def test_a_reward_that_is_not_a_finite_number_is_a_bad_reply():
    """Python's JSON reads NaN: a faulty service's NaN must fail the sample, not reach the
    trainer (which would dead-letter it and wait for its group forever)."""
    import fastapi

    faulty = fastapi.FastAPI()

    @faulty.post("/score")
    async def score():
        body = '{"rewards": [{"reward": NaN, "parts": {}}]}'
        return fastapi.Response(body, media_type="application/json")

    settings = FAST.model_copy(update={"attempts": 1})
    with serving(faulty) as url:
        async with httpx.AsyncClient() as http:
            client = RewardClient(http, url, settings, "rc")
            with pytest.raises(RewardUnavailable) as error:
                await client.score([ITEM])
    assert error.value.reason == "bad_reply"


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_emulated_device_serialises_a_replica_and_replicas_share_the_load():
    """reward.latencyMs: requests on one replica take turns (one device); a client spread
    over two replicas scores as many calls in about half the time; busy time is counted."""
    settings = FAST.model_copy(update={"timeoutSeconds": 10})
    busy_before = metric("rollfleet_reward_busy_seconds_total")

    async def eight_calls(url: str) -> float:
        async with httpx.AsyncClient() as http:
            client = RewardClient(http, url, settings, "rc")
            started = time.perf_counter()
            await asyncio.gather(*(client.score([ITEM]) for _ in range(8)))
            return time.perf_counter() - started

    def slow_app(seed):
        return create_app([("exact_match", 1.0, {})], latency_ms=100, seed=seed)

    with serving(slow_app(0)) as one:
        alone = await eight_calls(one)
        with serving(slow_app(1)) as two:
            shared = await eight_calls(f"{one},{two}")
    assert alone >= 0.8  # 8 x 100 ms, one at a time
    assert shared < 0.75 * alone
    # Both replicas run in this process: their busy time adds up (about 0.8 s each run).
    assert metric("rollfleet_reward_busy_seconds_total") - busy_before >= 1.5
    assert metric("rollfleet_reward_requests_in_flight") == 0


async def test_a_replica_that_is_never_idle_counts_its_busy_time_as_it_goes():
    settings = FAST.model_copy(update={"timeoutSeconds": 10})
    app = create_app([("exact_match", 1.0, {})], latency_ms=50, seed=0)
    with serving(app) as url:
        async with httpx.AsyncClient() as http:
            client = RewardClient(http, url, settings, "rc")
            before = metric("rollfleet_reward_busy_seconds_total")
            # 20 requests of 50 ms, one at a time on the replica's device: it always has
            # some in flight for about a second.
            calls = asyncio.gather(*(client.score([ITEM]) for _ in range(20)))
            await asyncio.sleep(0.5)
            midway = metric("rollfleet_reward_busy_seconds_total") - before
            await calls
    assert midway >= 0.3  # counted while busy, not only when the replica falls idle
    assert metric("rollfleet_reward_busy_seconds_total") - before >= 0.9


# --- batched scoring (the worker's per-group requests) -------------------------------------


def counting_app(delay_s: float = 0.0):
    """A /score that records each call's item count, rewards each item with its own
    response as a number, and answers NaN for the response "bad"."""
    import fastapi

    app, calls = fastapi.FastAPI(), []

    @app.post("/score")
    async def score(body: dict):
        calls.append(len(body["items"]))
        await asyncio.sleep(delay_s)
        reward = {"bad": "NaN"}  # Python's JSON reads NaN; the client must refuse it
        rewards = [
            f'{{"reward": {reward.get(i["response"], i["response"])}, "parts": {{}}}}'
            for i in body["items"]
        ]
        return fastapi.Response(
            '{"rewards": [' + ",".join(rewards) + "]}", media_type="application/json"
        )

    return app, calls


def items(*responses) -> list[dict]:
    return [{"response": str(r), "answer": "", "meta": {}} for r in responses]


async def test_requests_made_while_a_call_is_out_go_together_in_the_next_call():
    app, calls = counting_app(delay_s=0.2)
    with serving(app) as url:
        async with httpx.AsyncClient() as http:
            scoring = BatchedScoring(RewardClient(http, url, FAST, "rc"))
            first = asyncio.create_task(scoring.score(items(1, 2)))
            await asyncio.sleep(0.05)  # the first call is out
            rest = [
                asyncio.create_task(scoring.score(items(10 * k, 10 * k + 1))) for k in (1, 2, 3)
            ]
            results = await asyncio.gather(first, *rest)
    assert calls == [2, 6]  # one call, then the three requests made meanwhile in one
    assert [[r["reward"] for r in rewards] for rewards in results] == [
        [1, 2],
        [10, 11],
        [20, 21],
        [30, 31],
    ]


async def test_a_request_made_as_the_last_call_returns_is_sent():
    # The caller of the first request wakes before the finished sender is gone: a second
    # request made right then must still get a call of its own (it waited forever when
    # the sender left the set of senders in a done callback, which runs later).
    app, calls = counting_app()
    with serving(app) as url:
        async with httpx.AsyncClient() as http:
            scoring = BatchedScoring(RewardClient(http, url, FAST, "rc"))
            first = await scoring.score(items(1))
            async with asyncio.timeout(10):  # in this task: wait_for would start another
                second = await scoring.score(items(2))
    assert calls == [1, 1]
    assert [r["reward"] for r in first + second] == [1, 2]


async def test_a_bad_item_fails_only_its_own_request():
    app, calls = counting_app()
    settings = FAST.model_copy(update={"attempts": 1, "breakerFailures": 100})
    with serving(app) as url:
        async with httpx.AsyncClient() as http:
            scoring = BatchedScoring(RewardClient(http, url, settings, "rc"))
            good, bad, other = await asyncio.gather(
                scoring.score(items(1)),
                scoring.score(items("bad", 2)),
                scoring.score(items(3, 4)),
                return_exceptions=True,
            )
    assert calls == [5, 1, 2, 2]  # together, then each alone
    assert [r["reward"] for r in good] == [1] and [r["reward"] for r in other] == [3, 4]
    assert isinstance(bad, RewardUnavailable) and bad.reason == "bad_reply"


async def test_an_outage_fails_every_request_of_the_call_at_once():
    settings = FAST.model_copy(update={"attempts": 1, "outageWaitSeconds": 0})
    async with httpx.AsyncClient() as http:
        scoring = BatchedScoring(RewardClient(http, "http://127.0.0.1:9", settings, "rc"))
        results = await asyncio.gather(
            *(scoring.score(items(k)) for k in range(3)), return_exceptions=True
        )
    assert all(isinstance(r, RewardUnavailable) and r.reason == "unreachable" for r in results)
