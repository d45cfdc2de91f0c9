from __future__ import annotations

import msgpack
import pytest

from rollfleet.protocol import (
    SCHEMA_VERSION,
    Conditioning,
    Progress,
    ProtocolError,
    RolloutTask,
    Subjects,
    TensorEntry,
    Trajectory,
    TrajectoryStatus,
    WeightBucket,
    WeightVersion,
    decode,
    encode,
)


def make_task(**overrides) -> RolloutTask:
    fields = dict(
        task_id="t-1",
        group_id="g-1",
        index=7,
        prompt="3 5 7>22:",
        answer="22",
        meta={"numbers": [3, 5, 7], "target": 22},
        samples=4,
        group_size=8,
        sample_offset=4,
        multi_turn=False,
        min_version=2,
        issued_at=1234.5,
    )
    fields.update(overrides)
    return RolloutTask(**fields)


def make_trajectory(**overrides) -> Trajectory:
    # two model tokens, two env tokens, one model token
    fields = dict(
        task_id="t-1",
        group_id="g-1",
        sample_index=3,
        group_size=8,
        worker="pool-a-0",
        status=TrajectoryStatus.COMPLETED,
        prompt_ids=[1, 7, 40, 9],
        response_ids=[14, 15, 45, 51, 16],
        behaviour_logprobs=[-0.5, -1.25, 0.0, 0.0, -2.0],
        token_versions=[4, 3, -1, -1, 5],
        loss_mask=[1.0, 1.0, 0.0, 0.0, 1.0],
        reward=1.0,
        reward_parts={"countdown": 1.0},
        response_text="ab=;c",
        conditioning=Conditioning(budget=16),
        finished_at=99.0,
    )
    fields.update(overrides)
    return Trajectory(**fields)


def test_task_round_trip():
    task = make_task()
    data = encode(task)
    assert isinstance(data, bytes)
    back = decode(RolloutTask, data)
    assert back == task
    assert back.meta == {"numbers": [3, 5, 7], "target": 22}
    assert back.v == SCHEMA_VERSION


def test_trajectory_round_trip_keeps_enum_and_floats():
    traj = make_trajectory(advantage_weights=[0.5, 1.0, 0.0, 0.0, 2.0])
    back = decode(Trajectory, encode(traj))
    assert back == traj
    assert back.status is TrajectoryStatus.COMPLETED
    assert back.behaviour_logprobs == [-0.5, -1.25, 0.0, 0.0, -2.0]
    assert back.advantage_weights == [0.5, 1.0, 0.0, 0.0, 2.0]


def make_weight_version(**overrides) -> WeightVersion:
    fields = dict(
        version=3,
        step=30,
        transport="filesystem",
        buckets=[
            WeightBucket(
                name="bucket-0000.safetensors",
                sha256="ab" * 32,
                num_bytes=17_000,  # 16,896 bytes of tensors, 8 and the header
                tensors=[
                    TensorEntry(name="embed.weight", dtype="BF16", shape=[64, 128]),
                    TensorEntry(name="norm.weight", dtype="F32", shape=[128]),
                ],
            ),
            WeightBucket(
                name="bucket-0001.safetensors",
                sha256="cd" * 32,
                num_bytes=32,
                tensors=[TensorEntry(name="scalar", dtype="F32", shape=[])],
            ),
        ],
        published_at=1.0,
    )
    fields.update(overrides)
    return WeightVersion(**fields)


def test_other_messages_round_trip():
    wv = make_weight_version()
    back = decode(WeightVersion, encode(wv))
    assert back == wv
    assert back.transport == "filesystem"
    assert back.buckets[0].tensors[0] == TensorEntry(
        name="embed.weight", dtype="BF16", shape=[64, 128]
    )
    assert back.buckets[1].tensors[0].shape == []  # a scalar keeps its empty shape
    assert back.num_bytes == 17_032  # the sum of the buckets
    progress = Progress(phase="Running", step=5, total_steps=10, mean_reward=0.25, updated_at=2.0)
    assert decode(Progress, encode(progress)) == progress


