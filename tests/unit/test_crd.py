"""The generated CRD: up to date with spec.py, structural, and faithful to the models."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel

from rollfleet.crd import build_crd, model_schema, render_crd
from rollfleet.spec import RLJobSpec

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "rljob.yaml"
PRESERVE = "x-kubernetes-preserve-unknown-fields"
# JSON Schema constructs the API server rejects (or that make a schema non-structural).
FORBIDDEN = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "const", "title", "default"}


@pytest.fixture(scope="module")
def crd() -> dict:
    return build_crd()


@pytest.fixture(scope="module")
def version(crd) -> dict:
    (only,) = crd["spec"]["versions"]
    return only


@pytest.fixture(scope="module")
def spec(version) -> dict:
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def walk(node: dict, path: str = ""):
    """Every schema node below (and including) `node`, with a readable path."""
    yield path or ".", node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


def test_checked_in_file_is_current():
    assert CRD_FILE.read_text() == render_crd(), "crds/rljob.yaml is stale; run `make crds`"


def test_rendered_yaml_round_trips(crd):
    assert yaml.safe_load(render_crd()) == crd


def test_names_and_version(crd, version):
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "rljobs.rollfleet.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == ("RLJob", "rljobs", "rljob")
    assert names["shortNames"] == ["rlj"]
    assert crd["spec"]["scope"] == "Namespaced"
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)


def test_status_subresource(version):
    assert version["subresources"] == {"status": {}}


def test_printer_columns(version):
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Step", "Reward", "Age"} <= columns.keys()
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Step"]["type"] == "integer"
    assert columns["Reward"]["jsonPath"] == ".status.meanReward"
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }


def test_schema_is_structural(version):
    root = version["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        assert "type" in node or node.get(PRESERVE), f"{path} has no type"
        assert not FORBIDDEN & node.keys(), f"{path} keeps {FORBIDDEN & node.keys()}"
        # The API server forbids additionalProperties next to properties; pruning plus
        # strict field validation reject unknown fields instead.
        assert "additionalProperties" not in node, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(key, True) is True, f"{path}.{key} must be a boolean"


def test_every_spec_field_by_alias(spec):
    aliases = [f.alias or name for name, f in RLJobSpec.model_fields.items()]
    assert list(spec["properties"]) == aliases
    assert "async" in spec["properties"] and "async_" not in spec["properties"]


def test_bounds_carried_over(spec):
    props = spec["properties"]
    assert props["async"]["properties"]["ratio"]["minimum"] == 0
    pool = props["rollout"]["properties"]["pools"]
    assert pool["minItems"] == 1
    assert pool["items"]["properties"]["replicas"]["minimum"] == 1
    assert pool["items"]["properties"]["engine"]["enum"] == ["torch", "vllm"]
    assert pool["items"]["properties"]["name"]["maxLength"] == 40


def test_exclusive_bounds_in_openapi_v3_0_form(spec):
    clip = spec["properties"]["algorithm"]["properties"]["clipEpsilon"]
    assert (clip["minimum"], clip["exclusiveMinimum"]) == (0, True)
    assert (clip["maximum"], clip["exclusiveMaximum"]) == (1, True)


def test_optional_fields_are_nullable(spec):
    path = spec["properties"]["model"]["properties"]["path"]
    assert path["type"] == "string" and path["nullable"] is True
    held_out = spec["properties"]["task"]["properties"]["heldoutLimit"]
    assert (held_out["type"], held_out["minimum"], held_out["nullable"]) == ("integer", 1, True)


def test_only_open_maps_preserve_unknown_fields(version):
    root = version["schema"]["openAPIV3Schema"]
    preserved = {path for path, node in walk(root) if node.get(PRESERVE)}
    assert preserved == {
        ".spec.methods",
        ".spec.task.params",
        ".spec.reward.functions[].params",
    }


def test_const_becomes_enum():
    class Pinned(BaseModel):
        kind: Literal["RLJob"]

    kind = model_schema(Pinned)["properties"]["kind"]
    assert kind == {"type": "string", "enum": ["RLJob"]}


def test_unions_are_refused():
    class Either(BaseModel):
        value: int | str

    with pytest.raises(ValueError, match="union"):
        model_schema(Either)
