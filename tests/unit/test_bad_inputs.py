"""The bad-input corpus for manifests and bus messages: each row one bad input with an id,
refused with an error that names the field (and what to do), nothing started or lost.

- SPECS: manifests the spec itself refuses, through `rollfleet run` (before any process
  starts), the operator (an InvalidSpec condition naming the field) and, in a cluster,
  the CRD: its schema's bounds, a CEL rule, or where neither can tell (a task's
  parameters) the operator. NaN and infinities exist only in YAML (`.nan`, `.inf`):
  JSON, and so the API server, cannot carry them.
- RUN_INPUTS: what only `rollfleet run` can check, as it reads files: JSON Lines files,
  datasets, a `model.path` folder, and the task's own prompts against the context.
- MESSAGES: bytes on the bus, each refused by `protocol.decode` naming the field; through
  a real nats-server they land on the dead-letter stream, counted, while good messages
  after them are still delivered.
- WEIGHT_LIES: weight manifests that decode (their sizes add up) but lie about the stored
  bytes; a worker refuses the version, naming the bucket and what differs.

    .venv/bin/pytest -q tests/unit/test_bad_inputs.py
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import nats.errors
import pytest
import yaml

from rollfleet import cli
from rollfleet.crd import build_crd
from rollfleet.protocol import (
    MAX_MESSAGE_BYTES,
    GroupsCancelled,
    ProtocolError,
    RolloutTask,
    Trajectory,
    WeightVersion,
    decode,
    encode,
)
from rollfleet.spec import ManifestError
from rollfleet.weight_transport import FilesystemWeightStore, WeightsRejected, fetch_version
from rollfleet_operator.config import OperatorConfig
from rollfleet_operator.handlers import _parse
from rollfleet_operator.status import Observation, job_status
from tests.operator.harness import NS, RLJOBS, condition, declare, operator, status_of, wait_for
from tests.operator.schemas import to_json_schema
from tests.services import test_bus
from tests.services.test_bus import dead_letters, make_announcement, make_trajectory, weights_bytes
from tests.unit.test_crd import failing

NAN, INF = math.nan, math.inf
bus = test_bus.bus  # the fixture: the job's Bus on a nats-server of the test's own


@dataclass(frozen=True)
class Bad:
    id: str
    spec: Any  # the manifest's spec, or a function of `Files` making it
    field: str  # the field the error must name (below `spec.`)
    also: str = ""  # more the message must say (the other field, the fix)
    cluster: str = "schema"  # SPECS: what refuses it in a cluster: yaml, schema, cel, operator


def params(task: str, **values) -> dict:
    return {"task": {"name": task, "params": values}}


# fmt: off
SPECS = [
    # non-finite numbers: YAML's .nan and .inf, wherever a number goes
    Bad("nan-learning-rate", {"algorithm": {"learningRate": NAN}}, "algorithm.learningRate", "not a finite number", "yaml"),
    Bad("inf-temperature", {"rollout": {"sampling": {"temperature": INF}}}, "rollout.sampling.temperature", "not a finite number", "yaml"),
    Bad("minus-inf-reward-weight", {"reward": {"functions": [{"name": "exact_match", "weight": -INF}]}}, "reward.functions.0.weight", "not a finite number", "yaml"),
    Bad("nan-in-an-integer", {"rollout": {"pools": [{"maxBatch": NAN}]}}, "rollout.pools.0.maxBatch", "not a finite number", "yaml"),
    Bad("nan-task-parameter", params("countdown", pad_tail=NAN), "task.params.pad_tail", "not a finite number", "yaml"),
    Bad("inf-reward-parameter", {"reward": {"functions": [{"name": "numeric", "params": {"tolerance": INF}}]}}, "reward.functions.0.params.tolerance", "not a finite number", "yaml"),
    Bad("nan-method-parameter", {"methods": {"attention_credit": {"amplification": NAN}}}, "methods.attention_credit.amplification", "not a finite number", "yaml"),
    # out of range
    Bad("negative-async-ratio", {"async": {"ratio": -1}}, "async.ratio", "greater than or equal to 0"),
    Bad("top-p-above-one", {"rollout": {"sampling": {"topP": 1.5}}}, "rollout.sampling.topP", "less than or equal to 1"),
    Bad("clip-epsilon-one", {"algorithm": {"clipEpsilon": 1.0}}, "algorithm.clipEpsilon", "less than 1"),
    Bad("zero-replicas", {"rollout": {"pools": [{"replicas": 0}]}}, "rollout.pools.0.replicas", "greater than or equal to 1"),
    Bad("replicas-past-int32", {"rollout": {"pools": [{"replicas": 2**40}]}}, "rollout.pools.0.replicas", "less than or equal to 2147483647"),
    Bad("reward-scale-past-int32", {"reward": {"maxScale": 2**31}}, "reward.maxScale", "less than or equal to 2147483647"),
    Bad("negative-seed", {"seed": -1}, "seed", "greater than or equal to 0"),
    Bad("seed-past-torch", {"seed": 2**70}, "seed", "less than 4294967296"),
    Bad("sampling-seed-too-big", {"rollout": {"sampling": {"seed": 2**32}}}, "rollout.sampling.seed", "less than 4294967296"),
    Bad("thousand-threads", {"rollout": {"pools": [{"threads": 1000}]}}, "rollout.pools.0.threads", "less than or equal to 256"),
    Bad("no-new-tokens", {"rollout": {"sampling": {"maxNewTokens": 0}}}, "rollout.sampling.maxNewTokens", "greater than or equal to 1"),
    Bad("zero-learning-rate", {"model": {"warmup": {"learningRate": 0}}}, "model.warmup.learningRate", "greater than 0"),
    Bad("zero-steps", {"trainer": {"steps": 0}}, "trainer.steps", "greater than or equal to 1"),
    Bad("ack-wait-under-a-second", {"rollout": {"taskAckWaitSeconds": 0.5}}, "rollout.taskAckWaitSeconds", "greater than or equal to 1"),
    Bad("negative-latency", {"reward": {"latencyMs": -5}}, "reward.latencyMs", "greater than or equal to 0"),
    Bad("steps-as-text", {"trainer": {"steps": "many"}}, "trainer.steps", "valid integer"),
    # generation that cannot fit the model's context (prompt and response)
    Bad("new-tokens-100-million", {"rollout": {"sampling": {"maxNewTokens": 100_000_000}}}, "rollout.sampling.maxNewTokens", "model.maxLength", "cel"),
    Bad("context-below-new-tokens", {"model": {"maxLength": 12}}, "rollout.sampling.maxNewTokens", "model.maxLength", "cel"),
    # a task's parameters: an open map, which only the operator (and run) can check
    Bad("unknown-task-parameter", params("countdown", numbrs=3), "task.params.numbrs", "it takes: numbers, max_number", "operator"),
    Bad("seed-as-task-parameter", params("countdown", seed=3), "task.params.seed", "the seed is spec.seed", "operator"),
    Bad("task-parameter-as-text", params("countdown", numbers="three"), "task.params.numbers", "valid integer", "operator"),
    Bad("task-parameter-as-list", params("calculator", max_turns=[3]), "task.params.max_turns", "valid integer", "operator"),
    Bad("jsonl-path-as-number", params("jsonl", path=7), "task.params.path", "valid string", "operator"),
]
# fmt: on

ROWS = "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(20))


class Files:
    """Makes the files a RUN_INPUTS row names, in the test's own folder."""

    def __init__(self, root: Path, tiny_model: Path):
        self.root, self.tiny_model = root, tiny_model

    def write(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        return str(path)

    def folder(self, name: str) -> str:
        (self.root / name).mkdir()
        return str(self.root / name)

    def model(self, change: Callable[[Path], Any] = lambda folder: None) -> str:
        """A copy of the builtin tiny model folder, `change`d."""
        folder = self.root / "model"
        shutil.copytree(self.tiny_model, folder)
        change(folder)
        return str(folder)


def jsonl(path: Callable[[Files], str], **more) -> Callable[[Files], dict]:
    return lambda f: params("jsonl", path=path(f), **more)


def config_with(**changes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return change


# fmt: off
RUN_INPUTS = [
    # task files that are not JSON Lines
    Bad("csv-file", jsonl(lambda f: f.write("data.csv", "prompt,answer\n1+1,2\n")), "task.params.path", "not valid JSON"),
    Bad("json-array", jsonl(lambda f: f.write("data.json", json.dumps([{"prompt": "1", "answer": "1"}]))), "task.params.path", "expected a JSON object per line, got list"),
    Bad("pretty-printed-json", jsonl(lambda f: f.write("data.json", json.dumps({"prompt": "1", "answer": "1"}, indent=2))), "task.params.path", "data.json:1: not valid JSON"),
    Bad("gzip-bytes", jsonl(lambda f: f.write("data.jsonl.gz", b"\x1f\x8b\x08\x00\xff\xfe\x00")), "task.params.path", "not UTF-8 text"),
    Bad("latin-1-text", jsonl(lambda f: f.write("data.jsonl", ROWS.encode() + '{"prompt": "café"}'.encode("latin-1"))), "task.params.path", "data.jsonl:21: not UTF-8"),
    Bad("a-folder", jsonl(lambda f: f.folder("data")), "task.params.path", "is a folder"),
    Bad("missing-file", jsonl(lambda f: str(f.root / "nope.jsonl")), "task.params.path", "does not exist"),
    Bad("no-path", params("jsonl"), "task.params.path", "needs the path of a JSON Lines file"),
    Bad("prompt-is-an-object", jsonl(lambda f: f.write("d.jsonl", ROWS + '{"prompt": {"text": "1"}, "answer": "1"}\n')), "task.params.path", "field 'prompt' must be text or a number"),
    Bad("answer-field-missing", jsonl(lambda f: f.write("d.jsonl", '{"question": "1", "answer": "1"}\n')), "task.params.path", "set task.params.prompt_field"),
    # empty datasets
    Bad("empty-file", jsonl(lambda f: f.write("empty.jsonl", "")), "task.params.path", "holds no rows"),
    Bad("blank-lines-only", jsonl(lambda f: f.write("blank.jsonl", "\n  \n\n")), "task.params.path", "holds no rows"),
    Bad("empty-heldout-file", lambda f: params("jsonl", path=f.write("train.jsonl", ROWS), heldout_path=f.write("heldout.jsonl", "")), "task.params.heldout_path", "holds no rows"),
    Bad("one-row", jsonl(lambda f: f.write("one.jsonl", ROWS.splitlines()[0])), "task.params.path", "nothing to hold out"),
    Bad("empty-corpus", lambda f: params("qagent", corpus=f.write("c.jsonl", ""), questions=f.write("q.jsonl", ROWS.replace("prompt", "question")), heldout=f.write("h.jsonl", ROWS.replace("prompt", "question"))), "task.params.corpus", "holds no passages"),
    # a task that cannot be built
    Bad("mixed-inner-parameter", params("mixed", tasks=[{"name": "countdown", "params": {"numbrs": 3}}]), "task.params.tasks[0].params.numbrs", "is not a parameter of task countdown"),
    Bad("mixed-params-not-a-map", params("mixed", tasks=[{"name": "countdown", "params": [3]}]), "task.params.tasks[0].params", "expected a map"),
    Bad("countdown-no-target", params("countdown", max_target=-1), "task.params.max_number", "max_target not negative"),
    # the task's prompts and maxNewTokens must fit the context together
    Bad("countdown-prompt-and-60-tokens", {"rollout": {"sampling": {"maxNewTokens": 60}}}, "rollout.sampling.maxNewTokens", "exceed spec.model.maxLength (64)"),
    Bad("jsonl-prompt-too-long", lambda f: {**jsonl(lambda f: f.write("long.jsonl", ROWS.replace('"0+1="', '"' + "1+" * 30 + '1="')))(f), "rollout": {"sampling": {"maxNewTokens": 4}}}, "rollout.sampling.maxNewTokens", "the task's longest prompt (63 tokens"),
    # a model.path that is not a model
    Bad("model-path-missing", {"model": {"path": "/nonexistent/model"}}, "model.path", "does not exist"),
    Bad("model-path-a-file", lambda f: {"model": {"path": f.write("model.bin", b"\0" * 16)}}, "model.path", "is a file"),
    Bad("model-path-no-config", lambda f: {"model": {"path": f.folder("empty")}}, "model.path", "no config.json"),
    Bad("model-config-not-json", lambda f: {"model": {"path": f.model(lambda d: (d / "config.json").write_text("{model_type: llama"))}}, "model.path", "config.json is not JSON"),
    Bad("model-type-unknown", lambda f: {"model": {"path": f.model(config_with(model_type="bert"))}}, "model.path", "model_type 'bert' has no registered architecture"),
    Bad("model-no-tokenizer", lambda f: {"model": {"path": f.model(lambda d: (d / "tokenizer.json").unlink())}}, "model.path", "no tokenizer.json"),
    Bad("model-no-weights", lambda f: {"model": {"path": f.model(lambda d: [p.unlink() for p in d.glob("*.safetensors")])}}, "model.path", "holds no weights"),
    Bad("model-shorter-than-max-length", lambda f: {"model": {"path": f.model(), "maxLength": 256}}, "model.maxLength", "max_position_embeddings (128)"),
    Bad("model-prompt-and-60-tokens", lambda f: {"model": {"path": f.model()}, "rollout": {"sampling": {"maxNewTokens": 60}}}, "rollout.sampling.maxNewTokens", "the task's longest prompt"),
]
# fmt: on


def manifest_text(spec: dict) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "bad"},
            "spec": spec,
        }
    )


