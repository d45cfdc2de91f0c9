"""The generated CRD: up to date with spec.py, structural, and faithful to the models."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Literal

import cel
import pytest
import yaml
from pydantic import BaseModel, Field, ValidationError

from rollfleet.crd import _PLACEHOLDER, build_crd, model_schema, render_crd, render_rule
from rollfleet.methods import METHODS, MethodParams
from rollfleet.methods.attention_credit import AttentionCreditParams
from rollfleet.methods.ravr import RavrParams
from rollfleet.spec import (
    MAX_POOLS,
    Cel,
    ModelSpec,
    PodSettings,
    PoolSpec,
    RLJobSpec,
    RolloutSpec,
    TrainerSpec,
)

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "rljob.yaml"
INT_OR_STRING = "x-kubernetes-int-or-string"
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
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


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
        assert "type" in node or node.get(PRESERVE) or node.get(INT_OR_STRING), (
            f"{path} has no type"
        )
        # int-or-string (a Kubernetes quantity) is the one anyOf a structural schema allows
        forbidden = FORBIDDEN - {"anyOf"} if node.get(INT_OR_STRING) else FORBIDDEN
        assert not forbidden & node.keys(), f"{path} keeps {forbidden & node.keys()}"
        # The API server forbids additionalProperties next to properties (pruning plus
        # strict field validation reject unknown fields instead); a typed map has only it.
        extra = node.get("additionalProperties")
        assert extra is None or (
            "properties" not in node and ("type" in extra or extra.get(INT_OR_STRING))
        ), path
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
    # pod overrides' volumes: Kubernetes' Volume schema is too large to embed (crd._OPEN)
    volumes = {
        f".spec{where}.pod.volumes[]"
        for where in ("", ".rollout.pools[]", ".trainer", ".reward", ".env")
    }
    assert preserved == {
        ".spec.task.params",
        ".spec.reward.functions[].params",
        *volumes,
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


# --- CEL rules (x-kubernetes-validations) ----------------------------------------------
#
# The API server runs each rule on the object its schema node describes (`self`), without
# defaults (the CRD sets none). These tests run the generated rules with a real CEL engine
# (common-expression-language; like the API server it errors on a missing field, so an
# unguarded rule fails here) against what the pydantic validators accept.

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
CEL = "x-kubernetes-validations"
# Where each rule sits (a path below .spec) and the field it blames: one per validator.
RULES = {
    ("model", ".heads"): "must divide model.hidden",
    ("model", ".huggingface"): "name two models: keep one",
    ("rollout", ".pools"): "pool names must be unique",
    ("rollout.pools[]", ".gpusPerReplica"): "set gpuClass and engine: vllm",
    ("rollout", ".routing"): "needs routing: affinity",
    ("trainer", ".promptsPerStep"): "must be a multiple of workers",
    ("", ".rollout.sampling.maxNewTokens"): "must be below model.maxLength",
    ("", ".algorithm.miniBatches"): "must be a multiple of algorithm.miniBatches",
    ("", ".async.replicatePrompts"): "set replicatePrompts: false",
    ("methods.attention_credit", ".horizon"): "must be [near, far] with 1 <= near <= far",
    ("methods.ravr", ".template"): "must contain {question} and {answer}",
    ("", ".methods.ravr.posteriorSamples"): "must be below rollout.sampling.groupSize",
    ("", ".methods.nezha"): "needs model.architecture: nezha",
    ("", ".methods.qagent"): "needs task.name: qagent",
    ("", ".methods.qagent.reader"): "stage 2 needs the reader",
    ("", ".methods.recgpt"): "needs task.name: recgpt",
    ("", ".methods.recgpt.alignModel"): "the alignment reward model",
    ("", ".methods"): "runs alone",
}


def spec_rules(spec_schema: dict):
    """(location, rule) for every CEL rule in the spec schema; location: a path below .spec."""
    for path, node in walk(spec_schema):
        for rule in node.get(CEL, ()):
            yield path.lstrip("."), rule


def objects_at(obj: dict, location: str):
    """The objects a rule at `location` runs on (none where the manifest leaves it out)."""
    parts = [p for p in location.replace("[]", ".[]").split(".") if p]
    found = [obj]
    for part in parts:
        if part == "[]":
            found = [item for seq in found for item in seq]
        else:
            found = [o[part] for o in found if isinstance(o, dict) and part in o]
    return found


@functools.cache
def program(rule: str):
    return cel.compile(rule)


def holds(rule: str, obj: dict) -> bool:
    verdict = program(rule).execute({"self": obj})
    assert isinstance(verdict, bool), f"{rule} gave {verdict!r}"
    return verdict


def failing(spec_schema: dict, spec: dict) -> set[tuple[str, str]]:
    """The (location, fieldPath) of every rule the API server would refuse `spec` by."""
    return {
        (location, rule["fieldPath"])
        for location, rule in spec_rules(spec_schema)
        for obj in objects_at(spec, location)
        if not holds(rule["rule"], obj)
    }


def pydantic_errors(spec: dict) -> list[str]:
    try:
        RLJobSpec.model_validate(spec)
    except ValidationError as e:
        return [err["msg"] for err in e.errors()]
    return []


def test_one_rule_per_cross_field_validator(spec):
    assert {(loc, rule["fieldPath"]) for loc, rule in spec_rules(spec)} == RULES.keys()
    models = [
        ModelSpec,
        PoolSpec,
        RolloutSpec,
        TrainerSpec,
        RLJobSpec,
        AttentionCreditParams,
        RavrParams,
    ]
    validators = {
        m.__name__: len(m.__pydantic_decorators__.model_validators)
        + len(m.__pydantic_decorators__.field_validators)
        for m in models
    }
    # PodSettings' own checks (sharedMemory against the memory limit) compare quantities,
    # which the CEL evaluated here does not parse: pydantic only (rollfleet run, the operator).
    for m in models:
        if issubclass(m, PodSettings):
            validators[m.__name__] -= len(PodSettings.__pydantic_decorators__.model_validators)
    rules = {m.__name__: len(m.__cel__) for m in models}
    # RLJobSpec's _methods_fit_the_job runs every method's check_job, each with its rules,
    # and refuses company to a method that runs alone (a rule each)
    method_rules = sum(
        len(info.params.__job_cel__) + bool(info.params.__alone__) for info in METHODS.values()
    )
    rules["RLJobSpec"] -= method_rules - 1
    assert validators == rules
    for info in METHODS.values():
        checks = info.params.check_job is not MethodParams.check_job
        assert checks == bool(info.params.__job_cel__), info.name


def test_rules_are_well_formed(spec):
    for location, rule in spec_rules(spec):
        assert list(rule) == ["rule", "message", "fieldPath", "reason"], location
        assert "\n" not in rule["message"] and not _PLACEHOLDER.search(rule["rule"]), rule
        assert rule["reason"] in {"FieldValueInvalid", "FieldValueForbidden", "FieldValueDuplicate"}
        # The API server wants fieldPath to name a field of the schema the rule is on.
        node = functools.reduce(
            lambda n, part: n["items"] if part == "[]" else n["properties"][part],
            [p for p in location.replace("[]", ".[]").split(".") if p],
            spec,
        )
        functools.reduce(
            lambda n, part: n["properties"][part], rule["fieldPath"][1:].split("."), node
        )


def test_lists_iterated_by_rules_are_bounded(spec):
    """CEL cost estimation needs maxItems on every list a rule iterates over."""
    iterated = spec["properties"]["rollout"]["properties"]["pools"]
    assert iterated["maxItems"] == MAX_POOLS
    for _, rule in spec_rules(spec):
        if ".all(" in rule["rule"] or ".exists" in rule["rule"]:
            assert "pools" in rule["rule"], "a new iterated list: give it a maxItems and test it"


def test_defaults_written_into_rules(spec):
    """An absent field reads as its pydantic default, taken from spec.py, not by hand."""
    (trainer,) = spec["properties"]["trainer"][CEL]
    default = TrainerSpec()
    assert trainer["rule"] == (
        f"(has(self.promptsPerStep) ? self.promptsPerStep : {default.promptsPerStep}) % "
        f"(has(self.workers) ? self.workers : {default.workers}) == 0"
    )


@pytest.mark.parametrize("location", sorted({loc for loc, _ in RULES}))
def test_an_empty_object_passes(spec, location):
    """Every default is valid, so a section with no fields set passes its rules."""
    for loc, rule in spec_rules(spec):
        if loc == location:
            assert holds(rule["rule"], {}), rule["rule"]


REFUSED = [
    ({"trainer": {"promptsPerStep": 10, "workers": 4}}, ("trainer", ".promptsPerStep")),
    ({"trainer": {"workers": 3}}, ("trainer", ".promptsPerStep")),  # default promptsPerStep 16
    ({"algorithm": {"miniBatches": 3}}, ("", ".algorithm.miniBatches")),  # default 16 prompts
    (
        {"trainer": {"promptsPerStep": 12, "workers": 2}, "algorithm": {"miniBatches": 4}},
        ("", ".algorithm.miniBatches"),
    ),
    (
        {"methods": {"attention_credit": {"horizon": [5, 2]}}},
        ("methods.attention_credit", ".horizon"),
    ),
    ({"model": {"heads": 3}}, ("model", ".heads")),  # default hidden 128
    (
        {"rollout": {"sampling": {"maxNewTokens": 100_000_000}}},  # default maxLength 64
        ("", ".rollout.sampling.maxNewTokens"),
    ),
    ({"model": {"maxLength": 12}}, ("", ".rollout.sampling.maxNewTokens")),  # default 12 new
    ({"model": {"hidden": 130}}, ("model", ".heads")),  # default heads 4
    ({"model": {"hidden": 100, "heads": 8}}, ("model", ".heads")),
    ({"rollout": {"pools": [{"name": "a"}, {"name": "a"}]}}, ("rollout", ".pools")),
    ({"rollout": {"pools": [{}, {"name": "default"}]}}, ("rollout", ".pools")),
    ({"rollout": {"pools": [{}, {"engine": "vllm"}]}}, ("rollout", ".pools")),
    (
        {"async": {"envAsync": False, "replicatePrompts": True}},
        ("", ".async.replicatePrompts"),
    ),
]


@pytest.mark.parametrize(("manifest_spec", "rule"), REFUSED)
def test_rule_refuses_what_pydantic_refuses(spec, manifest_spec, rule):
    errors = pydantic_errors(manifest_spec)
    assert len(errors) == 1 and RULES[rule] in errors[0], errors
    assert failing(spec, manifest_spec) == {rule}


ACCEPTED = [
    {"trainer": {"promptsPerStep": 15}},  # default workers 1
    {"trainer": {"promptsPerStep": 12, "workers": 3}},
    {"trainer": {"promptsPerStep": 12, "workers": 2}, "algorithm": {"miniBatches": 3}},
    {"model": {"hidden": 96, "heads": 3}},
    {"rollout": {"pools": [{}, {"name": "b"}]}},
    {"async": {"envAsync": False}},
    {"async": {"replicatePrompts": True}},
    {"async": {"partialRollout": "reprefill"}},
    {"async": {"partialRollout": "reprefill"}, "rollout": {"pools": [{"engine": "vllm"}]}},
    {"async": {}, "rollout": {"pools": [{"engine": "vllm"}]}},
]


@pytest.mark.parametrize("manifest_spec", ACCEPTED)
def test_rules_accept_what_pydantic_accepts(spec, manifest_spec):
    assert pydantic_errors(manifest_spec) == []
    assert failing(spec, manifest_spec) == set()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_every_rule(spec, path):
    manifests = [m for m in yaml.safe_load_all(path.read_text()) if m and m.get("kind") == "RLJob"]
    assert manifests, path
    for manifest in manifests:
        assert failing(spec, manifest.get("spec", {})) == set(), path


def _maybe(rng: random.Random, fields: dict) -> dict:
    """Each field set or left out; a value of `...` is always left out."""
    return {k: rng.choice(v) for k, v in fields.items() if rng.random() < 0.6}


def random_spec(rng: random.Random) -> dict:
    sections = {
        "trainer": lambda: _maybe(rng, {"promptsPerStep": range(1, 25), "workers": range(1, 6)}),
        "algorithm": lambda: _maybe(rng, {"miniBatches": range(1, 5)}),
        "methods": lambda: _maybe(
            rng,
            {
                "attention_credit": [_maybe(rng, {"horizon": [[1, 8], [5, 2], [0, 3], [10, 100]]})],
                "nezha": [_maybe(rng, {"beam": [1, 10]})],
                "qagent": [_maybe(rng, {"stage": [1, 2], "reader": ["reader", "judge"]})],
                "recgpt": [_maybe(rng, {"alignModel": ["align", "judge"]})],
                "ravr": [
                    _maybe(
                        rng,
                        {
                            "posteriorSamples": range(1, 10),
                            "template": ["[{answer}]{question}", "{question}", "{answer}"],
                        },
                    )
                ],
            },
        ),
        "model": lambda: _maybe(
            rng,
            {
                "hidden": [8, 12, 96, 100, 128, 130],
                "heads": [1, 2, 3, 4, 5, 8],
                "architecture": ["llama", "nezha"],
                "maxLength": [8, 12, 64],
                "path": ["/models/m"],
                "huggingface": [{"id": "org/m"}],
            },
        ),
        "task": lambda: _maybe(rng, {"name": ["countdown", "recommend", "qagent", "recgpt"]}),
        "reward": lambda: _maybe(
            rng,
            {
                "models": [
                    {},
                    {"reader": "builtin:qagent-reader"},
                    {"align": "builtin:recgpt-align"},
                ],
                "functions": [[], [{"name": "exact_match"}]],
            },
        ),
        "rollout": lambda: _maybe(
            rng,
            {
                "pools": [
                    [
                        _maybe(
                            rng,
                            {
                                "name": ["default", "a", "b"],
                                "engine": ["torch", "vllm"],
                                "prefers": ["any", "prefill", "decode"],
                                "gpuClass": ["H20"],
                                "gpusPerReplica": [1, 2],
                            },
                        )
                        for _ in range(rng.randint(1, 4))
                    ]
                ],
                "routing": ["shared", "affinity"],
                "sampling": [_maybe(rng, {"groupSize": [2, 4, 8], "maxNewTokens": [4, 12, 64]})],
            },
        ),
        "async": lambda: _maybe(
            rng,
            {
                "envAsync": [True, False],
                "replicatePrompts": [True, False],
                "partialRollout": ["continue", "reprefill"],
                "ratio": [0, 1, 2],
            },
        ),
    }
    return {name: make() for name, make in sections.items() if rng.random() < 0.7}


def _pick(section: dict | None, *keys: str) -> dict:
    return {k: v for k, v in (section or {}).items() if k in keys}


def project(rule: tuple[str, str], s: dict) -> dict | None:
    """What the validator behind `rule` reads of spec `s`, the rest left out (None: nothing).

    Sections stay absent where `s` leaves them out; pools keep their count (and, where the
    check is not about names, get unique ones).
    """
    pools = s.get("rollout", {}).get("pools")
    match rule:
        case ("trainer", _) if "trainer" in s:
            return {"trainer": _pick(s["trainer"], "promptsPerStep", "workers")}
        case ("", ".rollout.sampling.maxNewTokens"):
            alone = {"model": _pick(s["model"], "maxLength")} if "model" in s else {}
            if "rollout" in s:
                sampling = s["rollout"].get("sampling")
                alone["rollout"] = (
                    {} if sampling is None else {"sampling": _pick(sampling, "maxNewTokens")}
                )
            return alone
        case ("", ".algorithm.miniBatches"):
            alone = {k: _pick(s[k], "promptsPerStep", "workers") for k in ("trainer",) if k in s}
            if "algorithm" in s:
                alone["algorithm"] = _pick(s["algorithm"], "miniBatches")
            if "trainer" in s and alone["trainer"].get("promptsPerStep", 16) % alone["trainer"].get(
                "workers", 1
            ):
                return None  # TrainerSpec's own check refuses it first
            return alone
        case ("methods.attention_credit", _) if "attention_credit" in s.get("methods", {}):
            return {"methods": {"attention_credit": s["methods"]["attention_credit"]}}
        case ("methods.ravr", _) if "ravr" in s.get("methods", {}):
            return {"methods": {"ravr": _pick(s["methods"]["ravr"], "template")}}
        case ("", ".methods.ravr.posteriorSamples"):
            alone = {}
            if "ravr" in s.get("methods", {}):
                alone["methods"] = {"ravr": _pick(s["methods"]["ravr"], "posteriorSamples")}
            if "rollout" in s:
                sampling = s["rollout"].get("sampling")
                alone["rollout"] = (
                    {} if sampling is None else {"sampling": _pick(sampling, "groupSize")}
                )
            return alone
        case ("", ".methods.nezha"):
            alone = {k: s[k] for k in ("task",) if k in s}
            if "nezha" in s.get("methods", {}):
                alone["methods"] = {"nezha": s["methods"]["nezha"]}
            if "model" in s:
                alone["model"] = _pick(s["model"], "architecture")
            return alone
        case ("", ".methods.qagent"):
            alone = {k: s[k] for k in ("task",) if k in s}
            if "qagent" in s.get("methods", {}):
                alone["methods"] = {"qagent": {}}  # stage 1: the reader's rule holds
            return alone
        case ("", ".methods.qagent.reader"):
            alone = {k: s[k] for k in ("reward",) if k in s}
            if "qagent" in s.get("methods", {}):
                alone["methods"] = {"qagent": s["methods"]["qagent"]}
                alone["task"] = {"name": "qagent"}  # the method's other rule holds
            return alone
        case ("", ".methods.recgpt"):
            alone = {k: s[k] for k in ("task",) if k in s}
            if "recgpt" in s.get("methods", {}):
                alone["methods"] = {"recgpt": {}}
                alone["reward"] = {"models": {"align": "builtin:recgpt-align"}}
            return alone
        case ("", ".methods.recgpt.alignModel"):
            alone = {k: s[k] for k in ("reward",) if k in s}
            if "recgpt" in s.get("methods", {}):
                alone["methods"] = {"recgpt": s["methods"]["recgpt"]}
                alone["task"] = {"name": "recgpt"}  # the method's other rule holds
            return alone
        case ("", ".methods"):
            if "recgpt" not in s.get("methods", {}):
                return {}
            # Which methods are on, and what recgpt needs of the rest of the job.
            return {
                "methods": {k: {} for k in s["methods"]},
                "task": {"name": "recgpt"},
                "reward": {"models": {"align": "builtin:recgpt-align"}},
            }
        case ("model", ".huggingface") if "model" in s:
            return {"model": _pick(s["model"], "path", "huggingface")}
        case ("model", _) if "model" in s:
            return {"model": _pick(s["model"], "hidden", "heads")}
        case ("rollout.pools[]", ".gpusPerReplica"):
            if pools is None:
                return None
            keep = ("engine", "gpuClass", "gpusPerReplica")
            return {
                "rollout": {
                    "pools": [{"name": f"p{i}", **_pick(p, *keep)} for i, p in enumerate(pools)]
                }
            }
        case ("rollout", ".routing") if "rollout" in s:
            alone = _pick(s["rollout"], "routing")
            if pools is not None:
                alone["pools"] = [
                    {"name": f"p{i}", **_pick(p, "prefers")} for i, p in enumerate(pools)
                ]
            return {"rollout": alone}
        case ("rollout", _) if "rollout" in s:
            return {
                "rollout": {} if pools is None else {"pools": [_pick(p, "name") for p in pools]}
            }
        case ("", ".async.replicatePrompts"):
            return (
                {"async": _pick(s["async"], "envAsync", "replicatePrompts")} if "async" in s else {}
            )
    return None


def test_cel_and_pydantic_agree_on_generated_specs(spec):
    rng = random.Random(4)
    verdicts = {rule: set() for rule in RULES}
    for _ in range(600):
        manifest_spec = random_spec(rng)
        refused = failing(spec, manifest_spec)
        errors = pydantic_errors(manifest_spec)
        # Accepted by pydantic exactly when no rule refuses; each pydantic error has its rule
        # (pydantic stops at the first failing validator of a model, CEL runs them all).
        assert (errors == []) == (refused == set()), (manifest_spec, errors, refused)
        for message in errors:
            assert any(RULES[rule] in message for rule in refused), (manifest_spec, message)
        # Each check alone, on just the fields it reads.
        for rule in RULES:
            alone = project(rule, manifest_spec)
            if alone is None:
                continue
            ok = pydantic_errors(alone) == []
            assert ok == (rule not in failing(spec, alone)), (rule, alone)
            assert ok == (rule not in refused), (rule, manifest_spec)
            verdicts[rule].add(ok)
    assert all(v == {True, False} for v in verdicts.values()), verdicts


# --- how crd.py writes a Cel out ------------------------------------------------------


class _Inner(BaseModel):
    x: int = 1
    rate: float = 2
    name: str = 'say "hi"'
    maybe: int | None = 3
    items: list[int] = Field(default_factory=list)


class _Outer(BaseModel):
    inner: _Inner = _Inner(x=5)
    same: _Inner = _Inner()
    many: list[_Inner] = Field(default_factory=list, max_length=4)


@pytest.mark.parametrize(
    ("template", "expanded"),
    [
        # Absent `inner` means _Outer's default (x=5); absent `inner.x`, _Inner's (1).
        (
            "{self.inner.x} > 0",
            "(has(self.inner) ? (has(self.inner.x) ? self.inner.x : 1) : 5) > 0",
        ),
        ("{self.same.x} > 0", "(has(self.same) && has(self.same.x) ? self.same.x : 1) > 0"),
        (
            "{self.same.rate} > 0.0",
            "(has(self.same) && has(self.same.rate) ? self.same.rate : 2.0) > 0.0",
        ),
        (
            '{self.same.name} != ""',
            '(has(self.same) && has(self.same.name) ? self.same.name : "say \\"hi\\"") != ""',
        ),
        ("self.many.all(i, {i.x} > 0)", "self.many.all(i, (has(i.x) ? i.x : 1) > 0)"),
    ],
)
def test_placeholders_expand_to_the_pydantic_default(template, expanded):
    assert render_rule(_Outer, Cel(template, "m"))["rule"] == expanded
    assert holds(expanded, {"many": [{}, {"x": 2}]})


@pytest.mark.parametrize(
    ("template", "field_path", "problem"),
    [
        ("{self.nope} > 0", None, "no field"),
        ("{self.same.maybe} > 0", None, "nullable"),
        ("size({self.same.items}) > 0", None, "no CEL literal"),
        ("{j.x} > 0", None, "neither self nor a macro variable"),
        ("self.same.x.all(i, true)", None, "not a list of objects"),
        ("true", ".nope", "no field"),
    ],
)
def test_bad_rules_are_refused(template, field_path, problem):
    with pytest.raises(ValueError, match=problem):
        render_rule(_Outer, Cel(template, "m", field_path=field_path))
