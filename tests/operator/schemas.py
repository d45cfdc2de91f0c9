"""Validate rendered custom resources against the upstream CRD schemas kept in data/.

    from tests.operator.schemas import validate_custom_resource
    validate_custom_resource(rendered_knative_service)   # raises on any schema error

The CRD is picked by the object's apiVersion (group/version) and kind; the served
version's openAPIV3Schema is converted once (cached) from Kubernetes' structural-schema
dialect to plain JSON Schema for the `jsonschema` package:

- `nullable: true` also allows null;
- `x-kubernetes-int-or-string: true` means integer or string;
- `x-kubernetes-preserve-unknown-fields: true` keeps unknown fields at that level;
- otherwise, in strict mode, every object schema gets `additionalProperties: false`
  (as Kubernetes' pruning and strict field validation treat unknown fields), unless it
  declares its own `additionalProperties` (a map);
- `format` (int32, int64, date-time, ...), CEL rules (`x-kubernetes-validations`) and
  list/map-type markers are not checked.

Top-level `metadata` is validated loosely (an object with a string `name`; labels and
annotations string maps), since the CRD schema only says `type: object` for it.
The files in data/ and where they came from are listed in data/README.md.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DATA_DIR = Path(__file__).parent / "data"

# (group, kind) -> CRD file in DATA_DIR
CRD_FILES: dict[tuple[str, str], str] = {
    ("serving.knative.dev", "Service"): "knative-serving-service.yaml",
    ("ray.io", "RayJob"): "kuberay-rayjob.yaml.gz",
}

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LOOSE_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_EMBEDDED_RESOURCE_FIELDS = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}
# Keywords carried over unchanged: same meaning in OpenAPI v3.0 and JSON Schema.
_PLAIN_KEYWORDS = (
    "required",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "default",
)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class CustomResourceValidationError(AssertionError):
    """A custom resource does not match its CRD schema; `errors` lists 'path: message'."""

    def __init__(self, what: str, errors: list[str]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{what}: {len(errors)} schema error(s):\n{lines}")


@functools.cache
def load_crd(group: str, kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition stored for (group, kind), parsed."""
    try:
        filename = CRD_FILES[(group, kind)]
    except KeyError:
        known = ", ".join(f"{g}/{k}" for g, k in sorted(CRD_FILES))
        raise ValueError(f"no CRD stored for {group}/{kind} (known: {known})") from None
    raw = (DATA_DIR / filename).read_bytes()
    if filename.endswith(".gz"):
        raw = gzip.decompress(raw)
    docs = [d for d in yaml.load_all(raw, Loader=_YAML_LOADER) if d]
    crds = [
        d
        for d in docs
        if d.get("kind") == "CustomResourceDefinition"
        and d["spec"]["group"] == group
        and d["spec"]["names"]["kind"] == kind
    ]
    if len(crds) != 1:
        raise ValueError(f"{filename}: expected one CRD for {group}/{kind}, found {len(crds)}")
    return crds[0]


def _split_api_version(api_version: str) -> tuple[str, str]:
    if "/" not in api_version:
        raise ValueError(f"apiVersion {api_version!r} has no group (core kinds have no CRD)")
    group, version = api_version.rsplit("/", 1)
    return group, version


def openapi_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The served version's openAPIV3Schema, as written in the CRD."""
    group, version = _split_api_version(api_version)
    crd = load_crd(group, kind)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            if not entry.get("served", False):
                raise ValueError(f"{group}/{version} {kind} is not served by its CRD")
            schema = entry.get("schema", {}).get("openAPIV3Schema")
            if schema is None:
                raise ValueError(f"{group}/{version} {kind}: the CRD has no openAPIV3Schema")
            return schema
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    raise ValueError(f"{kind}: version {version!r} not in CRD {group} (served: {served})")


