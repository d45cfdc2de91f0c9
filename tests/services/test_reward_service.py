from __future__ import annotations

import pytest

from rollfleet.service import TOKEN_ENV
from rollfleet_reward.app import create_app

META = {"numbers": [3, 5, 7], "target": 22}


def test_healthz_names_the_functions(serve_app):
    client = serve_app(create_app([("countdown", 1.0, {}), ("format", 0.1, {})]))
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "service": "reward",
        "functions": ["countdown", "format"],
        "models": [],
        "models_ready": True,
    }


def test_score_countdown(serve_app, metric_value):
    client = serve_app(create_app([("countdown", 1.0, {})]))
    before = metric_value(client.get("/metrics").text, "rollfleet_reward_items_total")
    items = [
        {"response": "3*5+7", "answer": "22", "meta": META},
        {"response": "3+5+7", "answer": "22", "meta": META},
        {"response": "7+5*3", "answer": "22", "meta": META},
    ]
    response = client.post("/score", json={"items": items})
    assert response.status_code == 200
    rewards = response.json()["rewards"]
    assert [r["reward"] for r in rewards] == [1.0, 0.0, 1.0]
    assert [r["parts"] for r in rewards] == [
        {"countdown": 1.0},
        {"countdown": 0.0},
        {"countdown": 1.0},
    ]
    assert all(r["error"] is None for r in rewards)
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "rollfleet_reward_items_total") == before + 3


def test_score_weighted_composition(serve_app):
    client = serve_app(create_app([("countdown", 1.0, {}), ("format", 0.25, {})]))
    items = [
        {"response": "3*5+7", "answer": "22", "meta": META},
        {"response": "3+5+7", "answer": "22", "meta": META},
        {"response": "twenty-two", "answer": "22", "meta": META},
    ]
    rewards = client.post("/score", json={"items": items}).json()["rewards"]
    assert [r["reward"] for r in rewards] == [1.25, 0.25, 0.0]
    assert rewards[1]["parts"] == {"countdown": 0.0, "format": 1.0}


def test_bad_item_scores_zero_with_error_without_failing_the_batch(serve_app, metric_value):
    client = serve_app(create_app([("countdown", 1.0, {})]))
    labels = 'function="countdown"'
    text = client.get("/metrics").text
    before = metric_value(text, "rollfleet_reward_errors_total", labels) if labels in text else 0.0
    items = [
        {"response": "3*5+7", "answer": "22"},  # countdown needs meta.numbers
        {"response": "3*5+7", "answer": "22", "meta": META},
    ]
    response = client.post("/score", json={"items": items})
    assert response.status_code == 200
    first, second = response.json()["rewards"]
    assert first["reward"] == 0.0
    assert first["parts"] == {}
    assert first["error"].startswith("KeyError")
    assert second["reward"] == 1.0
    after = metric_value(client.get("/metrics").text, "rollfleet_reward_errors_total", labels)
    assert after == before + 1


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"items": [{"response": "3*5+7"}]}, "answer"),
        ({"items": [{"response": "1", "answer": "1", "extra": 1}]}, "extra"),
        ({"items": []}, "items"),
        ({"things": []}, "items"),
        ({"items": [{"response": 5, "answer": "1"}]}, "response"),
    ],
)
def test_bad_payload_is_422_naming_the_field(serve_app, payload, field):
    client = serve_app(create_app([("exact_match", 1.0, {})]))
    response = client.post("/score", json=payload)
    assert response.status_code == 422
    locations = [d["loc"] for d in response.json()["detail"]]
    assert any(field in loc for loc in locations), locations
    assert field in response.text


def test_token_is_required_when_set(serve_app, monkeypatch):
    client = serve_app(create_app([("exact_match", 1.0, {})]))
    body = {"items": [{"response": "22", "answer": "22"}]}
    # no token configured: open
    assert client.post("/score", json=body).status_code == 200
    monkeypatch.setenv(TOKEN_ENV, "s3cret")  # read at request time
    assert client.post("/score", json=body).status_code == 401
    wrong = client.post("/score", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    basic = client.post("/score", json=body, headers={"Authorization": "Basic s3cret"})
    assert basic.status_code == 401
    ok = client.post("/score", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert ok.json()["rewards"][0]["reward"] == 1.0
    # probes stay open
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_metrics_exposes_reward_counters(serve_app):
    client = serve_app(create_app([("exact_match", 1.0, {})]))
    client.post("/score", json={"items": [{"response": "a", "answer": "a"}]})
    text = client.get("/metrics").text
    assert "rollfleet_reward_items_total" in text
    assert "rollfleet_reward_request_seconds_bucket" in text
    assert "rollfleet_reward_value_bucket" in text


def test_unknown_function_is_rejected_at_startup():
    with pytest.raises(ValueError, match=r"unknown reward functions \['vibes'\]"):
        create_app([("vibes", 1.0, {})])


def test_a_model_based_function_scores_the_batch_with_the_model_it_names(serve_app, tiny_model_dir):
    """`model_exact_match` with a real (untrained) model: an item whose reference is what
    the model answers scores 1, the others 0; rule-based parts beside it are kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollfleet.evaluation import _generate

    template = "{response}|{question}>"
    meta = {"question": "ab"}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = [tok.bos_token_id, *tok.encode(template.format(response="7", **meta))]
    (said,) = _generate(model, tok, [prompt], 6, [tok.eos_token_id], 0.0)
    said = tok.decode([t for t in said if t != tok.eos_token_id]).strip()
    assert said  # the untrained model answers something, so the match below is informative
    reader = (
        "model_exact_match",
        1.0,
        {"model": "reader", "template": template, "max_new_tokens": 6},
    )
    client = serve_app(
        create_app([("exact_match", 0.0, {}), reader], {"reader": str(tiny_model_dir)})
    )
    items = [
        {"response": "7", "answer": said, "meta": meta},
        {"response": "7", "answer": said + "x", "meta": meta},
    ]
    rewards = client.post("/score", json={"items": items}).json()["rewards"]
    assert [r["reward"] for r in rewards] == [1.0, 0.0]
    assert rewards[0]["parts"] == {"exact_match": 0.0, "model_exact_match": 1.0}
    assert client.get("/healthz").json()["models"] == ["reader"]


def test_a_model_based_function_needs_a_loaded_model():
    reader = ("model_exact_match", 1.0, {"model": "judge", "template": "{response}"})
    with pytest.raises(
        ValueError, match=r"reward.functions\[0\] \(model_exact_match\): params.model 'judge'"
    ):
        create_app([reader])
    with pytest.raises(ValueError, match=r"reward.models.judge: cannot load"):
        create_app([reader], {"judge": "/nonexistent/folder"})


def test_a_model_based_function_is_not_a_held_out_verifier():
    from rollfleet.rewards import score

    with pytest.raises(ValueError, match="model-based"):
        score("model_exact_match", {"response": "", "answer": "", "meta": {}})
