"""The Grafana dashboards in charts/rollfleet/dashboards/ ask only for metrics the services export.

The exported metrics are not listed here: every module under src/ and services/ that creates
a prometheus_client metric is imported (which registers its metrics in the default
REGISTRY), and the names come from REGISTRY.collect(). Each series name a query uses
(`rollfleet_x_bucket`, `rollfleet_y_total`, ...) must be one a service really exposes. The
chart's template must make one labelled ConfigMap per dashboard. `make dashboards-check`
(tests/e2e/test_dashboards_check.py) runs the queries against a real Prometheus.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rollfleet"
PACKAGE_ROOTS = [ROOT / "src", *sorted((ROOT / "services").glob("*"))]
METRIC_CALL = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"rollfleet_")


def _load_check_script():
    spec = importlib.util.spec_from_file_location(
        "dashboards_check", ROOT / "scripts" / "dashboards_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check_script()
DASHBOARDS = check.load_dashboards()

# --- PromQL: which names in an expression are metrics ---------------------------------------

KEYWORDS = {
    # operators, modifiers and literals
    *("and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"),
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
    # aggregations
    *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
    *("bottomk", "topk", "quantile"),
    # functions used in dashboards
    *("rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile"),
    *("label_values", "label_replace", "label_join", "vector", "scalar", "time"),
    *("abs", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "absent"),
    *("avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time"),
    *("count_over_time", "quantile_over_time", "resets", "changes", "sort", "sort_desc"),
}
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a label_values() query) selects."""
    if expr.lstrip().startswith("label_values("):
        expr = check.label_values_query(expr)[0]  # label_values(metric{...}, label)
    text = STRINGS.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = GROUPING.sub(" ", text)
    text = NUMBER.sub(" ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        word = match.group()
        followed_by_call = text[match.end() :].lstrip().startswith("(")
        if word.lower() in KEYWORDS or followed_by_call or word.startswith("$"):
            continue
        names.add(word)
    return names


def test_metric_names_finds_metrics_and_skips_promql_words():
    expr = (
        'histogram_quantile(0.95, sum by (rljob, le) (rate(rollfleet_a_bucket{pool=~"$pool", '
        'le!="+Inf"}[$__rate_interval]))) / ignoring (le) group_left sum without (pod) '
        "(rollfleet_b_total offset 5m) > bool 1e3 and on (rljob) rollfleet_c"
    )
    assert metric_names(expr) == {"rollfleet_a_bucket", "rollfleet_b_total", "rollfleet_c"}
    assert metric_names('label_values(rollfleet_d{namespace=~"$namespace"}, rljob)') == {
        "rollfleet_d"
    }


# --- what the services export ---------------------------------------------------------------


def metric_modules() -> list[str]:
    """Modules under src/ and services/*/ that create a rollfleet_ metric."""
    modules = []
    for root in PACKAGE_ROOTS:
        for path in sorted(root.rglob("*.py")):
            if METRIC_CALL.search(path.read_text()):
                parts = path.relative_to(root).with_suffix("").parts
                modules.append(".".join(p for p in parts if p != "__init__"))
    return modules


def exported_series() -> set[str]:
    """Every series name (x_total, x_bucket, x_sum, ...) the imported services expose."""
    for module in metric_modules():
        importlib.import_module(module)
    names = set()
    # A labelled metric has no series until a label set is used: use one, then remove it.
    for collector in set(REGISTRY._names_to_collectors.values()):
        labelnames = getattr(collector, "_labelnames", ())
        placeholder = ("dashboards-test",) * len(labelnames)
        if labelnames:
            collector.labels(*placeholder)
        try:
            for family in collector.collect():
                names.update(s.name for s in family.samples if s.name.startswith("rollfleet_"))
        finally:
            if labelnames:
                collector.remove(*placeholder)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    names = exported_series()
    assert len(names) > 40, sorted(names)  # every service's metrics were found
    return names


def unknown_metrics(expr: str, exported: set[str]) -> set[str]:
    return metric_names(expr) - exported


def test_the_metric_modules_are_found():
    modules = metric_modules()
    for module in (
        "rollfleet.bus",
        "rollfleet_trainer.loop",
        "rollfleet_trainer.backlog",
        "rollfleet_rollout.worker",
        "rollfleet_reward.app",
        "rollfleet_env.app",
    ):
        assert module in modules


def test_exported_names_are_real_series(exported):
    assert "rollfleet_rollout_tokens_total" in exported  # labelled counter, no child yet
    assert "rollfleet_env_step_seconds_bucket" in exported
    assert "rollfleet_env_step_seconds_sum" in exported
    # prometheus_client drops _sum from a histogram with negative buckets
    assert "rollfleet_reward_value_count" in exported
    assert "rollfleet_reward_value_sum" not in exported
    assert not any("dashboards-test" in str(s) for m in REGISTRY.collect() for s in m.samples)


def test_a_made_up_metric_is_caught(exported):
    assert unknown_metrics("sum(rate(rollfleet_made_up_total[5m]))", exported) == {
        "rollfleet_made_up_total"
    }
    assert unknown_metrics("rollfleet_reward_value_sum", exported) == {"rollfleet_reward_value_sum"}
    assert unknown_metrics("rate(rollfleet_env_step_seconds_count[1m])", exported) == set()


# --- the dashboards ---------------------------------------------------------------------------


def test_the_five_dashboards_are_there():
    assert set(DASHBOARDS) == {"training", "rollouts", "reward", "env", "nats"}
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)
    for dashboard in DASHBOARDS.values():
        assert dashboard["schemaVersion"] >= 36
        assert dashboard["id"] is None  # provisioned dashboards get their id from Grafana


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_query_uses_exported_metrics(name, exported):
    dashboard = DASHBOARDS[name]
    queries = [expr for _, _, expr in check.panel_queries(dashboard)]
    queries += [query for _, query in check.variable_queries(dashboard)]
    assert queries
    unknown = {q: unknown_metrics(q, exported) for q in queries}
    assert {q: u for q, u in unknown.items() if u} == {}
    for query in queries:
        assert metric_names(query), query  # each query selects at least one metric


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_has_a_query_on_the_datasource_variable(name):
    dashboard = DASHBOARDS[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in ("namespace", "rljob"):
        assert variables[var]["type"] == "query"
        assert variables[var]["allValue"] == ".*"  # matches series without the label too
    selected = {"uid": "${datasource}", "type": "prometheus"}
    panels = list(check.panels(dashboard))
    assert len(panels) >= 5
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == selected
        for target in panel["targets"]:
            assert target["datasource"] == selected
            assert target["expr"].strip()
            # every variable it uses is defined (expand raises KeyError otherwise)
            expanded = check.expand(target["expr"], check.variable_values(dashboard))
            assert "$" not in expanded
            assert f'{check.JOB_LABEL}=~".*"' in expanded  # follows the RLJob selector


def test_rollout_panels_are_per_pool():
    dashboard = DASHBOARDS["rollouts"]
    assert "pool" in {v["name"] for v in dashboard["templating"]["list"]}
    for panel, _, expr in check.panel_queries(dashboard):
        assert 'pool=~"$pool"' in expr, panel["title"]
        assert re.search(r"\bby \([^)]*\bpool\b", expr), panel["title"]  # a series per pool


def test_expand_substitutes_grafana_variables():
    values = {"pool": ".*", "__rate_interval": "10s"}
    assert check.expand('rate(x{pool=~"$pool"}[$__rate_interval])', values) == (
        'rate(x{pool=~".*"}[10s])'
    )
    assert check.expand("${pool:regex} [[pool]]", values) == ".* .*"
    with pytest.raises(KeyError, match="undefined variable"):
        check.expand("x{a=~'$nope'}", values)


def test_the_check_reports_an_empty_panel():
    """The Prometheus check fails a panel whose query returns nothing (or only NaN)."""
    dashboard = {
        "templating": {"list": []},
        "panels": [
            {"title": "has data", "targets": [{"refId": "A", "expr": "good"}]},
            {"title": "no series", "targets": [{"refId": "A", "expr": "missing"}]},
            {"title": "only NaN", "targets": [{"refId": "A", "expr": "nan"}]},
            {"title": "no query", "targets": []},
        ],
    }
    results = {
        "good": [{"metric": {}, "values": [[1, "NaN"], [2, "0"]]}],
        "missing": [],
        "nan": [{"metric": {}, "values": [[1, "NaN"]]}],
    }
    lines, failures = check.check({"test": dashboard}, results.__getitem__, lambda s, lb: [])
    assert [line.split()[0] for line in lines] == ["ok", "EMPTY", "EMPTY", "EMPTY"]
    assert len(failures) == 3
    assert all("has data" not in f for f in failures)


# --- the chart's template ------------------------------------------------------------------------


def test_the_chart_makes_one_labelled_configmap_per_dashboard(tmp_path):
    """Rendered by Helm (helm-python-sdk) in a stand-in chart: this template, these
    dashboards, and a stand-in for the chart's rollfleet.labels helper."""
    helm = pytest.importorskip("helm_python")
    chart = tmp_path / "rollfleet"
    (chart / "templates").mkdir(parents=True)
    shutil.copytree(CHART / "dashboards", chart / "dashboards")
    shutil.copy(CHART / "templates" / "dashboards.yaml", chart / "templates")
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: rollfleet\nversion: 0.1.0\n")
    (chart / "templates" / "_helpers.tpl").write_text(
        '{{- define "rollfleet.labels" -}}\napp.kubernetes.io/name: rollfleet\n{{- end }}\n'
    )
    values = {
        "dashboards": {
            "enabled": True,
            "label": "grafana_dashboard",
            "labelValue": "1",
            "annotations": {"grafana_folder": "rollfleet"},
        }
    }
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    release = "r" * 60  # long release names are cut so that every name fits in 63
    with helm.Chart.load(str(chart)) as loaded:
        rendered = loaded.render({}, name=release, namespace="monitoring")
        off = loaded.render({"dashboards": {"enabled": False}}, name="x", namespace="y")
    docs = [d for d in yaml.safe_load_all(rendered["rollfleet/templates/dashboards.yaml"]) if d]
    assert len(docs) == len(DASHBOARDS)
    for doc in docs:
        meta = doc["metadata"]
        assert doc["kind"] == "ConfigMap"
        assert len(meta["name"]) <= 63
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"])
        assert meta["namespace"] == "monitoring"
        assert meta["labels"]["grafana_dashboard"] == "1"
        assert meta["labels"]["app.kubernetes.io/name"] == "rollfleet"
        assert meta["annotations"] == {"grafana_folder": "rollfleet"}
        (key, text), *rest = doc["data"].items()
        assert not rest
        assert json.loads(text) == DASHBOARDS[key.removesuffix(".json")]
    assert len({d["metadata"]["name"] for d in docs}) == len(docs)
    assert not [d for d in yaml.safe_load_all(off.get("rollfleet/templates/dashboards.yaml", ""))]
    for name in DASHBOARDS:  # the template's name budget: 40 + len("-dashboard-") + 12
        assert re.fullmatch(r"[a-z0-9-]{1,12}", name)
