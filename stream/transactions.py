"""Exactly-once output (``--processing-guarantee exactly_once``): Kafka transactions, one producer per clicks partition.

Each clicks partition the worker owns has a transactional producer of its own, with the
transactional id ``<app-id>-eos-<clicks topic>-<partition>``. The answers and dead letters of a
micro-batch's clicks of a partition, the session states of that partition (changelog partition =
clicks partition) and the partition's consumed offset go in one transaction of that partition's
producer, committed before the clicks are acknowledged. Readers with ``isolation.level =
read_committed`` see a batch's answers and states together with its offsets, or nothing of it.

Fencing: whoever is given a partition starts a producer with that partition's transactional id
before it recovers the partition's sessions or reads its clicks (the consumer's
``on_partitions_assigned``, ahead of Faust's recovery). Starting it (InitProducerId) aborts the
previous owner's open transaction and raises the id's epoch, so a worker that lost the partition
(restarted, or a zombie that was paused until its partitions moved) can no longer write to it or
commit: the broker refuses its producer as fenced. One id per partition (and not one per worker
with the consumer group's generation in TxnOffsetCommit, KIP-447) because aiokafka 0.14 sends
TxnOffsetCommit v0, which carries no generation.

A partition's transactions run one after the other (a producer has one open transaction at a
time); the micro-batches that arrive while one is in flight go in the next, together (group
commit). Different partitions' transactions run side by side. Producers live for one group
generation: all are stopped when partitions are revoked (after their last transactions) and
started again for the next assignment.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from stream.outbox import Outbox
from stream.transport import wait_for_producer_ids

log = logging.getLogger("streamrec.transactions")

STOP_WAIT_SECONDS = 30.0  # how long a revocation waits for a partition's last transactions


class NotOwned(Exception):
    """The partition has no producer in this generation (revoked meanwhile)."""


class Transactions:
    """The transactional producers of the clicks partitions this worker owns."""

    def __init__(self, settings, producer_options: dict):
        self.settings = settings  # its kafka_kwargs(): the connection and security of every client made here
        self.producer_options = producer_options
        # the consumer group is the Faust app's (its id), whose offsets the transactions commit
        self.app_id, self.clicks_topic, self.group_id = settings.app_id, settings.clicks_topic, settings.app_id
        self.producers: dict[int, AIOKafkaProducer] = {}
        self.outboxes: dict[int, Outbox] = {}
        self.tails: dict[int, asyncio.Future] = {}  # each partition's committing task
        self.pending: dict[int, list] = {}  # per partition, what its next transaction holds: (records, offset, future) each
        self.failed: dict[int, BaseException] = {}  # partitions whose producer failed this generation
        self.topics: list[str] = []  # every topic the transactions write to (tracked in each producer's metadata)
        self.committed = None  # called once per committed transaction (the worker counts them)
        # on_committed(topic, partition, records): a done-callback for a batch of those records, called with the
        # batch's (resolved) future once its transaction is committed (stream.store.SessionStore.on_sent), or None
        self.on_committed = None

    def transactional_id(self, partition: int) -> str:
        return f"{self.app_id}-eos-{self.clicks_topic}-{partition}"

    async def on_assigned(self, assigned: Iterable) -> None:
        """Start (and so fence any earlier owner of) a producer for each clicks partition assigned; before recovery."""
        await self.stop()
        new = sorted({tp.partition for tp in assigned if tp.topic == self.clicks_topic})
        producers = {p: AIOKafkaProducer(**self.settings.kafka_kwargs(), **self.producer_options, transactional_id=self.transactional_id(p), client_id=self.transactional_id(p)) for p in new}
        try:
            await asyncio.gather(*(producer.start() for producer in producers.values()))
            # start() only starts the sender, which asks for the producer id (InitProducerId: the fencing)
            # in the background; wait for it, so that the fencing is done before recovery begins.
            await wait_for_producer_ids(producers.values())
            if self.topics:
                await asyncio.gather(*(producer.client.set_topics(self.topics) for producer in producers.values()))
        except BaseException:
            await asyncio.gather(*(producer.stop() for producer in producers.values()), return_exceptions=True)
            raise
        self.producers = producers
        self.outboxes = {p: Outbox(producer) for p, producer in producers.items()}
        log.info("transactional producers started for partitions %s", new)

    async def on_revoked(self) -> None:
        await self.stop()

    async def stop(self) -> None:
        """After each partition's last transaction (at most STOP_WAIT_SECONDS), stop every producer."""
        deadline = asyncio.get_running_loop().time() + STOP_WAIT_SECONDS
        while tails := [t for t in self.tails.values() if not t.done()]:  # a tail may start another while we wait
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(tails, timeout=left)
        producers, self.producers, self.outboxes, self.tails, self.failed = self.producers, {}, {}, {}, {}
        for partition, entries in self.pending.items():
            for _, _, future in entries:
                if not future.done():
                    future.set_exception(NotOwned(partition))
        self.pending = {}
        await asyncio.gather(*(producer.stop() for producer in producers.values()), return_exceptions=True)

    def transact(self, partition: int, records: list, offset: int | None) -> asyncio.Future:
        """``records``, each (topic, partition or None to partition by key, key, value), and with
        ``offset`` the clicks partition's consumed offset (the next one to read), in a transaction of
        ``partition``'s producer; a future that resolves once it is committed. Raises NotOwned (in the
        future) when the partition is not this worker's now.

        Group commit: what is handed over while the partition's transaction is in flight goes in its
        next one, all together (so under load transactions grow with the backlog, and a click waits
        for at most the transaction in flight and its own)."""
        future = asyncio.get_running_loop().create_future()
        if partition not in self.producers:
            future.set_exception(NotOwned(partition))
            return future
        failed = self.failed.get(partition)
        if failed is not None:
            future.set_exception(RuntimeError(f"an earlier transaction of partition {partition} failed ({failed!r})"))
            return future
        self.pending.setdefault(partition, []).append((records, offset, future))
        tail = self.tails.get(partition)
        if tail is None or tail.done():
            self.tails[partition] = asyncio.ensure_future(self._drain(partition))
        return future

    async def _drain(self, partition: int) -> None:
        """Commit what is pending for ``partition``, one transaction at a time, until nothing is."""
        while self.pending.get(partition):
            taken = self.pending.pop(partition)
            offsets = [offset for _, offset, _ in taken if offset is not None]
            try:
                await self._commit(partition, [r for records, _, _ in taken for r in records], max(offsets) if offsets else None)
            except BaseException as exc:
                self.failed[partition] = exc
                for _, _, future in taken + self.pending.pop(partition, []):
                    if not future.done():
                        future.set_exception(exc)
                return
            for _, _, future in taken:
                if not future.done():
                    future.set_result(None)

    def _defer(self, sent: list, topic: str, partition: int, batch: list):
        """Outbox.send's on_sent: the on_committed callback of a batch, kept in ``sent`` with the batch's
        future until the transaction is committed."""
        callback = self.on_committed(topic, partition, batch)
        return None if callback is None else (lambda future: sent.append((callback, future)))

    async def _commit(self, partition: int, records: list, offset: int | None) -> None:
        producer, outbox = self.producers[partition], self.outboxes[partition]
        sent: list = []  # (callback, future) of each batch whose records count only once committed
        on_sent = None if self.on_committed is None else functools.partial(self._defer, sent)
        await producer.begin_transaction()
        try:
            for topic, part, key, value in records:
                if part is None:
                    await outbox.add_keyed(topic, key, value)
                else:
                    outbox.add(topic, part, key, value)
            futures = await outbox.send(on_sent=on_sent)
            if offset is not None:
                await producer.send_offsets_to_transaction({TopicPartition(self.clicks_topic, partition): offset}, self.group_id)
            await asyncio.gather(*futures)
            await producer.commit_transaction()
        except BaseException as exc:
            log.error("transaction of partition %d failed (%r)", partition, exc)
            try:
                await asyncio.wait_for(producer.abort_transaction(), 10.0)
            except BaseException:
                pass  # a fenced producer cannot abort; the broker aborts its transaction
            raise
        for callback, future in sent:  # in send order: a partition's states reach the store as committed
            callback(future)
        if self.committed is not None:
            self.committed()

    async def changelog_ends(self, changelog_topics, ends: dict) -> dict:
        """``ends`` (end offsets, read committed) with each changelog partition's replaced by one past its
        last committed record (see committed_ends)."""
        tails = {tp: end for tp, end in ends.items() if tp.topic in changelog_topics and end}
        if tails:
            ends.update(await committed_ends(self.settings, tails))
        return ends


