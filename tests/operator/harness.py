"""Shared set-up for the operator tests: the kmock API emulator with the kinds the operator
uses, the real kopf operator running in the test's event loop, and small helpers to act as a
user (apply, edit, delete) and to read what the emulator holds.

The emulator merges patches as plain dicts and has no garbage collector, so deleting an
RLJob shows the finalizer, not the children's removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import time
import uuid
from pathlib import Path

import aiohttp
import kmock
import kopf
import yaml
from nats.aio.client import RawCredentials

os.environ.setdefault("ROLLFLEET_OPERATOR_STATUS_INTERVAL", "1")

import rollfleet_operator.handlers  # noqa: F401  (registers the handlers with kopf)
from rollfleet.bus import Bus
from rollfleet_operator.config import NatsConfig, OperatorConfig


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata a real API server sets on create, which kopf
    needs (resourceVersion for its patches): uid, resourceVersion, generation, timestamp.
    Use it with `pytestmark = pytest.mark.kmock(cls=ApiServer)`."""

    async def _handle(self, request):
        if (
            request.resource is not None
            and request.action == kmock.action.CREATE
            and isinstance(request.data, dict)
        ):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("generation", 1)
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta.setdefault("creationTimestamp", now)
        return await super()._handle(request)


def _filter_contains(self, item):
    """`request in filter` without replaying every request served so far: kmock 0.8 answers
    it by iterating the whole request log through the filter (View.__contains__), once per
    reaction for every request, so a test's CPU grew with the square of its requests (55 s
    of CPU for the 16 examples). A request is in a filter when it is in the filter's source
    and meets its criteria, which is what the iteration computes."""
    if isinstance(item, kmock.Request):
        return bool(self.criteria(item)) and item in self._source
    return kmock.View.__contains__(self, item)


kmock.Filter.__contains__ = _filter_contains


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
        singular="rljob",
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
            memo=kopf.Memo(config=config, nats_signer=nats_server.keys.signer()),
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
        await _end_leftover_tasks()


async def job_bus(nats_server, job: str) -> Bus:
    """The bus of `job` (its bus name), as a user of that job minted with the server's keys."""
    creds = nats_server.keys.signer().job_creds(job, name="test")
    return await Bus.connect(nats_server.url, job, credentials=RawCredentials(creds))


def _kopf_tasks() -> set[asyncio.Task]:
    return {
        t
        for t in asyncio.all_tasks()
        if "/kopf/" in getattr(t.get_coro(), "cr_code", _NO_CODE).co_filename
    }


_NO_CODE = (lambda: None).__code__


async def _end_leftover_tasks(timeout: float = 45.0) -> None:
    """kopf takes a cancelled handler for a failed one and its worker carries on, so a
    handler blocked on an emulator request can outlive the operator task (seen under load).
    Cancel what kopf left until it ends, while the emulator and NATS still serve; the test
    fails naming the tasks instead of hanging the event loop's close (and CI)."""
    deadline = time.monotonic() + timeout
    while leftovers := _kopf_tasks():
        if time.monotonic() > deadline:
            names = sorted(t.get_name() for t in leftovers)
            raise AssertionError(f"kopf tasks still running {timeout:.0f} s after stop: {names}")
        for t in leftovers:
            t.cancel()
        await asyncio.wait(leftovers, timeout=1.0)


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


async def api(emulator, method: str, path: str, body: dict | None = None) -> int:
    """A user's request to the emulated API server (as kubectl would send it)."""
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"{str(emulator.url).rstrip('/')}{path}", json=body, headers=headers
        ) as response,
    ):
        return response.status


JOB_PATH = f"/apis/rollfleet.io/v1alpha1/namespaces/{NS}/rljobs"


async def edit_spec(emulator, name: str, spec: dict) -> None:
    generation = rljob(emulator, name)["metadata"]["generation"] + 1
    status = await api(
        emulator,
        "PATCH",
        f"{JOB_PATH}/{name}",
        {"metadata": {"generation": generation}, "spec": spec},
    )
    assert status == 200


def replicas(emulator, kind: str, name: str) -> int:
    return children(emulator, "countdown")[kind, name]["spec"]["replicas"]


async def started(emulator, path: str = "examples/countdown.yaml") -> str:
    data = manifest(Path(path))
    emulator.objects[RLJOBS, NS, data["metadata"]["name"]] = data
    return data["metadata"]["name"]
