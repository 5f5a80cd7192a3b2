"""Apache Kafka on loopback, run with ``java`` in KRaft mode: `streamrec broker --engine kafka`,
the tests and the benchmarks.

The jars come from Maven Central through ``deploy/kafka/pom.xml`` (``make kafka``) into
``~/.cache/streamrec/kafka-<version>/libs`` (or ``$STREAMREC_KAFKA_LIBS``). Each node is broker and
controller at once; ``nodes=3`` makes a 3-node quorum with replication factor 3 and
``min.insync.replicas`` 2 for the topics it creates. With a data directory the storage is formatted
once and kept: a restart, even after a SIGKILL, finds every topic, record, offset and group again.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from stream.broker import free_port
from streamrec.errors import UserError

#: The Apache Kafka release the project runs (deploy/kafka/pom.xml and the compose image tag say the same).
KAFKA_VERSION = "4.4.0"
INSTALL_HINT = "install Java 17 and Maven (Debian: apt-get install openjdk-17-jre-headless maven), then run `make kafka`"
# IPv4 sockets: the broker listens on 127.0.0.1 only, not on an IPv6 socket mapped to it.
JVM_OPTIONS = ("-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true", "-Djava.net.preferIPv4Stack=true")

# Settings of every node: quick to start and to form groups on a test box. The group session timeout
# may go down to 0.5 s (the tests fail a worker over in 2 s; Apache Kafka's default minimum is 6 s).
BASE_CONFIG = {
    "num.partitions": "1",
    "offsets.topic.num.partitions": "8",
    "transaction.state.log.num.partitions": "8",
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "500",
    # A dead node is fenced, and its partitions get new leaders, 4 s after its last heartbeat (default 9 s).
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "4000",
    "auto.create.topics.enable": "false",
    "log.message.timestamp.type": "CreateTime",
}

LOG4J2 = """\
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
"""


def kafka_libs() -> Path:
    """The folder of Apache Kafka's jars; a one-line UserError naming what to install when absent."""
    libs = Path(os.environ.get("STREAMREC_KAFKA_LIBS") or Path.home() / ".cache" / "streamrec" / f"kafka-{KAFKA_VERSION}" / "libs")
    if not (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        raise UserError(f"Apache Kafka {KAFKA_VERSION} is not installed in {libs}: {INSTALL_HINT}")
    return libs


def java_binary() -> str:
    java = shutil.which("java", path=os.path.join(os.environ["JAVA_HOME"], "bin") if os.environ.get("JAVA_HOME") else None) or shutil.which("java")
    if not java:
        raise UserError(f"no `java` on PATH: {INSTALL_HINT}")
    return java


def kafka_available() -> str | None:
    """None when Apache Kafka can run here, else why not (one line)."""
    try:
        java_binary()
        kafka_libs()
    except UserError as e:
        return str(e)
    return None


def port_taken(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (what `kafka-storage random-uuid` prints).

    Never one that starts with '-' (1 in 64 would): the format command would take it for an option
    ("argument --cluster-id/-t: expected one argument"); Kafka's own Uuid.randomUuid skips them too.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """The broker gets SIGKILL when the process that started it dies, however it dies (Linux)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Node:
    """One broker-and-controller process of the cluster."""

    node_id: int
    port: int  # clients
    controller_port: int
    directory: Path  # log.dirs, server.properties, broker.log
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class KafkaCluster:
    """Apache Kafka (KRaft) on loopback for the lifetime of a ``with`` block: ``nodes`` processes,
    each broker and controller.

    ``ports``: the client port of each node (free ports when omitted); controllers listen on free
    ports. ``data_dir`` keeps the storage across restarts (a temporary one is removed at stop).
    ``config`` adds or overrides broker settings (e.g. security); ``listener`` replaces the client
    listener's security protocol name and ``format_args`` is added to the storage format command
    (SCRAM users); ``client`` holds the aiokafka connection settings (security) of the cluster's own
    admin checks. ``quirks`` is the ``--broker-quirks`` its clients pass: none.
    """

    quirks = "none"

    def __init__(
        self,
        nodes: int = 1,
        ports: list[int] | None = None,
        data_dir: Path | None = None,
        config: dict[str, str] | None = None,
        listener: str = "PLAINTEXT",
        format_args: tuple[str, ...] = (),
        client: dict | None = None,
        startup_timeout: float = 90.0,
        log_level: str = "WARN",
    ) -> None:
        if nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {nodes}")
        if ports is not None and len(ports) != nodes:
            raise UserError(f"{nodes} nodes need {nodes} ports, got {len(ports)}")
        self.libs = kafka_libs()
        self.java = java_binary()
        self._temporary = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="streamrec-kafka-"))
        self.config = dict(config or {})
        self.listener = listener
        self.format_args = tuple(format_args)
        self.client = dict(client or {})
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        ports = ports or [free_port() for _ in range(nodes)]
        self.nodes = [Node(i + 1, ports[i], free_port(), self.data_dir / f"node-{i + 1}") for i in range(nodes)]

    # -- addresses -------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def url(self) -> str:
        return ",".join(f"kafka://{n.bootstrap}" for n in self.nodes)

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def process(self) -> subprocess.Popen | None:
        return self.nodes[0].process

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    # -- configuration ---------------------------------------------------------------------------

    def server_properties(self, node: Node) -> dict[str, str]:
        n = len(self.nodes)
        voters = ",".join(f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self.nodes)
        replication = str(min(n, 3))
        insync = "2" if n >= 3 else "1"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"{self.listener}://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"{self.listener}://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": self.listener,
            "listener.security.protocol.map": f"{self.listener}:{self.listener},CONTROLLER:PLAINTEXT",
            "log.dirs": str(node.directory / "data"),
            "default.replication.factor": replication,
            "min.insync.replicas": insync,
            "offsets.topic.replication.factor": replication,
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": insync,
            **BASE_CONFIG,
        }
        props.update(self.config)
        return props

    def _write_config(self, node: Node) -> Path:
        node.directory.mkdir(parents=True, exist_ok=True)
        path = node.directory / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in self.server_properties(node).items()))
        (node.directory / "log4j2.properties").write_text(LOG4J2.format(log=node.directory / "broker.log", level=self.log_level))
        return path

    def _java(self, node: Node, main: str, *args: str) -> list[str]:
        return [
            self.java,
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={node.directory}",
            "-cp",
            str(self.libs / "*"),
            main,
            *args,
        ]

    def _format(self, node: Node, config: Path) -> None:
        """Format the node's storage once (``meta.properties`` marks it formatted); the cluster id is kept beside it."""
        if (node.directory / "data" / "meta.properties").exists():
            return
        id_file = self.data_dir / "cluster.id"
        if not id_file.exists():
            id_file.write_text(new_cluster_id())
        cmd = self._java(node, "kafka.tools.StorageTool", "format", "-t", id_file.read_text().strip(), "-c", str(config), *self.format_args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise UserError(f"formatting Apache Kafka's storage in {node.directory} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")

    # -- lifecycle -------------------------------------------------------------------------------

    def start_node(self, node: Node) -> None:
        """Start one node's process (formatting its storage first if new); does not wait for it."""
        if node.alive:
            return
        for port in (node.port, node.controller_port):
            if port_taken(port):
                raise UserError(f"port {port} on 127.0.0.1 is already taken")
        config = self._write_config(node)
        self._format(node, config)
        with open(node.directory / "stdout.log", "ab") as out:
            node.process = subprocess.Popen(self._java(node, "kafka.Kafka", str(config)), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def start(self) -> "KafkaCluster":
        try:
            for node in self.nodes:
                self.start_node(node)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the cluster answers metadata with every live node registered as a broker."""
        timeout = timeout or self.startup_timeout
        deadline = time.monotonic() + timeout
        live = [n for n in self.nodes if n.alive]
        while True:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None and node in live:
                    raise UserError(f"Apache Kafka node {node.node_id} exited at start (status {node.process.returncode}); see {node.directory / 'broker.log'}")
            if all(port_taken(n.port) for n in live) and len(self.brokers()) >= len(live):
                return
            if time.monotonic() > deadline:
                raise UserError(f"Apache Kafka did not answer metadata on {self.bootstrap} within {timeout:.0f}s; see {self.data_dir}/node-*/broker.log")
            time.sleep(0.2)

    def brokers(self, timeout: float = 5.0) -> list[int]:
        """The node ids the cluster's metadata lists as brokers right now (empty when it cannot say)."""
        return asyncio.run(self._metadata(timeout))[0]

    def leaders(self, topic: str, timeout: float = 30.0) -> dict[int, int]:
        """Partition -> node id of its leader (-1: none), from the metadata of a live node; {} if none answers in time."""
        deadline = time.monotonic() + timeout
        while True:
            leaders = asyncio.run(self._metadata(5.0, topic))[1]
            if leaders or time.monotonic() > deadline:
                return leaders
            time.sleep(0.2)

    async def _metadata(self, timeout: float, topic: str | None = None) -> tuple[list[int], dict[int, int]]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=[n.bootstrap for n in self.nodes if n.alive], request_timeout_ms=int(timeout * 1000), **self.kafka_kwargs())
        try:
            await asyncio.wait_for(admin.start(), timeout)
            cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
            brokers = sorted(b["node_id"] for b in cluster["brokers"])
            leaders = {}
            if topic is not None:
                (described,) = await asyncio.wait_for(admin.describe_topics([topic]), timeout)
                leaders = {p["partition"]: p["leader"] for p in described["partitions"]}
            return brokers, leaders
        except Exception:
            return [], {}
        finally:
            await admin.close()

    def kafka_kwargs(self) -> dict:
        """The security settings of an aiokafka client of this cluster (none on PLAINTEXT); the address is the caller's."""
        return dict(self.client)

    def kill(self, node_id: int = 1) -> None:
        """SIGKILL one node: no shutdown, no flush (the OS keeps what it had written)."""
        node = self.node(node_id)
        if node.alive:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(timeout=30)

    def restart(self, node_id: int = 1, wait: bool = True) -> None:
        self.start_node(self.node(node_id))
        if wait:
            self.wait_ready()

    def stop_node(self, node: Node, timeout: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL after ``timeout``."""
        p = node.process
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        # Stopped all at once: a node stopping alone waits for the others to take its partitions over.
        for node in self.nodes:
            if node.alive:
                try:
                    os.killpg(node.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for node in self.nodes:
            self.stop_node(node)
        if self._temporary:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "KafkaCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

