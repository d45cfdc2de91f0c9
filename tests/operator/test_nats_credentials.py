"""Each job's NATS credentials in a cluster: the per-job Secret, the pods that mount it,
and the real operator minting users that reach their own job only.

Rendering: the job's Secret carries its NATS creds; trainer and rollout pods (RayJob
head and workers included) mount them read-only and get their path, never their content;
reward and env pods get none; no JWT or seed appears anywhere but in the Secret. The
operator (kopf against kmock, a real nats-server in operator mode): the creds it writes
for a job open that job's streams and nothing of another job's.

    .venv/bin/pytest -q tests/operator/test_nats_credentials.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import nats.errors
import pytest
from nats.aio.client import RawCredentials

from rollfleet.bus import Bus
from rollfleet.nats_auth import BUS_ROLES, NatsKeys, read_creds
from rollfleet.protocol import Subjects
from rollfleet.spec import load_manifest
from rollfleet_operator.config import OperatorConfig
from rollfleet_operator.render import job_secret, names, render
from tests.operator.harness import (
    NS,
    RLJOBS,
    children,
    declare,
    manifest,
    operator,
    reconciled,
    rljob,
    wait_for,
)

EXAMPLES = sorted(Path("examples").glob("*.yaml"))
CONFIG = OperatorConfig.model_validate({"gpuClasses": {"H800": {}, "H20": {}}})
CREDS_PATH = "/etc/rollfleet-nats/nats.creds"
# What no object but the Secret may hold: a JWT, or an nkey seed (S + kind + base32).
SECRET_MATERIAL = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+|\bS[OAU][A-Z2-7]{50,}")


def pods(child: dict) -> list[dict]:
    spec = child.get("spec", {})
    if child["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [g["template"] for g in groups]
    return [spec["template"]] if "template" in spec else []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("knative", [True, False], ids=["knative", "no-knative"])
def test_bus_pods_mount_the_job_creds_and_the_others_get_none(path, knative):
    job = load_manifest(path)
    tokens = names(job.metadata.name)["tokens"]
    roles_seen = set()
    for child in render(job, "team-a", CONFIG, knative=knative):
        for template in pods(child):
            role = template["metadata"]["labels"]["app.kubernetes.io/component"]
            roles_seen.add(role)
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container["env"]}
                mounts = {m["name"]: m for m in container["volumeMounts"]}
                if role not in BUS_ROLES:
                    assert "ROLLFLEET_NATS_CREDS" not in env and "nats-creds" not in mounts
                    assert "nats-creds" not in volumes
                    continue
                assert env["ROLLFLEET_NATS_CREDS"] == {
                    "name": "ROLLFLEET_NATS_CREDS",
                    "value": CREDS_PATH,
                }
                assert mounts["nats-creds"] == {
                    "name": "nats-creds",
                    "mountPath": str(Path(CREDS_PATH).parent),
                    "readOnly": True,
                }
                assert volumes["nats-creds"]["secret"] == {
                    "secretName": tokens,
                    "items": [{"key": "nats-creds", "path": Path(CREDS_PATH).name}],
                    "defaultMode": 0o440,  # owner root, group the pod's fsGroup
                }
    assert {"trainer", "rollout"} <= roles_seen


def test_the_job_secret_holds_a_user_of_that_job_and_validates():
    keys = NatsKeys.create()
    job = load_manifest("examples/countdown.yaml")
    bus_name = f"team-a.{job.metadata.name}"
    creds = keys.signer().job_creds(bus_name, name=f"job {bus_name}")
    secret = job_secret(job.metadata.name, "team-a", creds)
    for version in ("1.30", "1.37"):
        kubernetes_validate.validate(secret, version, strict=True)
    assert secret["metadata"]["name"] == names(job.metadata.name)["tokens"]
    claims = read_creds(RawCredentials(secret["stringData"]["nats-creds"]))
    assert claims["nats"]["sub"]["allow"][0] == f"{Subjects(bus_name).root}.>"
    assert claims["nats"]["issuer_account"] == keys.signer().account


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_no_secret_material_outside_the_secret(path):
    job = load_manifest(path)
    for child in render(job, "team-a", CONFIG, knative=True):
        text = json.dumps(child)
        assert not SECRET_MATERIAL.search(text), f"{child['kind']} {child['metadata']['name']}"
        for template in pods(child):
            for container in template["spec"]["containers"]:
                for entry in container["env"]:  # secrets come by reference, never as values
                    assert "secretKeyRef" in entry.get("valueFrom", {}) or "value" in entry
                    assert "BEGIN NATS" not in entry.get("value", "")


async def test_the_operator_gives_each_job_a_user_of_its_own(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config, caplog
):
    declare(kmock, knative=True)
    first = manifest(Path("examples/countdown.yaml"))
    second = manifest(Path("examples/countdown.yaml"))
    second["metadata"].update(name="other", uid="uid-other")
    for job in (first, second):
        kmock.objects[RLJOBS, NS, job["metadata"]["name"]] = job
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        for name in ("countdown", "other"):
            await wait_for(lambda name=name: reconciled(kmock, name), what=f"{name} reconciled")
    found = children(kmock, "countdown")
    creds = found["Secret", names("countdown")["tokens"]]["stringData"]["nats-creds"]
    assert read_creds(RawCredentials(creds))["name"] == f"job {NS}.countdown"

    # Its own job's streams, which the operator made: open to it.
    mine, theirs = Subjects(f"{NS}.countdown"), Subjects(f"{NS}.other")
    bus = await Bus.connect(nats_server.url, mine.job, credentials=RawCredentials(creds))
    try:
        assert (await bus.js.stream_info(mine.task_stream)).config.name == mine.task_stream
        js = bus.nc.jetstream(timeout=0.5)
        with pytest.raises(nats.errors.TimeoutError):  # the server drops it...
            await js.stream_info(theirs.task_stream)
        wanted = f'publish to "$js.api.stream.info.{theirs.task_stream.lower()}"'
        await wait_for(  # ...and says why
            lambda: any(wanted in r.getMessage().lower() for r in caplog.records),
            timeout=5,
            what="the permissions violation",
        )
    finally:
        await bus.close()

    # Nothing but the Secret holds the creds: not the status, ConfigMap, labels or logs.
    for (kind, name), obj in found.items():
        if kind != "Secret":
            assert not SECRET_MATERIAL.search(json.dumps(obj)), f"{kind} {name}"
    assert not SECRET_MATERIAL.search(json.dumps(rljob(kmock, "countdown")))
    assert not any(SECRET_MATERIAL.search(r.getMessage()) for r in caplog.records)
