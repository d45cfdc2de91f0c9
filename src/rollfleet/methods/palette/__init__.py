"""Reasoning Palette: latent contextualisation with a VAE prefix (arXiv 2512.17206).

A VAE learns the space of the task's (question, answer) pairs, summarised as the
mean-pooled input embeddings of their tokens (the policy's own embedding table). Its
decoder turns a latent z ~ N(0, I) into a pseudo-token embedding; L of them in front of
the prompt steer how the policy answers, so different latents explore different
strategies. Warm-up: train the VAE, then a brief SFT (`sftSteps`, the paper's ~10: more
teaches the model to ignore the prefix) with one-position prefixes from prior latents.
RL: a share ρ(τ) of each GRPO group gets an L-position prefix, τ the run's progress
(`linear`: ρ = 1 − τ; `two_phase`: 1, then 0 from half the run); the rest sample plainly.
Advantages are over the whole mixed group. The latents travel with the trajectory and the
trainer decodes the same prefix when it scores the sample; held-out evaluation (and the
deployed model) use no prefix.

    spec:
      task: {name: countdown}
      methods:
        palette: {prefixLength: 8, schedule: linear}

The VAE and the prefix math are in `vae.py`, the stages in `stages.py`; README "Reasoning
Palette" lists what the paper leaves open and what was chosen.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollfleet.methods import MethodParams, register_method


class PaletteParams(MethodParams):
    latentDim: int = Field(16, ge=1, le=1024, description="dimension of the VAE's latent z")
    prefixLength: int = Field(
        8, ge=1, le=64, description="prefix positions in RL (L; one latent each)"
    )
    schedule: Literal["linear", "two_phase"] = Field(
        "linear",
        description="share of each group with a prefix over the run's progress t: linear "
        "1 - t, or two_phase (1, then 0 from t = 0.5)",
    )
    vaeHidden: int = Field(256, ge=8, description="width of the encoder's and decoder's MLPs")
    vaeSteps: int = Field(1500, ge=1, description="VAE training steps (batches of 256)")
    vaeExamples: int = Field(4096, ge=16, description="(question, answer) pairs the VAE learns")
    beta: float = Field(0.05, ge=0, description="weight of the KL term in the VAE's loss")
    sftSteps: int = Field(
        10, ge=0, description="SFT steps with prior prefixes after the VAE (the paper's ~10)"
    )
    sftPrefixLength: int = Field(1, ge=1, le=64, description="prefix positions during the SFT")
    sftLearningRate: float = Field(
        3e-4,
        gt=0,
        description="the SFT's peak rate, decayed to 0 (the builtin warm-up's 3e-3 for 10 "
        "steps halves the tiny model's accuracy)",
    )


register_method(
    "palette",
    PaletteParams,
    "rollfleet.methods.palette.stages:Palette",
    "Reasoning Palette (arXiv 2512.17206): a VAE's decoded latents as a prefix on part of "
    "each group, a share decaying over the run, for strategy-diverse exploration",
)
