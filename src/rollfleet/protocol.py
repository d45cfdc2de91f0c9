"""Messages on the bus and the subjects they travel on.

Every message is a pydantic model serialised as msgpack (never pickle) and carries its
schema version `v`. Consumers call `decode`, which raises `ProtocolError` for anything
that does not validate; the bus then moves the raw bytes to the dead-letter subject.
Validation is what keeps a bad message from reaching the trainer's arithmetic: numbers are
finite (a NaN log-prob or reward would poison a whole batch), per-token lists are as long
as the response, and a weight manifest's sizes add up.

    data = encode(RolloutTask(...));  task = decode(RolloutTask, data)
"""

from __future__ import annotations

import enum
import math
import time
from typing import Annotated, Any, Literal, Self, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 6  # 2: weights announced as a manifest of buckets; 3: RolloutTask, stale status, advantage_weights; 4: typed Conditioning; 5: Conditioning.palette; 6: Trajectory.segments


# 8 times NATS's default max_payload: bigger bytes are refused before msgpack reads them.
MAX_MESSAGE_BYTES = 8 * 2**20


class ProtocolError(ValueError):
    """Bytes that are not a valid message of the expected type and version."""


# Every model on the wire refuses unknown fields and NaN or infinite numbers.
WIRE = ConfigDict(extra="forbid", allow_inf_nan=False)


class Message(BaseModel):
    model_config = WIRE
    v: int = SCHEMA_VERSION


class RolloutTask(Message):
    """One prompt for the rollout pools: sample `samples` responses for it."""

    task_id: str
    group_id: str  # the prompt's group: all samples of one prompt share it (GRPO)
    index: int  # position in the task's train split (the trainer's dataset cursor)
    prompt: str
    answer: str
    meta: dict[str, Any] = Field(default_factory=dict)
    samples: int = Field(ge=1)
    group_size: int = Field(ge=1)
    sample_offset: int = Field(0, ge=0)  # first sample index of this task within the group
    multi_turn: bool = False
    min_version: int = Field(ge=0)  # the worker loads at least this policy version first
    trainer_rank: int = Field(0, ge=0)  # the trainer rank that issued it gets its trajectories
    issued_at: float = Field(default_factory=time.time)

    @classmethod
    def for_example(
        cls, example: Any, *, index: int, group_id: str, samples: int, **fields: Any
    ) -> Self:
        """The message asking for `samples` responses to a dataset example (a
        `tasks.Example`); `fields` sets the rest (task_id defaults to t<index>, group_size
        to `samples`, min_version to 0)."""
        fields = {"task_id": f"t{index}", "group_size": samples, "min_version": 0, **fields}
        return cls(
            index=index,
            group_id=group_id,
            samples=samples,
            prompt=example.prompt,
            answer=example.answer,
            meta=example.meta,
            **fields,
        )


class RavrSample(BaseModel):
    """RAVR: how one sample of a group was drawn, and what the trainer scores it against."""

    model_config = WIRE

    posterior: bool  # drawn with the reference answer in view (else from the prior)
    question_ids: list[int]  # the question-only prompt: the prior's, with no answer in it
    cue_ids: list[int]  # the text between a trace and the answer when scoring s(z)
    reference_ids: list[int]  # the reference answer's tokens, scored for the utility s(z)


class PaletteSample(BaseModel):
    """Reasoning Palette: the latents behind one sample's prefix. The prefix itself is the
    VAE decoder's output for each row (one prefix position per row), which the trainer
    recomputes; sending the latents, not the embeddings, keeps the message independent
    of the model's hidden size."""

    model_config = WIRE

    latents: list[list[float]] = Field(min_length=1)  # [prefix length][latent dim], float32


class Conditioning(BaseModel):
    """How a sample was drawn beyond its prompt tokens, recorded by method modules on the
    worker (`build_request`) for the trainer: one typed field per method, None where that
    method is off. A method that needs more adds its field here and bumps SCHEMA_VERSION."""

    model_config = WIRE

    budget: int | None = Field(None, ge=1)  # BARD: the thinking budget behind the prompt's marker
    ravr: RavrSample | None = None  # RAVR: prior or posterior sample, question and answer ids
    palette: PaletteSample | None = None  # Reasoning Palette: the prefix's latents, if any


def _check_aligned(tokens) -> None:
    """The per-token lists of a trajectory or segment are as long as its response."""
    n = len(tokens.response_ids)
    for name in ("behaviour_logprobs", "token_versions", "loss_mask"):
        if len(getattr(tokens, name)) != n:
            raise ValueError(
                f"{name} has {len(getattr(tokens, name))} entries for {n} response tokens"
            )