TAIL_RECORDS = 256  # records read back from a partition's end at first, to find its last committed record
TAIL_SECONDS = 30.0  # longest time spent reading one partition's tail


async def committed_ends(settings, ends: dict) -> dict:
    """Partition -> one past its last committed data record before ``ends[partition]`` (the end offset
    a read_committed reader gets), or the partition's first offset if it has none.

    The records between are commit or abort markers and aborted records, which a read_committed
    reader never gets. Reads back from the end, TAIL_RECORDS at first, eight times further each time
    nothing committed is found.
    """
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False, isolation_level="read_committed", fetch_max_wait_ms=50)
    await consumer.start()
    out = {}
    try:
        tps = [TopicPartition(tp.topic, tp.partition) for tp in ends]
        consumer.assign(tps)
        firsts = await consumer.beginning_offsets(tps)
        for tp, original in zip(tps, ends):
            end, first = ends[original], firsts[tp]
            window, found, start = TAIL_RECORDS, None, end
            while found is None and start > first:
                start = max(first, end - window)
                found = await _last_below(consumer, tp, start, end)
                window *= 8
            out[original] = found + 1 if found is not None else first
    finally:
        await consumer.stop()
    return out


async def _last_below(consumer, tp, start: int, end: int) -> int | None:
    """The offset of the last record of ``tp`` in [start, end) a read_committed reader gets, or None."""
    import time

    consumer.seek(tp, start)
    last = None
    deadline = time.monotonic() + TAIL_SECONDS
    while await consumer.position(tp) < end:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tp.topic}[{tp.partition}]: could not read offsets {start}..{end} within {TAIL_SECONDS:.0f}s")
        batch = await consumer.getmany(tp, timeout_ms=200)
        for record in batch.get(tp, ()):
            if record.offset < end:
                last = record.offset
    return last
