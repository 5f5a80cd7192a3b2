"""Every setting of the stream, in one place.

Each field of ``Settings`` is one command-line flag (``--field-name``) and one
environment variable (``STREAMREC_FIELD_NAME``), with one default. The click
options of `streamrec serve` / `replay` / `score-online` / `demo` and the table in
docs/stream.md are generated from the fields, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from stream.broker_adapter import ADAPTERS, broker_adapter
from streamrec.errors import UserError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
BROKER_QUIRKS = tuple(ADAPTERS)  # none, tansu: stream.broker_adapter says what each changes
PROCESSING_GUARANTEES = ("at_least_once", "exactly_once")


def _s(default, help: str, choices: tuple[str, ...] | None = None, minimum: float | None = None, secret: bool = False):
    return field(default=default, repr=not secret, metadata={"help": help, "choices": choices, "min": minimum})


@dataclass(frozen=True)
class Settings:
    """Stream settings (see docs/stream.md for the table)."""

    broker: str = _s("kafka://127.0.0.1:9092", "Kafka bootstrap servers: kafka://HOST:PORT, several separated by commas.")
    clicks_topic: str = _s("clicks", "Topic of click events (key = session id).")
    recommendations_topic: str = _s("recommendations", "Topic the worker publishes recommendations to (key = session id).")
    dlq_topic: str = _s("clicks-dlq", "Dead-letter topic for events that cannot be parsed.")
    partitions: int = _s(4, "Partitions of the topics the worker creates when they are missing.", minimum=1)
    replication_factor: int = _s(1, "Replication factor of the topics the worker creates.", minimum=1)
    app_id: str = _s("streamrec", "Faust app id: the consumer group and the prefix of the session table's changelog topic.")
    fetch_wait_ms: int = _s(10, "With --broker-quirks tansu: longest time the embedded broker may hold a fetch (aiokafka fetch_max_wait_ms; it holds every fetch that long, so low = low latency). Apache Kafka answers as soon as data arrives, and there the worker keeps Faust's 1.5 s.", minimum=0)
    batch_size: int = _s(256, "Most events scored in one micro-batch; a batch is whatever has arrived, never waited for.", minimum=1)
    processing_guarantee: str = _s("at_least_once", "at_least_once: answers, dead letters and states are published, then the clicks' offsets committed; after a crash or rebalance some answers come twice (identical; deduplicate on session_id, position). exactly_once: each micro-batch's answers, dead letters and states go in Kafka transactions together with the consumed offsets, one transactional producer per clicks partition (fenced when the partition moves); consumers reading with isolation.level=read_committed see every click answered exactly once. Not with --broker-quirks tansu (see docs/reliability.md).", PROCESSING_GUARANTEES)
    session_ttl: float = _s(1800.0, "Seconds after its last click when a session's state is removed (tombstone in the changelog).", minimum=0.001)
    max_event_bytes: int = _s(65536, "Largest click event (key + value bytes) the worker parses; a larger one is dead-lettered as 'too_large' keeping only its first bytes, so no dead letter outgrows the broker's message size limit.", minimum=1024)
    stall_seconds: float = _s(30.0, "Seconds without a finished micro-batch while clicks wait (or with the event loop blocked) after which the worker reports a stall: streamrec_stalled=1, a log warning, /healthz 503.", minimum=0.1)
    k: int = _s(20, "Items per recommendation (at most the bundle's k).", minimum=1)
    exclude_seen: bool = _s(False, "Drop items the session already clicked from its recommendations.")
    metrics_host: str = _s("127.0.0.1", "Address the Prometheus metrics endpoint binds to.")
    metrics_port: int = _s(9108, "Port of the Prometheus metrics endpoint (0 = no endpoint).", minimum=0)
    faust_metrics: bool = _s(True, "Also export Faust's own consumer/stream metrics (faust PrometheusMonitor) on the same endpoint.")
    broker_quirks: str = _s("none", "'tansu' when the broker is the embedded one: works around its ListOffsets answer, its held and empty fetches, its missing idempotent producer and its missing transactions (the five workarounds of stream/broker_adapter.py; docs/stream.md). Never with Apache Kafka.", BROKER_QUIRKS)
    group_session_timeout: float = _s(10.0, "Consumer group session timeout in seconds: how soon a dead worker's partitions move. Apache Kafka accepts it between the broker's group.min.session.timeout.ms and group.max.session.timeout.ms (6 s and 30 min by default).", minimum=0.5)
    standby_replicas: int = _s(0, "Faust table_standby_replicas: how many other workers also read each changelog partition into their store. With --store memory this does not shorten a takeover; with --store rocksdb it does (see docs/stream.md, 'Scale-out and sizing').", minimum=0)
    store: str = _s("memory", "Where a worker keeps its session states: 'memory' (Faust's in-memory store: a worker taking over partitions, or restarted, reads their whole changelog) or 'rocksdb' (Faust's RocksDB store through rocksdict, on disk in --data-dir: a restarted worker, or a standby, reads only the changelog's tail; not for production yet: see docs/stream.md, 'Scale-out and sizing').", ("memory", "rocksdb"))
    data_dir: str = _s("", "With --store rocksdb: the worker's own directory for its RocksDB state (locked: one worker per directory; keep it across restarts). Empty = $XDG_STATE_HOME (~/.local/state)/streamrec/APP_ID-METRICS_PORT.")
    scorer_threads: int = _s(1, "CPU threads of the scorer (ONNX Runtime / torch intra-op).", minimum=1)
    bundle_poll_seconds: float = _s(5.0, "How often the worker checks --bundle (a directory or a symlink to one) for a new model_version and swaps it in while serving (0 = never).", minimum=0)
    model_updates_topic: str = _s("model-updates", "Topic of model-update messages (`streamrec publish-model`): every worker reads every message, outside the consumer group, and swaps the bundle it names in while serving (empty = not read).")
    bundle_root: str = _s("", "Directory that every bundle a model-updates message names must lie in, its path resolved with symlinks; a message naming any other path is refused (streamrec_model_updates_total{outcome=\"outside_root\"}). Empty = the directory that holds --bundle.")
    experiment: str = _s("", "Name of the A/B experiment the worker runs with --arms (it seeds the stable assignment of sessions to arms, and answers carry it); empty = no experiment, one model from --bundle. See docs/experiments.md.")
    arms: str = _s("", "The experiment's arms as NAME=BUNDLE:WEIGHT separated by commas (e.g. champion=/srv/a:0.9,challenger=/srv/b:0.1): each a bundle served at once; a new session goes to an arm with probability weight / sum of weights and stays there (recorded in its state). Needs --experiment; with it --bundle may be left out.")
    security_protocol: str = _s("PLAINTEXT", "Kafka security protocol of every client.", SECURITY_PROTOCOLS)
    sasl_mechanism: str = _s("PLAIN", "SASL mechanism (with SASL_* protocols).", SASL_MECHANISMS)
    sasl_username: str = _s("", "SASL user name.")
    sasl_password: str = _s("", "SASL password.", secret=True)
    ssl_cafile: str = _s("", "CA bundle to verify the brokers (SSL, SASL_SSL).")
    ssl_certfile: str = _s("", "Client certificate (mutual TLS).")
    ssl_keyfile: str = _s("", "Client certificate's private key (mutual TLS).")
    log_level: str = _s("warning", "Worker log level.", ("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo = f.metadata.get("min")
            if lo is not None and (not math.isfinite(value) or value < lo):
                raise UserError(f"--{flag_name(f.name)} must be at least {lo}, got {value}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"--{flag_name(f.name)} must be one of {', '.join(choices)}, got '{value}'")
        for topic in ("clicks_topic", "recommendations_topic", "dlq_topic", "app_id"):
            if not getattr(self, topic):
                raise UserError(f"--{flag_name(topic)} must not be empty")
        if self.model_updates_topic in (self.clicks_topic, self.recommendations_topic, self.dlq_topic):
            raise UserError(f"--model-updates-topic must be a topic of its own, not '{self.model_updates_topic}'")
        self.bootstrap_servers()
        if bool(self.experiment) != bool(self.arms):
            raise UserError("--experiment and --arms go together: an experiment needs its arms, arms need the experiment's name")
        if self.arms:
            self.experiment_arms()
        if self.data_dir and Path(self.data_dir).expanduser().exists() and not Path(self.data_dir).expanduser().is_dir():
            raise UserError(f"--data-dir {self.data_dir} is not a directory")
        if self.bundle_root and not Path(self.bundle_root).is_dir():
            raise UserError(f"--bundle-root {self.bundle_root}: no such directory")
        broker_adapter(self).check(self)
        if self.security_protocol.startswith("SASL") and not self.sasl_username:
            raise UserError(f"--security-protocol {self.security_protocol} needs --sasl-username (and --sasl-password)")

    def bootstrap_servers(self) -> list[str]:
        """HOST:PORT of every broker in ``broker``."""
        out = []
        for part in self.broker.replace(";", ",").split(","):
            part = part.strip()
            if part.startswith("kafka://"):
                part = part[len("kafka://") :]
            host, sep, port = part.rstrip("/").rpartition(":")
            if not sep or not host or not port.isdigit():
                raise UserError(f"--broker wants kafka://HOST:PORT[,HOST:PORT...], got '{self.broker}'")
            out.append(f"{host}:{port}")
        return out

    def experiment_arms(self) -> tuple:
        """The parsed --arms (stream.experiment.Arm each); empty without an experiment."""
        from stream.experiment import parse_arms

        return parse_arms(self.arms) if self.arms else ()

    def faust_broker(self) -> list[str]:
        return [f"kafka://{hp}" for hp in self.bootstrap_servers()]

    def to_env(self) -> dict[str, str]:
        """The STREAMREC_* environment that reproduces these settings in a child process."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[env_name(f.name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    def worker_data_dir(self) -> Path:
        """The directory of the worker's RocksDB state: --data-dir, or one of its own per app id and metrics port."""
        from stream.store import default_data_dir

        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir(self.app_id, self.metrics_port)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly_once"

    @property
    def isolation_level(self) -> str:
        """What the project's readers of the worker's output use (stream.broker_adapter)."""
        return broker_adapter(self).isolation_level

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context every client uses, or None without TLS."""
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise UserError(f"--{flag_name(name)} {path}: no such file")
        context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return context

    def kafka_kwargs(self) -> dict[str, Any]:
        """Connection and security keyword arguments for any aiokafka client."""
        out: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers(), "security_protocol": self.security_protocol}
        context = self.ssl_context()
        if context is not None:
            out["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            out.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username, sasl_plain_password=self.sasl_password)
        return out

    def faust_group_settings(self) -> dict[str, Any]:
        """faust.App settings of the consumer group: timeouts derived from --group-session-timeout, standbys.

        Faust refuses a session timeout above its request timeout (90 s by default), and a JoinGroup
        request waits on the broker up to the rebalance timeout, so the request timeout follows
        both (as the Java client does for JoinGroup: rebalance timeout + 5 s).
        """
        session = self.group_session_timeout
        rebalance = max(session, 10.0)
        return {
            "broker_session_timeout": session,
            "broker_heartbeat_interval": min(3.0, session / 4),
            "broker_rebalance_timeout": rebalance,
            "broker_request_timeout": max(90.0, rebalance + 5.0),
            "table_standby_replicas": self.standby_replicas,
        }

    def faust_credentials(self) -> dict[str, Any]:
        """``broker_credentials`` for faust.App (SASL/TLS reach its consumer and producer)."""
        import faust

        context = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            return {"broker_credentials": faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password, ssl_context=context, mechanism=self.sasl_mechanism)}
        if context is not None:
            return {"broker_credentials": faust.SSLCredentials(context)}
        return {}


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return "STREAMREC_" + name.upper()


def _option(f: dataclasses.Field) -> Callable:
    flag = flag_name(f.name)
    kwargs: dict[str, Any] = {"envvar": env_name(f.name), "default": f.default, "show_default": True, "help": f.metadata["help"]}
    if f.type in ("bool", bool):
        return click.option(f"--{flag}/--no-{flag}", f.name, **kwargs)
    if f.metadata.get("choices"):
        kwargs["type"] = click.Choice(f.metadata["choices"], case_sensitive=False)
    else:
        kwargs["type"] = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
    return click.option(f"--{flag}", f.name, **kwargs)


def settings_options(names: tuple[str, ...] | None = None) -> Callable:
    """Decorator adding the click options of the named settings (all when None)."""
    fields = [f for f in dataclasses.fields(Settings) if names is None or f.name in names]

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields):
            fn = _option(f)(fn)
        return fn

    return decorate


def settings_from(options: dict[str, Any]) -> tuple[Settings, dict[str, Any]]:
    """Split click keyword arguments into (Settings, the remaining arguments)."""
    names = {f.name for f in dataclasses.fields(Settings)}
    chosen = {k: v for k, v in options.items() if k in names}
    for name in ("security_protocol", "sasl_mechanism"):
        if name in chosen:
            chosen[name] = chosen[name].upper()
    if "log_level" in chosen:
        chosen["log_level"] = chosen["log_level"].lower()
    return Settings(**chosen), {k: v for k, v in options.items() if k not in names}


def markdown_table() -> str:
    """The settings table of docs/stream.md."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = ("on" if default else "off") if isinstance(default, bool) else (f"`{default}`" if default != "" else "(empty)")
        choices = f.metadata.get("choices")
        help = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        rows.append(f"| `--{flag_name(f.name)}` | `{env_name(f.name)}` | {shown} | {help} |")
    return "\n".join(rows)
