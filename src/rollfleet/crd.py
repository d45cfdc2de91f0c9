"""The RLJob CustomResourceDefinition, generated from the pydantic models in spec.py.

The models are the one source of truth; this module turns their JSON Schema (draft 2020-12,
with $refs) into the structural OpenAPI v3.0 schema the Kubernetes API server wants:
refs inlined, `X | None` as `nullable`, exclusive bounds as booleans, open maps as
`x-kubernetes-preserve-unknown-fields`, titles and defaults dropped (the operator applies
defaults through pydantic). A model's `__cel__` rules (spec.Cel, beside the validators they
mirror) become `x-kubernetes-validations` on its schema, each `{self.field}` written out
with the field's pydantic default for when the manifest leaves it out. Regenerate the
checked-in files after changing spec.py:

    make crds      # rollfleet crd | tee charts/rollfleet/crds/rljob.yaml > crds/rljob.yaml

tests/unit/test_crd.py fails while crds/rljob.yaml is stale.
"""

from __future__ import annotations

import json
import math
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema

from rollfleet.spec import (
    API_VERSION,
    KIND,
    KUBE_SCHEMA,
    QUANTITY_PATTERN,
    Cel,
    RLJobSpec,
    RLJobStatus,
)

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


_CEL = "x-kubernetes-validations"
_RULE_KEYS = ("rule", "message", "fieldPath", "reason")
# `{self.a.b}` or `{p.b}` in a Cel rule: a field path, expanded with its default.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*(?:\.\w+)+)\}")
# `self.a.pools.all(p, ...)`: a list macro; `p` stands for an item of `self.a.pools`.
_MACRO = re.compile(
    r"\b([A-Za-z_]\w*(?:\.\w+)+)\.(?:all|exists|exists_one|filter|map)\(\s*(\w+)\s*,"
)


def _field(model: type[BaseModel], alias: str) -> tuple[str, FieldInfo]:
    """A field of `model` by its alias (the name in the manifest): (attribute name, info)."""
    for name, info in model.model_fields.items():
        if (info.alias or name) == alias:
            return name, info
    raise ValueError(f"CEL rule names {model.__name__}.{alias}, which is no field there")


