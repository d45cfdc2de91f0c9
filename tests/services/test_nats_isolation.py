"""Per-job NATS users (rollfleet.nats_auth) against a real nats-server in operator mode.

Two jobs' users share one server (the `secure_nats` fixture). Job A's user runs its whole
Bus flow; what it tries on job B's subjects, streams, consumers, buckets and replies is
refused by the server, each seen as the permissions violation the server sends back (Bus
logs it) and checked against B's data afterwards. Credentials that are malformed,
tampered with, expired or minted with other keys are refused with an error saying which.
The chart's NATS set-up (its config including auth.conf from the mounted Secret) is run
with a real server too.

    .venv/bin/pytest -q tests/services/test_nats_isolation.py
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import nats.errors
import nats.js.errors
import nkeys
import pytest
import yaml
from nats.aio.client import RawCredentials
from nats.js import api

from rollfleet.bus import Bus
from rollfleet.local.nats import EmbeddedNats, free_port, nats_server_binary, port_is_free
from rollfleet.nats_auth import (
    ACCOUNT_ID,
    SIGNING_SEED,
    CredentialsError,
    JobSigner,
    NatsKeys,
    decode_claims,
    format_creds,
    job_permissions,
    public_key,
    read_creds,
)
from rollfleet.protocol import GroupsCancelled, Progress, RolloutTask, Subjects, Trajectory, encode
from tests.services.test_bus import make_announcement, make_task, make_trajectory, weights_bytes

JOB_A, JOB_B = "job-a", "job-b"
SHORT = 0.5  # s: a JetStream call the server drops fails this fast; the violation is checked


def user_jwt(creds: str) -> str:
    return next(line for line in creds.splitlines() if line.startswith("eyJ"))


async def connect(server, keys: NatsKeys, job: str, **mint) -> Bus:
    creds = keys.signer().job_creds(job, **mint)
    return await Bus.connect(server.url, job, name=f"test-{job}", credentials=RawCredentials(creds))


async def set_up(server, keys: NatsKeys, job: str) -> None:
    """What the job's starter does (the operator, `rollfleet run`): make its streams."""
    starter = await connect(server, keys, job, manage_streams=True)
    try:
        await starter.ensure_streams()
    finally:
        await starter.close()


@pytest.fixture
async def jobs(secure_nats, nats_keys):
    for job in (JOB_A, JOB_B):
        await set_up(secure_nats, nats_keys, job)
    a = await connect(secure_nats, nats_keys, JOB_A)
    b = await connect(secure_nats, nats_keys, JOB_B)
    await a.ensure_streams()  # a trainer's: everything is there, only looked up
    await b.ensure_streams()
    yield a, b
    await a.close()
    await b.close()


def violations(caplog) -> list[str]:
    return [
        r.getMessage().lower()
        for r in caplog.records
        if r.name == "rollfleet.bus" and "permissions violation" in r.getMessage().lower()
    ]