class Segment(BaseModel):
    """One agent's share of a multi-agent sample (RecGPT-V2's planner, experts and
    arbiter): its own prompt and response, with the per-token lists a Trajectory carries,
    trained as a row of its own. `reward` is the agent's own reward, or None for the
    sample's (`Trajectory.reward`, shared by its agents)."""

    model_config = WIRE

    agent: str = Field(min_length=1, max_length=64)
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]
    token_versions: list[int]
    loss_mask: list[float]
    reward: float | None = None

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        _check_aligned(self)
        return self


class TrajectoryStatus(enum.StrEnum):
    COMPLETED = "completed"  # the model ended with end-of-sequence (or the episode ended)
    TRUNCATED = "truncated"  # hit the token limit
    STALE = "stale"  # aborted by the worker: its oldest token fell more than α versions behind
    ABORTED = "aborted"  # cancelled by the trainer (a redundant straggler)
    FAILED = "failed"  # the env or the reward service failed for this sample


class Trajectory(Message):
    """One sampled response, token by token, with everything the trainer needs.

    `response_ids` holds every token after the prompt: the model's and, in multi-turn
    episodes, the env's observations. `loss_mask` is 1 on the model's tokens and 0 on
    the env's; `token_versions` is the policy version that produced each model token
    (-1 on env tokens). `advantage_weights` optionally scales each token's advantage
    (credit assignment); it is kept apart from the mask, so it never enters the loss
    aggregation's denominator. `conditioning` is what method modules recorded about how
    the sample was drawn (e.g. BARD's budget).

    A multi-agent sample carries its tokens in `segments` instead, one per agent turn
    owner, each trained as its own row; its own token lists are then empty. The sample
    travels whole in one message, so a group is complete when its samples are and no
    sample is ever half trained. `rows()` gives either kind as segments.
    """

    task_id: str
    group_id: str
    sample_index: int = Field(ge=0)
    group_size: int = Field(ge=1)
    worker: str
    status: TrajectoryStatus
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]
    token_versions: list[int]
    loss_mask: list[float]
    advantage_weights: list[float] | None = None
    reward: float = 0.0
    reward_parts: dict[str, float] = Field(default_factory=dict)
    response_text: str = ""
    conditioning: Conditioning = Field(default_factory=Conditioning)
    segments: list[Segment] = Field(default_factory=list, max_length=64)
    finished_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        _check_aligned(self)
        n = len(self.response_ids)
        if self.segments and (n or self.prompt_ids or self.advantage_weights is not None):
            raise ValueError(
                "a trajectory with segments carries its tokens in them: prompt_ids, "
                "response_ids and advantage_weights must be empty"
            )
        if self.advantage_weights is not None and len(self.advantage_weights) != n:
            raise ValueError(
                f"advantage_weights has {len(self.advantage_weights)} entries for {n} response tokens"
            )
        if self.sample_index >= self.group_size:
            raise ValueError(f"sample_index {self.sample_index} >= group_size {self.group_size}")
        return self

    def rows(self) -> list[Segment]:
        """What the trainer trains, one row each: the segments, or the trajectory itself
        as one segment (agent "policy", the sample's reward)."""
        if self.segments:
            return self.segments
        return [
            Segment(
                agent="policy",
                prompt_ids=self.prompt_ids,
                response_ids=self.response_ids,
                behaviour_logprobs=self.behaviour_logprobs,
                token_versions=self.token_versions,
                loss_mask=self.loss_mask,
            )
        ]

    def oldest_version(self) -> int | None:
        """Version of the oldest model token (None if the model produced none)."""
        versions = [
            v
            for row in self.rows()
            for v, m in zip(row.token_versions, row.loss_mask, strict=True)
            if m > 0 and v >= 0
        ]
        return min(versions) if versions else None


# Bytes per element of each dtype a weight bucket may hold, by its safetensors name.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; safetensors refuses a longer header


class TensorEntry(BaseModel):
    model_config = WIRE
    name: str = Field(min_length=1, max_length=1024)
    dtype: Literal[tuple(DTYPE_BYTES)]  # as safetensors writes it: "F32", "BF16", ...
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


class WeightBucket(BaseModel):
    """One stored piece of a version: a safetensors blob holding some of the tensors."""

    model_config = WIRE
    # a plain file name: the filesystem store joins it to its folder
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=255)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_bytes: int = Field(ge=0)
    tensors: list[TensorEntry]

    @model_validator(mode="after")
    def _sizes_add_up(self) -> Self:
        # safetensors: an 8-byte header length, the JSON header, then every tensor's bytes
        data = sum(t.num_bytes for t in self.tensors)
        if not data + 8 <= self.num_bytes <= data + 8 + SAFETENSORS_MAX_HEADER:
            raise ValueError(
                f"num_bytes {self.num_bytes} does not fit its tensors: their shapes and dtypes "
                f"take {data} bytes, plus 8 and a header of at most {SAFETENSORS_MAX_HEADER}"
            )
        return self