def to_json_schema(node: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """Convert one structural-schema node (and everything under it) to JSON Schema."""
    return _convert(node, strict, structural=True)


def _convert(node: dict[str, Any], strict: bool, structural: bool) -> dict[str, Any]:
    # `structural` is False inside allOf/anyOf/oneOf/not: those branches only add value
    # checks in Kubernetes and must not close objects to other fields.
    out: dict[str, Any] = {k: node[k] for k in _PLAIN_KEYWORDS if k in node}
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    nullable = node.get("nullable") is True

    if node.get("x-kubernetes-int-or-string") is True:
        types: list[str] | None = ["integer", "string"]
    elif "type" in node:
        types = [node["type"]]
    else:
        types = None
    if types is not None:
        if nullable:
            types = [*types, "null"]
        out["type"] = types[0] if len(types) == 1 else types

    if "enum" in node:
        out["enum"] = (
            [*node["enum"], None] if nullable and None not in node["enum"] else node["enum"]
        )

    # OpenAPI v3.0 boolean exclusive bounds -> JSON Schema numeric ones.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if bound in node:
            if node.get(exclusive) is True:
                out[exclusive] = node[bound]
            else:
                out[bound] = node[bound]

    properties = dict(node.get("properties", {}))
    if node.get("x-kubernetes-embedded-resource") is True:
        for name, sub in _EMBEDDED_RESOURCE_FIELDS.items():
            properties.setdefault(name, sub)
    if properties:
        out["properties"] = {
            name: _convert(sub, strict, structural) for name, sub in properties.items()
        }

    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = _convert(additional, strict, structural)
    elif isinstance(additional, bool):
        out["additionalProperties"] = additional
    elif strict and structural and not preserve and node.get("type") == "object":
        out["additionalProperties"] = False

    if isinstance(node.get("items"), dict):
        out["items"] = _convert(node["items"], strict, structural)
    # int-or-string's own `anyOf: [{type: integer}, {type: string}]` is dropped: the type
    # above already says it (and repeating it would double every error).
    skip_any_of = node.get("x-kubernetes-int-or-string") is True and all(
        set(sub) == {"type"} for sub in node.get("anyOf", [])
    )
    for junctor in ("allOf", "anyOf", "oneOf"):
        if junctor == "anyOf" and skip_any_of:
            continue
        if junctor in node:
            out[junctor] = [_convert(sub, strict, structural=False) for sub in node[junctor]]
    if "not" in node:
        out["not"] = _convert(node["not"], strict, structural=False)
    return out


@functools.cache
def _validator(api_version: str, kind: str, strict: bool) -> jsonschema.Draft202012Validator:
    schema = to_json_schema(openapi_schema(api_version, kind), strict=strict)
    schema.setdefault("properties", {})["metadata"] = _LOOSE_METADATA
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return jsonschema.Draft202012Validator(schema)


def json_schema(api_version: str, kind: str, strict: bool = True) -> dict[str, Any]:
    """The converted JSON Schema used for (apiVersion, kind) (cached; do not mutate)."""
    return _validator(api_version, kind, strict).schema


def _path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _messages(error: jsonschema.ValidationError) -> list[str]:
    where = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        return [
            f"{_path([*where, name])}: unknown field"
            for name in sorted(error.instance)
            if name not in known
        ]
    return [f"{_path(where)}: {error.message}"]


def schema_errors(obj: dict[str, Any], strict: bool = True) -> list[str]:
    """Every schema error in obj as 'path: message', sorted; empty when obj is valid."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a mapping, got {type(obj).__name__}")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise ValueError("object has no apiVersion/kind strings")
    validator = _validator(api_version, kind, strict)
    messages: set[str] = set()
    for error in validator.iter_errors(obj):
        messages.update(_messages(error))
    return sorted(messages)


def validate_custom_resource(obj: dict[str, Any], *, strict: bool = True) -> None:
    """Raise CustomResourceValidationError (an AssertionError) listing every schema error.

    strict=True (the default) rejects unknown fields wherever the CRD does not preserve
    them; strict=False only checks the declared fields' types and constraints.
    Unknown apiVersion/kind pairs raise ValueError.
    """
    errors = schema_errors(obj, strict=strict)
    if errors:
        name = (obj.get("metadata") or {}).get("name", "<no name>")
        raise CustomResourceValidationError(f"{obj['apiVersion']} {obj['kind']} {name}", errors)