def refused_by_run(tmp_path: Path, text: str, capsys, monkeypatch) -> str:
    """`rollfleet run` on the manifest `text`: its error, after checking it started nothing."""

    class NeverStarted:
        def __init__(self, *args, **kwargs):
            raise AssertionError("rollfleet run started the job")

    monkeypatch.setattr("rollfleet.local.runtime.LocalRun", NeverStarted)
    path, run_dir = tmp_path / "job.yaml", tmp_path / "run"
    path.write_text(text)
    assert cli.main(["run", str(path), "--run-dir", str(run_dir), "--quiet"]) == 2
    assert not run_dir.exists()
    return capsys.readouterr().err


def assert_names(message: str, bad: Bad) -> None:
    assert bad.field in message, message
    assert bad.also in message, message


@pytest.mark.parametrize("bad", SPECS, ids=lambda b: b.id)
def test_run_refuses_a_bad_spec_before_starting(tmp_path, capsys, monkeypatch, bad):
    text = manifest_text(bad.spec)
    if bad.cluster == "yaml":
        assert ".nan" in text or ".inf" in text  # as a user writes them
    error = refused_by_run(tmp_path, text, capsys, monkeypatch)
    assert error.startswith(f"error: {tmp_path / 'job.yaml'} is not a valid RLJob")
    assert_names(error, bad)


