"""The RLJob CustomResourceDefinition, generated from the pydantic models in spec.py.

The models are the one source of truth; this module turns their JSON Schema (draft 2020-12,
with $refs) into the structural OpenAPI v3.0 schema the Kubernetes API server wants:
refs inlined, `X | None` as `nullable`, exclusive bounds as booleans, open maps as
`x-kubernetes-preserve-unknown-fields`, titles and defaults dropped (the operator applies
defaults through pydantic). Regenerate the checked-in file after changing spec.py:

    rollfleet crd > crds/rljob.yaml      # or: make crds

tests/unit/test_crd.py fails while crds/rljob.yaml is stale.
"""

from __future__ import annotations

from typing import Any

import yaml

from rollfleet.spec import API_VERSION, KIND, RLJobSpec, RLJobStatus

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "rljobs"
HEADER = "# Generated from src/rollfleet/spec.py by `make crds`; do not edit.\n"

# JSON Schema keywords copied as they are; anything else pydantic emits is an error, so a
# new construct in spec.py fails here rather than producing a CRD the API server rejects.
_KEPT = {
    "type",
    "description",
    "enum",
    "format",
    "minimum",
    "maximum",
    "multipleOf",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
}
_DROPPED = {"title", "default", "$defs", "additionalProperties"}
_PRESERVE = "x-kubernetes-preserve-unknown-fields"

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.meanReward"},
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.heldoutAccuracy", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _inline(node: dict, defs: dict, seen: tuple[str, ...]) -> tuple[dict, tuple[str, ...]]:
    """Replace a $ref (or a one-element allOf around one) by its definition.

    Keys next to the ref (a field's description) override the definition's own.
    """
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
    if "$ref" not in node:
        return node, seen
    name = node["$ref"].removeprefix("#/$defs/")
    if name in seen:
        raise ValueError(f"recursive model {name} cannot be inlined into a CRD schema")
    siblings = {k: v for k, v in node.items() if k != "$ref"}
    return _inline({**defs[name], **siblings}, defs, (*seen, name))


def _strip_null(node: dict) -> tuple[dict, bool]:
    """`anyOf: [X, {type: null}]` becomes X; the flag says whether null was allowed."""
    if "anyOf" not in node:
        return node, False
    branches = [b for b in node["anyOf"] if b != {"type": "null"}]
    if len(branches) != 1:
        raise ValueError(f"a union cannot be expressed in a structural schema: {node['anyOf']}")
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    return {**branches[0], **outer}, len(branches) < len(node["anyOf"])


def _is_open_map(node: dict) -> bool:
    return node.get("type") == "object" and (
        node.get("additionalProperties") is True or "properties" not in node
    )


def _type_of(value: Any) -> str:
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number")):
        if isinstance(value, python_type):
            return name
    return "string"


def _convert(node: dict, defs: dict, seen: tuple[str, ...] = ()) -> dict:
    """One JSON Schema node (and everything below it) as a structural OpenAPI v3.0 node."""
    node, seen = _inline(node, defs, seen)
    node, nullable = _strip_null(node)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _KEPT:
            out[key] = value
        elif key == "const":
            out["enum"] = [value]
            out.setdefault("type", _type_of(value))
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # 2020-12 puts the bound in the keyword; OpenAPI v3.0 wants it beside a boolean.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _convert(sub, defs, seen) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs, seen)
        elif key not in _DROPPED:
            raise ValueError(f"JSON Schema keyword {key!r} has no CRD equivalent: {node}")
    if nullable:
        out["nullable"] = True
    if _is_open_map(node):
        out[_PRESERVE] = True
    # `type` first, then `description`: easier to read in the generated YAML.
    order = {"type": 0, "description": 1}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 2)))


def model_schema(model: type) -> dict:
    """A pydantic model's validation schema (by alias) as a structural OpenAPI v3.0 schema."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(schema, schema.get("$defs", {}))


def build_crd() -> dict:
    """The RLJob CustomResourceDefinition (apiextensions.k8s.io/v1) as a dict."""
    schema = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(RLJobSpec),
            "status": model_schema(RLJobStatus),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["rlj"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as YAML, with the do-not-edit header; what crds/rljob.yaml must contain."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False)