def test_payload_is_plain_msgpack_map():
    raw = msgpack.unpackb(encode(make_trajectory()), raw=False)
    assert isinstance(raw, dict)
    assert raw["v"] == SCHEMA_VERSION
    assert raw["status"] == "completed"  # the enum travels as its string value
    assert raw["response_ids"] == [14, 15, 45, 51, 16]
    assert b"pickle" not in encode(make_trajectory())


@pytest.mark.parametrize("garbage", [b"\xc1", b"", b"\x92\x01", b"\x81\xa1v\x01trailing"])
def test_garbage_bytes_raise_protocol_error(garbage):
    with pytest.raises(ProtocolError, match="not msgpack"):
        decode(RolloutTask, garbage)


@pytest.mark.parametrize("value", [[1, 2, 3], "task", 42, None])
def test_non_map_raises_protocol_error(value):
    with pytest.raises(ProtocolError, match="expected a map"):
        decode(RolloutTask, msgpack.packb(value))


def test_non_string_keys_raise_protocol_error():
    with pytest.raises(ProtocolError):
        decode(RolloutTask, msgpack.packb({1: "x"}))


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None])
def test_wrong_schema_version_raises(version):
    raw = msgpack.unpackb(encode(make_task()), raw=False)
    raw["v"] = version
    with pytest.raises(ProtocolError, match="schema version"):
        decode(RolloutTask, msgpack.packb(raw))


def test_missing_schema_version_raises():
    raw = msgpack.unpackb(encode(make_task()), raw=False)
    del raw["v"]
    with pytest.raises(ProtocolError, match="schema version None"):
        decode(RolloutTask, msgpack.packb(raw))


def test_misaligned_trajectory_raises():
    raw = msgpack.unpackb(encode(make_trajectory()), raw=False)
    raw["behaviour_logprobs"] = raw["behaviour_logprobs"][:-1]
    with pytest.raises(
        ProtocolError, match="behaviour_logprobs has 4 entries for 5 response tokens"
    ):
        decode(Trajectory, msgpack.packb(raw))


def test_misaligned_advantage_weights_and_sample_index_raise():
    raw = msgpack.unpackb(encode(make_trajectory()), raw=False)
    raw["advantage_weights"] = [1.0]
    with pytest.raises(ProtocolError, match="advantage_weights"):
        decode(Trajectory, msgpack.packb(raw))
    raw = msgpack.unpackb(encode(make_trajectory()), raw=False)
    raw["sample_index"] = 8  # == group_size
    with pytest.raises(ProtocolError, match="sample_index"):
        decode(Trajectory, msgpack.packb(raw))


def test_invalid_field_error_names_the_field():
    raw = msgpack.unpackb(encode(make_task()), raw=False)
    raw["samples"] = 0
    with pytest.raises(ProtocolError, match=r"invalid RolloutTask: samples"):
        decode(RolloutTask, msgpack.packb(raw))


def test_wrong_message_type_raises():
    # A trajectory is not a task: extra fields are forbidden and task fields are missing.
    with pytest.raises(ProtocolError, match="invalid RolloutTask"):
        decode(RolloutTask, encode(make_trajectory()))


def test_oldest_version_ignores_env_tokens():
    # env tokens carry version -1 and mask 0; the oldest model token is version 3
    assert make_trajectory().oldest_version() == 3
    # a model token with a masked-out position does not count either
    traj = make_trajectory(token_versions=[4, 3, 0, 0, 5], loss_mask=[1.0, 0.0, 0.0, 0.0, 1.0])
    assert traj.oldest_version() == 4


def test_oldest_version_none_without_model_tokens():
    traj = make_trajectory(
        response_ids=[45, 51],
        behaviour_logprobs=[0.0, 0.0],
        token_versions=[-1, -1],
        loss_mask=[0.0, 0.0],
    )
    assert traj.oldest_version() is None


def test_namespaced_jobs_get_their_own_streams():
    from rollfleet.spec import bus_name

    a, b = Subjects(bus_name("run", "team-a")), Subjects(bus_name("run", "team-b"))
    assert a.tasks == "rollfleet.team-a.run.tasks"
    assert a.task_stream == "RF_team_a__run_TASKS" != b.task_stream
    assert "." not in a.weight_bucket and a.weight_bucket != b.weight_bucket
    assert Subjects(bus_name("run", None)).tasks == "rollfleet.run.tasks"  # local runs