@pytest.fixture
def files(tmp_path, tiny_model_dir) -> Files:
    (tmp_path / "files").mkdir()
    return Files(tmp_path / "files", tiny_model_dir)


@pytest.mark.parametrize("bad", RUN_INPUTS, ids=lambda b: b.id)
def test_run_refuses_bad_files_and_tasks_before_starting(tmp_path, capsys, monkeypatch, files, bad):
    spec = bad.spec(files) if callable(bad.spec) else bad.spec
    error = refused_by_run(tmp_path, manifest_text(spec), capsys, monkeypatch)
    assert error.startswith("error: spec."), error
    assert_names(error, bad)
    assert "Traceback" not in error and "TypeError" not in error


@pytest.mark.parametrize("bad", SPECS, ids=lambda b: b.id)
def test_the_operator_marks_a_bad_spec_invalid_naming_the_field(bad):
    with pytest.raises(ManifestError) as error:
        _parse("bad", NS, copy.deepcopy(bad.spec))
    status = job_status(Observation(generation=2, invalid=str(error.value)), None)
    failed = condition(status, "Failed")
    assert status["phase"] == "Failed"
    assert (failed["status"], failed["reason"], failed["observedGeneration"]) == (
        "True",
        "InvalidSpec",
        2,
    )
    assert_names(failed["message"], bad)


