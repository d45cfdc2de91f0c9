"""The rollout worker's client of the env service: one session per multi-turn sample.

Every way an env request can fail ends the sample (status failed) with a reason, counted
in `rollfleet_rollout_env_failures_total{pool,reason}`; none hangs the worker:

- what the env service says went wrong, from its reply's `reason` (rollfleet_env.app):
  step_timeout, step_memory, step_error (it stopped or could not run the step) and
  session_lost (the session's sandbox was restarted);
- unreachable: connection refused or reset (the service is down or restarting; opening a
  session waits up to OPEN_GRACE_SECONDS for it to come back first);
- timeout: no answer within env.stepTimeoutSeconds plus QUEUE_ROOM_SECONDS (a step may
  wait behind other sessions' steps in its sandbox);
- http_<code>: any other refusal, such as 404 for a session that a restarted service no
  longer knows; bad_reply: not the JSON the service promises.

A failed session is not retried: its env state is gone, and the episode so far was
conditioned on it.

    session = HttpEnvSession(http, url, step_timeout=spec.env.stepTimeoutSeconds)
    await session.open(meta)                           # EnvFailed(reason) on failure
    observation, done, info = await session.step(action)
    await session.close()                              # best effort
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
from prometheus_client import Counter

from rollfleet_rollout.reward_client import failure_reason

FAILED_SAMPLES = Counter(
    "rollfleet_rollout_env_failures_total",
    "Samples marked failed because their env session failed, by reason",
    ["pool", "reason"],
)
SERVICE_REASONS = ("step_timeout", "step_memory", "step_error", "session_lost")
QUEUE_ROOM_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 5.0  # a session left open is closed by the env's idle timeout
OPEN_GRACE_SECONDS = 30.0  # how long a new session waits for an env service to come back
TRANSIENT = ("unreachable", "http_502", "http_503", "http_504")  # a service on its way back


class EnvFailed(Exception):
    """An env request failed; `reason` is the label the sample is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def export_failures(pool: str) -> None:
    """Export the pool's counters as 0 from the start (http_<code> ones appear when seen)."""
    for reason in (*SERVICE_REASONS, "unreachable", "timeout", "bad_reply"):
        FAILED_SAMPLES.labels(pool, reason)


def env_failure_reason(error: Exception) -> str:
    """The env service's own reason when its reply names one it may give, else the
    transport's (the reward client's labels); never a label made up by the reply."""
    if isinstance(error, httpx.HTTPStatusError):
        with contextlib.suppress(ValueError, AttributeError):  # not a JSON object
            reason = error.response.json().get("reason")
            if reason in SERVICE_REASONS:
                return reason
    return failure_reason(error)


class HttpEnvSession:
    """An env session on one env-service replica (the rollfleet.episodes EnvSession)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        step_timeout: float,
        open_grace: float = OPEN_GRACE_SECONDS,
    ):
        self.http, self.url, self.session_id = http, url, None
        self.timeout = step_timeout + QUEUE_ROOM_SECONDS
        self.open_grace = open_grace

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await self.http.post(f"{self.url}{path}", json=body, timeout=self.timeout)
            reply.raise_for_status()
            result = reply.json()
        except (httpx.HTTPError, ValueError) as e:
            raise EnvFailed(env_failure_reason(e), str(e)) from e
        if not isinstance(result, dict):
            raise EnvFailed("bad_reply", f"{path} answered {str(result)[:200]}")
        return result

    async def open(self, meta: dict) -> None:
        """Open the sample's session. Nothing is lost yet, so an env service that is down
        or restarting is waited for (up to `open_grace` seconds) rather than failing the
        sample: failing fast would burn through the dataset while it is away."""
        deadline, wait = time.monotonic() + self.open_grace, 0.25
        while True:
            try:
                reply = await self._post("/sessions", {"meta": meta})
                break
            except EnvFailed as e:
                if e.reason not in TRANSIENT or time.monotonic() + wait > deadline:
                    raise
            await asyncio.sleep(wait)
            wait = min(2 * wait, 4.0)
        session_id = reply.get("session_id")
        if not isinstance(session_id, str):
            raise EnvFailed("bad_reply", "the new session's reply has no session_id")
        self.session_id = session_id

    async def step(self, action: str) -> tuple[str, bool, dict]:
        result = await self._post(f"/sessions/{self.session_id}/step", {"action": action})
        observation, done, info = (
            result.get("observation"),
            result.get("done"),
            result.get("info", {}),
        )
        if not (isinstance(observation, str) and isinstance(done, bool) and isinstance(info, dict)):
            raise EnvFailed("bad_reply", f"not a step reply: {str(result)[:200]}")
        return observation, done, info

    async def close(self) -> None:
        if self.session_id is not None:
            with contextlib.suppress(httpx.HTTPError):  # else the env's idle timeout closes it
                await self.http.delete(
                    f"{self.url}/sessions/{self.session_id}", timeout=CLOSE_TIMEOUT_SECONDS
                )
            self.session_id = None
