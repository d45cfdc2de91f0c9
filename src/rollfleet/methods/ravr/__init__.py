"""RAVR: reference-answer-guided variational reasoning (arXiv 2510.25206).

One policy, two prompts. The prior π(z|x) sees the question only; the posterior q(z|x, y*)
sees the question and the reference answer, through a template, and reconstructs the
reasoning that leads to it. A group of `groupSize` samples draws `posteriorSamples` of them
from the posterior and the rest from the prior. The trainer scores every trace's utility
s(z) = π(y*|x, z) (teacher-forced where the trace states its answer, after its last
`answerCue`; length-normalised) and trains:
- prior samples: GRPO on the task's verifier, within the group's prior samples;
- posterior samples, under the posterior prompt: advantage s(z) − mean s of the group's
  prior samples (the utility baseline), which improves q (the ELBO's first term);
- the same posterior traces under the question-only prompt, with advantage
  pullWeight · s(z) and the policy loss's importance ratio π(z|x) / q(z|x, y*) (clipped):
  the prior pulled toward high-utility reasoning (the ELBO's −KL(q ‖ π) term, weighted by
  utility).

    spec:
      task: {name: solve, params: {steps: 3, max_x: 99, max_value: 999}}
      methods:
        ravr: {posteriorSamples: 4}

The math is in `utility.py`, the stages in `stages.py`; README "Reference-answer-guided
reasoning" lists the equations and what the paper leaves open.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from rollfleet.cel import Cel
from rollfleet.methods import MethodParams, register_method


class RavrParams(MethodParams):
    posteriorSamples: int = Field(
        4, ge=1, description="samples of each group drawn with the reference answer in view"
    )
    template: str = Field(
        "[{answer}]{question}",
        description="the posterior's prompt: {question} is the task's prompt, {answer} the "
        "reference answer",
    )
    answerCue: str = Field(
        "=",
        description="where the answer is scored: after the trace's last answerCue (where it "
        "states its answer), or after the whole trace followed by it",
    )
    pullWeight: float = Field(
        1.0, ge=0, description="weight of the prior's pull toward posterior traces"
    )
    posteriorWarmupSteps: int = Field(
        200,
        ge=0,
        description="SFT steps on the task's demonstrations under the posterior template, "
        "after the builtin warm-up (a small model must first learn to read the answer "
        "there; the paper's LLMs already can); 0 skips it",
    )

    __cel__ = (
        Cel(
            '!has(self.template) || (self.template.contains("{question}") && '
            'self.template.contains("{answer}"))',
            "template must contain {question} and {answer}, e.g. [{answer}]{question}",
            field_path=".template",
        ),
    )

    @model_validator(mode="after")
    def _template_has_both(self):
        if not ("{question}" in self.template and "{answer}" in self.template):
            raise ValueError(
                f"template {self.template!r} must contain {{question}} and {{answer}}, "
                "e.g. [{answer}]{question}"
            )
        return self

    def check_job(self, spec) -> None:
        group = spec.rollout.sampling.groupSize
        if self.posteriorSamples >= group:
            raise ValueError(
                f"methods.ravr.posteriorSamples ({self.posteriorSamples}) must be below "
                f"rollout.sampling.groupSize ({group}): the utility baseline needs prior samples"
            )


# The job-level rule `check_job` mirrors, on the RLJob spec (spec.py collects these). The
# method's section may be absent (no default to fall back to), so its field is read by hand.
RavrParams.__job_cel__ = (
    Cel(
        "!has(self.methods) || !has(self.methods.ravr) || "
        "(has(self.methods.ravr.posteriorSamples) ? self.methods.ravr.posteriorSamples : "
        f"{RavrParams.model_fields['posteriorSamples'].default}) < "
        "{self.rollout.sampling.groupSize}",
        "methods.ravr.posteriorSamples must be below rollout.sampling.groupSize: the "
        "utility baseline needs prior samples",
        field_path=".methods.ravr.posteriorSamples",
    ),
)


register_method(
    "ravr",
    RavrParams,
    "rollfleet.methods.ravr.stages:Ravr",
    "reference-answer-guided variational reasoning (arXiv 2510.25206): part of each group "
    "sampled with the answer in view, rewarded by the answer's likelihood, and the "
    "question-only policy pulled toward it",
)
