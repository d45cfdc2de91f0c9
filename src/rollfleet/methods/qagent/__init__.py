"""QAgent: a search agent trained for retrieval quality (arXiv 2510.08383).

The agent plans, searches a BM25 index (the `qagent` task's env: up to 3 queries a round,
at most 5 rounds), reflects on the passages the env returns, and answers. The passages
are env turns, outside the loss. The method picks the reward of the paper's stage:

- Stage 1 (end to end): exact match of the agent's own answer x the protocol's format flag.
- Stage 2 (generalised): a frozen reader, served by the reward service, answers from the
  passages the agent retrieved, scored by exact match, plus `goldBonus` when the gold
  answer appears in them. Retrieval is what pays, so the agent serves any reader.

    spec:
      task: {name: qagent}
      methods:
        qagent: {stage: 2, reader: reader}
      reward:
        models: {reader: "builtin:qagent-reader"}

Every stage is the platform's own: the env turns are masked by the episode runner, the
rewards are registered functions (`qagent_*` in rollfleet.rewards). README "QAgent".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollfleet.cel import Cel
from rollfleet.methods import Method, MethodParams, register_method


class QAgentParams(MethodParams):
    stage: Literal[1, 2] = Field(
        1,
        description="1: the agent's exact match x format; 2: a frozen reader's exact match "
        "on the retrieved passages + goldBonus if the gold answer is in them",
    )
    reader: str = Field(
        "reader", min_length=1, description="stage 2: the reader, a name in reward.models"
    )
    goldBonus: float = Field(
        0.5, ge=0, le=10, description="stage 2: reward when the gold answer was retrieved"
    )
    readerPassages: int = Field(
        4, ge=1, le=32, description="stage 2: the reader reads the last N passages retrieved"
    )

    def reward_functions(self, verifier: str) -> list[tuple[str, float, dict]]:
        # The agent's own exact match comes first: it is the held-out accuracy either way.
        if self.stage == 1:
            main = ("qagent_stage1", 1.0, {})
        else:
            params = {
                "model": self.reader,
                "gold_bonus": self.goldBonus,
                "passages": self.readerPassages,
            }
            main = ("qagent_reader", 1.0, params)
        return [
            ("qagent_answer", 0.0, {}),
            main,
            ("qagent_hit", 0.0, {}),
            ("qagent_format", 0.0, {}),
        ]

    def check_job(self, spec) -> None:
        if spec.task.name != "qagent":
            raise ValueError(
                f"methods.qagent needs task.name: qagent (the search env); got {spec.task.name!r}"
            )
        if self.stage == 2 and not spec.reward.functions and self.reader not in spec.reward.models:
            raise ValueError(
                f"methods.qagent.reader: stage 2 needs the reader {self.reader!r} in "
                f'reward.models (e.g. {self.reader}: "builtin:qagent-reader"); '
                f"reward.models has {sorted(spec.reward.models)}"
            )


QAgentParams.__job_cel__ = (
    Cel(
        '!has(self.methods) || !has(self.methods.qagent) || {self.task.name} == "qagent"',
        "methods.qagent needs task.name: qagent (the search env)",
        field_path=".methods.qagent",
    ),
    Cel(
        "!has(self.methods) || !has(self.methods.qagent) || "
        "(has(self.methods.qagent.stage) ? self.methods.qagent.stage : "
        f"{QAgentParams.model_fields['stage'].default}) != 2 || "
        "(has(self.reward) && has(self.reward.functions) && size(self.reward.functions) > 0) || "
        "(has(self.reward) && has(self.reward.models) && "
        "(has(self.methods.qagent.reader) ? self.methods.qagent.reader : "
        f"'{QAgentParams.model_fields['reader'].default}') in self.reward.models)",
        "methods.qagent.reader: stage 2 needs the reader in reward.models "
        '(e.g. reader: "builtin:qagent-reader")',
        field_path=".methods.qagent.reader",
    ),
)


class QAgent(Method):
    """No stage of its own: the method is the task's env and the rewards it picks."""

    name = "qagent"


register_method(
    "qagent",
    QAgentParams,
    "rollfleet.methods.qagent:QAgent",
    "QAgent (arXiv 2510.08383): a search agent over BM25 trained on exact match x format "
    "(stage 1) or on what a frozen reader answers from its retrievals (stage 2)",
)
