"""Bad HTTP input to the reward and env services: refused with a 4xx that says what is wrong,
counted in `rollfleet_http_rejected_total{service,reason}`, never a 500 or a hang.

- property-based tests generated from each service's OpenAPI schema (schemathesis, a
  fixed small number of derandomized examples): no request, valid or not, gets a 5xx, and
  every refusal is counted once under its reason;
- BAD_REQUESTS: one row per crafted request (no or wrong token, oversized, not UTF-8, not
  JSON, fields out of their bounds), each sent over real HTTP to a served app;
- CALCULATOR_ACTIONS and SEARCH_ACTIONS: env actions crafted to escape the calculator's
  grammar or the search env (code, shell metacharacters, huge numbers, deep nesting),
  each answered as an ordinary observation, quickly.

    .venv/bin/pytest -q tests/services/test_bad_http.py
"""

from __future__ import annotations

import functools
import json
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import REGISTRY

from rollfleet.service import MAX_BODY_BYTES, TOKEN_ENV
from rollfleet.tasks import make_task
from rollfleet_env.app import create_app as create_env_app
from rollfleet_reward.app import create_app as create_reward_app
from tests.conftest import serving

TOKEN = "s3cret-token"
GOOD_SCORE = {"items": [{"response": "22", "answer": "22"}]}


def reward_app():
    return create_reward_app([("numeric", 1.0, {})])


def env_app(task: str = "calculator"):
    # A factory: each sandbox builds the task (a search index does not pickle).
    return create_env_app(functools.partial(make_task, task), session_timeout=30)


def rejections(service: str) -> dict[str, float]:
    """Every reason's count for `service`, as the process's registry holds it now."""
    return {
        s.labels["reason"]: s.value
        for metric in REGISTRY.collect()
        if metric.name == "rollfleet_http_rejected"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels["service"] == service
    }


# --- property-based: generated from the OpenAPI schemas -----------------------------------
# Both valid and invalid payloads (schemathesis' positive and negative modes); the token
# is unset, so what is tested is the payload handling (auth has its rows below).

SCHEMAS = {
    "reward": schemathesis.openapi.from_asgi("/openapi.json", reward_app()),
    "env": schemathesis.openapi.from_asgi("/openapi.json", env_app()),
}
FEW_EXAMPLES = settings(
    max_examples=15,
    derandomize=True,  # the same examples every run
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def check_refusal_is_counted(case, service: str) -> None:
    before = rejections(service)
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text)
    after = rejections(service)
    changed = {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)}
    if response.status_code >= 400:
        assert sum(changed.values()) == 1, changed
        assert "detail" in response.json()  # says what is wrong
    else:
        assert changed == {}


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)  # the services read it at each request


