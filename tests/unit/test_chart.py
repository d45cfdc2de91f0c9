"""The Helm chart (charts/rollfleet): renders and lints clean, and what it renders is valid.

Rendering and linting use helm-python-sdk (Helm 4's engine, offline). The chart's one
dependency, the official NATS chart, cannot be fetched here (no network), so it is not
vendored under charts/rollfleet/charts/. helm_python then behaves like this, whatever
nats.enabled says: `Chart.render` succeeds and simply renders no NATS objects (it does not
check dependencies as `helm template`/`helm install` do), and `lint` reports one warning,
"chart directory is missing these dependencies: nats" (an error only with strict=True).
So every variant below is checked without the NATS objects; the dependency itself is
checked as declared in Chart.yaml, and the values handed to it as data.

Every rendered object of a built-in kind passes kubernetes-validate in strict mode for
Kubernetes 1.30 and 1.37; the PodMonitor (a Prometheus Operator custom resource) is checked
field by field. Templates added by others (dashboards.yaml) are rendered and validated too.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from rollfleet.nats_auth import ACCOUNT_ID, SIGNING_SEED
from rollfleet_operator.config import OperatorConfig
from rollfleet_operator.handlers import DEFAULT_SIGNER_DIR, SIGNER_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rollfleet"
RELEASE = "rollfleet"
NAMESPACE = "rollfleet-system"
K8S_VERSIONS = ("1.30.0", "1.37.0")
MISSING_NATS = "chart directory is missing these dependencies: nats"
EXTERNAL_NATS = "nats://nats.messaging.svc:4222"

# Custom resources the chart may render: kubernetes-validate knows only built-in kinds.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "knative-absent": {"reward": {"knative": "never"}},
    "ray-off": {"ray": {"enabled": False}},
    "monitoring-on": {"monitoring": {"podMonitor": {"enabled": True}}},
    "nats-off": {"nats": {"enabled": False}, "natsUrl": EXTERNAL_NATS},
    "minimal": {
        "reward": {"knative": "never"},
        "ray": {"enabled": False},
        "nats": {"enabled": False},
        "natsUrl": EXTERNAL_NATS,
        "natsAuth": {"secretName": "nats-keys"},
        "dashboards": {"enabled": False},
        "rbac": {"aggregateToDefaultRoles": False},
        "serviceAccount": {"create": True, "name": "rf-operator"},
        "image": {"registry": "registry.example.com/ml", "tag": "1.2.3"},
    },
}

# The operator's ClusterRole, rule by rule, in default values (apiGroup, resource) -> verbs.
CRUD = {"get", "list", "watch", "create", "patch", "update", "delete"}
OPERATOR_RULES = {
    ("rollfleet.io", "rljobs"): {"get", "list", "watch", "patch", "update"},
    ("rollfleet.io", "rljobs/status"): {"get", "patch", "update"},
    ("rollfleet.io", "rljobs/finalizers"): {"update"},
    ("", "configmaps"): CRUD,
    ("", "secrets"): CRUD,
    ("", "services"): CRUD,
    ("", "persistentvolumeclaims"): CRUD,
    ("", "events"): {"create", "patch"},
    ("", "pods"): {"get", "list"},  # read-only: status tells crash-looping pods apart
    ("", "namespaces"): {"get", "list", "watch"},
    ("apps", "deployments"): CRUD,
    ("apps", "statefulsets"): CRUD,
    ("networking.k8s.io", "networkpolicies"): CRUD,
    ("ray.io", "rayjobs"): CRUD,
    ("serving.knative.dev", "services"): CRUD,
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
}


# --- helpers --------------------------------------------------------------------------


@cache
def _render(variant: str) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=VARIANTS[variant], name=RELEASE, namespace=NAMESPACE)


def render_values(values: dict[str, Any], name: str = RELEASE) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=values, name=name, namespace=NAMESPACE)


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered manifests (NOTES.txt left out)."""
    found = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        found.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return found


def rendered(variant: str) -> list[dict[str, Any]]:
    return objects(_render(variant))


def only(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def operator_deployment(variant: str) -> dict[str, Any]:
    return only(rendered(variant), "Deployment", f"{RELEASE}-operator")


def operator_config(variant: str) -> OperatorConfig:
    cm = only(rendered(variant), "ConfigMap", f"{RELEASE}-operator-config")
    return OperatorConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))


def operator_rules(variant: str) -> dict[tuple[str, str], set[str]]:
    role = only(rendered(variant), "ClusterRole", f"{RELEASE}-operator")
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def chart_yaml() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def nats_dependency_status() -> str:
    (dep,) = [d for d in helm.dependency_list(CHART) if d["name"] == "nats"]
    return dep["status"]


# --- Chart.yaml, the NATS dependency, the CRD -----------------------------------------


