"""The worker's sends: one aiokafka producer, records grouped into explicit batches per partition.

Sending a micro-batch's records as a few ``send_batch`` calls instead of one
``send`` per record takes the producer's per-record Python cost out of the hot
path. Keyed records go to the partition Kafka's default (murmur2) partitioner
picks for the key, as any Java or aiokafka producer would.

``single_last``: topics whose every partition write must END with a batch of
exactly one record: workaround 1 of stream.broker_adapter (a broker whose
ListOffsets "latest" answer is the first offset of the last batch + 1, so that
a changelog whose last batch holds several records looks shorter than it is
and Faust's table recovery stops early; with a one-record last batch that
answer is the true end). The broker adapter says which topics, if any.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner


class Outbox:
    def __init__(self, producer: AIOKafkaProducer, single_last: frozenset[str] = frozenset()):
        self.producer = producer
        self.single_last = single_last
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._pending: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}

    async def partition_for(self, topic: str, key: bytes) -> int:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = sorted(await self.producer.partitions_for(topic))
            self._partitions[topic] = partitions
        return self._partitioner(key, partitions, partitions)

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> None:
        self._pending.setdefault((topic, partition), []).append((key, value))

    async def add_keyed(self, topic: str, key: bytes, value: bytes) -> None:
        self.add(topic, await self.partition_for(topic, key), key, value)

    async def send(self, on_sent=None) -> list[asyncio.Future]:
        """Queue everything added so far; futures that resolve when the broker has each batch.

        ``on_sent(topic, partition, records)``: a done-callback for the future of each batch of those records
        (stream.store.SessionStore.on_sent); the callbacks of one partition's batches run in send order."""
        futures = []
        # Kafka record timestamps are epoch milliseconds: a record stamped in seconds reads as January
        # 1970, and Apache Kafka's time retention deletes its segment at the next check (minutes).
        now = int(time.time() * 1000)
        pending, self._pending = self._pending, {}
        for (topic, partition), records in pending.items():
            last_alone = topic in self.single_last and len(records) > 1
            head = records[:-1] if last_alone else records
            futures += await self._send(topic, partition, head, now, on_sent)
            if last_alone:
                futures += await self._send(topic, partition, records[-1:], now, on_sent)
        return futures

    async def _send(self, topic: str, partition: int, records, now: int, on_sent=None) -> list[asyncio.Future]:
        futures = []
        batch = self.producer.create_batch()
        start = 0  # index of the batch's first record
        for i, (key, value) in enumerate(records):
            if batch.append(key=key, value=value, timestamp=now) is None:
                futures.append(await self._send_batch(batch, topic, partition, records[start:i] if on_sent else None, on_sent))
                batch, start = self.producer.create_batch(), i
                if batch.append(key=key, value=value, timestamp=now) is None:
                    raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a producer batch")
        if batch.record_count():
            futures.append(await self._send_batch(batch, topic, partition, records[start:] if on_sent else None, on_sent))
        return futures

    async def _send_batch(self, batch, topic: str, partition: int, records, on_sent) -> asyncio.Future:
        future = await self.producer.send_batch(batch, topic, partition=partition)
        callback = on_sent(topic, partition, records) if on_sent is not None else None
        if callback is not None:
            future.add_done_callback(callback)
        return future
