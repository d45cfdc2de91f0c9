"""Attention-based credit assignment: preplan and anchor tokens (arXiv 2510.13554).

The trainer reads the policy's own attention on the batch it trains on and amplifies the
advantages of the tokens that structure the reasoning: pre-plan tokens, where the local
attention pattern changes sharply (WAAD), and anchors, tokens that later tokens keep
attending to (FAI). Switch it on with

    spec:
      methods:
        attention_credit: {strategy: coupled}

The math is in `credit.py` (pure functions on attention maps), the trainer stage in
`stages.py`; README "Attention-based credit assignment" says which equations and which
of our own choices (where the paper leaves them open) they implement.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rollfleet.cel import Cel
from rollfleet.methods import MethodParams, register_method


class AttentionCreditParams(MethodParams):
    strategy: Literal["coupled", "local_chunk", "global_anchor", "random"] = Field(
        "coupled",
        description="which tokens are amplified: pre-plan tokens (local_chunk), anchors "
        "(global_anchor), anchors handing credit to their pre-plan token (coupled), or "
        "as many tokens as global_anchor at random positions (random, the control)",
    )
    amplification: float = Field(1.5, gt=0, description="γ_amp: selected tokens' advantage factor")
    quantile: float = Field(
        0.4, gt=0, le=1, description="q: share of each response's tokens selected"
    )
    window: int = Field(10, ge=1, description="W: WAAD caps each attention distance at W tokens")
    horizon: list[int] = Field(
        [10, 100],
        min_length=2,
        max_length=2,
        description="[near, far]: FAI of token s averages the attention it receives from "
        "tokens s+near .. s+far; scale it down for short responses",
    )
    layers: int = Field(
        5,
        ge=1,
        description="attention layers read, evenly spaced in [L/3, 2L/3] (fewer if L is small)",
    )
    headShare: float = Field(
        0.3,
        gt=0,
        le=0.5,
        description="share of heads that are local (shortest span) and global (longest)",
    )
    couplingShare: float = Field(
        0.5,
        ge=0,
        le=1,
        description="α: share of a dominated anchor's extra credit handed to its pre-plan token",
    )
    lookback: int = Field(
        3, ge=1, description="k: a pre-plan token within k tokens before an anchor may dominate it"
    )
    positiveOnly: bool = Field(
        False, description="amplify only non-negative advantages (the paper's first version)"
    )

    __cel__ = (
        Cel(
            "!has(self.horizon) || (self.horizon[0] >= 1 && self.horizon[0] <= self.horizon[1])",
            "horizon must be [near, far] with 1 <= near <= far",
            field_path=".horizon",
        ),
    )

    @model_validator(mode="after")
    def _horizon_ordered(self):
        near, far = self.horizon
        if not 1 <= near <= far:
            raise ValueError(f"horizon {self.horizon} must be [near, far] with 1 <= near <= far")
        return self


register_method(
    "attention_credit",
    AttentionCreditParams,
    "rollfleet.methods.attention_credit.stages:AttentionCredit",
    "attention-based credit assignment (arXiv 2510.13554): advantages of pre-plan and anchor tokens amplified",
)
