"""Early warning for the private Faust and aiokafka names the stream relies on (issue 15 gathers them
into one module; until then this lists those used by the fetch loop's put-back, the exactly-once
transactions and the RocksDB store). A rename upstream fails here, not silently in a rebalance."""

from __future__ import annotations

import asyncio
import inspect

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.producer.transaction_manager import TransactionManager
from faust.stores import rocksdb as faust_rocksdb
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka


def test_the_fetch_loop_finds_the_faust_consumer_names_it_reads_batches_through():
    """stream.transport's fetch loop: _wait_next_records (returns records and active partitions),
    the consumer's scheduler and _to_message."""
    wait = faust_consumer.Consumer._wait_next_records
    assert inspect.iscoroutinefunction(wait) and list(inspect.signature(wait).parameters) == ["self", "timeout"]
    assert "self.scheduler = " in inspect.getsource(faust_consumer.Consumer.__init__)
    assert list(inspect.signature(faust_aiokafka.Consumer._to_message).parameters) == ["self", "tp", "record"]


def test_the_aiokafka_clients_keep_the_private_attributes_the_worker_sets_or_awaits():
    """stream.transport sets the consumer's _isolation_level and _fetch_max_wait_ms before start();
    stream.transactions awaits the producer's _txn_manager.wait_for_pid() (the fencing)."""

    async def build():
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", transactional_id="early-warning")
        return consumer, producer

    consumer, producer = asyncio.run(build())
    assert consumer._isolation_level == "read_uncommitted" and consumer._fetch_max_wait_ms == 500
    assert isinstance(producer._txn_manager, TransactionManager)
    assert inspect.iscoroutinefunction(TransactionManager.wait_for_pid)


def test_faust_rocksdb_store_keeps_the_names_the_session_store_writes_through():
    """stream.store reads each partition's database (_dbs, _db_for_partition) and writes the
    persisted changelog offset under Faust's offset_key."""
    store = faust_rocksdb.Store
    assert store.offset_key == b"__faust\0offset__"
    assert list(inspect.signature(store._db_for_partition).parameters) == ["self", "partition"]
    assert "self._dbs = " in inspect.getsource(store.__init__)