@pytest.fixture(scope="module")
def spec_schema() -> dict:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def schema_error_paths(spec_schema: dict, spec: dict) -> set[str]:
    validator = jsonschema.Draft202012Validator(to_json_schema(spec_schema))
    return {".".join(map(str, e.absolute_path)) for e in validator.iter_errors(spec)}


@pytest.mark.parametrize("bad", SPECS, ids=lambda b: b.id)
def test_the_cluster_refuses_a_bad_spec_where_it_can(spec_schema, bad):
    """What the API server does with the spec: kubectl cannot even write NaN as JSON; the
    CRD's schema and CEL rules refuse the rest, except a task's parameters (an open map),
    which the operator refuses (the test above)."""
    if bad.cluster == "yaml":
        with pytest.raises(ValueError, match="not JSON compliant"):
            json.dumps(bad.spec, allow_nan=False)
        return
    by_schema = schema_error_paths(spec_schema, bad.spec)
    by_cel = {f"{loc}{path}".lstrip(".") for loc, path in failing(spec_schema, bad.spec)}
    assert by_schema == ({bad.field} if bad.cluster == "schema" else set()), by_schema
    assert by_cel == ({bad.field} if bad.cluster == "cel" else set()), by_cel


async def test_a_running_operator_fails_each_bad_spec_naming_the_field(
    kmock, secure_nats, tmp_path, monkeypatch
):
    """Every SPECS row JSON can carry, applied at once to the real operator (kmock runs no
    schema or CEL checks, so the operator must refuse them itself)."""
    rows = [bad for bad in SPECS if bad.cluster != "yaml"]
    declare(kmock, knative=True)
    for i, bad in enumerate(rows):
        kmock.objects[RLJOBS, NS, f"bad-{i}"] = {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {
                "name": f"bad-{i}",
                "namespace": NS,
                "uid": f"uid-{i}",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": bad.spec,
        }
    async with operator(kmock, secure_nats, tmp_path, monkeypatch, OperatorConfig()):
        for i, bad in enumerate(rows):
            status = await wait_for(
                lambda i=i: (
                    status_of(kmock, f"bad-{i}").get("phase") == "Failed"
                    and status_of(kmock, f"bad-{i}")
                ),
                timeout=60.0,
                what=f"{bad.id} failed",
            )
            failed = condition(status, "Failed")
            assert failed["reason"] == "InvalidSpec", bad.id
            assert_names(failed["message"], bad)


# --- bus messages ------------------------------------------------------------------------


def trajectory(**changes) -> bytes:
    raw = make_trajectory().model_dump(mode="json")
    return msgpack.packb({**raw, **changes}, use_bin_type=True)


def announcement(change: Callable[[dict], Any]) -> bytes:
    raw = make_announcement(3).model_dump(mode="json")
    change(raw)
    return msgpack.packb(raw, use_bin_type=True)


def bucket(**changes) -> Callable[[dict], None]:
    return lambda raw: raw["buckets"][0].update(changes)


def tensor(**changes) -> Callable[[dict], None]:
    return lambda raw: raw["buckets"][0]["tensors"][0].update(changes)


def second_bucket(raw: dict, **changes) -> None:
    raw["buckets"].append(
        {**copy.deepcopy(raw["buckets"][0]), "name": "bucket-0001.safetensors", **changes}
    )


GOOD = make_trajectory()


@dataclass(frozen=True)
class BadMessage:
    id: str
    cls: type
    data: bytes
    field: str  # what the error must name


# fmt: off
MESSAGES = [
    # framing and version
    BadMessage("old-schema-version", Trajectory, trajectory(v=5), "v: schema version 5"),
    BadMessage("no-schema-version", Trajectory, msgpack.packb({k: v for k, v in GOOD.model_dump(mode="json").items() if k != "v"}), "v: schema version None"),
    BadMessage("version-as-text", Trajectory, trajectory(v="6"), "v: schema version '6'"),
    BadMessage("truncated", Trajectory, encode(GOOD)[:-7], "not msgpack"),
    BadMessage("empty", Trajectory, b"", "not msgpack"),
    BadMessage("oversized", Trajectory, trajectory(response_text="x" * MAX_MESSAGE_BYTES), f"more than the {MAX_MESSAGE_BYTES}"),
    BadMessage("nested-too-deep", Trajectory, b"\x91" * 5000 + b"\x00", "not msgpack: StackError"),
    BadMessage("a-list-not-a-map", Trajectory, msgpack.packb([1, 2, 3]), "expected a map, got list"),
    BadMessage("integer-keys", Trajectory, msgpack.packb({1: 2}), "not msgpack"),
    BadMessage("unknown-field", Trajectory, trajectory(pickle=b"cos\nsystem\n"), "pickle: Extra inputs are not permitted"),
    # non-finite numbers
    BadMessage("nan-logprob", Trajectory, trajectory(behaviour_logprobs=[-0.5, NAN, -0.1]), "behaviour_logprobs.1: Input should be a finite number"),
    BadMessage("inf-logprob", Trajectory, trajectory(behaviour_logprobs=[-INF, -1.0, -0.1]), "behaviour_logprobs.0: Input should be a finite number"),
    BadMessage("nan-reward", Trajectory, trajectory(reward=NAN), "reward: Input should be a finite number"),
    BadMessage("inf-reward", Trajectory, trajectory(reward=INF), "reward: Input should be a finite number"),
    BadMessage("inf-reward-part", Trajectory, trajectory(reward_parts={"countdown": -INF}), "reward_parts.countdown: Input should be a finite number"),
    BadMessage("nan-advantage-weight", Trajectory, trajectory(advantage_weights=[NAN, 1.0, 1.0]), "advantage_weights.0: Input should be a finite number"),
    BadMessage("nan-loss-mask", Trajectory, trajectory(loss_mask=[1.0, NAN, 1.0]), "loss_mask.1: Input should be a finite number"),
    BadMessage("nan-palette-latent", Trajectory, trajectory(conditioning={"palette": {"latents": [[0.1, NAN]]}}), "conditioning.palette.latents.0.1: Input should be a finite number"),
    BadMessage("inf-finished-at", Trajectory, trajectory(finished_at=INF), "finished_at: Input should be a finite number"),
    # arrays of unequal length
    BadMessage("short-logprobs", Trajectory, trajectory(behaviour_logprobs=[-0.5]), "behaviour_logprobs has 1 entries for 3 response tokens"),
    BadMessage("long-versions", Trajectory, trajectory(token_versions=[3, 3, 4, 4]), "token_versions has 4 entries for 3 response tokens"),
    BadMessage("short-loss-mask", Trajectory, trajectory(loss_mask=[]), "loss_mask has 0 entries for 3 response tokens"),
    BadMessage("short-advantage-weights", Trajectory, trajectory(advantage_weights=[1.0]), "advantage_weights has 1 entries for 3 response tokens"),
    BadMessage("segment-misaligned", Trajectory, trajectory(prompt_ids=[], response_ids=[], behaviour_logprobs=[], token_versions=[], loss_mask=[], segments=[{"agent": "planner", "prompt_ids": [1], "response_ids": [5, 6], "behaviour_logprobs": [-1.0], "token_versions": [0, 0], "loss_mask": [1.0, 1.0]}]), "segments.0: behaviour_logprobs has 1 entries for 2 response tokens"),
    # out of range
    BadMessage("sample-past-group", Trajectory, trajectory(sample_index=2, group_size=2), "sample_index 2 >= group_size 2"),
    BadMessage("negative-sample", Trajectory, trajectory(sample_index=-1), "sample_index: Input should be greater than or equal to 0"),
    BadMessage("token-as-text", Trajectory, trajectory(response_ids=[9, "rm -rf", 2]), "response_ids.1: Input should be a valid integer"),
    BadMessage("task-without-samples", RolloutTask, msgpack.packb({**RolloutTask(task_id="t", group_id="g", index=0, prompt="p", answer="a", samples=1, group_size=1, min_version=0).model_dump(mode="json"), "samples": 0}), "samples: Input should be greater than or equal to 1"),
    BadMessage("cancel-nothing", GroupsCancelled, msgpack.packb({"v": 6, "group_ids": []}), "group_ids: List should have at least 1 item"),
    # weight manifests whose sizes do not add up
    BadMessage("bucket-smaller-than-its-tensors", WeightVersion, announcement(bucket(num_bytes=40)), "buckets.0: num_bytes 40 does not fit its tensors: their shapes and dtypes take 68 bytes"),
    BadMessage("bucket-far-larger", WeightVersion, announcement(bucket(num_bytes=10**12)), "buckets.0: num_bytes 1000000000000 does not fit"),
    BadMessage("negative-dimension", WeightVersion, announcement(tensor(shape=[-5])), "buckets.0.tensors.0.shape.0: Input should be greater than or equal to 0"),
    BadMessage("huge-dimensions", WeightVersion, announcement(tensor(shape=[2**40, 2**40])), "num_bytes"),
    BadMessage("unknown-dtype", WeightVersion, announcement(tensor(dtype="F128")), "buckets.0.tensors.0.dtype: Input should be 'F64', 'F32'"),
    BadMessage("bucket-name-escapes", WeightVersion, announcement(bucket(name="../../../etc/passwd")), "buckets.0.name: String should match pattern"),
    BadMessage("checksum-not-hex", WeightVersion, announcement(bucket(sha256="not-a-digest")), "buckets.0.sha256: String should match pattern"),
    BadMessage("tensor-twice", WeightVersion, announcement(second_bucket), "tensor names listed twice: ['bias', 'layer.weight']"),
    BadMessage("bucket-twice", WeightVersion, announcement(lambda raw: second_bucket(raw, name="bucket-0000.safetensors", tensors=[])), "bucket names listed twice"),
]
# fmt: on


@pytest.mark.parametrize("bad", MESSAGES, ids=lambda b: b.id)
def test_decode_refuses_a_bad_message_naming_the_field(bad):
    with pytest.raises(ProtocolError) as error:
        decode(bad.cls, bad.data)
    assert bad.field in str(error.value)


async def last_dead_letters(bus, count: int) -> list[tuple[bytes, str]]:
    """(data, reason) of the job's last `count` dead letters, oldest first."""
    stream = bus.subjects.deadletter_stream
    last = (await bus.js.stream_info(stream)).state.last_seq
    messages = [await bus.js.get_msg(stream, seq) for seq in range(last - count + 1, last + 1)]
    return [(m.data, m.headers["Rollfleet-Reason"]) for m in messages]


async def test_bad_trajectories_are_dead_lettered_and_counted_while_good_ones_arrive(bus):
    rows = [b for b in MESSAGES if b.cls is Trajectory and b.id != "oversized"]
    subject = bus.subjects.trajectories_for(0)
    before = dead_letters("trajectories")
    # NATS itself refuses what is over its max_payload: it never reaches a consumer
    with pytest.raises(nats.errors.MaxPayloadError):
        await bus.js.publish(subject, next(b for b in MESSAGES if b.id == "oversized").data)
    await bus.js.publish(subject, encode(make_trajectory("first")))
    for bad in rows:
        await bus.js.publish(subject, bad.data)
    await bus.js.publish(subject, encode(make_trajectory("last")))

    consumer, delivered = await bus.trajectory_consumer(), []
    while len(delivered) < 2:
        got = await bus.fetch(consumer, Trajectory, 100, timeout=2)
        assert got, "the good trajectories never arrived"
        delivered += got
    assert [t.task_id for t, _ in delivered] == ["first", "last"]
    assert dead_letters("trajectories") == before + len(rows)
    letters = await last_dead_letters(bus, len(rows))
    for bad, (data, reason) in zip(rows, letters, strict=True):
        assert (data or b"") == bad.data and bad.field in reason, (bad.id, reason)


async def test_bad_weight_announcements_are_dead_lettered_while_a_good_one_arrives(bus):
    rows = [b for b in MESSAGES if b.cls is WeightVersion]
    before = dead_letters("weights")
    arrived: list[WeightVersion] = []

    async def on_weights(version: WeightVersion) -> None:
        arrived.append(version)

    await bus.on_weights(on_weights)
    for bad in rows:
        await bus.nc.publish(bus.subjects.weights, bad.data)
    await bus.nc.publish(bus.subjects.weights, encode(make_announcement(4)))
    for _ in range(100):
        if arrived:
            break
        await asyncio.sleep(0.05)
    assert [v.version for v in arrived] == [4]
    assert dead_letters("weights") == before + len(rows)
    letters = await last_dead_letters(bus, len(rows))
    assert [reason.split(":")[0] for _, reason in letters] == ["invalid WeightVersion"] * len(rows)


# --- weight manifests that decode but lie about the stored bytes -------------------------


def lying(bucket: dict | None = None, tensor: dict | None = None):
    """The manifest with its bucket's fields, or those of its tensor layer.weight, changed."""

    def change(version: WeightVersion) -> WeightVersion:
        raw = version.model_dump()
        raw["buckets"][0].update(bucket or {})
        raw["buckets"][0]["tensors"][1].update(tensor or {})
        return WeightVersion.model_validate(raw)  # a manifest that decodes

    return change


SIZE = len(weights_bytes(3))  # the stored bucket's bytes
# fmt: off
WEIGHT_LIES = [
    ("one-byte-more", lying({"num_bytes": SIZE + 1}), f"{SIZE} bytes, manifest says {SIZE + 1}"),
    ("other-checksum", lying({"sha256": hashlib.sha256(b"other").hexdigest()}), "checksum mismatch"),
    ("transposed-shape", lying(tensor={"shape": [3, 4]}), "in the bytes only: ['layer.weight F32 [4, 3]']; in the manifest only: ['layer.weight F32 [3, 4]']"),
    ("integer-dtype", lying(tensor={"dtype": "I32"}), "in the manifest only: ['layer.weight I32 [4, 3]']"),
    ("renamed-tensor", lying(tensor={"name": "lm_head.weight"}), "in the manifest only: ['lm_head.weight F32 [4, 3]']"),
]
# fmt: on


@pytest.mark.parametrize(
    ("change", "message"), [pytest.param(*row[1:], id=row[0]) for row in WEIGHT_LIES]
)
async def test_a_worker_rejects_weights_that_differ_from_their_manifest(tmp_path, change, message):
    store = FilesystemWeightStore(tmp_path)
    honest = make_announcement(3).model_copy(update={"transport": "filesystem"})
    await store.put(3, honest.buckets[0].name, weights_bytes(3))
    assert set(await fetch_version(store, honest)) == {"bias", "layer.weight"}
    with pytest.raises(WeightsRejected) as error:
        await fetch_version(store, change(honest))
    assert f"weights v3 {honest.buckets[0].name}" in str(error.value)
    assert message in str(error.value)
