from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import httpx
import pytest

from rollfleet.service import TOKEN_ENV
from rollfleet.tasks import Task, TaskEnv, make_task
from rollfleet_env.app import create_app


@pytest.fixture
def calculator():
    return make_task("calculator")


def new_session(client, meta=None) -> str:
    response = client.post(
        "/sessions", json={"meta": meta if meta is not None else {"max_turns": 3}}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["turn"] == 0
    return body["session_id"]


def test_episode_tool_call_then_answer(serve_app, calculator):
    client = serve_app(create_app(calculator, session_timeout=30))
    sid = new_session(client)
    response = client.post(f"/sessions/{sid}/step", json={"action": "c12*34;"})
    assert response.status_code == 200
    assert response.json() == {"observation": "=408;", "done": False, "turn": 1, "info": {}}
    response = client.post(f"/sessions/{sid}/step", json={"action": "a413"})
    assert response.json() == {"observation": "", "done": True, "turn": 2, "info": {}}
    # stepping after the episode ended is a conflict
    after = client.post(f"/sessions/{sid}/step", json={"action": "c1+1;"})
    assert after.status_code == 409
    assert sid in after.json()["detail"]


def test_max_turns_from_session_meta_ends_the_episode(serve_app, calculator):
    client = serve_app(create_app(calculator, session_timeout=30))
    sid = new_session(client, {"max_turns": 2})
    assert client.post(f"/sessions/{sid}/step", json={"action": "c2*3;"}).json()["done"] is False
    last = client.post(f"/sessions/{sid}/step", json={"action": "c2*4;"}).json()
    assert last == {"observation": "=8;", "done": True, "turn": 2, "info": {}}


def test_sessions_are_independent(serve_app, calculator):
    client = serve_app(create_app(calculator, session_timeout=30))
    a, b = new_session(client), new_session(client)
    assert a != b
    assert client.post(f"/sessions/{a}/step", json={"action": "a1"}).json()["done"] is True
    assert client.post(f"/sessions/{b}/step", json={"action": "c9*9;"}).json() == {
        "observation": "=81;",
        "done": False,
        "turn": 1,
        "info": {},
    }


def test_unknown_and_closed_sessions_are_404(serve_app, calculator):
    client = serve_app(create_app(calculator, session_timeout=30))
    missing = client.post("/sessions/nope/step", json={"action": "c1;"})
    assert missing.status_code == 404
    assert "nope" in missing.json()["detail"]
    sid = new_session(client)
    assert client.delete(f"/sessions/{sid}").json() == {"closed": sid}
    assert client.post(f"/sessions/{sid}/step", json={"action": "c1;"}).status_code == 404


def test_bad_step_payload_is_422(serve_app, calculator):
    client = serve_app(create_app(calculator, session_timeout=30))
    sid = new_session(client)
    response = client.post(f"/sessions/{sid}/step", json={"act": "c1;"})
    assert response.status_code == 422
    assert "action" in response.text


def test_single_turn_task_has_no_steps(serve_app):
    client = serve_app(create_app(make_task("countdown"), session_timeout=30))
    sid = new_session(client, {})
    response = client.post(f"/sessions/{sid}/step", json={"action": "3*5+7"})
    assert response.status_code == 400
    assert "single-turn" in response.json()["detail"]


def test_idle_session_expires(serve_app, calculator, metric_value):
    client = serve_app(create_app(calculator, session_timeout=0.3))
    expired_before = metric_value(
        client.get("/metrics").text, "rollfleet_env_sessions_expired_total"
    )
    sid = new_session(client)
    assert client.get("/healthz").json()["sessions"] == 1
    time.sleep(0.7)  # > timeout + a sweep interval (timeout / 4)
    response = client.post(f"/sessions/{sid}/step", json={"action": "c12*34;"})
    assert response.status_code == 404
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "rollfleet_env_sessions_expired_total") >= expired_before + 1
    assert metric_value(metrics, "rollfleet_env_sessions") == 0
    assert client.get("/healthz").json()["sessions"] == 0


def test_used_session_stays_alive(serve_app, calculator):
    client = serve_app(create_app(calculator, session_timeout=0.3))
    busy, idle = new_session(client, {"max_turns": 10}), new_session(client)
    for _ in range(5):  # 0.5 s in all, but never idle for more than 0.1 s
        time.sleep(0.1)
        assert client.post(f"/sessions/{busy}/step", json={"action": "c1+1;"}).status_code == 200
    time.sleep(0.1)
    assert client.post(f"/sessions/{busy}/step", json={"action": "c2+2;"}).json()["turn"] == 6
    assert client.post(f"/sessions/{idle}/step", json={"action": "c1+1;"}).status_code == 404


