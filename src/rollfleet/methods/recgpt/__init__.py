"""RecGPT-V2: multi-agent intent reasoning with constrained rewards (arXiv 2512.14503).

A planner splits the user's intent in two, three persona experts (the same policy under
role prompts) propose tags, an arbiter picks the final top N (the `recgpt` task's
coordinator env; every agent's turn is a segment of the trajectory, trained with the
episode's reward). The method picks how the reward is composed:

- `summed`: accuracy + weighted alignment, diversity and length terms (the baseline the
  paper shows being hacked: diversity bought with accuracy);
- `gated`: accuracy, paid only when alignment, diversity and length each pass their
  threshold: R = R_acc x 1[align >= t] x 1[div >= t] x 1[length ok] (the `gated` reward);
- `judge`: Agent-as-a-Judge's S/A/B grade (`recgpt_judge`), as a listwise reward (ranks
  within the group, S > A > B) or pointwise (1 / 0.5 / 0).

    spec:
      task: {name: recgpt}
      methods:
        recgpt: {reward: gated, alignModel: align}
      reward:
        models: {align: "builtin:recgpt-align"}

Warm-up SFT trains every agent on the task's teacher (`RecGPTTask.sft_examples`).
README "RecGPT-V2".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollfleet.cel import Cel
from rollfleet.methods import Method, MethodParams, register_method


class RecGPTParams(MethodParams):
    reward: Literal["summed", "gated", "judge"] = Field(
        "gated",
        description="summed: accuracy + weighted alignment, diversity, length; gated: accuracy "
        "only where each constraint passes; judge: the Agent-as-a-Judge grade",
    )
    alignModel: str = Field(
        "align", min_length=1, description="the alignment reward model, a name in reward.models"
    )
    alignGate: float = Field(0.75, ge=0, le=1, description="gated/judge: alignment threshold")
    diversityGate: float = Field(0.5, ge=0, le=1, description="gated/judge: diversity threshold")
    alignWeight: float = Field(1.0, ge=0, le=10, description="summed: weight of alignment")
    diversityWeight: float = Field(1.0, ge=0, le=10, description="summed: weight of diversity")
    lengthWeight: float = Field(1.0, ge=0, le=10, description="summed: weight of the length band")
    judge: Literal["listwise", "pointwise"] = Field(
        "listwise",
        description="judge: rank the grades within each group (S > A > B), or use 1/0.5/0",
    )

    def reward_functions(self, verifier: str) -> list[tuple[str, float, dict]]:
        align = {"model": self.alignModel}
        summed = self.reward == "summed"
        # Accuracy first (the held-out verifier); the constraints reported beside.
        terms = [
            ("recgpt_acc", 1.0 if summed else 0.0, {}),
            ("recgpt_align", self.alignWeight if summed else 0.0, align),
            ("recgpt_diversity", self.diversityWeight if summed else 0.0, {}),
            ("recgpt_length", self.lengthWeight if summed else 0.0, {}),
        ]
        if self.reward == "gated":
            gates = {
                "recgpt_align": self.alignGate,
                "recgpt_diversity": self.diversityGate,
                "recgpt_length": 1.0,
            }
            params = {"main": "recgpt_acc", "gates": gates, "params": {"recgpt_align": align}}
            terms.insert(1, ("gated", 1.0, params))
        elif self.reward == "judge":
            params = {**align, "align": self.alignGate, "diversity": self.diversityGate}
            terms.insert(1, ("recgpt_judge", 1.0, params))
        return terms

    def check_job(self, spec) -> None:
        if spec.task.name != "recgpt":
            raise ValueError(
                f"methods.recgpt needs task.name: recgpt (the agents' coordinator); got "
                f"{spec.task.name!r}"
            )
        if not spec.reward.functions and self.alignModel not in spec.reward.models:
            raise ValueError(
                f"methods.recgpt.alignModel: the alignment reward model {self.alignModel!r} "
                f'must be in reward.models (e.g. {self.alignModel}: "builtin:recgpt-align"); '
                f"reward.models has {sorted(spec.reward.models)}"
            )


def _param(field: str) -> str:
    """A CEL expression for methods.recgpt.<field> with its default."""
    default = RecGPTParams.model_fields[field].default
    return f"(has(self.methods.recgpt.{field}) ? self.methods.recgpt.{field} : '{default}')"


RecGPTParams.__alone__ = (
    "the other methods' stages assume one sequence per sample, and a RecGPT-V2 sample is "
    "five agents' segments"
)
RecGPTParams.__job_cel__ = (
    Cel(
        '!has(self.methods) || !has(self.methods.recgpt) || {self.task.name} == "recgpt"',
        "methods.recgpt needs task.name: recgpt (the agents' coordinator)",
        field_path=".methods.recgpt",
    ),
    Cel(
        "!has(self.methods) || !has(self.methods.recgpt) || "
        "(has(self.reward) && has(self.reward.functions) && size(self.reward.functions) > 0) || "
        f"(has(self.reward) && has(self.reward.models) && {_param('alignModel')} in "
        "self.reward.models)",
        "methods.recgpt.alignModel: the alignment reward model must be in reward.models "
        '(e.g. align: "builtin:recgpt-align")',
        field_path=".methods.recgpt.alignModel",
    ),
)


def listwise(rewards):
    """Each sample's rank within its group, in [0, 1]: the share of the group's other
    samples it beats, ties counting half (grades S > A > B become ranks). Rewards
    [groups, samples]."""
    n = rewards.shape[1]
    if n < 2:
        return rewards * 0
    above = (rewards.unsqueeze(2) > rewards.unsqueeze(1)).sum(2).to(rewards.dtype)
    ties = (rewards.unsqueeze(2) == rewards.unsqueeze(1)).sum(2).to(rewards.dtype) - 1
    return (above + 0.5 * ties) / (n - 1)


class RecGPT(Method):
    """The agents episode runner; with the judge, its grades ranked within each group."""

    name = "recgpt"
    episode = "agents"

    def group_rewards(self, model, batch, rewards):
        if self.params.reward == "judge" and self.params.judge == "listwise":
            return listwise(rewards)
        return rewards


register_method(
    "recgpt",
    RecGPTParams,
    "rollfleet.methods.recgpt:RecGPT",
    "RecGPT-V2 (arXiv 2512.14503): planner, persona experts and arbiter as segments of one "
    "trajectory, with gated (constrained), summed or Agent-as-a-Judge rewards",
)
