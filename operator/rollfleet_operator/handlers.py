"""kopf handlers: reconcile RLJobs into their children and report status.

- create / update / resume -> `reconcile`: validate, refuse changes that cannot apply in
  place, create the job's JetStream streams, create or patch every child (owner
  references through `kopf.adopt`), write status. Running it twice changes nothing: a
  child is patched only when it differs from what the job renders.
- a timer -> `refresh`: the trainer's progress from NATS and the children's health into
  status; a finished job has its pods scaled to zero (checkpoints stay on the PVC).
- delete -> `finalize`: remove the job's streams and buckets. Kubernetes' garbage
  collector removes the children through their owner references.

Each job gets a NATS user of its own (rollfleet.nats_auth), minted with the rollfleet
account's signing key, which the operator reads from $ROLLFLEET_NATS_SIGNER_DIR (the
chart mounts the Secret `rollfleet nats-keys` made there); its creds go into the job's
Secret. The operator's own NATS calls for a job use a short-lived user of that job.

Run it with `python -m rollfleet_operator` (see __main__.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any

import kopf
import yaml
from nats.aio.client import RawCredentials

from rollfleet.bus import Bus
from rollfleet.crd import GROUP, PLURAL, VERSION
from rollfleet.nats_auth import JobSigner
from rollfleet.protocol import Progress
from rollfleet.spec import API_VERSION, KIND, ManifestError, RLJob, bus_name, parse_manifest
from rollfleet_operator import render as rendering
from rollfleet_operator.config import OperatorConfig, load_config
from rollfleet_operator.kube import Kube
from rollfleet_operator.status import Observation, child_problems, job_status, pod_problem

RESOURCE = (GROUP, VERSION, PLURAL)
FINALIZER = "rollfleet.io/finalizer"
STATUS_INTERVAL_S = float(os.environ.get("ROLLFLEET_OPERATOR_STATUS_INTERVAL", "10"))
NATS_TIMEOUT_S = 10.0
SIGNER_DIR_ENV = "ROLLFLEET_NATS_SIGNER_DIR"
DEFAULT_SIGNER_DIR = "/etc/rollfleet-nats-signer"
OPERATOR_USER_TTL_S = 600.0  # the operator's own users: one per connection, short-lived


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.persistence.finalizer = FINALIZER
    # Handler progress in annotations: the RLJob status schema holds only our own fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    memo.settings = settings  # the handlers log in with it (kube.Kube.connect)
    if "config" not in memo:
        memo.config = load_config()
    if "nats_signer" not in memo:
        memo.nats_signer = JobSigner.load(os.environ.get(SIGNER_DIR_ENV, DEFAULT_SIGNER_DIR))


@kopf.on.login()
def login(**kwargs) -> kopf.ConnectionInfo | None:
    """kopf's own credential readers (no client library needed): pod, else kubeconfig."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


# --- helpers ------------------------------------------------------------------------------
def _parse(name: str, namespace: str, spec: dict[str, Any]) -> RLJob:
    return parse_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        },
        source=f"RLJob {namespace}/{name}",
    )


