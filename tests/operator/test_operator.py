"""The real kopf operator against the kmock Kubernetes API emulator and a real nats-server.

Each test starts the operator (kopf.operator in this event loop, logged in through a
kubeconfig pointing at the emulator), applies RLJobs as a user would, and checks the
objects the emulator holds. The emulator merges patches as plain dicts and has no garbage
collector, so deleting an RLJob here shows the finalizer, not the children's removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import kmock
import kopf
import pytest
import yaml

os.environ.setdefault("ROLLFLEET_OPERATOR_STATUS_INTERVAL", "1")

import rollfleet_operator.handlers  # noqa: F401  (registers the handlers with kopf)
from rollfleet_operator.config import NatsConfig, OperatorConfig
from tests.conftest import NATS_TOKEN

EXAMPLES = sorted(Path("examples").glob("*.yaml"))
NS = "team-a"
RLJOBS = kmock.resource("rollfleet.io", "v1alpha1", "rljobs")
BUILTIN = {
    "v1/namespaces": ("Namespace", False),
    "v1/events": ("Event", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/secrets": ("Secret", True),
    "v1/services": ("Service", True),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True),
    "v1/pods": ("Pod", True),
    "apps/v1/deployments": ("Deployment", True),
    "apps/v1/statefulsets": ("StatefulSet", True),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True),
    "ray.io/v1/rayjobs": ("RayJob", True),
}
KNATIVE = {"serving.knative.dev/v1/services": ("Service", True)}


def declare(emulator, knative: bool) -> None:
    resources = {**BUILTIN, **(KNATIVE if knative else {})}
    for key, (kind, namespaced) in resources.items():
        emulator.resources[key] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs={"get", "list", "watch", "create", "patch"}
        )
    emulator.resources["rollfleet.io/v1alpha1/rljobs"] = kmock.ResourceInfo(
        kind="RLJob",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "patch"},
    )


@contextlib.asynccontextmanager
async def operator(emulator, nats_server, tmp_path, monkeypatch, config: OperatorConfig):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "kmock", "cluster": {"server": str(emulator.url).rstrip("/")}}
                ],
                "users": [{"name": "test", "user": {"token": "kmock"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                "current-context": "kmock",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    config = config.model_copy(update={"nats": NatsConfig(url=nats_server.url)})
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 2
    settings.watching.client_timeout = 3
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=kopf.get_default_registry(),
            settings=settings,
            standalone=True,
            clusterwide=True,
            memo=kopf.Memo(config=config, nats_token=NATS_TOKEN),
            stop_flag=stop,
        )
    )
    try:
        yield
    finally:
        stop.set()
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:  # handlers still talking to NATS: cut them short, as a pod's SIGKILL would
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def manifest(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["metadata"]["namespace"] = NS
    data["metadata"].setdefault("generation", 1)
    data["metadata"].setdefault("resourceVersion", "1")
    data["metadata"].setdefault("uid", f"uid-{data['metadata']['name']}")
    return data


async def wait_for(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def children(emulator, job: str) -> dict[tuple[str, str], dict]:
    """(kind, name) -> object for every live object labelled with the job."""
    found = {}
    for (_resource, _ns, name), obj in emulator.objects.items():
        if obj.deleted:
            continue
        raw = obj.raw
        if raw.get("metadata", {}).get("labels", {}).get("rollfleet.io/job") == job:
            kind = (
                raw["kind"] if raw["apiVersion"] != "serving.knative.dev/v1" else "KnativeService"
            )
            found[(kind, name)] = raw
    return found


def rljob(emulator, name: str) -> dict:
    obj = emulator.objects[RLJOBS, NS, name]
    return obj.raw


def child_writes(emulator) -> list:
    """Requests that created or changed anything but the RLJob itself."""
    return [
        r
        for r in list(emulator)
        if r.method.value in ("POST", "PATCH", "PUT")
        and "rljobs" not in r.url.path
        and "/events" not in r.url.path
    ]


def reconciled(emulator, name: str) -> bool:
    """kopf records the spec it handled once every handler of the change succeeded."""
    annotations = rljob(emulator, name)["metadata"].get("annotations", {})
    handled = "rollfleet.io/last-handled-configuration" in annotations
    return handled and "phase" in status_of(emulator, name)  # status goes in its own PATCH


def status_of(emulator, name: str) -> dict:
    return rljob(emulator, name).get("status", {})


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


@pytest.fixture
def gpu_config() -> OperatorConfig:
    return OperatorConfig.model_validate(
        {
            "gpuClasses": {
                "H800": {"nodeSelector": {"rollfleet.io/node-profile": "compute-optimised"}},
                "H20": {
                    "nodeSelector": {"rollfleet.io/node-profile": "bandwidth-optimised"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                },
            }
        }
    )


@pytest.mark.parametrize("knative", [True, False], ids=["knative", "no-knative"])
async def test_every_example_yields_its_children(
    kmock, nats_server, tmp_path, monkeypatch, gpu_config, knative
):
    declare(kmock, knative)
    for path in EXAMPLES:
        kmock.objects[RLJOBS, NS, yaml.safe_load(path.read_text())["metadata"]["name"]] = manifest(
            path
        )
    async with operator(kmock, nats_server, tmp_path, monkeypatch, gpu_config):
        for path in EXAMPLES:
            data = manifest(path)
            name, spec = data["metadata"]["name"], data["spec"]
            await wait_for(
                lambda name=name: reconciled(kmock, name), what=f"{path.name} reconciled"
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
