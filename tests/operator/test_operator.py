"""The real kopf operator against the kmock Kubernetes API emulator and a real nats-server.

Each test starts the operator (kopf.operator in this event loop, logged in through a
kubeconfig pointing at the emulator), applies RLJobs as a user would, and checks the
objects the emulator holds (set-up in harness.py).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import nats.js.errors
import pytest
import yaml

from rollfleet.protocol import Progress
from tests.operator.harness import (
    EXAMPLES,
    JOB_PATH,
    NS,
    RLJOBS,
    api,
    child_writes,
    children,
    condition,
    declare,
    edit_spec,
    job_bus,
    manifest,
    operator,
    reconciled,
    replicas,
    rljob,
    started,
    status_of,
    wait_for,
)


# Every example through the operator with Knative; without it only the reward's children
# differ (a Deployment and a Service), which two examples show.
@pytest.mark.parametrize(
    ("knative", "examples"),
    [(True, EXAMPLES), (False, [p for p in EXAMPLES if p.name in ("countdown.yaml", "bard.yaml")])],
    ids=["knative", "no-knative"],
)
async def test_every_example_yields_its_children(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config, knative, examples
):
    declare(kmock, knative)
    for path in examples:
        kmock.objects[RLJOBS, NS, yaml.safe_load(path.read_text())["metadata"]["name"]] = manifest(
            path
        )
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        for path in examples:
            data = manifest(path)
            name, spec = data["metadata"]["name"], data["spec"]
            # Every example reconciles at once; under load a kmock GET can stall until the
            # client's 30 s timeout before kopf retries, so wait past that.
            await wait_for(
                lambda name=name: reconciled(kmock, name),
                timeout=60.0,
                what=f"{path.name} reconciled",
            )
            status, found = status_of(kmock, name), children(kmock, name)
            kinds = sorted(kind for kind, _ in found)
            workers = spec.get("trainer", {}).get("workers", 1)
            pools = spec.get("rollout", {}).get("pools", [{"name": "default"}])
            expected = ["ConfigMap", "NetworkPolicy", "Secret", "Service", "StatefulSet"]
            expected += ["Deployment"] * len(pools)
            expected += (
                ["PersistentVolumeClaim", "RayJob"] if workers > 1 else ["Service", "StatefulSet"]
            )
            expected += ["KnativeService"] if knative else ["Deployment", "Service"]
            hugging_face = spec.get("model", {}).get("huggingface", {})
            if hugging_face and not hugging_face.get("cacheClaim"):
                expected.append("PersistentVolumeClaim")  # the model cache the job gets
            assert kinds == sorted(expected), path.name
            for obj in found.values():
                refs = obj["metadata"]["ownerReferences"]
                assert (
                    refs[0]["kind"] == "RLJob" and refs[0]["name"] == name and refs[0]["controller"]
                )
                assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == name
            assert status["phase"] == "Pending"
            assert condition(status, "Progressing")["status"] == "True"
            assert condition(status, "Failed")["status"] == "False"


async def test_reconciling_again_changes_nothing(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config
):
    declare(kmock, knative=True)
    kmock.objects[RLJOBS, NS, "countdown"] = manifest(Path("examples/countdown.yaml"))
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        await wait_for(lambda: len(children(kmock, "countdown")) == 9, what="children")
    before = len(child_writes(kmock))
    assert before, "the first run created the children"
    snapshot = children(kmock, "countdown")
    seen = len(list(kmock))
    # A restarted operator resumes the job: nothing to create or patch.
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        await wait_for(
            lambda: any(
                "rljobs" in r.url.path and r.method.value == "PATCH" for r in list(kmock)[seen:]
            ),
            what="the resumed reconciliation",
        )
        await asyncio.sleep(1.0)
    assert len(child_writes(kmock)) == before
    assert children(kmock, "countdown") == snapshot


async def test_replica_edits_patch_and_other_changes_are_refused(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config
):
    declare(kmock, knative=False)
    name = await started(kmock)
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        await wait_for(lambda: reconciled(kmock, name), what="reconciled")
        assert replicas(kmock, "Deployment", "countdown-rollout-default") == 2
        # the example's pool with only its replicas changed
        (pool,) = manifest(Path("examples/countdown.yaml"))["spec"]["rollout"]["pools"]
        pools = [{**pool, "replicas": 5}]
        await edit_spec(kmock, name, {"rollout": {"pools": pools}, "reward": {"replicas": 3}})
        await wait_for(
            lambda: replicas(kmock, "Deployment", "countdown-rollout-default") == 5,
            what="the pool's Deployment patched",
        )
        await wait_for(
            lambda: replicas(kmock, "Deployment", "countdown-reward") == 3, what="reward"
        )
        # A new model cannot replace the one being trained: refused, children untouched.
        before = children(kmock, name)
        await edit_spec(kmock, name, {"model": {"hidden": 256}})
        progressing = await wait_for(
            lambda: (
                (c := condition(status_of(kmock, name), "Progressing"))["reason"]
                == "SpecChangeRefused"
                and c
            ),
            what="the refusal",
        )
        assert "spec.model" in progressing["message"] and progressing["status"] == "False"
        assert progressing["observedGeneration"] == 3
        assert children(kmock, name) == before


async def test_suspend_scales_to_zero_and_back(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config
):
    declare(kmock, knative=False)
    name = await started(kmock)
    workloads = [
        ("Deployment", "countdown-rollout-default", 2),
        ("Deployment", "countdown-reward", 1),
        ("StatefulSet", "countdown-env", 1),
        ("StatefulSet", "countdown-trainer", 1),
    ]
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        await wait_for(lambda: reconciled(kmock, name), what="reconciled")
        await edit_spec(kmock, name, {"suspend": True})
        await wait_for(
            lambda: all(replicas(kmock, k, n) == 0 for k, n, _ in workloads), what="zero"
        )
        await wait_for(lambda: status_of(kmock, name).get("phase") == "Suspended", what="phase")
        await edit_spec(kmock, name, {"suspend": False})
        await wait_for(
            lambda: all(replicas(kmock, k, n) == r for k, n, r in workloads), what="back"
        )
        await wait_for(lambda: status_of(kmock, name).get("phase") == "Pending", what="phase")


async def test_delete_runs_the_finalizer(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
    declare(kmock, knative=True)
    name = await started(kmock)
    bus = await job_bus(nats_server, f"{NS}.{name}")
    try:
        async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
            await wait_for(lambda: reconciled(kmock, name), what="reconciled")
            assert "rollfleet.io/finalizer" in rljob(kmock, name)["metadata"]["finalizers"]
            await bus.js.stream_info(bus.subjects.task_stream)  # created on start
            assert await api(kmock, "DELETE", f"{JOB_PATH}/{name}") == 200
            await wait_for(lambda: kmock.objects[RLJOBS, NS, name].deleted, what="deletion")
        await bus.close()
        bus = await job_bus(nats_server, f"{NS}.{name}")
        for stream in (bus.subjects.task_stream, bus.subjects.trajectory_stream):
            with pytest.raises(nats.js.errors.NotFoundError):
                await bus.js.stream_info(stream)
    finally:
        await bus.close()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"trainer": {"workers": 3, "promptsPerStep": 32}}, "trainer"),
        (
            {"rollout": {"pools": [{"name": "a", "gpuClass": "B200"}]}},
            r"spec.rollout.pools\[0\].gpuClass",
        ),
        ({"algorithm": {"policyLoss": "nope"}}, "spec.algorithm.policyLoss"),
    ],
    ids=["workers-divide-batch", "unknown-gpu-class", "unknown-loss"],
)
async def test_an_invalid_spec_fails_naming_the_field(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config, spec, field
):
    declare(kmock, knative=True)
    data = manifest(Path("examples/countdown.yaml"))
    data["metadata"]["name"] = "bad"
    data["spec"] = spec
    kmock.objects[RLJOBS, NS, "bad"] = data
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        status = await wait_for(
            lambda: status_of(kmock, "bad").get("phase") == "Failed" and status_of(kmock, "bad"),
            what="Failed",
        )
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert re.search(field, failed["message"]), failed["message"]
    assert not children(kmock, "bad")


async def test_progress_and_failing_children_show_in_status(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config
):
    declare(kmock, knative=True)
    name = await started(kmock, "examples/countdown-2-trainers.yaml")
    bus = await job_bus(nats_server, f"{NS}.{name}")
    try:
        async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
            await wait_for(lambda: reconciled(kmock, name), what="reconciled")
            progress = Progress(
                phase="Running",
                step=42,
                total_steps=500,
                policy_version=42,
                mean_reward=0.25,
                samples_per_second=450.0,
                staleness=1.0,
            )
            await bus.put_progress(progress)
            status = await wait_for(
                lambda: status_of(kmock, name).get("step") == 42 and status_of(kmock, name),
                what="progress in status",
            )
            assert status["phase"] == "Running" and status["policyVersion"] == 42
            assert status["meanReward"] == 0.25 and status["samplesPerSecond"] == 450.0
            assert condition(status, "Ready")["status"] == "True"

            # A rollout pod that keeps crashing: Degraded, naming the pool and the pod.
            kmock.objects[kmock.resource("v1", "pods"), NS, "crashy"] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "crashy",
                    "namespace": NS,
                    "labels": {
                        "rollfleet.io/job": name,
                        "app.kubernetes.io/component": "rollout",
                        "rollfleet.io/pool": "default",
                    },
                },
                "status": {
                    "containerStatuses": [
                        {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "restartCount": 7}
                    ]
                },
            }
            degraded = await wait_for(
                lambda: (
                    (c := condition(status_of(kmock, name), "Degraded"))["status"] == "True" and c
                ),
                what="Degraded",
            )
            assert "rollout default: pod crashy is in CrashLoopBackOff" in degraded["message"]
            assert condition(status_of(kmock, name), "Ready")["status"] == "False"

            # The RayJob fails: the job has Failed, naming it.
            rayjob_path = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/{name}-trainer"
            assert (
                await api(
                    kmock,
                    "PATCH",
                    rayjob_path,
                    {"status": {"jobStatus": "FAILED", "message": "rank 1 died"}},
                )
                == 200
            )
            status = await wait_for(
                lambda: status_of(kmock, name).get("phase") == "Failed" and status_of(kmock, name),
                what="Failed",
            )
            failed = condition(status, "Failed")
            assert failed["reason"] == "ChildFailed"
            assert f"RayJob {name}-trainer failed: rank 1 died" in failed["message"]
    finally:
        await bus.close()


async def test_a_finished_job_completes_and_frees_its_pods(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config
):
    declare(kmock, knative=False)
    name = await started(kmock)
    bus = await job_bus(nats_server, f"{NS}.{name}")
    try:
        async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
            await wait_for(lambda: reconciled(kmock, name), what="reconciled")
            assert replicas(kmock, "StatefulSet", "countdown-trainer") == 1
            done = Progress(phase="Succeeded", step=500, total_steps=500, heldout_after=0.33)
            await bus.put_progress(done)
            status = await wait_for(
                lambda: (
                    status_of(kmock, name).get("phase") == "Succeeded" and status_of(kmock, name)
                ),
                what="Succeeded",
            )
            assert condition(status, "Complete")["status"] == "True"
            assert condition(status, "Progressing")["status"] == "False"
            assert status["heldoutAccuracy"] == 0.33
            await wait_for(
                lambda: all(
                    c["spec"]["replicas"] == 0
                    for (kind, _), c in children(kmock, name).items()
                    if kind in ("Deployment", "StatefulSet")
                ),
                what="every workload at zero",
            )
    finally:
        await bus.close()
