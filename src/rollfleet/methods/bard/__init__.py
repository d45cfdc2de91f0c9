"""BARD: budget-aware reasoning (arXiv 2511.01470).

A thinking budget in the prompt is a control signal: the policy should spend about that
many tokens, reasoning more when it may. Phase 1 (the `warmup` stage) is SFT on teacher
chains compressed to several budgets, each behind its budget marker; phase 2 is RL with
reward accuracy × budget fidelity (the `bard` reward function; `form: additive` is the
ablation).

    spec:
      methods:
        bard: {budgets: [3, 6, 9, 15]}
      reward:
        functions:
          - {name: chain_sum, weight: 0}   # held-out accuracy reads the first function
          - {name: bard, weight: 1}

The stages are in `stages.py`; README "Budget-aware reasoning" has the equations.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from rollfleet.methods import MethodParams, register_method


class BardParams(MethodParams):
    budgets: list[Annotated[int, Field(ge=1)]] = Field(
        [3, 6, 9, 15],
        min_length=1,
        max_length=16,
        description="token budgets trained on (each group gets one; its prompt starts with it)",
    )
    sftSteps: int = Field(
        300, ge=0, description="phase 1: SFT steps on chains compressed to the budgets; 0 skips it"
    )
    sftLearningRate: float = Field(1e-3, gt=0, description="phase 1's peak rate, decayed to 0")
    sftBatchSize: int = Field(64, ge=1)
    reward: Literal["multiplicative", "additive"] = Field(
        "multiplicative",
        description="accuracy x budget fidelity, or their mean (the ablation)",
    )
    tolerance: float = Field(
        0.1, ge=0, description="lengths within ±tolerance x budget keep full budget fidelity"
    )

    def reward_functions(self, verifier: str) -> list[tuple[str, float, dict]]:
        params = {"verifier": verifier, "form": self.reward, "tolerance": self.tolerance}
        return [(verifier, 0.0, {}), ("bard", 1.0, params)]


def budget_marker(budget: int) -> str:
    """The control signal in front of the prompt: `b12#` for a 12-token budget."""
    return f"b{budget}#"


register_method(
    "bard",
    BardParams,
    "rollfleet.methods.bard.stages:Bard",
    "budget-aware reasoning (arXiv 2511.01470): a token budget in the prompt, SFT on "
    "compressed chains, RL on accuracy x budget fidelity",
)