def test_metrics_and_health(serve_app, calculator, metric_value):
    client = serve_app(create_app(calculator, session_timeout=30))
    created_before = metric_value(
        client.get("/metrics").text, "rollfleet_env_sessions_created_total"
    )
    new_session(client)
    new_session(client)
    metrics = client.get("/metrics").text
    assert "rollfleet_env_sessions " in metrics
    assert metric_value(metrics, "rollfleet_env_sessions") == 2
    assert metric_value(metrics, "rollfleet_env_sessions_created_total") == created_before + 2
    assert client.get("/healthz").json() == {
        "status": "ok",
        "service": "env",
        "task": "calculator",
        "sessions": 2,
    }


def test_step_latency_is_applied(serve_app, calculator):
    client = serve_app(create_app(calculator, session_timeout=30, step_latency_ms=150, seed=0))
    sid = new_session(client)
    started = time.perf_counter()
    assert client.post(f"/sessions/{sid}/step", json={"action": "c1+1;"}).status_code == 200
    assert time.perf_counter() - started >= 0.15


def test_token_is_required_when_set(serve_app, calculator, monkeypatch):
    client = serve_app(create_app(calculator, session_timeout=30))
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert client.post("/sessions", json={}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    created = client.post("/sessions", json={}, headers=auth)
    assert created.status_code == 200
    sid = created.json()["session_id"]
    assert client.post(f"/sessions/{sid}/step", json={"action": "c1;"}).status_code == 401
    assert client.delete(f"/sessions/{sid}").status_code == 401
    step = client.post(f"/sessions/{sid}/step", json={"action": "c1;"}, headers=auth)
    assert step.json()["observation"] == "=1;"


class Lookup(Task):
    """A multi-turn task whose env does blocking work (waits for the file its meta names,
    as a retrieval index would compute) and keeps its own state, reported in `info`. The
    env runs in a sandbox process: the class is its factory."""

    name = "lookup"
    multi_turn = True

    def open_env(self, meta):
        return LookupEnv(self, meta)


class LookupEnv(TaskEnv):
    def __init__(self, task, meta):
        super().__init__(task, meta)
        self.queries: list[str] = []

    def step(self, action):
        if action == "slow":
            deadline = time.monotonic() + 10
            while not Path(self.meta["gate"]).exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        self.queries.append(action)
        return f"[{len(self.queries)}]", len(self.queries) >= 2, {"queries": list(self.queries)}


def test_env_steps_run_off_the_event_loop_with_state_and_info(serve_app, tmp_path):
    gate = tmp_path / "gate"
    client = serve_app(create_app(Lookup, session_timeout=30, sandboxes=2))
    # One session per sandbox: the slow step holds only its own.
    slow, fast = new_session(client, {"gate": str(gate)}), new_session(client, {})
    replies = {}

    def step_slowly():
        with httpx.Client(base_url=str(client.base_url), timeout=20) as other:
            replies["slow"] = other.post(f"/sessions/{slow}/step", json={"action": "slow"})

    blocked = threading.Thread(target=step_slowly)
    blocked.start()
    try:
        # While one session's step blocks in its thread, the service answers the others.
        assert client.get("/healthz").status_code == 200
        first = client.post(f"/sessions/{fast}/step", json={"action": "q1"}).json()
        assert first == {
            "observation": "[1]",
            "done": False,
            "turn": 1,
            "info": {"queries": ["q1"]},
        }
        assert "slow" not in replies
    finally:
        gate.touch()
        blocked.join()
    assert replies["slow"].json()["info"] == {"queries": ["slow"]}
    second = client.post(f"/sessions/{fast}/step", json={"action": "q2"}).json()
    assert second["done"] is True and second["info"] == {"queries": ["q1", "q2"]}


def test_search_env_answers_with_passages_in_info(serve_app):
    """QAgent's search env behind the real service: each search turn's reply carries the
    queries and the passages they found; the answer ends the session."""
    example = make_task("qagent").example("train", 1)
    # The search env's index does not pickle: each sandbox builds the task from a factory.
    client = serve_app(create_app(functools.partial(make_task, "qagent"), session_timeout=30))
    sid = new_session(client, example.meta)
    model = [text for speaker, text in example.demonstration if speaker == "model"]
    env = [text for speaker, text in example.demonstration if speaker == "env"]
    for turn, (action, observation) in enumerate(zip(model, env, strict=False), start=1):
        body = client.post(f"/sessions/{sid}/step", json={"action": action}).json()
        assert body["observation"] == observation and body["turn"] == turn
        assert body["info"]["passages"] == [observation[3:-4]]
        assert len(body["info"]["queries"]) == 1
    body = client.post(f"/sessions/{sid}/step", json={"action": model[-1]}).json()
    assert body == {"observation": "", "done": True, "turn": 3, "info": {"answer": example.answer}}