async def refused(caplog, action: str, subject: str, timeout: float = 5.0) -> None:
    """Wait for the server's permissions violation for `action` ("publish" or
    "subscription") on `subject` (a prefix of it); fail if none comes."""
    wanted = f'permissions violation for {action} to "{subject}'.lower()
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(wanted in v for v in violations(caplog)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no violation for {action} to {subject}: {violations(caplog)}")
        await asyncio.sleep(0.02)


async def dropped(call) -> None:
    """A JetStream call the server refused: nothing answers it."""
    with pytest.raises(nats.errors.TimeoutError):
        await call


# --- what a job's user may do ---------------------------------------------------------------


async def test_job_user_runs_its_whole_bus_flow(jobs, caplog):
    a, _ = jobs
    s = a.subjects
    for i in range(3):
        await a.publish(s.tasks, make_task(i))
    tasks = await a.fetch(await a.task_consumer(), RolloutTask, 10, timeout=2)
    assert [t.task_id for t, _ in tasks] == ["t0", "t1", "t2"]
    for _, raw in tasks:
        await raw.ack()
    await a.publish(s.trajectories_for(0), make_trajectory("t0"))
    trajectories = await a.fetch(await a.trajectory_consumer(0), Trajectory, 10, timeout=2)
    assert [t.task_id for t, _ in trajectories] == ["t0"]
    await trajectories[0][1].ack()
    assert (await a.pending())["trajectories"] == 0

    # Weights: objects of several chunks (the store's are 128 KB), announcements, the KV.
    big = os.urandom(300_000)
    await a.put_object("v1/bucket-0000.safetensors", big)
    await a.put_file("config.json", b"{}")
    assert await a.get_object("v1/bucket-0000.safetensors") == big
    assert await a.get_file("config.json") == b"{}"
    assert await a.object_names("v1/") == ["v1/bucket-0000.safetensors"]
    announced = asyncio.Queue()

    async def on_weights(w):
        await announced.put(w.version)

    await a.on_weights(on_weights)
    await a.announce_weights(make_announcement(1))
    assert (await a.latest_weights()).version == 1
    assert await asyncio.wait_for(announced.get(), 5) == 1
    await a.delete_object("v1/bucket-0000.safetensors")

    await a.put_progress(Progress(phase="Running", step=3, total_steps=10, policy_version=1))
    assert (await a.get_progress()).step == 3
    async with a.swap_lease("pool", slots=1, holder="w0") as slot:
        assert slot == 0
    await a.put_journal(0, b"journal")  # the inflight bucket
    assert await a.get_journal(0) == b"journal"
    cancelled = asyncio.Queue()

    async def on_cancel(message: GroupsCancelled):
        await cancelled.put(message.group_ids)

    await a.on_cancel(on_cancel)
    await a.cancel_groups(["g1"])
    assert await asyncio.wait_for(cancelled.get(), 5) == ["g1"]
    await a.restart_trajectory_consumer(0)
    await a.purge_work()
    assert violations(caplog) == []


async def test_every_stream_and_bucket_of_a_job_is_open_to_its_user(secure_nats, nats_keys, caplog):
    """Whatever Subjects lists (a stream or bucket added later included) the job's starter
    may make and its user use, a bucket as a KV bucket or an object store."""
    bus = await connect(secure_nats, nats_keys, "job-c", manage_streams=True)
    js, s = bus.js, bus.subjects
    try:
        for i, stream in enumerate(s.streams()):
            await js.add_stream(name=stream, subjects=[f"{s.root}.probe{i}"])
            await js.publish(f"{s.root}.probe{i}", b"x")
            sub = await js.pull_subscribe(f"{s.root}.probe{i}", durable="probe", stream=stream)
            (msg,) = await sub.fetch(1, timeout=2)
            await msg.ack()
            await js.delete_consumer(stream, "probe")
        for bucket in s.buckets():
            kv = await js.create_key_value(bucket=bucket)
            await kv.put("k", b"v")
            assert (await kv.get("k")).value == b"v"
            store = await js.create_object_store(bucket)
            await store.put("o", b"v")
            assert (await store.get("o")).data == b"v"
    finally:
        await bus.close()
    assert violations(caplog) == []


# --- what it may not do to another job ---------------------------------------------------


async def test_a_cannot_read_b_trajectories_consumers_or_replies(jobs, caplog):
    a, b = jobs
    sb = b.subjects
    await b.publish(sb.trajectories_for(0), make_trajectory("secret"))
    b_consumer = await b.trajectory_consumer(0)
    js = a.nc.jetstream(timeout=SHORT)

    for subject in (f"{sb.trajectories}.>", sb.trajectories_for(0), f"{sb.inbox}.>", "_INBOX.>"):
        await a.nc.subscribe(subject)
        await refused(caplog, "subscription", subject)
    await a.nc.subscribe(">")
    await refused(caplog, "subscription", ">")

    await dropped(js.consumer_info(sb.trajectory_stream, "trainer-0"))
    await refused(caplog, "publish", f"$JS.API.CONSUMER.INFO.{sb.trajectory_stream}.trainer-0")
    await dropped(js.add_consumer(sb.trajectory_stream, api.ConsumerConfig(durable_name="spy")))
    await refused(caplog, "publish", f"$JS.API.CONSUMER.DURABLE.CREATE.{sb.trajectory_stream}.spy")
    await dropped(js.get_msg(sb.trajectory_stream, 1))
    await refused(caplog, "publish", f"$JS.API.STREAM.MSG.GET.{sb.trajectory_stream}")
    await dropped(js.stream_info(sb.trajectory_stream))
    await refused(caplog, "publish", f"$JS.API.STREAM.INFO.{sb.trajectory_stream}")
    # Pulling from B's consumer, and acking for it, are refused too.
    await a.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{sb.trajectory_stream}.trainer-0", b"1")
    await refused(caplog, "publish", f"$JS.API.CONSUMER.MSG.NEXT.{sb.trajectory_stream}")

    # B's trajectory is untouched, there for B alone.
    (got,) = await b.fetch(b_consumer, Trajectory, 10, timeout=2)
    assert got[0].task_id == "secret"
    consumers = await b.js.consumers_info(sb.trajectory_stream)
    assert [c.name for c in consumers] == ["trainer-0"]


async def test_a_cannot_write_b_tasks_weights_kv_or_streams(jobs, caplog):
    a, b = jobs
    sb = b.subjects
    await b.put_object("v1/bucket-0000.safetensors", weights_bytes(1))
    await b.announce_weights(make_announcement(1))
    await b.put_progress(Progress(phase="Running", step=7, total_steps=10, policy_version=1))
    js = a.nc.jetstream(timeout=SHORT)

    await a.nc.publish(sb.tasks, encode(make_task(0)))
    await refused(caplog, "publish", sb.tasks)
    await dropped(js.publish(sb.tasks_for("h20"), encode(make_task(1))))
    await refused(caplog, "publish", sb.tasks_for("h20"))
    for subject in (sb.weights, sb.cancel, f"{sb.trajectories}.0"):
        await a.nc.publish(subject, b"forged")
        await refused(caplog, "publish", subject)

    await dropped(js.object_store(sb.weight_bucket))
    await refused(caplog, "publish", f"$JS.API.STREAM.INFO.OBJ_{sb.weight_bucket}")
    for subject in (f"$O.{sb.weight_bucket}.C.forged", f"$O.{sb.weight_bucket}.M.forged"):
        await dropped(js.publish(subject, b"forged"))
        await refused(caplog, "publish", subject)
    await dropped(js.key_value(sb.progress_bucket))
    await refused(caplog, "publish", f"$JS.API.STREAM.INFO.KV_{sb.progress_bucket}")
    for bucket, key in ((sb.progress_bucket, "trainer"), (sb.swap_bucket, "pool.0")):
        await dropped(js.publish(f"$KV.{bucket}.{key}", b"forged"))
        await refused(caplog, "publish", f"$KV.{bucket}.{key}")

    await dropped(js.purge_stream(sb.task_stream))
    await refused(caplog, "publish", f"$JS.API.STREAM.PURGE.{sb.task_stream}")
    await dropped(js.delete_stream(sb.trajectory_stream))
    await refused(caplog, "publish", f"$JS.API.STREAM.DELETE.{sb.trajectory_stream}")
    # A stream of A's name on B's subjects would catch what B publishes: refused.
    await dropped(js.add_stream(name="SPY", subjects=[f"{sb.weights}"]))
    await refused(caplog, "publish", "$JS.API.STREAM.CREATE.SPY")

    # B's data is what B wrote.
    assert (await b.js.stream_info(sb.task_stream)).state.messages == 0
    assert (await b.js.stream_info(sb.trajectory_stream)).state.messages == 0
    assert await b.get_object("v1/bucket-0000.safetensors") == weights_bytes(1)
    assert await b.object_names("") == ["v1/bucket-0000.safetensors"]
    assert (await b.latest_weights()).version == 1
    assert (await b.get_progress()).step == 7


async def test_a_job_user_cannot_change_streams_so_cannot_mirror_another_jobs(jobs, caplog):
    """JetStream does not check permissions on a stream's mirror or sources: a job's user
    that could re-create one of its streams as a mirror of B's would read B's trajectories.
    Only the job's starter may create, change or delete streams."""
    a, b = jobs
    await b.publish(b.subjects.trajectories_for(0), make_trajectory("secret"))
    mine = a.subjects.deadletter_stream
    js = a.nc.jetstream(timeout=SHORT)
    await dropped(js.delete_stream(mine))
    await refused(caplog, "publish", f"$JS.API.STREAM.DELETE.{mine}")
    mirror = api.StreamConfig(name=mine, mirror=api.StreamSource(name=b.subjects.trajectory_stream))
    await dropped(js.update_stream(mirror))
    await refused(caplog, "publish", f"$JS.API.STREAM.UPDATE.{mine}")
    await dropped(js.add_stream(mirror))
    await refused(caplog, "publish", f"$JS.API.STREAM.CREATE.{mine}")
    assert (await a.js.stream_info(mine)).config.mirror is None
    await a.publish(a.subjects.tasks, make_task(0))  # and its own streams still work
    assert (await a.pending())["tasks"] == 1


def test_only_a_starter_may_change_streams():
    subjects = Subjects(JOB_A)
    job_user = job_permissions(subjects)
    starter = job_permissions(subjects, manage_streams=True)
    assert job_user["pub"]["deny"] == [
        "$JS.API.STREAM.CREATE.*",
        "$JS.API.STREAM.UPDATE.*",
        "$JS.API.STREAM.DELETE.*",
    ]
    assert "deny" not in starter["pub"]
    assert job_user["pub"]["allow"] == starter["pub"]["allow"]


# --- credentials ----------------------------------------------------------------------------


async def test_expired_credentials_are_refused_saying_so(secure_nats, nats_keys):
    with pytest.raises(ConnectionError, match=r"Authorization Violation.*expired at"):
        await connect(secure_nats, nats_keys, JOB_A, ttl_s=-60)
    bus = await connect(secure_nats, nats_keys, JOB_A, ttl_s=600)  # not yet: fine
    await bus.close()


async def test_credentials_from_other_keys_are_refused(secure_nats):
    with pytest.raises(ConnectionError, match=r"Authorization Violation.*not accepted"):
        await connect(secure_nats, NatsKeys.create(), JOB_A)


async def test_a_user_cannot_widen_its_own_permissions(secure_nats, nats_keys):
    """The server checks the account's signature: a JWT edited to allow everything fails."""
    creds = nats_keys.signer().job_creds(JOB_A)
    token = user_jwt(creds)
    header, _, signature = token.split(".")
    claims = decode_claims(token)
    claims["nats"]["pub"] = claims["nats"]["sub"] = {"allow": [">"]}
    widened = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = creds.replace(token, f"{header}.{widened}.{signature}")
    with pytest.raises(ConnectionError, match="Authorization Violation"):
        await Bus.connect(secure_nats.url, JOB_A, credentials=RawCredentials(forged))


async def test_no_credentials_or_a_token_are_refused(secure_nats):
    with pytest.raises(ConnectionError, match="Authorization Violation"):
        await Bus.connect(secure_nats.url, JOB_A)
    with pytest.raises(ConnectionError, match="Authorization Violation"):
        await Bus.connect(secure_nats.url, JOB_A, token="test-token-3f9a")


async def test_malformed_credentials_are_refused_before_connecting(tmp_path, nats_keys):
    url = "nats://127.0.0.1:1"  # never reached: the file is checked first
    with pytest.raises(CredentialsError, match=r"cannot read NATS credentials file .*missing"):
        await Bus.connect(url, JOB_A, credentials=tmp_path / "missing.creds")
    garbage = tmp_path / "garbage.creds"
    garbage.write_text("not a creds file\n")
    with pytest.raises(CredentialsError, match=r"garbage.creds is not a NATS creds file"):
        await Bus.connect(url, JOB_A, credentials=garbage)
    creds = nats_keys.signer().job_creds(JOB_A)
    other_seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    with pytest.raises(CredentialsError, match="seed is not the key of its user JWT"):
        read_creds(RawCredentials(format_creds(user_jwt(creds), other_seed)))


# --- keys, JWTs and files --------------------------------------------------------------------


def test_user_jwt_is_signed_by_the_account_signing_key_with_job_scoped_permissions(nats_keys):
    signer = nats_keys.signer()
    creds = signer.job_creds(JOB_A, name="trainer")
    claims = read_creds(RawCredentials(creds))
    header, payload, signature = user_jwt(creds).split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "typ": "JWT",
        "alg": "ed25519-nkey",
    }
    signing_key = nkeys.from_seed(bytearray(signer.signing_seed.encode()))
    assert signing_key.verify(
        f"{header}.{payload}".encode(), base64.urlsafe_b64decode(signature + "==")
    )
    assert claims["iss"] == public_key(signer.signing_seed) != signer.account
    assert claims["name"] == "trainer" and claims["jti"] and claims["iat"]
    assert "exp" not in claims  # a job's user lives as long as the job
    user = claims["nats"]
    assert (user["type"], user["version"], user["issuer_account"]) == ("user", 2, signer.account)
    s = Subjects(JOB_A)
    assert user["sub"]["allow"] == [f"{s.root}.>", f"{s.inbox}.>"]
    publish = user["pub"]["allow"]
    assert publish[:2] == user["sub"]["allow"]
    for stream in [*s.streams(), *(f"KV_{b}" for b in s.buckets())]:
        assert f"$JS.API.*.*.{stream}" in publish and f"$JS.ACK.{stream}.>" in publish
    # Nothing reaches past the job: every allowed subject names it (or its streams), but
    # the API's account info and stream-name lookup; none names job B.
    token_of_job = s.task_stream.removeprefix("RF_").removesuffix("_TASKS")
    shared = ("$JS.API.INFO", "$JS.API.STREAM.NAMES")
    for subject in publish:
        assert JOB_A in subject or token_of_job in subject or subject in shared, subject
        assert JOB_B not in subject and "job_b" not in subject, subject