def _contains(actual: Any, wanted: Any) -> bool:
    """Does the object in the cluster already hold every field we render?"""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            _contains(actual.get(k), v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(_contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    return actual == wanted


async def _apply(kube: Kube, child: dict[str, Any], logger) -> None:
    current = await kube.get(child)
    if current is None:
        await kube.create(child)
        logger.info("created %s %s", child["kind"], child["metadata"]["name"])
    elif child["kind"] != "Secret" and not _contains(current, child):
        # Secrets are created once: the token must stay what the pods already use.
        await kube.merge_patch(child, child)
        logger.info("patched %s %s", child["kind"], child["metadata"]["name"])


IN_PLACE = "pool replicas, reward.replicas, env.replicas and suspend"


def _refused_change(applied: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why `wanted` cannot replace the running `applied` spec in place, or None."""
    comparable = copy.deepcopy(applied)
    pools, wanted_pools = comparable["rollout"]["pools"], wanted["rollout"]["pools"]
    if [p["name"] for p in pools] == [p["name"] for p in wanted_pools]:
        for pool, new in zip(pools, wanted_pools, strict=True):
            pool["replicas"] = new["replicas"]
    for section in ("reward", "env"):
        comparable[section]["replicas"] = wanted[section]["replicas"]
    comparable["suspend"] = wanted["suspend"]
    changed = sorted(k for k in set(comparable) | set(wanted) if comparable.get(k) != wanted.get(k))
    if not changed:
        return None
    fields = ", ".join(f"spec.{k}" for k in changed)
    return (
        f"{fields} changed, which a running job cannot take in place (only {IN_PLACE} can); "
        "the job keeps its previous spec: revert the change, or delete and re-create the RLJob"
    )


async def _use_knative(kube: Kube, config: OperatorConfig) -> bool:
    if config.reward.knative == "auto":
        return await kube.served("serving.knative.dev/v1", "services")
    return config.reward.knative == "always"


@contextlib.asynccontextmanager
async def _bus(memo: kopf.Memo, job: str):
    """A connection to the job's streams, as a user that may set them up and remove them
    (the job's own may not); `job` is its bus name (RLJob.bus_name)."""
    creds = memo.nats_signer.job_creds(
        job, name="rollfleet-operator", ttl_s=OPERATOR_USER_TTL_S, manage_streams=True
    )
    bus = await Bus.connect(
        memo.config.nats.url, job, name="rollfleet-operator", credentials=RawCredentials(creds)
    )
    try:
        yield bus
    finally:
        await bus.close()


async def _observe(
    kube: Kube, rljob: RLJob, namespace: str, memo: kopf.Memo, logger
) -> Observation:
    """Progress from NATS and the health of every child, for the status."""
    job = rljob.metadata.name
    obs = Observation(generation=0, suspended=rljob.spec.suspend)
    try:
        async with _bus(memo, rljob.bus_name) as bus:
            obs.progress = await bus.get_progress()
    except ConnectionError as e:
        obs.degraded.append(f"NATS: {e}")
    knative = await _use_knative(kube, memo.config)
    for child in rendering.render(rljob, namespace, memo.config, knative):
        current = await kube.get(child)
        if current is None:
            continue
        degraded, failed = child_problems(current)
        obs.degraded += [degraded] if degraded else []
        obs.failed += [failed] if failed else []
    for pod in await kube.list("v1", "Pod", namespace, {"rollfleet.io/job": job}):
        problem = pod_problem(pod)
        obs.degraded += [problem] if problem else []
    return obs


def _write_status(patch: kopf.Patch, obs: Observation, status: dict[str, Any]) -> None:
    patch.status.update(job_status(obs, status.get("conditions")))


# --- handlers -------------------------------------------------------------------------------
@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(body, spec, meta, status, name, namespace, patch, memo, logger, **_) -> None:
    generation = meta.get("generation", 1)
    try:
        rljob = _parse(name, namespace, dict(spec))
    except ManifestError as e:
        _write_status(patch, Observation(generation, invalid=str(e)), status)
        return  # nothing to retry until the spec changes
    async with Kube.connect(memo.settings) as kube:
        config_map = await kube.get(_config_ref(name, namespace))
        if config_map is not None:
            applied = yaml.safe_load(config_map["data"]["job.yaml"])["spec"]
            wanted = rljob.model_dump(mode="json", by_alias=True)["spec"]
            refused = _refused_change(applied, wanted)
            if refused:
                logger.warning("refused a spec change: %s", refused)
                obs = await _observe(
                    kube, _parse(name, namespace, applied), namespace, memo, logger
                )
                obs.generation, obs.refused = generation, refused
                _write_status(patch, obs, status)
                return
        try:
            children = rendering.render(
                rljob, namespace, memo.config, await _use_knative(kube, memo.config)
            )
        except rendering.RenderError as e:
            _write_status(patch, Observation(generation, invalid=str(e)), status)
            return
        try:
            async with _bus(memo, rljob.bus_name) as bus:
                await bus.ensure_streams()
        except ConnectionError as e:
            raise kopf.TemporaryError(f"NATS unavailable: {e}", delay=10) from e
        secret = rendering.job_secret(
            name,
            namespace,
            memo.nats_signer.job_creds(rljob.bus_name, name=f"job {rljob.bus_name}"),
        )
        for child in [secret, *children]:
            kopf.adopt(child, owner=body)
            await _apply(kube, child, logger)
        obs = await _observe(kube, rljob, namespace, memo, logger)
    obs.generation = generation
    _write_status(patch, obs, status)


def _config_ref(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": rendering.names(name)["config"], "namespace": namespace},
    }


@kopf.timer(*RESOURCE, interval=STATUS_INTERVAL_S, initial_delay=STATUS_INTERVAL_S)
async def refresh(body, spec, meta, status, name, namespace, patch, memo, logger, **_) -> None:
    try:
        rljob = _parse(name, namespace, dict(spec))
    except ManifestError:
        return  # reconcile has written why
    if any(
        c.get("reason") in ("SpecChangeRefused", "InvalidSpec")
        for c in status.get("conditions", [])
    ):
        return  # reconcile wrote why; it writes again once the spec is fixed
    async with Kube.connect(memo.settings) as kube:
        obs = await _observe(kube, rljob, namespace, memo, logger)
        progress: Progress | None = obs.progress
        if progress and progress.phase in ("Succeeded", "Failed"):
            # Training ended: free the GPUs. The PVC keeps checkpoints and metrics.
            knative = await _use_knative(kube, memo.config)
            for child in rendering.render(rljob, namespace, memo.config, knative, stopped=True):
                kopf.adopt(child, owner=body)
                await _apply(kube, child, logger)
    obs.generation = meta.get("generation", 1)
    _write_status(patch, obs, status)


@kopf.on.delete(*RESOURCE)
async def finalize(name, namespace, memo, logger, **_) -> None:
    try:
        async with _bus(memo, bus_name(name, namespace)) as bus:
            await bus.delete_streams()
    except ConnectionError as e:
        raise kopf.TemporaryError(
            f"NATS unavailable, streams not yet removed: {e}", delay=10
        ) from e
    logger.info("removed the job's JetStream streams and buckets")
