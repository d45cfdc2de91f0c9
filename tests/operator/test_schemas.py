"""The CRD-schema helper: stored upstream CRDs load, and valid/invalid objects are told apart."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from tests.operator.schemas import (
    CustomResourceValidationError,
    json_schema,
    load_crd,
    schema_errors,
    validate_custom_resource,
)

KNATIVE_SERVICE = {
    "apiVersion": "serving.knative.dev/v1",
    "kind": "Service",
    "metadata": {"name": "reward", "namespace": "team-a"},
    "spec": {
        "template": {
            "spec": {"containers": [{"image": "ghcr.io/example/reward:1.0"}]},
        },
    },
}

RAY_POD_TEMPLATE = {
    "spec": {"containers": [{"name": "ray", "image": "rayproject/ray:2.9.0"}]},
}

# The stored KubeRay CRD also requires rayStartParams on both groups and
# minReplicas/maxReplicas on worker groups (newer KubeRay releases relaxed this).
RAY_JOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "train"},
    "spec": {
        "entrypoint": "python -m rollfleet.train",
        "rayClusterSpec": {
            "headGroupSpec": {"rayStartParams": {}, "template": copy.deepcopy(RAY_POD_TEMPLATE)},
            "workerGroupSpecs": [
                {
                    "groupName": "gpu",
                    "replicas": 2,
                    "minReplicas": 0,
                    "maxReplicas": 4,
                    "rayStartParams": {},
                    "template": copy.deepcopy(RAY_POD_TEMPLATE),
                }
            ],
        },
    },
}


@pytest.mark.parametrize(
    ("group", "kind", "versions"),
    [("serving.knative.dev", "Service", {"v1"}), ("ray.io", "RayJob", {"v1", "v1alpha1"})],
)
def test_stored_crds_have_a_schema_per_version(group, kind, versions):
    crd = load_crd(group, kind)
    assert crd["kind"] == "CustomResourceDefinition"
    assert {v["name"] for v in crd["spec"]["versions"]} == versions
    for version in crd["spec"]["versions"]:
        assert {"spec", "status"} <= set(version["schema"]["openAPIV3Schema"]["properties"])


@pytest.mark.parametrize("api_version", ["serving.knative.dev/v1", "ray.io/v1"])
def test_converted_schemas_are_valid_json_schema(api_version):
    kind = "Service" if api_version.startswith("serving") else "RayJob"
    jsonschema.Draft202012Validator.check_schema(json_schema(api_version, kind))


@pytest.mark.parametrize("obj", [KNATIVE_SERVICE, RAY_JOB], ids=["ksvc", "rayjob"])
def test_minimal_objects_pass(obj):
    validate_custom_resource(obj)


def test_unknown_field_fails_with_its_path():
    obj = copy.deepcopy(KNATIVE_SERVICE)
    obj["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(AssertionError) as info:
        validate_custom_resource(obj)
    assert "spec.template.spec.containers[0].imagee: unknown field" in str(info.value)
    # Without strict mode unknown fields are not errors (only types and constraints are).
    validate_custom_resource(obj, strict=False)


def test_wrong_type_fails():
    obj = copy.deepcopy(RAY_JOB)
    obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(CustomResourceValidationError) as info:
        validate_custom_resource(obj)
    assert info.value.errors == [
        "spec.rayClusterSpec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"
    ]


def test_every_error_is_listed():
    obj = copy.deepcopy(RAY_JOB)
    del obj["spec"]["entrypoint"]
    obj["spec"]["suspend"] = "no"
    obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"containerPort": 8265, "bogus": 1}
    ]
    errors = schema_errors(obj)
    assert errors == [
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].ports[0].bogus:"
        " unknown field",
        "spec.suspend: 'no' is not of type 'boolean'",
        "spec: 'entrypoint' is a required property",
    ]


def test_preserved_and_int_or_string_fields():
    obj = copy.deepcopy(KNATIVE_SERVICE)
    template = obj["spec"]["template"]
    # template.metadata preserves unknown fields; affinity is an opaque object.
    template["metadata"] = {"annotations": {"autoscaling.knative.dev/min-scale": "1"}, "x": 1}
    template["spec"]["affinity"] = {"anything": {"goes": True}}
    container = template["spec"]["containers"][0]
    container["resources"] = {"limits": {"cpu": 2, "memory": "4Gi"}}
    container["readinessProbe"] = {"httpGet": {"port": "http"}}
    validate_custom_resource(obj)
    container["resources"]["limits"]["memory"] = ["4Gi"]
    assert schema_errors(obj) == [
        "spec.template.spec.containers[0].resources.limits.memory:"
        " ['4Gi'] is not of type 'integer', 'string'"
    ]


def test_metadata_is_checked_loosely():
    obj = copy.deepcopy(KNATIVE_SERVICE)
    obj["metadata"]["uid"] = "1234"  # other metadata fields are not checked
    validate_custom_resource(obj)
    del obj["metadata"]["name"]
    obj["metadata"]["labels"] = {"app": 1}
    assert schema_errors(obj) == [
        "metadata.labels.app: 1 is not of type 'string'",
        "metadata: 'name' is a required property",
    ]


def test_unknown_kind_or_version_is_a_value_error():
    with pytest.raises(ValueError, match="no CRD stored"):
        validate_custom_resource({"apiVersion": "ray.io/v1", "kind": "RayService"})
    with pytest.raises(ValueError, match="not in CRD"):
        validate_custom_resource({"apiVersion": "ray.io/v2", "kind": "RayJob"})
    with pytest.raises(ValueError, match="no group"):
        validate_custom_resource({"apiVersion": "v1", "kind": "Service"})
