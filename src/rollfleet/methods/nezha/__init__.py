"""NEZHA: self-drafting generative recommendation with a hash-set verifier (arXiv 2511.18793).

The model (`model.architecture: nezha`) is the builtin Llama with a draft head: the
prompt ends with one placeholder per semantic-ID level, the backbone runs once, and the
head's RNN over the levels produces the item's codes (rollfleet.models.nezha). A
model-free verifier of valid prefixes (rollfleet.tasks.recommend.PrefixVerifier) keeps
every decoded item real. The torch engine decodes in this mode for the job's requests.

Warm-up: backbone and head train together on the task's demonstrations, the answer's
text loss (what autoregressive decoding of the same model needs: the baseline) plus the
head's teacher-forced cross-entropy, with the paper's learning-rate multipliers for the
head (code embeddings x100, RNN cells x10). (The head alone on a frozen backbone reached
a third of the text decode's top-1 hit rate: the placeholders' hidden states must learn
to carry the levels.) RL: each sample is one item drawn from the head (verifier-masked at the
rollout temperature); the reward pays hits on the user's next items, and an item outside
the catalogue earns nothing; the trainer scores the drawn codes with the same masked head.

    spec:
      task: {name: recommend}
      model: {architecture: nezha}
      methods:
        nezha: {beam: 10}
"""

from __future__ import annotations

from pydantic import Field

from rollfleet.cel import Cel
from rollfleet.methods import MethodParams, register_method


class NezhaParams(MethodParams):
    beam: int = Field(
        10, ge=1, le=1024, description="beam width of greedy decoding (held-out, deployment)"
    )
    verifier: bool = Field(
        True,
        description="keep only valid prefixes while decoding (false: the head decodes freely "
        "and invalid items earn zero reward)",
    )
    warmupSteps: int = Field(
        600, ge=0, description="joint SFT steps: the answer's text loss plus the head's"
    )
    warmupBatchSize: int = Field(64, ge=1)
    warmupLearningRate: float = Field(
        3e-3, gt=0, description="peak rate of the backbone and the head's output layers"
    )
    embeddingMultiplier: float = Field(
        100.0, gt=0, description="code embeddings learn this many times faster (paper: 100)"
    )
    cellMultiplier: float = Field(
        10.0, gt=0, description="RNN cells learn this many times faster (paper: 10)"
    )

    def reward_functions(self, verifier: str) -> list[tuple[str, float, dict]]:
        return [(verifier, 1.0, {}), ("item_valid", 0.0, {})]

    def check_job(self, spec) -> None:
        if spec.model.architecture != "nezha" or spec.task.name != "recommend":
            raise ValueError(
                "methods.nezha needs model.architecture: nezha (the draft head) and task.name: "
                f"recommend (semantic-ID items); got {spec.model.architecture!r} and "
                f"{spec.task.name!r}"
            )


NezhaParams.__job_cel__ = (
    Cel(
        "!has(self.methods) || !has(self.methods.nezha) || "
        '({self.model.architecture} == "nezha" && {self.task.name} == "recommend")',
        "methods.nezha needs model.architecture: nezha (the draft head) and task.name: "
        "recommend (semantic-ID items)",
        field_path=".methods.nezha",
    ),
)


register_method(
    "nezha",
    NezhaParams,
    "rollfleet.methods.nezha.stages:Nezha",
    "NEZHA (arXiv 2511.18793): one backbone forward and a draft head decode a semantic-ID "
    "item, a hash set of valid prefixes keeps it real",
)
