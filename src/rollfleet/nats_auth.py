"""Per-job NATS users: nkeys, NATS JWTs (decentralized auth, JWT v2) and creds files.

nats-server runs in operator mode: it trusts one operator, whose JWT names a system
account, and preloads (`resolver: MEMORY`) the JWTs of that system account and of one
`rollfleet` account with JetStream on. Whoever starts a job (the operator in a cluster,
`rollfleet run` locally) holds the rollfleet account's signing seed and mints the job a
user of its own, allowed only the job's subjects, streams, buckets and reply inbox
(`job_permissions`); a new job needs nothing new on the server.

    keys = NatsKeys.create()                    # NatsKeys.load(dir) / keys.write(dir)
    server_conf = keys.server_config()          # the auth part of nats-server's config
    creds = keys.signer().job_creds("countdown")        # a creds file's text
    bus = await Bus.connect(url, "countdown", credentials=RawCredentials(creds))

`rollfleet nats-keys OUT_DIR` writes a set for a cluster (README, "Kubernetes").
Tested against a real nats-server: `pytest tests/services/test_nats_isolation.py`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections import UserString
from dataclasses import dataclass
from pathlib import Path

import nkeys

from rollfleet.protocol import Subjects

ACCOUNT_NAME = "rollfleet"
# What `rollfleet nats-keys` writes (and a Kubernetes Secret holds, key = file name).
OPERATOR_SEED, SYSTEM_SEED, ACCOUNT_SEED = "operator.nk", "system.nk", "account.nk"
SIGNING_SEED, ACCOUNT_ID = "signing.nk", "account.pub"  # all a job's starter needs
SERVER_CONFIG = "auth.conf"  # what nats-server needs: JWTs only, no seed
JWT_FILES = {"operator": "operator.jwt", "system": "system.jwt", "account": "account.jwt"}
UNLIMITED = -1
# The components that talk to NATS and get the job's credentials; the others (reward,
# env sandboxes running model-written actions) get none.
BUS_ROLES = ("trainer", "rollout")
MAX_CONTROL_LINE = 65536  # bytes


class CredentialsError(ValueError):
    """NATS credentials that cannot be used; the message names where they came from."""


# --- keys and JWTs ----------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_HEADER = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())


def new_seed(prefix: int) -> str:
    """A fresh nkey seed of one kind (nkeys.PREFIX_BYTE_OPERATOR, _ACCOUNT, _USER)."""
    return nkeys.encode_seed(os.urandom(32), prefix).decode()


def public_key(seed: str) -> str:
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


def encode_jwt(
    subject: str, name: str, nats: dict, issuer_seed: str, expires: int | None = None
) -> str:
    """A JWT as nats-server reads it: `nats` holds the kind's own claims (type, version)."""
    issuer = nkeys.from_seed(bytearray(issuer_seed.encode()))
    claims: dict = {"iat": int(time.time()), "iss": issuer.public_key.decode()}
    claims |= {"name": name, "sub": subject}
    if expires is not None:
        claims["exp"] = expires
    # A unique id, made as nats-io/jwt makes it: SHA-512/256 of the standard claims, in
    # base32 without padding (the server does not check it).
    digest = hashlib.new("sha512_256", json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    claims["nats"] = {**nats, "version": 2}
    signed = f"{_HEADER}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def decode_claims(token: str) -> dict:
    """A JWT's claims, unverified (for messages and tests; the server verifies)."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error) as e:
        raise CredentialsError(f"not a NATS JWT ({e})") from None


@dataclass(frozen=True)
class JobSigner:
    """Mints job users: the rollfleet account's signing seed and the account's public key."""

    signing_seed: str
    account: str

    @classmethod
    def load(cls, directory: str | Path) -> JobSigner:
        """From `signing.nk` and `account.pub` in `directory` (a mounted Secret)."""
        directory = Path(directory)
        try:
            seed = (directory / SIGNING_SEED).read_text().strip()
            account = (directory / ACCOUNT_ID).read_text().strip()
        except OSError as e:
            raise CredentialsError(
                f"cannot read the NATS account signing key: {e}; create it with "
                "`rollfleet nats-keys OUT_DIR` and mount its Secret (README, Kubernetes)"
            ) from None
        if not (seed.startswith("SA") and account.startswith("A")):
            raise CredentialsError(
                f"{directory}: {SIGNING_SEED} must hold an account seed (SA...) and "
                f"{ACCOUNT_ID} an account public key (A...), as `rollfleet nats-keys` writes them"
            )
        return cls(seed, account)

    def job_creds(
        self,
        job: str,
        name: str | None = None,
        ttl_s: float | None = None,
        manage_streams: bool = False,
    ) -> str:
        """A creds file's text: a new user that may use job `job`'s NATS resources only.
        `ttl_s`: it expires then (the server disconnects it); None: never.
        `manage_streams`: it may also create, change and delete them (job_permissions)."""
        seed = new_seed(nkeys.PREFIX_BYTE_USER)
        expires = int(time.time() + ttl_s) if ttl_s is not None else None
        nats = {
            **job_permissions(Subjects(job), manage_streams),
            "subs": UNLIMITED,
            "data": UNLIMITED,
            "payload": UNLIMITED,
            "issuer_account": self.account,  # signed by a signing key, not the account's own
            "type": "user",
        }
        user = encode_jwt(public_key(seed), name or f"job {job}", nats, self.signing_seed, expires)
        return format_creds(user, seed)


@dataclass(frozen=True)
class NatsKeys:
    """Operator, system account and rollfleet account (with its signing key), and their JWTs."""

    operator_seed: str
    system_seed: str
    account_seed: str
    signing_seed: str
    jwts: dict[str, str]  # operator, system, account

    @classmethod
    def create(cls) -> NatsKeys:
        operator = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
        system, account = (new_seed(nkeys.PREFIX_BYTE_ACCOUNT) for _ in range(2))
        signing = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        limits = {"subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED}
        limits |= {"imports": UNLIMITED, "exports": UNLIMITED, "wildcards": True}
        limits |= {"conn": UNLIMITED, "leaf": UNLIMITED}
        # JetStream is on for an account whose storage limits are not 0 (-1: unlimited).
        jetstream = {"mem_storage": UNLIMITED, "disk_storage": UNLIMITED}
        jetstream |= {"streams": UNLIMITED, "consumer": UNLIMITED}

        def account_jwt(seed: str, name: str, extra: dict) -> str:
            nats = {"limits": limits | extra.pop("limits", {}), **extra, "type": "account"}
            return encode_jwt(public_key(seed), name, nats, operator)

        jwts = {
            "operator": encode_jwt(
                public_key(operator),
                "rollfleet",
                {"system_account": public_key(system), "type": "operator"},
                operator,
            ),
            "system": account_jwt(system, "SYS", {}),
            "account": account_jwt(
                account,
                ACCOUNT_NAME,
                # No default permissions: a user JWT lists all that user may do.
                {"limits": jetstream, "signing_keys": [public_key(signing)]},
            ),
        }
        return cls(operator, system, account, signing, jwts)

    def signer(self) -> JobSigner:
        return JobSigner(self.signing_seed, public_key(self.account_seed))

    def server_config(self) -> str:
        """nats-server's auth settings: the operator, its system account, and both
        accounts preloaded (no account server; a new job's user needs no reload)."""
        system, account = public_key(self.system_seed), public_key(self.account_seed)
        return (
            f'operator: "{self.jwts["operator"]}"\n'
            f'system_account: "{system}"\n'
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f'  "{system}": "{self.jwts["system"]}"\n'
            f'  "{account}": "{self.jwts["account"]}"\n'
            "}\n"
            # A job user's JWT lists each of its streams and comes in the client's CONNECT
            # line, longer than the default limit of 4 KB.
            f"max_control_line: {MAX_CONTROL_LINE}\n"
        )

    def write(self, directory: str | Path) -> Path:
        """Every key, JWT and the server's auth settings as files, readable by owner only."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = {
            OPERATOR_SEED: self.operator_seed,
            SYSTEM_SEED: self.system_seed,
            ACCOUNT_SEED: self.account_seed,
            SIGNING_SEED: self.signing_seed,
            ACCOUNT_ID: public_key(self.account_seed),
            SERVER_CONFIG: self.server_config(),
        }
        files |= {JWT_FILES[kind]: token for kind, token in self.jwts.items()}
        for name, text in files.items():
            write_private(directory / name, text if text.endswith("\n") else text + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> NatsKeys:
        directory = Path(directory)

        def read(name: str) -> str:
            return (directory / name).read_text().strip()

        jwts = {kind: read(name) for kind, name in JWT_FILES.items()}
        return cls(
            read(OPERATOR_SEED), read(SYSTEM_SEED), read(ACCOUNT_SEED), read(SIGNING_SEED), jwts
        )

    @classmethod
    def load_or_create(cls, directory: str | Path) -> NatsKeys:
        """The keys in `directory`, or new ones written there (a resumed run keeps its own:
        JetStream keeps each account's streams under the account's key)."""
        if (Path(directory) / SIGNING_SEED).exists():
            return cls.load(directory)
        keys = cls.create()
        keys.write(directory)
        return keys


# --- what a job's user may do -----------------------------------------------------------
STREAM_CHANGES = ("CREATE", "UPDATE", "DELETE")  # what only a job's starter may do


def job_permissions(
    subjects: Subjects, manage_streams: bool = False
) -> dict[str, dict[str, list[str]]]:
    """Publish/subscribe allow-lists of one job's user: its own subjects and reply inbox,
    and the JetStream API of exactly its own streams, consumers and buckets. Only a user
    that `manage_streams` (whoever starts the job: the operator, `rollfleet run`) may
    create, change or delete those streams: JetStream does not check permissions on a
    stream's mirror or sources, so a job's user that could re-create its own streams could
    make one a mirror of another job's."""
    api = "$JS.API"
    buckets = subjects.buckets()
    # A bucket is a stream: KV_<bucket> or OBJ_<bucket>; both are allowed for every bucket,
    # so one added later is covered whichever kind it is.
    streams = [
        *subjects.streams(),
        *(f"KV_{b}" for b in buckets),
        *(f"OBJ_{b}" for b in buckets),
    ]
    own = [f"{subjects.root}.>", f"{subjects.inbox}.>"]
    # nats-py's object store finds a bucket's stream by subject (STREAM.NAMES): it lists
    # stream names, never their messages.
    publish = [*own, f"{api}.INFO", f"{api}.STREAM.NAMES"]
    for stream in streams:
        publish += [
            # STREAM.<op>.S (CREATE, INFO, PURGE...), CONSUMER.<op>.S[.<consumer>...]
            # (CREATE, INFO, DELETE, NAMES...), DIRECT.GET.S[.<subject>]: the stream's
            # name is their fifth token, so each names this stream and no other.
            f"{api}.*.*.{stream}",
            f"{api}.*.*.{stream}.>",
            f"{api}.STREAM.MSG.*.{stream}",  # GET, DELETE
            f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",  # flow control of ordered consumers (object reads)
        ]
    for bucket in buckets:
        publish += [f"$KV.{bucket}.>", f"$O.{bucket}.>"]
    permissions = {"pub": {"allow": publish}, "sub": {"allow": own}}
    if not manage_streams:
        permissions["pub"]["deny"] = [f"{api}.STREAM.{op}.*" for op in STREAM_CHANGES]
    return permissions


# --- creds files ------------------------------------------------------------------------
def format_creds(user_jwt: str, user_seed: str) -> str:
    """The creds file format every NATS client reads (nats-py `user_credentials=`)."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def read_creds(credentials: str | Path | UserString) -> dict:
    """The user JWT's claims in a creds file (a path) or creds text (nats-py RawCredentials);
    raises CredentialsError naming the source and what is wrong with it."""
    if isinstance(credentials, UserString):
        source, text = "the NATS credentials given", str(credentials)
    else:
        source = f"NATS credentials file {credentials}"
        try:
            text = Path(credentials).read_text()
        except OSError as e:
            raise CredentialsError(f"cannot read {source}: {e.strerror}") from None
    lines = [line.strip() for line in text.splitlines()] + [""]
    # Each block's content is the line after its BEGIN line.
    token, seed = (
        next((lines[i + 1] for i, line in enumerate(lines) if line == begin), "")
        for begin in ("-----BEGIN NATS USER JWT-----", "-----BEGIN USER NKEY SEED-----")
    )
    if not (token and seed):
        raise CredentialsError(
            f"{source} is not a NATS creds file: it needs a BEGIN NATS USER JWT and a BEGIN "
            "USER NKEY SEED block (rollfleet.nats_auth.format_creds writes one)"
        )
    try:
        claims = decode_claims(token)
    except CredentialsError as e:
        raise CredentialsError(f"{source}: its user JWT is {e}") from None
    try:
        user = public_key(seed)
    except nkeys.NkeysError:
        raise CredentialsError(f"{source}: its USER NKEY SEED is not an nkey seed") from None
    if claims.get("sub") != user:
        raise CredentialsError(f"{source}: its seed is not the key of its user JWT")
    return claims


def expiry_problem(claims: dict) -> str | None:
    """Why a user with these claims is refused for its age, or None."""
    expires = claims.get("exp")
    if expires is not None and expires <= time.time():
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        return f"the NATS user {claims.get('name')!r} expired at {when}"
    return None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (also when it was there with wider modes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