def _is_nullable(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)  # `X | None`


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, itself, as the items of a list, or optional (`M | None`)."""
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if _is_nullable(annotation):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _cel_literal(value: Any, annotation: Any) -> str:
    """A default as a CEL literal of the field's CEL type (a float field's 300 is 300.0)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if annotation is float and isinstance(value, int | float) and math.isfinite(value):
        return repr(float(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a CEL string literal too; "" reads better in YAML than ''
    raise ValueError(f"default {value!r} has no CEL literal: guard the field with has() instead")


def _walk(path: str, scopes: dict[str, type[BaseModel]]) -> list[FieldInfo]:
    """The fields along `self.a.b` (or `p.b`, p a macro variable), outermost first."""
    root, *aliases = path.split(".")
    if root not in scopes:
        raise ValueError(f"CEL rule: {root!r} in {path!r} is neither self nor a macro variable")
    model: type[BaseModel] | None = scopes[root]
    fields = []
    for alias in aliases:
        if model is None:
            raise ValueError(f"CEL rule: {path!r} goes below a non-model field")
        fields.append(_field(model, alias)[1])
        model = _model_in(fields[-1].annotation)
    return fields


def _with_default(path: str, scopes: dict[str, type[BaseModel]]) -> str:
    """`self.a.b` as CEL that reads the field, or its pydantic default where it is absent.

    Which default depends on where the path stops: with `self.a` absent it is the default
    of `a`, its `b`; with `self.a` there but `self.a.b` absent, the default of a's `b`.
    """
    fields = _walk(path, scopes)
    if _is_nullable(fields[-1].annotation):
        raise ValueError(f"CEL placeholder {{{path}}}: a nullable field needs a hand-written guard")
    prefixes = path.split(".")
    guards: list[tuple[str, str]] = []  # (has() argument, the literal used when it is absent)
    for i, info in enumerate(fields):
        value = info.get_default(call_default_factory=True)
        for alias in prefixes[i + 2 :]:
            if not isinstance(value, BaseModel):
                raise ValueError(f"CEL placeholder {{{path}}}: no default for {alias!r}")
            value = getattr(value, _field(type(value), alias)[0])
        literal = _cel_literal(value, fields[-1].annotation)
        guards.append((".".join(prefixes[: i + 2]), literal))
    # Neighbouring guards with the same fallback share one ternary.
    expr = path
    while guards:
        literal = guards[-1][1]
        run: list[str] = []
        while guards and guards[-1][1] == literal:
            run.insert(0, guards.pop()[0])
        expr = f"({' && '.join(f'has({p})' for p in run)} ? {expr} : {literal})"
    return expr


def render_rule(model: type[BaseModel], cel: Cel) -> dict:
    """One Cel of `model` as an x-kubernetes-validations entry, its placeholders expanded."""
    scopes: dict[str, type[BaseModel]] = {"self": model}
    for receiver, var in _MACRO.findall(cel.rule):
        items = _model_in(_walk(receiver, scopes)[-1].annotation)
        if items is None:
            raise ValueError(f"CEL rule: {receiver!r} is not a list of objects")
        scopes[var] = items
    rule = _PLACEHOLDER.sub(lambda m: _with_default(m.group(1), scopes), cel.rule)
    out = {"rule": rule, "message": cel.message}
    if cel.field_path is not None:
        _walk("self" + cel.field_path, {"self": model})  # refuses a path that is no field
        out["fieldPath"] = cel.field_path
    out["reason"] = cel.reason
    return out


class _WithCel(GenerateJsonSchema):
    """pydantic's JSON Schema, each model's `__cel__` rules added to its own schema."""

    def model_schema(self, schema):
        out = super().model_schema(schema)
        model = schema["cls"]
        rules = getattr(model, "__cel__", ())
        if rules:
            out[_CEL] = [render_rule(model, cel) for cel in rules]
        return out


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
    """An object of any fields (`dict[str, Any]`); a typed map (`dict[str, str]`) is not."""
    extra = node.get("additionalProperties")
    return node.get("type") == "object" and (
        extra is True or ("properties" not in node and not isinstance(extra, dict))
    )


def _type_of(value: Any) -> str:
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number")):
        if isinstance(value, python_type):
            return name
    return "string"


# --- Kubernetes' own schemas, for fields that hold its API objects (spec.kube_field) -------
# The oldest Kubernetes the chart supports: its OpenAPI as kubernetes-validate ships it
# (JSON Schema 2020-12). Only `make crds` and the tests read it (a dev dependency).
KUBE_VERSION = "1.30"
# What the API server allows in a structural schema besides the keywords in _KEPT.
_KUBE_EXTENSIONS = {"x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"}
_KUBE_DROPPED = {
    "$schema",
    "$id",
    "default",
    "x-kubernetes-patch-strategy",
    "x-kubernetes-patch-merge-key",
}
_INT_OR_STRING = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "x-kubernetes-int-or-string": True,
}


@cache
def kube_definitions() -> dict[str, dict]:
    import kubernetes_validate  # dev dependency: `make crds` runs in the dev venv

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = folder / f"v{KUBE_VERSION}.0-local" / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


# A Volume's schema is 88 KB (some thirty volume sources): in each of the five places pod
# overrides go it would take the CRD past what `kubectl apply` can store (256 KB). Its
# items stay open, a name required; the API server checks them in the pods the operator
# creates, and the operator reports what it refuses.
_OPEN = {"io.k8s.api.core.v1.Volume": ["name"]}


def kube_schema(name: str, defs: dict[str, dict], seen: tuple[str, ...] = ()) -> dict:
    """Kubernetes' definition `name` (io.k8s.api.core.v1.EnvVar) as a structural schema."""
    if name in _OPEN:
        required = _OPEN[name]
        properties = {key: {"type": "string"} for key in required}
        return {"type": "object", "required": required, "properties": properties, _PRESERVE: True}
    if name.endswith(".resource.Quantity"):
        return {**_INT_OR_STRING, "pattern": QUANTITY_PATTERN}
    if name.endswith(".intstr.IntOrString"):
        return dict(_INT_OR_STRING)
    if name in seen:
        raise ValueError(f"recursive Kubernetes definition {name} cannot be inlined")
    return _kube_node(defs[name], defs, (*seen, name))


def _kube_node(node: dict, defs: dict[str, dict], seen: tuple[str, ...]) -> dict:
    if "$ref" in node:
        out = kube_schema(node["$ref"].rsplit("/", 1)[-1], defs, seen)
        return {**out, **({"description": node["description"]} if "description" in node else {})}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "type":  # ["string", "null"]: null is pruned by the API server anyway
            (out["type"],) = [
                t for t in (value if isinstance(value, list) else [value]) if t != "null"
            ]
        elif key == "enum":
            out[key] = [v for v in value if v is not None]
        elif key in _KEPT or key in _KUBE_EXTENSIONS:
            out[key] = value
        elif key == "properties":
            out[key] = {k: _kube_node(v, defs, seen) for k, v in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _kube_node(value, defs, seen)
        elif key not in _KUBE_DROPPED and key != "additionalProperties":
            raise ValueError(f"Kubernetes schema keyword {key!r} has no CRD equivalent: {node}")
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out[_PRESERVE] = True  # free-form in Kubernetes too (fieldsV1)
    return out


def _kube_field(node: dict, nullable: bool) -> dict:
    """A pydantic field marked with KUBE_SCHEMA: Kubernetes' schema in its place (for a
    list, as its items), with the field's own description."""
    item = kube_schema(node[KUBE_SCHEMA], kube_definitions())
    out: dict[str, Any] = {"type": "array", "items": item} if node.get("type") == "array" else item
    out = {**out, "description": node.get("description", out.get("description", ""))}
    if nullable:
        out["nullable"] = True
    return out


def _convert(node: dict, defs: dict, seen: tuple[str, ...] = ()) -> dict:
    """One JSON Schema node (and everything below it) as a structural OpenAPI v3.0 node."""
    node, seen = _inline(node, defs, seen)
    node, nullable = _strip_null(node)
    node, seen = _inline(node, defs, seen)  # `Model | None`: the model behind the null
    if KUBE_SCHEMA in node:
        return _kube_field(node, nullable)
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
        elif key == _CEL:
            # pydantic sorted each rule's keys; the rule first reads better.
            out[key] = [{k: rule[k] for k in _RULE_KEYS if k in rule} for rule in value]
        elif key == "properties":
            out[key] = {name: _convert(sub, defs, seen) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _convert(value, defs, seen)  # a list's items, a typed map's values
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
    schema = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_WithCel)
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