def test_chart_metadata():
    meta = chart_yaml()
    assert meta["apiVersion"] == "v2"
    assert (meta["name"], meta["version"], meta["appVersion"]) == ("rollfleet", "0.1.0", "0.1.0")
    assert meta["kubeVersion"] == ">=1.30.0-0"


def test_chart_declares_the_official_nats_chart_with_its_condition():
    (dep,) = chart_yaml()["dependencies"]
    assert dep["name"] == "nats"
    assert dep["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert re.fullmatch(r"1\.\d+\.\d+", dep["version"]), "pin one 1.x release of the nats chart"
    assert dep["condition"] == "nats.enabled"
    assert nats_dependency_status() in {"missing", "ok"}


def nats_auth_volume() -> dict[str, Any]:
    """The volume the NATS subchart's pod template gets (its podTemplate.patch)."""
    with helm.Chart.load(CHART) as chart:
        (patch,) = chart.values["nats"]["podTemplate"]["patch"]
    assert (patch["op"], patch["path"]) == ("add", "/spec/volumes/-")
    return patch["value"]


def test_nats_values_turn_jetstream_and_operator_mode_on():
    with helm.Chart.load(CHART) as chart:
        values = chart.values
    nats = values["nats"]
    assert nats["enabled"] is True
    jetstream = nats["config"]["jetstream"]
    assert jetstream["enabled"] is True
    assert jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    # Operator mode: the server includes auth.conf of the natsAuth Secret, mounted next to
    # its config (/etc/nats-config/nats.conf), and that file only (no signing key).
    assert nats["config"]["merge"] == {"$include": "../nats-auth/auth.conf"}
    (mount,) = [p["value"] for p in nats["container"]["patch"]]
    assert mount == {"name": "rollfleet-nats-auth", "mountPath": "/etc/nats-auth", "readOnly": True}
    volume = nats_auth_volume()
    assert volume["name"] == mount["name"]
    assert volume["secret"]["items"] == [{"key": "auth.conf", "path": "auth.conf"}]
    assert set(volume["secret"]["secretName"]) == {"$tplYaml"}
    # no token any more (operator mode); only the Go runtime's soft memory limit
    assert nats["container"]["env"] == {"GOMEMLIMIT": "1GiB"}


def test_nats_auth_secret_name_templated_for_the_subchart_matches_the_operator_one(tmp_path):
    """The nats chart renders its `$tplYaml` name with the release; so do we, in a scratch
    chart: the NATS server and the operator mount the same Secret."""
    template = nats_auth_volume()["secret"]["secretName"]["$tplYaml"]
    scratch = tmp_path / "scratch"
    (scratch / "templates").mkdir(parents=True)
    (scratch / "Chart.yaml").write_text("apiVersion: v2\nname: scratch\nversion: 0.1.0\n")
    (scratch / "templates" / "name.yaml").write_text(f"name: {template}\n")
    for release in (RELEASE, "team-a", "x" * 53):
        with helm.Chart.load(scratch) as chart:
            name = yaml.safe_load(chart.render(name=release)["scratch/templates/name.yaml"])["name"]
        deployment = only(objects(render_values({}, name=release)), "Deployment")
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["nats-signer"]["secret"]["secretName"] == name


def test_crd_in_chart_equals_the_generated_crd():
    """charts/rollfleet/crds/rljob.yaml is a copy of crds/rljob.yaml (`make crds` writes both)."""
    assert (CHART / "crds" / "rljob.yaml").read_bytes() == (
        ROOT / "crds" / "rljob.yaml"
    ).read_bytes()
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    assert [c["filename"] for c in crds] == ["rollfleet/crds/rljob.yaml"]
    crd = yaml.safe_load(crds[0]["data"])
    assert crd["metadata"]["name"] == "rljobs.rollfleet.io"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(crd, version, strict=True)


# --- render, lint, validate -----------------------------------------------------------


@pytest.mark.parametrize("kube_version", ["v1.30.0", "v1.37.0"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_clean(variant, kube_version):
    report = helm.lint(
        CHART, values=VARIANTS[variant], namespace=NAMESPACE, kube_version=kube_version
    )
    assert report["errors"] == []
    problems = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    # The one finding offline: the nats chart is declared but not vendored (see the docstring).
    allowed = [MISSING_NATS] if nats_dependency_status() == "missing" else []
    assert problems == allowed


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_pass_strict_validation(variant):
    objs = rendered(variant)
    assert objs
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message}")


def test_strict_validation_catches_unknown_fields():
    """The check above has teeth: an unknown field in a pod spec fails it."""
    deployment = operator_deployment("default")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_carries_the_common_labels(variant):
    for obj in rendered(variant):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "rollfleet"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "rollfleet-0.1.0"
        assert labels["app.kubernetes.io/part-of"] == "rollfleet"


def test_namespaced_objects_land_in_the_release_namespace():
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for obj in rendered("default"):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


def test_default_render_has_the_expected_objects():
    kinds = sorted(
        (o["kind"], o["metadata"]["name"])
        for o in rendered("default")
        if o["kind"] != "ConfigMap" or "operator" in o["metadata"]["name"]
    )  # dashboards' ConfigMaps come from another template
    assert kinds == [
        ("ClusterRole", "rollfleet-operator"),
        ("ClusterRole", "rollfleet-rljob-editor"),
        ("ClusterRole", "rollfleet-rljob-viewer"),
        ("ClusterRoleBinding", "rollfleet-operator"),
        ("ConfigMap", "rollfleet-operator-config"),
        ("Deployment", "rollfleet-operator"),
        ("ServiceAccount", "rollfleet"),
    ]


# --- the operator Deployment ----------------------------------------------------------


def test_operator_deployment():
    deployment = operator_deployment("default")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert (
        pod["serviceAccountName"] == only(rendered("default"), "ServiceAccount")["metadata"]["name"]
    )
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/rollfleet/operator:0.1.0"
    assert container["command"] == ["python", "-m", "rollfleet_operator"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": 8080}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/part-of"] == "rollfleet"


def test_operator_reads_its_config_and_nats_signing_key():
    deployment = operator_deployment("default")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["ROLLFLEET_OPERATOR_CONFIG"]["value"] == "/etc/rollfleet-operator/config.yaml"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The signing key and account id from the natsAuth Secret, where handlers.py looks.
    signer_dir = env[SIGNER_DIR_ENV]["value"]
    assert signer_dir == DEFAULT_SIGNER_DIR
    signer = volumes[mounts[signer_dir]]["secret"]
    assert signer["secretName"] == f"{RELEASE}-nats-auth"
    assert {i["key"] for i in signer["items"]} == {SIGNING_SEED, ACCOUNT_ID}
    assert signer["defaultMode"] == 0o440
    config_volume = volumes[mounts["/etc/rollfleet-operator"]]
    assert config_volume["configMap"]["name"] == f"{RELEASE}-operator-config"
    assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]


def test_operator_runs_restricted():
    pod = operator_deployment("default")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 10001
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_chart_makes_no_secret_and_mounts_the_named_one():
    """The keys come from `rollfleet nats-keys`, never from the chart (Helm cannot make
    nkeys); natsAuth.secretName names the Secret the operator mounts."""
    for variant in VARIANTS:
        assert not [o for o in rendered(variant) if o["kind"] == "Secret"], variant
    pod = only(rendered("minimal"), "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["nats-signer"]["secret"]["secretName"] == "nats-keys"


# --- the operator's settings file -----------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_operator_config_loads(variant):
    assert isinstance(operator_config(variant), OperatorConfig)


def test_operator_config_defaults():
    config = operator_config("default")
    assert config.images.rollout == "ghcr.io/rollfleet/rollout:0.1.0"
    assert config.images.rolloutVllm == "ghcr.io/rollfleet/rollout-vllm:0.1.0"
    assert config.images.trainer == "ghcr.io/rollfleet/trainer:0.1.0"
    assert config.images.reward == "ghcr.io/rollfleet/reward:0.1.0"
    assert config.images.env == "ghcr.io/rollfleet/env:0.1.0"
    assert config.nats.url == f"nats://{RELEASE}-nats.{NAMESPACE}.svc:4222"
    assert config.reward.knative == "auto"
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    h800, h20 = config.gpuClasses["H800"], config.gpuClasses["H20"]
    assert h800.nodeSelector == {"rollfleet.io/node-profile": "compute-optimised"}
    assert h20.nodeSelector == {"rollfleet.io/node-profile": "bandwidth-optimised"}
    assert h800.tolerations == h20.tolerations == [toleration]
    assert config.trainer.rayVersion == "2.60.0"
    assert config.trainer.ray is True


def test_operator_config_follows_values():
    assert operator_config("knative-absent").reward.knative == "never"
    assert operator_config("ray-off").trainer.ray is False  # jobs needing Ray: InvalidSpec
    assert operator_config("nats-off").nats.url == EXTERNAL_NATS
    minimal = operator_config("minimal")
    assert minimal.images.trainer == "registry.example.com/ml/trainer:1.2.3"
    assert (
        only(rendered("minimal"), "Deployment")["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        == "registry.example.com/ml/operator:1.2.3"
    )


def test_nats_url_follows_the_nats_chart_naming():
    # The nats chart names its Service after the release alone when that contains "nats".
    cm = only(
        objects(render_values({}, name="my-nats")), "ConfigMap", "my-nats-rollfleet-operator-config"
    )
    config = OperatorConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config.nats.url == f"nats://my-nats.{NAMESPACE}.svc:4222"


def test_nats_off_without_a_url_fails_with_a_clear_message():
    with pytest.raises(helm.HelmRenderError, match="natsUrl is required"):
        render_values({"nats": {"enabled": False}})


# --- RBAC -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_rbac_wildcards(variant):
    for obj in rendered(variant):
        if obj["kind"] not in {"ClusterRole", "Role"}:
            continue
        for rule in obj["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not any("*" in item for item in rule.get(field, [])), (obj, rule)
            assert "nonResourceURLs" not in rule


def test_operator_rbac_is_exactly_what_it_needs():
    assert operator_rules("default") == OPERATOR_RULES
    binding = only(rendered("default"), "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == f"{RELEASE}-operator"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
    ]


def test_ray_off_drops_rayjobs_and_knative_absent_drops_knative():
    without_ray = dict(OPERATOR_RULES)
    del without_ray[("ray.io", "rayjobs")]
    assert operator_rules("ray-off") == without_ray
    without_knative = dict(OPERATOR_RULES)
    del without_knative[("serving.knative.dev", "services")]
    assert operator_rules("knative-absent") == without_knative


def test_user_roles_aggregate_into_the_builtin_roles():
    objs = rendered("default")
    editor = only(objs, "ClusterRole", f"{RELEASE}-rljob-editor")
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    viewer = only(objs, "ClusterRole", f"{RELEASE}-rljob-viewer")
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert not [o for o in rendered("minimal") if "rljob-" in o["metadata"]["name"]]


# --- monitoring -----------------------------------------------------------------------


def test_no_podmonitor_by_default():
    assert not [o for o in rendered("default") if o["kind"] == "PodMonitor"]


def test_podmonitor():
    monitor = only(rendered("monitoring-on"), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] == RELEASE
    assert monitor["metadata"]["namespace"] == NAMESPACE
    spec = monitor["spec"]
    assert spec["selector"] == {
        "matchLabels": {
            "app.kubernetes.io/part-of": "rollfleet",
            "app.kubernetes.io/managed-by": "rollfleet-operator",
        }
    }
    assert spec["namespaceSelector"] == {"any": True}  # job pods run in the jobs' namespaces
    (endpoint,) = spec["podMetricsEndpoints"]  # required by the PodMonitor CRD
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint[key])
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "podTargetLabels"}
    # it selects every pod the operator renders for a job (each serves /metrics on "http"),
    # not the operator's own pod (kopf serves /healthz only)
    from rollfleet.spec import load_manifest
    from rollfleet_operator.config import OperatorConfig
    from rollfleet_operator.render import render

    job = load_manifest("examples/countdown.yaml")
    pods = [
        c["spec"]["template"]
        for c in render(job, "ns", OperatorConfig(), knative=False)
        if c["kind"] in ("Deployment", "StatefulSet")
    ]
    assert len(pods) == 4
    for pod in pods:
        assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert "http" in [p["name"] for p in pod["spec"]["containers"][0]["ports"]]
    operator_pod = operator_deployment("monitoring-on")["spec"]["template"]
    assert not spec["selector"]["matchLabels"].items() <= operator_pod["metadata"]["labels"].items()


# --- values and their schema ----------------------------------------------------------


def test_dashboards_values():
    with helm.Chart.load(CHART) as chart:
        dashboards = chart.values["dashboards"]
    assert dashboards["enabled"] is True
    assert dashboards["label"] == "grafana_dashboard"
    assert dashboards["labelValue"] == "1"


def test_schema_is_draft_07_and_closed():
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
        values = chart.values
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])
    for section in ("image", "operator", "serviceAccount", "rbac", "ray", "reward", "trainer"):
        assert schema["properties"][section]["additionalProperties"] is False, section
    for section in ("natsAuth", "monitoring", "dashboards"):
        assert schema["properties"][section]["additionalProperties"] is False, section
    assert "additionalProperties" not in schema["properties"]["nats"]  # the subchart's values


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"operator": {"replicas": "1"}}, "/operator/replicas"),
        ({"operator": {"replicas": 2}}, "/operator/replicas"),
        ({"reward": {"knative": "sometimes"}}, "/reward/knative"),
        ({"typo": True}, "typo"),
        ({"operator": {"replica": 1}}, "replica"),
        ({"gpuClasses": {"H100": {"nodeSelecter": {}}}}, "nodeSelecter"),
        ({"monitoring": {"podMonitor": {"interval": "soon"}}}, "/monitoring/podMonitor/interval"),
    ],
)
def test_schema_rejects_bad_values(values, where):
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render_values(values)


def test_schema_leaves_the_nats_subchart_values_open():
    render_values({"nats": {"enabled": True, "config": {"cluster": {"enabled": True}}}})