class WeightVersion(Message):
    """Announcement and manifest of a published policy version.

    The tensors sit in `buckets` in the weight store (`transport`: the NATS object store or
    a shared filesystem); a worker checks each bucket against its entry before swapping.
    """

    version: int = Field(ge=0)
    step: int = Field(ge=0)
    transport: Literal["nats", "filesystem"] = "nats"
    buckets: list[WeightBucket] = Field(min_length=1)
    published_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _names_are_unique(self) -> Self:
        for what, names in (
            ("bucket", [b.name for b in self.buckets]),
            ("tensor", [t.name for b in self.buckets for t in b.tensors]),
        ):
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"buckets: {what} names listed twice: {twice[:5]}")
        return self

    @property
    def num_bytes(self) -> int:
        return sum(b.num_bytes for b in self.buckets)


class GroupsCancelled(Message):
    """The trainer will not train on these prompt groups (redundant stragglers): workers
    abort their samples and skip their queued tasks."""

    group_ids: list[str] = Field(min_length=1)


class Progress(Message):
    """The trainer's view of the job, kept in the job's KV bucket for the CLI and operator."""

    # a diverged run reports its NaN loss rather than no progress at all
    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)
    phase: str  # WarmingUp, Running, Succeeded, Failed
    step: int = 0
    total_steps: int = 0
    policy_version: int = 0
    mean_reward: float | None = None
    samples_per_second: float | None = None
    staleness: float | None = None
    samples_consumed: int = 0
    samples_dropped_stale: int = 0
    heldout_before: float | None = None
    heldout_after: float | None = None
    loss: float | None = None
    message: str = ""
    updated_at: float = Field(default_factory=time.time)


M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    return msgpack.packb(message.model_dump(mode="json"), use_bin_type=True)


def decode(cls: type[M], data: bytes) -> M:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"{len(data)} bytes, more than the {MAX_MESSAGE_BYTES} a {cls.__name__} may take"
        )
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not msgpack: {str(e) or type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"expected a map, got {type(raw).__name__}")
    if raw.get("v") != SCHEMA_VERSION:
        raise ProtocolError(
            f"v: schema version {raw.get('v')!r}, this service speaks {SCHEMA_VERSION}"
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ProtocolError(
            f"invalid {cls.__name__}: {f'{where}: ' if where else ''}{message}"
        ) from None


class Subjects:
    """Subject, stream and bucket names of one job; one place so nothing drifts."""

    def __init__(self, job: str):
        self.job = job
        token = job.replace("-", "_").replace(".", "__")  # stream names take no dots
        self.tasks = f"rollfleet.{job}.tasks"  # shared by every pool; .<pool> with affinity routing
        self.trajectories = f"rollfleet.{job}.trajectories"  # .<trainer rank>
        self.weights = f"rollfleet.{job}.weights"
        self.cancel = f"rollfleet.{job}.cancel"
        self.deadletter = f"rollfleet.{job}.deadletter"
        self.task_stream = f"RF_{token}_TASKS"
        self.trajectory_stream = f"RF_{token}_TRAJECTORIES"
        self.deadletter_stream = f"RF_{token}_DEADLETTER"
        self.weight_bucket = f"rf_{token}_weights"
        self.progress_bucket = f"rf_{token}_progress"
        self.swap_bucket = f"rf_{token}_swaps"  # rolling weight updates: who may pause now
        self.inflight_bucket = f"rf_{token}_inflight"  # issued groups not yet in a checkpoint
        self.root = f"rollfleet.{job}"  # every subject above is below it
        # Replies to this job's requests (nats-py `inbox_prefix`), apart from other jobs'.
        self.inbox = f"_INBOX.rollfleet.{job}"

    def streams(self) -> list[str]:
        """Every stream of the job (each `*_stream` name above): with `buckets`, what its
        NATS user may use (rollfleet.nats_auth), so one added here is covered."""
        return sorted(v for k, v in vars(self).items() if k.endswith("_stream"))

    def buckets(self) -> list[str]:
        """Every KV and object-store bucket of the job (each `*_bucket` name above)."""
        return sorted(v for k, v in vars(self).items() if k.endswith("_bucket"))

    def tasks_for(self, pool: str | None) -> str:
        """A pool's own task subject (affinity routing), or the shared one (None)."""
        return self.tasks if pool is None else f"{self.tasks}.{pool}"

    def trajectories_for(self, rank: int) -> str:
        """Each trainer rank consumes the trajectories of the tasks it issued."""
        return f"{self.trajectories}.{rank}"