def served(app):
    """A client of `app` served for real, for every test of the module (it starts once)."""
    with serving(app) as url, httpx.Client(base_url=url, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def reward_client():
    yield from served(reward_app())


@pytest.fixture(scope="module")
def env_client():
    yield from served(env_app())


@pytest.fixture(scope="module")
def search_client():
    yield from served(env_app("qagent"))


@SCHEMAS["reward"].parametrize()
@FEW_EXAMPLES
def test_reward_service_never_fails_on_generated_requests(case):
    check_refusal_is_counted(case, "reward")


@SCHEMAS["env"].parametrize()
@FEW_EXAMPLES
def test_env_service_never_fails_on_generated_requests(case):
    check_refusal_is_counted(case, "env")


# --- crafted requests -------------------------------------------------------------------


def chunks(total: int, size: int = 2**20):
    """A body sent in chunks with no Content-Length (the limit must count what arrives)."""
    while total > 0:
        yield b" " * min(size, total)
        total -= size


def oversized(body: dict) -> bytes:
    """`body` as JSON padded past the limit (still valid JSON: trailing spaces)."""
    return json.dumps(body).encode().ljust(MAX_BODY_BYTES + 1)


BEARER = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json", **BEARER}

# (id, service, method, path, request options, status, reason, what the detail must say)
BAD_REQUESTS = [
    (
        "reward-no-token",
        "reward",
        "POST",
        "/score",
        {"json": GOOD_SCORE},
        401,
        "auth",
        "bearer token",
    ),
    (
        "reward-wrong-token",
        "reward",
        "POST",
        "/score",
        {"json": GOOD_SCORE, "headers": {"Authorization": "Bearer nope"}},
        401,
        "auth",
        "bearer token",
    ),
    (
        "reward-basic-scheme",
        "reward",
        "POST",
        "/score",
        {"json": GOOD_SCORE, "headers": {"Authorization": f"Basic {TOKEN}"}},
        401,
        "auth",
        "bearer token",
    ),
    (
        "env-no-token",
        "env",
        "POST",
        "/sessions",
        {"json": {"meta": {}}},
        401,
        "auth",
        "bearer token",
    ),
    (
        "env-token-prefix",
        "env",
        "POST",
        "/sessions",
        {"json": {"meta": {}}, "headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}},
        401,
        "auth",
        "bearer token",
    ),
    (
        "reward-oversized-declared",
        "reward",
        "POST",
        "/score",
        {"content": oversized(GOOD_SCORE), "headers": JSON},
        413,
        "too_large",
        f"over this service's limit of {MAX_BODY_BYTES}",
    ),
    (
        "reward-oversized-chunked",
        "reward",
        "POST",
        "/score",
        {"content": chunks(MAX_BODY_BYTES + 1), "headers": JSON},
        413,
        "too_large",
        "has 8388609 bytes",
    ),
    (
        "env-oversized-declared",
        "env",
        "POST",
        "/sessions",
        {"content": oversized({"meta": {}}), "headers": JSON},
        413,
        "too_large",
        "send fewer or smaller items",
    ),
    (
        "reward-latin-1",
        "reward",
        "POST",
        "/score",
        {"content": b'{"items": [{"response": "caf\xe9", "answer": "1"}]}', "headers": JSON},
        400,
        "not_utf8",
        "not UTF-8 (byte 0xe9 at offset 28)",
    ),
    (
        "env-utf-16",
        "env",
        "POST",
        "/sessions",
        {"content": '{"meta": {}}'.encode("utf-16"), "headers": JSON},
        400,
        "not_utf8",
        "send JSON encoded as UTF-8",
    ),
    (
        "reward-not-json",
        "reward",
        "POST",
        "/score",
        {"content": b"items=1&answer=2", "headers": JSON},
        422,
        "invalid",
        "JSON decode error",
    ),
    (
        "reward-truncated-json",
        "reward",
        "POST",
        "/score",
        {"content": b'{"items": [{"response": "1", "ans', "headers": JSON},
        422,
        "invalid",
        "JSON decode error",
    ),
    (
        "reward-no-items",
        "reward",
        "POST",
        "/score",
        {"json": {"items": []}, "headers": BEARER},
        422,
        "invalid",
        "items",
    ),
    (
        "reward-too-many-items",
        "reward",
        "POST",
        "/score",
        {"json": {"items": [{"response": "1", "answer": "1"}] * 4097}, "headers": BEARER},
        422,
        "invalid",
        "items",
    ),
    (
        "reward-nan-token-count",
        "reward",
        "POST",
        "/score",
        {
            "content": b'{"items": [{"response": "1", "answer": "1", "response_tokens": NaN}]}',
            "headers": JSON,
        },
        422,
        "invalid",
        "response_tokens",
    ),
    (
        "reward-negative-turn-tokens",
        "reward",
        "POST",
        "/score",
        {
            "json": {
                "items": [
                    {
                        "response": "1",
                        "answer": "1",
                        "turns": [{"role": "model", "text": "1", "tokens": -3}],
                    }
                ]
            },
            "headers": BEARER,
        },
        422,
        "invalid",
        "tokens",
    ),
    (
        "reward-unknown-turn-role",
        "reward",
        "POST",
        "/score",
        {
            "json": {
                "items": [
                    {
                        "response": "1",
                        "answer": "1",
                        "turns": [{"role": "root", "text": "", "tokens": 0}],
                    }
                ]
            },
            "headers": BEARER,
        },
        422,
        "invalid",
        "role",
    ),
    (
        "reward-wrong-method",
        "reward",
        "GET",
        "/score",
        {"headers": BEARER},
        405,
        "method",
        "Method Not Allowed",
    ),
    (
        "env-meta-not-a-map",
        "env",
        "POST",
        "/sessions",
        {"json": {"meta": ["max_turns", 3]}, "headers": BEARER},
        422,
        "invalid",
        "meta",
    ),
    (
        "env-unknown-session",
        "env",
        "POST",
        "/sessions/0123abcd/step",
        {"json": {"action": "c1;"}, "headers": BEARER},
        404,
        "not_found",
        "no session '0123abcd'",
    ),
    (
        "env-action-too-long",
        "env",
        "POST",
        "/sessions/{session}/step",
        {"json": {"action": "c" + "1" * 5000 + ";"}, "headers": BEARER},
        422,
        "invalid",
        "action",
    ),
    (
        "env-action-not-text",
        "env",
        "POST",
        "/sessions/{session}/step",
        {"json": {"action": {"__class__": "os.system"}}, "headers": BEARER},
        422,
        "invalid",
        "action",
    ),
]


@pytest.mark.parametrize(
    ("service", "method", "path", "options", "status", "reason", "detail"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_REQUESTS],
)
def test_a_bad_request_is_refused_naming_the_problem_and_counted(
    reward_client,
    env_client,
    monkeypatch,
    metric_value,
    service,
    method,
    path,
    options,
    status,
    reason,
    detail,
):
    client = reward_client if service == "reward" else env_client
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    if "{session}" in path:
        created = client.post("/sessions", json={"meta": {}}, headers=BEARER)
        path = path.format(session=created.json()["session_id"])
    labels = f'reason="{reason}",service="{service}"'
    before = metric_value(client.get("/metrics").text, "rollfleet_http_rejected_total", labels)

    response = client.request(method, path, **options)

    assert response.status_code == status, response.text
    assert detail in response.text
    after = metric_value(client.get("/metrics").text, "rollfleet_http_rejected_total", labels)
    assert after == before + 1
    # the service still answers good requests
    good = (
        client.post("/score", json=GOOD_SCORE, headers=BEARER)
        if service == "reward"
        else client.post("/sessions", json={"meta": {}}, headers=BEARER)
    )
    assert good.status_code == 200


def test_a_reward_that_overflows_scores_zero_with_an_error(serve_app):
    # two parts of 1 weighted 1e308 each: the total is inf, which JSON cannot carry
    client = serve_app(create_reward_app([("exact_match", 1e308, {}), ("numeric", 1e308, {})]))
    response = client.post("/score", json={"items": [GOOD_SCORE["items"][0]] * 2})
    assert response.status_code == 200
    for scored in response.json()["rewards"]:
        assert scored["reward"] == 0.0 and "not a finite number" in scored["error"]


# --- env actions crafted to escape the task's env ---------------------------------------

# The calculator's grammar is digits, + - * and parentheses, at most 64 characters.
CALCULATOR_ACTIONS = [
    ("python-import", "c__import__('os').system('id');", "=error;"),
    ("python-dunder", "c().__class__.__base__.__subclasses__();", "=error;"),
    ("python-eval", "ceval('1+1');", "=error;"),
    ("shell-subshell", "c$(cat /etc/passwd);", "=error;"),
    ("shell-backticks", "c`id`;", "=error;"),
    ("shell-chain", "c1; rm -rf /;", "=error;"),
    ("shell-pipe", "c1|sh;", "=error;"),
    ("power-tower", "c9**9**9;", "=error;"),
    ("exponent-float", "c1e309;", "=error;"),
    ("division", "c1/0;", "=error;"),
    ("nul-byte", "c1\x00+1;", "=error;"),
    ("too-long", "c" + "9" * 65 + ";", "=error;"),
    ("deep-parentheses", "c" + "(" * 2000 + "1" + ")" * 2000 + ";", "=error;"),
    ("unbalanced", "c" + "(" * 40 + "1;", "=error;"),
    ("nested-within-limit", "c" + "(" * 31 + "7" + ")" * 31 + ";", "=7;"),
    ("largest-product", "c" + "*".join(["9" * 9] * 6) + ";", f"={999_999_999**6};"),
    ("largest-number", "c" + "9" * 64 + ";", f"={int('9' * 64)};"),
]


@pytest.mark.parametrize(
    ("action", "observation"), [pytest.param(*row[1:], id=row[0]) for row in CALCULATOR_ACTIONS]
)
def test_a_crafted_calculator_action_is_an_ordinary_observation(env_client, action, observation):
    session = env_client.post("/sessions", json={"meta": {"max_turns": 3}}).json()["session_id"]
    started = time.monotonic()
    response = env_client.post(f"/sessions/{session}/step", json={"action": action})
    assert time.monotonic() - started < 2.0
    assert response.status_code == 200
    assert response.json()["observation"] == observation


# The search env parses `<s>q1;q2</s>` and runs BM25 over its corpus; nothing else happens.
SEARCH_ACTIONS = [
    ("sql-injection", "<s>'; DROP TABLE passages; --</s>"),
    ("shell-subshell", "<s>$(id);`id`</s>"),
    ("python-code", "<s>__import__('os').system('id')</s>"),
    ("regex-metacharacters", "<s>.*(a+)+$;[^]</s>"),
    ("empty-queries", "<s>;;;</s>"),
    ("nested-tags", "<s><s><s>x</s></s></s>"),
    ("many-queries", "<s>" + ";".join(["q"] * 1000) + "</s>"),
    ("long-query", "<s>" + "w " * 2000 + "</s>"),
    ("control-characters", "<s>\x00\x1b[2J\r\n</s>"),
]


@pytest.mark.parametrize("action", [pytest.param(row[1], id=row[0]) for row in SEARCH_ACTIONS])
def test_a_crafted_search_action_is_an_ordinary_observation(search_client, action):
    session = search_client.post("/sessions", json={"meta": {}}).json()["session_id"]
    started = time.monotonic()
    response = search_client.post(f"/sessions/{session}/step", json={"action": action})
    assert time.monotonic() - started < 2.0
    assert response.status_code == 200
    body = response.json()
    assert body["observation"].startswith("<i>") and body["done"] is False


# A session's meta comes from the trainer's task; a crafted one must be refused too: the
# task refuses it (ValueError naming the meta field), and the env service answers 422.
CRAFTED_META = [
    ("calculator-max-turns-text", "calculator", {"max_turns": "three"}, "meta.max_turns"),
    ("calculator-max-turns-null", "calculator", {"max_turns": None}, "meta.max_turns"),
    ("mixed-unknown-kind", "mixed", {"kind": "chess"}, "meta.kind"),
]


@pytest.mark.parametrize(
    ("task", "meta", "field"), [pytest.param(*row[1:], id=row[0]) for row in CRAFTED_META]
)
def test_a_crafted_session_meta_is_refused_naming_the_field(serve_app, task, meta, field):
    params = {"tasks": [{"name": "calculator"}, {"name": "countdown"}]} if task == "mixed" else {}
    client = serve_app(create_env_app(make_task(task, params), session_timeout=30))
    response = client.post("/sessions", json={"meta": meta})
    assert response.status_code == 422 and field in response.text
