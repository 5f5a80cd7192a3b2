"""Faust's aiokafka transport with the changes the stream needs, each measured on this project's box;
and the one module of stream/ that uses private names of Faust, mode or aiokafka.

Every such use is here, behind a small named function or in the overrides below, each saying why the
public API does not suffice on Apache Kafka; the rest of stream/ calls these. The versions they were
written against are pinned in constraints.txt, and tests/test_private_names.py fails when one of the
names changes or, for a copied or wrapped upstream method, when its source does.

1. Fetch wait, only where the broker adapter sets one (stream.broker_adapter, which
   says why). faust-streaming 0.15 hard-codes ``fetch_max_wait_ms=1500`` for
   its consumer and has no setting for it, so ``set_fetch_max_wait`` sets the
   aiokafka consumer's before it starts. On Apache Kafka, which answers a fetch
   as soon as data arrives, Faust's own value stands (docs/stream.md, "What
   Apache Kafka needs"), and this never runs.

2. Bulk delivery. Faust's consumer loop hands each fetched record to the
   conductor inside ``wait_first(callback, suspend_flow.wait())``, which
   creates two tasks and an event-loop round trip per record and caps a
   trivial agent at ~7k records/s on this box, whatever the agent does. This
   loop awaits the conductor callback directly, so a fetched batch reaches
   the agent's queue in one go and the agent takes it as one micro-batch
   (~40k records/s trivial). Records fetched while flow is suspended (a
   rebalance) are dropped exactly as Faust drops them.

   Around a rebalance the hand-over never blocks: while the agent's queue is
   full the loop waits for room itself and drops the record (not marking it
   read) if a rebalance begins meanwhile, rather than letting the conductor
   block in ``queue.put`` across a rebalance, after which the record lands in
   the cleared queue, out of order (mode's queue lets a pending put through
   after ``clear()``).

   Nor does it hand a stream record over while a rebalance is under way.
   Faust's table recovery resumes the stream partitions *before* its seek to
   the committed offsets, and resumes the flow, which clears the agent's
   queue, only after it: a record handed over in between was lost from the
   queue, and the read offset the loop had set for it outlived the seek, so
   the loop then dropped the records the seek read again as "already read".
   Such a record is skipped unread instead (its offset noted), and once the
   rebalance is over the loop seeks the partition back to the first record
   skipped, unless the rebalance's seek already went back that far (see
   docs/reliability.md).

   A fetched batch can also outlive a rebalance: the loop may still be handing
   it over when the rebalance has ended and sought every partition back to its
   committed offset. Its records, fetched in an older group generation, are
   dropped without touching the read offset: one of them, taken as read, made
   the loop open a gap up to it and then drop the records the seek read again
   as already read, so one click went unanswered and its offset was committed
   (seen once in the scale-out test on Apache Kafka, under load).

3. Records fetched while a rebalance begins are put back, not dropped.
   Faust's ``Consumer.getmany`` drops a fetched batch whose records it has
   not handed over yet when the flow stops or the group generation changes,
   and relies on the rebalance's seek to committed offsets to read them again.
   A changelog partition has no committed offset: when the fetch that Faust's
   table recovery starts with its own seek came back in the few milliseconds
   before it resumed the flow, those records were dropped, the partition's
   position stood at its end, and the recovery waited for them for ever ("No
   event received for active tp ... since recovery start": the worker never
   answered again; about one full test run in four on Apache Kafka, which
   answers a fetch at once). The same window lost clicks fetched right after
   the seek to committed offsets (their offsets then counted as read). This
   loop takes the batch from ``_wait_next_records`` itself and, when it stops
   handing a batch over for a rebalance, seeks each partition back to the
   first record not handed over, unless a seek has moved it since the fetch
   (that seek then decides where reading resumes). Shown by a local
   experiment: widening the window by 0.3 s made every rebalance of the
   scale-out test stall before this change and none after (docs/reliability.md).

4. Adaptive fetch wait, only where the broker adapter asks for it
   (stream.broker_adapter, which says why): ``adapt_fetch_wait`` wraps aiokafka's
   Fetcher's per-request coroutine on the live object, so that after each
   answer the adapter's policy sets the next fetch's wait. aiokafka has no hook
   for either. On Apache Kafka this never runs.

5. Only with ``--processing-guarantee exactly_once`` (stream.transactions): the
   consumer reads committed records only; each new assignment starts (and so
   fences) the partitions' transactional producers before Faust's recovery;
   Faust commits no offset (each transaction does); and the end of a changelog
   partition that Faust's recovery waits for is one past its last committed
   record, not the end offset: a transaction ends with a commit marker, which
   takes an offset and never reaches the reader, so recovery would wait for it
   for ever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka.errors import IllegalStateError
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger("streamrec.transport")

ROOM_POLL_SECONDS = 0.002  # how often the fetch loop looks for room in a full agent queue


# The private names used outside the overrides below: each behind one function.


def set_fetch_max_wait(consumer, ms: int) -> None:
    """Set an aiokafka consumer's fetch wait before ``start()`` hands it to its Fetcher (point 1).

    Faust builds the consumer itself with ``fetch_max_wait_ms=1500`` and no setting; aiokafka reads
    ``_fetch_max_wait_ms`` in ``start()``. Not used on Apache Kafka."""
    consumer._fetch_max_wait_ms = ms


def set_read_committed(consumer) -> None:
    """Make an aiokafka consumer read committed records only (point 5), before ``start()``.

    Faust builds the consumer with read_committed only when its own ``processing_guarantee`` is
    exactly_once, which would also make Faust's producer transactional (the worker has its own
    transactional producers, stream.transactions); aiokafka reads ``_isolation_level`` in ``start()``.
    Needed on Apache Kafka under ``--processing-guarantee exactly_once``."""
    consumer._isolation_level = "read_committed"


def adapt_fetch_wait(consumer, wait) -> None:
    """Make the started aiokafka ``consumer`` set its fetch wait from ``wait.after_fetch(empty_while_behind)``
    (milliseconds) after each fetch answer (point 4).

    Wraps the Fetcher's per-request coroutine on the instance: its fetch loop looks the method up for
    every request and builds each request from ``_fetch_max_wait_ms``; aiokafka has no hook for it.
    Not used on Apache Kafka."""
    fetcher = consumer._fetcher
    fetch = fetcher._proc_fetch_request

    async def fetch_and_adapt(assignment, node_id, request):
        had_records = await fetch(assignment, node_id, request)
        if assignment.active:
            behind = False
            for topic, partitions in request.topics:
                for partition, offset, _ in partitions:
                    tp = TopicPartition(topic, partition)
                    state = assignment.state_value(tp)
                    if tp not in fetcher._records and state.highwater is not None and state.highwater > offset:
                        behind = True
            fetcher._fetch_max_wait_ms = wait.after_fetch(behind)
        return had_records

    fetcher._proc_fetch_request = fetch_and_adapt


async def wait_for_producer_ids(producers) -> None:
    """Wait until each started transactional aiokafka producer has its producer id (InitProducerId:
    the fencing of the transactional id's earlier owner).

    ``start()`` only starts the sender, which asks for the id in the background; aiokafka's public
    ``begin_transaction()`` waits for it but also begins a transaction. Needed on Apache Kafka under
    ``--processing-guarantee exactly_once``."""
    await asyncio.gather(*(producer._txn_manager.wait_for_pid() for producer in producers))


def rocksdb_partition_db(store, partition: int, open_it: bool = False):
    """The RocksDB database of ``partition`` in Faust's RocksDB ``store`` (a table's ``.data``) if it is
    open here, else None; with ``open_it``, opened if need be (Faust does so on assignment).

    Faust's Store offers reads and writes by key only (to the partition of the current event): the
    worker writes a batch of states together with the changelog offset in one write, to the
    partition of its choosing (stream.store). Needed on any broker with ``--store rocksdb``."""
    return store._db_for_partition(partition) if open_it else store._dbs.get(partition)


def rocksdb_offset_key(store) -> bytes:
    """The key under which Faust's RocksDB ``store`` keeps each partition database's persisted changelog
    offset (what ``set_persisted_offset`` writes; undocumented, hence here)."""
    return store.offset_key


def consumer_partition_report(consumer, tp) -> str:
    """One clicks partition as a Faust consumer sees it, for the worker's stall log: high watermark,
    last offset handed to the agent, committed offset, and whether it is fetched (paused during
    recovery, or its buffer full). Faust keeps these in private attributes only."""
    c = consumer
    why_not = [name for name, tps in (("paused", c._paused_partitions), ("buffer full", c._buffered_partitions)) if tp in tps]
    fetching = "fetching" if tp in (c._active_partitions or ()) else f"not fetching ({', '.join(why_not) or 'inactive'})"
    return f"p{tp.partition} high={c.highwater(tp)} read={c._read_offset.get(tp)} committed={c._committed_offset.get(tp)} {fetching}"


async def put_back(consumer, spans: dict) -> dict:
    """Seek each partition of ``spans`` (tp -> (first offset, offset after the last) of records fetched but
    not handed over) back to the first offset, if the aiokafka ``consumer`` still stands right after the
    last: a seek since the fetch decides where reading resumes, and a revoked partition is left to its
    next owner. The spans put back."""
    assigned = consumer.assignment()
    done = {}
    for tp, (first, end) in spans.items():
        aiotp = TopicPartition(tp.topic, tp.partition)
        if aiotp not in assigned:
            continue
        try:
            position = await asyncio.wait_for(consumer.position(aiotp), timeout=5.0)
        except (IllegalStateError, asyncio.TimeoutError):
            continue
        if position == end:
            consumer.seek(aiotp, first)
            done[tp] = (first, end)
    return done


class SkippedWhileRebalancing:
    """Per stream partition, the first offset the fetch loop skipped unread while a rebalance was under way."""

    def __init__(self) -> None:
        self.first: dict = {}

    def skip(self, tp, offset: int) -> None:
        if offset < self.first.get(tp, offset + 1):
            self.first[tp] = offset

    def forget(self, tps) -> None:
        """Partitions revoked: their next owner starts from the committed offset."""
        for tp in tps:
            self.first.pop(tp, None)

    def seek_back(self, tp, offset: int) -> int | None:
        """Where to read ``tp`` from again before its record at ``offset``, the first after the rebalance:
        the first offset skipped, or None when ``offset`` is not past it (never a seek forward)."""
        first = self.first.pop(tp, None)
        return first if first is not None and offset > first else None


def stream_transport(fetch_max_wait_ms: int | None, bulk_delivery: bool = True, fetch_wait=None, exactly_once=None) -> type:
    """A Faust Transport class whose consumer waits at most ``fetch_max_wait_ms`` per fetch (None: Faust's 1.5 s).

    ``bulk_delivery=False`` keeps Faust's own per-record delivery loop (the
    stream benchmark's baselines use it). ``fetch_wait``: None, or a callable
    that makes the policy ``adapt_fetch_wait`` follows (point 4 above; the
    broker adapter's, stream.broker_adapter).

    ``exactly_once`` (point 5): the worker's stream.transactions.Transactions under
    ``--processing-guarantee exactly_once``, None otherwise.
    """

    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any):
            consumer = super()._create_worker_consumer(transport)
            # Overridden (a private hook of Faust's) because Faust builds the aiokafka consumer here with
            # its own fetch wait and isolation level, and has no setting for either (points 1 and 5).
            if fetch_max_wait_ms is not None:
                set_fetch_max_wait(consumer, fetch_max_wait_ms)  # aiokafka hands it to its Fetcher in start(), after this
            if exactly_once is not None:
                set_read_committed(consumer)  # recovery must not apply the states of aborted transactions
            return consumer

        async def unread(self, spans: dict) -> None:
            """Seek each partition of ``spans`` (tp -> (first offset, offset after the last)) back to the first
            offset if it still stands right after the last, in the consumer's own thread."""
            if spans:
                await self.call_thread(self._unread, spans)

        async def _unread(self, spans: dict) -> None:
            # The aiokafka consumer itself (Faust's private _ensure_consumer): Faust's public seek cannot say
            # "only if the position has not moved since the fetch" (put_back).
            for tp, (first, end) in (await put_back(self._ensure_consumer(), spans)).items():
                log.info("%s[%d]: put back %d fetched records (from offset %d): a rebalance began before they were handed over", tp.topic, tp.partition, end - first, first)

        async def on_start(self) -> None:
            await super().on_start()
            if fetch_wait is not None:
                adapt_fetch_wait(self._consumer, fetch_wait())

    class Consumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self):
            # Faust's only way to give its consumer another thread class (the overrides above); no setting.
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

        if exactly_once is not None:

            async def on_partitions_assigned(self, assigned, generation_id: int = 0) -> None:
                # Fence the partitions' earlier owners before Faust recovers their sessions or reads their clicks.
                await exactly_once.on_assigned(assigned)
                await super().on_partitions_assigned(assigned, generation_id)

            async def on_partitions_revoked(self, revoked) -> None:
                await super().on_partitions_revoked(revoked)  # waits for the acks, i.e. the committed transactions
                await exactly_once.on_revoked()

            async def _commit(self, offsets) -> bool:
                # Still needed on Apache Kafka: Faust's commit path has no switch to leave the offsets to someone
                # else's transactions short of its own exactly_once, which makes its producer transactional.
                return True  # the offsets went into each batch's transaction

            async def highwaters(self, *partitions):
                ends = dict(await super().highwaters(*partitions))
                return await exactly_once.changelog_ends(self.app.tables.changelog_topics, ends)

    class BulkConsumer(Consumer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._skipped = SkippedWhileRebalancing()

        async def on_partitions_revoked(self, revoked) -> None:
            self._skipped.forget(revoked)
            await super().on_partitions_revoked(revoked)

        async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - exercised by every broker test
            # Faust's Consumer._drain_messages (faust-streaming 0.15.3) rewritten: its per-record hand-over and its
            # dropping of a fetched batch at a rebalance (points 2 and 3) are broker-independent, so still needed on
            # Apache Kafka; Faust has no public hook into this loop. tests/test_private_names.py pins the upstream
            # source's hash and every private name read here.
            app = self.app
            skipped = self._skipped
            callback = self.callback
            wait_next_records = self._wait_next_records
            scheduler = self.scheduler
            to_message = self._to_message
            consumer_should_stop = self._stopped.is_set
            fetcher_should_stop = fetcher._stopped.is_set
            get_read_offset = self._read_offset.__getitem__
            set_read_offset = self._read_offset.__setitem__
            acks_enabled_for = self.app.topics.acks_enabled_for
            commit_every = self._commit_every
            try:
                while not (consumer_should_stop() or fetcher_should_stop()):
                    await self.sleep(0)
                    if self.should_stop:
                        break
                    if skipped.first and not app.rebalancing:
                        await self._read_skipped_again()
                    changelog_topics = app.tables.changelog_topics  # filled as the tables start: read per batch
                    sought_back = set()  # partitions sought back during this batch: the rest of it is read again
                    records, active_partitions = await wait_next_records(1.0)
                    if not records or self.should_stop:
                        continue
                    generation = app.consumer_generation_id
                    batch = list(scheduler.iterate(records))
                    for i, (tp, record) in enumerate(batch):
                        if not self.flow_active or app.consumer_generation_id != generation:
                            # A rebalance began after this batch was fetched (point 3): hand none of the rest over,
                            # and put back what the seeks of the rebalance did not already move.
                            await self._unread(batch[i:])
                            break
                        if tp in sought_back:
                            continue
                        if not (active_partitions is None or tp in active_partitions or tp in self._buffered_partitions):
                            await self._unread([(t, r) for t, r in batch[i:] if t == tp])
                            sought_back.add(tp)
                            continue
                        self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                        message = to_message(tp, record)
                        offset = message.offset
                        if message.topic not in changelog_topics:
                            if app.rebalancing:
                                skipped.skip(tp, offset)
                                continue
                        if skipped.first:
                            back_to = skipped.seek_back(tp, offset)
                            if back_to is not None and await self._seek_back(tp, back_to):
                                sought_back.add(tp)
                                continue
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if not await self._room_for(message):
                            await self._unread(batch[i:])  # a rebalance began: read this again once it is over
                            break
                        await callback(message)  # cannot block: flow on, room in the queue
                        set_read_offset(tp, offset)
            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    return
                raise
            except asyncio.CancelledError:
                if self.transport.app.should_stop:
                    return
                raise

        async def _read_skipped_again(self) -> None:
            """The rebalance is over: seek each partition with records skipped during it back to the first one
            (a partition may have no record after them, so this cannot wait for one)."""
            for tp in list(self._skipped.first):
                try:
                    position = await self.position(tp)  # the next record the loop would get: it has taken all before
                except IllegalStateError:
                    position = None
                if position is None:
                    self._skipped.forget([tp])  # no longer ours
                    continue
                back_to = self._skipped.seek_back(tp, position)
                if back_to is not None:
                    await self._seek_back(tp, back_to)

        async def _unread(self, batch: list) -> None:
            """Put the fetched records of ``batch`` (``(tp, record)`` in fetch order) back: each partition is
            sought back to its first record here, unless a seek has moved it since the fetch."""
            span: dict = {}
            for tp, record in batch:
                first, _ = span.get(tp, (record.offset, 0))
                span[tp] = (first, record.offset + 1)
            await self._thread.unread(span)

        async def _seek_back(self, tp, offset: int) -> bool:
            """Seek ``tp`` back to ``offset``, the first record skipped during the rebalance; False if it is no longer ours."""
            log.info("%s[%d]: reading again from offset %d (records skipped while rebalancing)", tp.topic, tp.partition, offset)
            try:
                await self.seek_wait({tp: offset})  # also sets the read offset
            except IllegalStateError:
                return False  # revoked meanwhile: its next owner starts from the committed offset
            return True

        async def _room_for(self, message) -> bool:
            """Wait until the queues ``message`` goes to have room; False if a rebalance began meanwhile."""
            app = self.app
            channels = app.topics._tp_index.get(message.tp, ())  # the Conductor's channels per partition: no public accessor
            while True:
                if self.should_stop or self.suspend_flow.is_set() or not app.flow_control.is_active() or message.generation_id != app.consumer_generation_id:
                    return False
                if not any(channel.queue.full() for channel in channels):
                    return True
                await asyncio.sleep(ROOM_POLL_SECONDS)

    class Transport(faust_aiokafka.Transport):
        pass

    Transport.Consumer = BulkConsumer if bulk_delivery else Consumer
    return Transport