def test_subjects_for_job():
    s = Subjects("my-job")
    assert s.job == "my-job"
    assert s.tasks == "rollfleet.my-job.tasks"
    assert s.trajectories == "rollfleet.my-job.trajectories"
    assert s.trajectories_for(0) == "rollfleet.my-job.trajectories.0"
    assert s.trajectories_for(3) == "rollfleet.my-job.trajectories.3"
    assert s.weights == "rollfleet.my-job.weights"
    assert s.deadletter == "rollfleet.my-job.deadletter"
    assert s.task_stream == "RF_my_job_TASKS"
    assert s.trajectory_stream == "RF_my_job_TRAJECTORIES"
    assert s.deadletter_stream == "RF_my_job_DEADLETTER"
    assert s.weight_bucket == "rf_my_job_weights"
    assert s.progress_bucket == "rf_my_job_progress"
    assert s.swap_bucket == "rf_my_job_swaps"


def test_weight_version_defaults_to_nats_and_needs_a_bucket():
    wv = make_weight_version()
    raw = msgpack.unpackb(encode(wv), raw=False)
    del raw["transport"]
    assert decode(WeightVersion, msgpack.packb(raw)).transport == "nats"
    raw["transport"] = "s3"
    with pytest.raises(ProtocolError, match="invalid WeightVersion: transport"):
        decode(WeightVersion, msgpack.packb(raw))
    raw["transport"] = "nats"
    raw["buckets"] = []
    with pytest.raises(ProtocolError, match="invalid WeightVersion: buckets"):
        decode(WeightVersion, msgpack.packb(raw))


@pytest.mark.parametrize(
    "field, value",
    [
        ("object_name", "weights/v00000003.safetensors"),  # a schema-1 field
        ("num_bytes", 10),  # derived from the buckets, not sent
    ],
)
def test_weight_version_rejects_unknown_fields(field, value):
    raw = msgpack.unpackb(encode(make_weight_version()), raw=False)
    raw[field] = value
    with pytest.raises(ProtocolError, match="invalid WeightVersion"):
        decode(WeightVersion, msgpack.packb(raw))


def test_weight_bucket_entries_reject_unknown_fields_and_negative_sizes():
    raw = msgpack.unpackb(encode(make_weight_version()), raw=False)
    raw["buckets"][0]["tensors"][0]["offset"] = 0
    with pytest.raises(ProtocolError, match="invalid WeightVersion"):
        decode(WeightVersion, msgpack.packb(raw))
    raw = msgpack.unpackb(encode(make_weight_version()), raw=False)
    raw["buckets"][1]["num_bytes"] = -1
    with pytest.raises(ProtocolError, match="invalid WeightVersion"):
        decode(WeightVersion, msgpack.packb(raw))


def test_task_trainer_rank_defaults_to_zero_and_round_trips():
    assert make_task().trainer_rank == 0
    task = make_task(trainer_rank=2)
    assert decode(RolloutTask, encode(task)).trainer_rank == 2
    raw = msgpack.unpackb(encode(task), raw=False)
    raw["trainer_rank"] = -1
    with pytest.raises(ProtocolError, match="invalid RolloutTask: trainer_rank"):
        decode(RolloutTask, msgpack.packb(raw))


@pytest.mark.parametrize(
    ("conditioning", "field"),
    [
        ({"budjet": 16}, "budjet"),
        ({"budget": 0}, "budget"),
        ({"palette": {"latents": []}}, "palette.latents"),
    ],
)
def test_conditioning_is_typed(conditioning, field):
    """What a method records per sample is typed: an unknown or invalid field is refused."""
    raw = msgpack.unpackb(encode(make_trajectory()), raw=False)
    assert raw["conditioning"] == {"budget": 16, "ravr": None, "palette": None}
    raw["conditioning"] = conditioning
    with pytest.raises(ProtocolError, match=f"conditioning.{field}"):
        decode(Trajectory, msgpack.packb(raw))
