"""The method plug-in layer (rollfleet.methods): typed parameters in the spec, and how the
enabled methods' stages combine."""

from __future__ import annotations

import pytest
import torch

from rollfleet.methods import METHODS, Method, Stages
from rollfleet.spec import ManifestError, parse_manifest

# What a method needs of the rest of the job (its check_job)
NEEDS = {
    "nezha": {"task": {"name": "recommend"}, "model": {"architecture": "nezha"}},
    "qagent": {"task": {"name": "qagent"}},
    "recgpt": {"task": {"name": "recgpt"}, "reward": {"models": {"align": "builtin:recgpt-align"}}},
}


def manifest(methods: dict, **spec) -> dict:
    return {
        "apiVersion": "rollfleet.io/v1alpha1",
        "kind": "RLJob",
        "metadata": {"name": "methods"},
        "spec": {"methods": methods, **spec},
    }


def test_methods_are_typed_and_off_by_default():
    assert parse_manifest(manifest({})).spec.enabled_methods() == []
    spec = parse_manifest(manifest({"attention_credit": {"amplification": 2.0}})).spec
    ((name, params),) = spec.enabled_methods()
    assert name == "attention_credit" and params.amplification == 2.0
    assert params.strategy == "coupled"  # the rest at their defaults


def test_unknown_method_and_parameter_are_refused_with_what_is_allowed():
    with pytest.raises(ManifestError) as refused:
        parse_manifest(manifest({"attention_credt": {}}))
    assert "spec.methods.attention_credt: unknown field; allowed: " in str(refused.value)
    assert "attention_credit" in str(refused.value)
    with pytest.raises(ManifestError) as refused:
        parse_manifest(manifest({"attention_credit": {"gamma": 1.5}}))
    message = str(refused.value)
    assert "spec.methods.attention_credit.gamma: unknown field; allowed: amplification" in message
    with pytest.raises(ManifestError, match=r"attention_credit\.quantile"):
        parse_manifest(manifest({"attention_credit": {"quantile": 0}}))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_loads_its_stages(name):
    spec = parse_manifest(manifest({name: {}}, **NEEDS.get(name, {}))).spec
    stages = Stages.for_spec(spec)
    assert [m.name for m in stages.methods] == [name]
    assert all(isinstance(m, Method) for m in stages.methods)


def test_methods_that_both_replace_a_stage_are_refused_together():
    spec = parse_manifest(manifest({"palette": {}, "ravr": {}})).spec
    with pytest.raises(ValueError, match=r"\['palette', 'ravr'\] all replace the advantages stage"):
        Stages.for_spec(spec)


class Weighs(Method):
    name = "weighs"

    def __init__(self, factor: float):
        super().__init__(None, None)
        self.factor = factor

    def advantage_weights(self, model, batch, advantages):
        return torch.full((1, 3), self.factor)

    def extra_loss(self, model, batch, logprobs):
        return torch.tensor(self.factor), {f"term_{self.factor}": self.factor}


class Scores(Method):
    name = "scores"

    def policy_logprobs(self, model, batch):
        return torch.zeros(1, 3)


class Plays(Method):
    name = "plays"
    episode = "agents"


def test_weights_multiply_and_extra_losses_add_up():
    stages = Stages([Weighs(2.0), Weighs(3.0)])
    assert stages.advantage_weights(None, None, None).tolist() == [[6.0, 6.0, 6.0]]
    terms = stages.extra_losses(None, None, None)
    assert [float(t) for t, _ in terms] == [2.0, 3.0]
    assert Stages([]).advantage_weights(None, None, None) is None
    assert Stages([]).policy_logprobs(None, None) is None


def test_a_replacing_stage_has_one_owner():
    assert Stages([Scores(None, None)]).policy_logprobs(None, None).shape == (1, 3)
    with pytest.raises(ValueError, match="replace the policy_logprobs stage"):
        Stages([Scores(None, None), Scores(None, None)])
    assert Stages([Plays(None, None)]).episode == "agents"
    assert Stages([]).episode == "turns"
    with pytest.raises(ValueError, match="own episode runner"):
        Stages([Plays(None, None), Plays(None, None)])