def test_keys_are_written_owner_only_and_read_back(tmp_path, nats_keys):
    directory = nats_keys.write(tmp_path / "keys")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert NatsKeys.load(directory) == nats_keys
    assert NatsKeys.load_or_create(directory) == nats_keys
    signer = JobSigner.load(directory)
    assert signer == nats_keys.signer()
    (directory / SIGNING_SEED).unlink()
    with pytest.raises(CredentialsError, match="rollfleet nats-keys"):
        JobSigner.load(directory)
    (directory / SIGNING_SEED).write_text((directory / ACCOUNT_ID).read_text())
    with pytest.raises(CredentialsError, match=r"must hold an account seed \(SA"):
        JobSigner.load(directory)


def test_embedded_server_config_is_owner_only_and_needs_one_kind_of_auth(tmp_path, nats_keys):
    with EmbeddedNats(tmp_path / "nats", keys=nats_keys) as server:
        config = server.store_dir / "nats-server.conf"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert nats_keys.signing_seed not in config.read_text()  # JWTs only, no seed
    with pytest.raises(ValueError, match="not both"):
        EmbeddedNats(tmp_path / "x", auth_token="t", keys=nats_keys)


async def test_the_chart_nats_config_includes_the_keys_where_the_secret_is_mounted(tmp_path):
    """The bundled NATS as the chart configures it: its config (/etc/nats-config/nats.conf)
    includes auth.conf from where the natsAuth Secret is mounted; a real server so set up
    takes a job's user."""
    values = yaml.safe_load(Path("charts/rollfleet/values.yaml").read_text())["nats"]
    include = values["config"]["merge"]["$include"]
    (mount,) = [p["value"]["mountPath"] for p in values["container"]["patch"]]
    keys = NatsKeys.create()
    root = tmp_path / "root"
    (root / mount.lstrip("/")).mkdir(parents=True)
    (root / mount.lstrip("/") / "auth.conf").write_text(keys.server_config())
    config = root / "etc" / "nats-config" / "nats.conf"
    config.parent.mkdir(parents=True)
    port = free_port()
    store = tmp_path / "js"
    # The layout the nats chart writes: its values merged into one map, includes inline.
    config.write_text(
        f'{{\n  "jetstream": {{"store_dir": "{store}"}},\n  include {include};\n'
        f'  "host": "127.0.0.1",\n  "port": {port}\n}}\n'
    )
    server = subprocess.Popen(
        [nats_server_binary(), "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"nats://127.0.0.1:{port}"
        for _ in range(100):
            if server.poll() is not None or not port_is_free(port):
                break
            await asyncio.sleep(0.05)
        creds = RawCredentials(keys.signer().job_creds(JOB_A, manage_streams=True))
        bus = await Bus.connect(url, JOB_A, credentials=creds)
        try:
            await bus.ensure_streams()
        finally:
            await bus.close()
        with pytest.raises(ConnectionError, match="Authorization Violation"):
            await Bus.connect(url, JOB_A)
    finally:
        server.terminate()
        server.wait(10)
