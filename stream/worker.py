"""The Faust worker behind `streamrec serve`.

One agent consumes ``clicks``. Each micro-batch is whatever the consumer has
delivered (up to ``--batch-size``), never waited for: the agent blocks for the
first event only, then takes what is already queued. The batch is scored by
``BatchProcessor``; each touched session's state is written once to the
``sessions`` table (--store: in-memory or RocksDB, stream.store; compacted changelog topic
``<app-id>-sessions-changelog``, on the partition the session's clicks arrive
on); answers and dead letters are sent in bulk, the batch's state records only
once the broker has confirmed them (in batch order), and the events are
acknowledged when the states are confirmed too (at-least-once). A state in the
changelog thus implies its answers are out, which lets a restarted worker skip
redelivered clicks its recovered states already hold (see stream.processor).

With ``--processing-guarantee exactly_once`` a micro-batch's answers, dead letters
and states go instead, per clicks partition, in one Kafka transaction together
with the partition's consumed offset, and the events are acknowledged once it is
committed (stream.transactions).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import faust
from aiokafka import AIOKafkaProducer
from mode import CrashingSupervisor

from stream.broker_adapter import broker_adapter
from stream.experiment import ArmedProcessor
from stream.metrics import StreamMetrics, online_ks
from stream.outbox import Outbox
from stream.processor import BatchProcessor, Record
from stream.settings import Settings
from stream.state import SessionState, StateError, last_seen_of
from stream.store import SessionStore, faust_store
from stream.topics import ensure_topics
from stream.transactions import NotOwned, Transactions
from stream.transport import consumer_partition_report, stream_transport
from stream.watchdog import BEAT_SECONDS, Watchdog, serve_http
from streamrec.errors import UserError
from streamrec.runtime import configure_process, release_free_heap

log = logging.getLogger("streamrec.worker")

TABLE = "sessions"
EXPIRY_CHUNK = 5000  # sessions examined between yields to the event loop
OUTPUT_BATCH_BYTES = 512 * 1024  # largest record batch the worker sends
DRAIN_SECONDS = 5.0  # how long a stopping worker waits for its last states and acks
MAX_PENDING_BATCHES = 4  # micro-batches whose answers, states or acks may be outstanding before the agent waits
# The producer of answers, dead letters and states (docs/reliability.md, "Producer settings"): a batch
# counts as sent once every in-sync replica has it (acks=all; with min.insync.replicas 2 a leader's
# death loses no confirmed answer or state), and the broker drops the copy a retry may write twice
# (idempotence: retries after a lost answer or a leader change keep one copy, in order). aiokafka
# retries a failed batch until request_timeout_ms (40 s) has passed; then the worker stops so that
# its unacknowledged clicks are read again (see _ack_when_delivered). linger 0: sent at once.
# Without idempotence where the broker has none (stream.broker_adapter, outbox_producer).
OUTBOX_PRODUCER = dict(acks="all", enable_idempotence=True, linger_ms=0)
# Under --processing-guarantee exactly_once, the transactional producer of each clicks partition (idempotent by being
# transactional). A transaction begun right after the last one's commit may be answered CONCURRENT_TRANSACTIONS
# while the broker writes the last one's markers, and aiokafka retries AddOffsetsToTxn after retry_backoff_ms
# (100 ms by default; the Java client waits 20 ms in this case): 10 ms. Measured at 100 clicks/s, one transaction
# per click then: p50 93.6 ms with 100 ms, 74.6 ms with 10 ms (two runs on the loaded 2-core box); what brought it
# to 18 ms was committing together what waits for a partition's transaction (stream.transactions).
EOS_PRODUCER = dict(acks="all", linger_ms=0, max_batch_size=OUTPUT_BATCH_BYTES, retry_backoff_ms=10)


def expiry_interval(ttl: float) -> float:
    """How often idle sessions are looked for: a tenth of the TTL, between 0.1 s and 60 s."""
    return min(max(ttl / 10.0, 0.1), 60.0)


class StreamWorker:
    """The Faust app, its table and agent, wired to a scorer and metrics."""

    def __init__(self, settings: Settings, scorer, partitions: int, metrics: StreamMetrics | None = None, arm_scorers: dict | None = None):
        """``arm_scorers``: arm name -> scorer under an A/B experiment (--arms), ``scorer`` then the first arm's.

        Every processor checks ``settings.k`` against its scorer (stream.bundles.check_k)."""
        self.settings = settings
        self.scorer = scorer
        self.partitions = partitions
        arms = settings.experiment_arms()
        if arms:
            self.processor = ArmedProcessor(settings.experiment, arms, [self.make_processor(arm_scorers[a.name], a.name) for a in arms])
        else:
            self.processor = self.make_processor(scorer)
        self.metrics = metrics or StreamMetrics(online_ks(settings.k), arms=tuple(a.name for a in arms))
        self.watchdog = Watchdog(settings.stall_seconds, self.metrics.registry)
        self.outbox: Outbox | None = None  # made when the agent starts (it owns the producer)
        self.state_outbox: Outbox | None = None  # the changelog writes, sent after the answers they count
        self._states_queued: asyncio.Future | None = None  # True once the last batch's states are queued, False if it failed
        self._deliveries: set[asyncio.Task] = set()  # batches whose answers, states or acks are not done yet
        self._queue = None  # the agent's queue of events, once it runs
        self._stall_reported = False
        self.transactions: Transactions | None = None  # under exactly_once
        for arm, served in (arm_scorers.items() if arms else [(None, scorer)]):
            self.metrics.model_info.labels(*self.metrics.model_labels(served, arm)).set(1)
        self.app = self._build_app()

    def _build_app(self) -> faust.App:
        s = self.settings
        store, table_options = faust_store(s)
        if table_options:
            datadir = s.worker_data_dir()
        else:
            # The memory store writes nothing to disk, but Faust makes <datadir>/v1/tables when it starts, by
            # default "<app id>-data" in the working directory: give it a temporary one, gone with the worker.
            datadir = Path(tempfile.mkdtemp(prefix=f"{s.app_id}-faust-"))
            weakref.finalize(self, shutil.rmtree, datadir, True)
        app = faust.App(
            s.app_id,
            broker=s.faust_broker(),
            store=store,
            datadir=str(datadir),
            web_enabled=False,
            topic_partitions=self.partitions,
            topic_replication_factor=s.replication_factor,
            consumer_auto_offset_reset="earliest",
            **s.faust_group_settings(),
            processing_guarantee="at_least_once",
            stream_buffer_maxsize=max(4 * s.batch_size, 1024),
            **s.faust_credentials(),
        )
        if s.exactly_once:
            self.transactions = Transactions(s, EOS_PRODUCER)
            self.transactions.committed = self.metrics.transactions.inc
        broker = broker_adapter(s)
        app.transport = stream_transport(broker.fetch_max_wait_ms(s), fetch_wait=broker.fetch_wait(s), exactly_once=self.transactions)(app.conf.broker_consumer, app)
        if s.faust_metrics:
            from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor

            app.monitor = PrometheusMonitor(metrics=FaustMetrics.create(self.metrics.registry, "faust"))
        self.clicks = app.topic(s.clicks_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw", partitions=self.partitions)
        self.recommendations = s.recommendations_topic
        self.dlq = s.dlq_topic
        self.table = app.Table(TABLE, key_type=bytes, value_type=bytes, partitions=self.partitions, default=None, options=table_options or None)
        self.store = SessionStore(self.table, rocksdb=bool(table_options))
        self._partition_of: dict[bytes, int] = {}  # the batch's session keys -> their partition
        self.table.apply_changelog_batch = self._counting(self.table.apply_changelog_batch)
        if self.transactions is not None:
            self.transactions.topics = [self.recommendations, self.dlq, self.table.changelog_topic_name]
            self.transactions.on_committed = self.store.on_sent  # a state reaches the store once its transaction is committed
        app.agent(self.clicks, name="streamrec.score", supervisor_strategy=CrashingSupervisor)(self._agent)
        app.timer(expiry_interval(s.session_ttl), name="streamrec.expire")(self._expire)
        app.timer(BEAT_SECONDS, name="streamrec.watchdog")(self._watch)
        return app

    def _counting(self, apply):
        """Faust's table recovery applying changelog records, counted (streamrec_changelog_records_recovered_total)."""
        counter = self.metrics.recovered_records

        def apply_changelog_batch(batch) -> None:
            batch = batch if isinstance(batch, list) else list(batch)
            counter.inc(len(batch))
            apply(batch)

        return apply_changelog_batch

    def make_processor(self, scorer, arm: str | None = None) -> BatchProcessor:
        """The micro-batch processor of ``scorer``, or of one A/B arm's (a hot swap makes a new one, stream.swap)."""
        s = self.settings
        return BatchProcessor(scorer, s.k, exclude_seen=s.exclude_seen, max_event_bytes=s.max_event_bytes, experiment=s.experiment if arm is not None else None, arm=arm)

    async def _watch(self) -> None:
        self.watchdog.observe(self.app, self.settings.clicks_topic)
        stalled = self.watchdog.health.state == "stalled"
        if stalled and not self._stall_reported:
            log.warning("consumer state while stalled: %s", self.consumer_state())
        self._stall_reported = stalled

    def consumer_state(self) -> str:
        """One line on where the consumer stands on each clicks partition, logged when a stall begins:
        flow (off during a rebalance), the agent's queue, and per partition the high watermark, the
        last offset handed to the agent, the committed offset, and whether it is fetched (Faust stops
        fetching a partition while the agent's queue is nearly full, or paused during recovery)."""
        c = self.app.consumer
        parts = []
        for tp in sorted(c.assignment()):
            if tp.topic != self.settings.clicks_topic:
                continue
            parts.append(consumer_partition_report(c, tp))
        queue = self._queue
        waiting = f"{queue.qsize()}/{queue.maxsize}" if queue is not None else "not started"
        return f"flow {'on' if c.flow_active else 'off'}, agent queue {waiting}; " + ("; ".join(parts) or "no clicks partitions")

    def _owned_partitions(self) -> set[int]:
        topic = self.settings.clicks_topic
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == topic}

    def _load_state(self, key: bytes) -> SessionState | None:
        raw = self.store.get(key, self._partition_of[key])
        if raw is None:
            return None
        try:
            return SessionState.decode(raw)
        except StateError as e:
            log.warning("session %r: unreadable state (%s); starting it afresh", key, e)
            return None

    async def _agent(self, stream) -> None:
        queue = self._queue = stream.channel.queue
        batch_size = self.settings.batch_size
        if self.transactions is not None:
            await self._consume(stream, queue, batch_size, self._close_transactions)
            return
        producer = AIOKafkaProducer(**self.settings.kafka_kwargs(), **broker_adapter(self.settings).outbox_producer(OUTBOX_PRODUCER), max_batch_size=OUTPUT_BATCH_BYTES, client_id=f"{self.settings.app_id}-outbox")
        await producer.start()
        changelog = self.table.changelog_topic_name
        # Once aiokafka tracks any topic it refreshes metadata for the tracked ones only, and a batch
        # queued for a topic that fell out of its metadata waits for a leader until it expires (a
        # stall, then a crash): track every output topic from the start.
        await producer.client.set_topics([self.recommendations, self.dlq, changelog])
        self.outbox = Outbox(producer, single_last=broker_adapter(self.settings).single_last(changelog))
        self.state_outbox = Outbox(producer, single_last=self.outbox.single_last)
        await self._consume(stream, queue, batch_size, lambda: self._close(producer))

    async def _consume(self, stream, queue, batch_size: int, close) -> None:
        try:
            while True:
                try:
                    events = [await queue.get()]
                except StopAsyncIteration:  # Faust ends the stream this way when the worker stops
                    return
                while len(events) < batch_size and not queue.empty():
                    events.append(queue.get_nowait())
                await self._handle(stream, events)
                while len(self._deliveries) > MAX_PENDING_BATCHES:
                    # The broker confirms more slowly than we score: wait, so that clicks wait in Kafka
                    # (where lag shows) and not as unconfirmed batches in memory, which a rebalance
                    # would have to wait for and a crash would have to redo.
                    await asyncio.wait(self._deliveries, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await asyncio.shield(close())  # Faust cancels a stopping agent: finish regardless

    async def _close(self, producer: AIOKafkaProducer) -> None:
        """Give the last batches DRAIN_SECONDS to publish their states, then close the producer."""
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=DRAIN_SECONDS)
        await producer.flush()
        await producer.stop()

    async def _close_transactions(self) -> None:
        """Give the last batches DRAIN_SECONDS to commit, then stop the transactional producers."""
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=DRAIN_SECONDS)
        await self.transactions.stop()

    def _current(self, events: list) -> list:
        """The events this worker may process now: fetched in the consumer group's current generation,
        outside a rebalance, on partitions it owns.

        The agent reads its queue directly, so it makes the check Faust's own stream iterator makes:
        an event fetched before a rebalance is skipped (the seek to the committed offset that ends the
        rebalance reads it again). Processing it would apply a click out of order (the clicks before
        it, read again, would then look already applied and go unanswered). The events kept are
        tracked, so that a rebalance waits for their answers and states before Faust commits and
        gives the partitions up (``Consumer.wait_empty``).
        """
        app = self.app
        if not app.flow_control.is_active():
            return []
        generation = app.consumer_generation_id
        owned = self._owned_partitions()
        kept = [e for e in events if e.message.generation_id == generation and e.message.partition in owned]
        track = app.consumer.track_message
        for e in kept:
            track(e.message)
        return kept

    async def _handle(self, stream, events: list) -> None:
        events = self._current(events)
        if not events:
            return
        # Faust's stall check (stream_processing_timeout) reads this; its Stream iteration, which the agent bypasses, would set it.
        self.app.monitor.stream_inbound_time.update(dict.fromkeys({e.message.tp for e in events}, time.monotonic()))
        now = time.time()
        records = [Record(e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset, e.message.timestamp or now) for e in events]
        self._partition_of = {r.key: r.partition for r in records}
        store = self.store
        store.new_batch()
        result = self.processor.process(records, self._load_state)

        # One table write per session per batch: pending in the store now (what the next batch reads),
        # the changelog record on the session's own partition (where Faust's recovery looks for it) once
        # the answers are out (or in the same transaction under exactly_once), and the store itself once
        # the broker has that record (committed, under exactly_once; stream.store).
        states = []
        for key, state in result.states.items():
            raw = state.encode()
            store.put(key, raw)
            states.append((state.partition, key, raw))
        if self.transactions is not None:
            self._transact(stream, events, result, states)
        else:
            await self._publish(stream, events, result, states)
        self._observe(result, records)

    async def _publish(self, stream, events: list, result, states: list) -> None:
        """At least once: answers and dead letters now, states once they are confirmed, then the acks."""
        outbox = self.outbox
        for key, value in result.recommendations:
            await outbox.add_keyed(self.recommendations, key, value)
        for key, value, _ in result.dead_letters:
            if key is None:
                outbox.add(self.dlq, 0, None, value)
            else:
                await outbox.add_keyed(self.dlq, key, value)
        futures = await outbox.send()
        queued = asyncio.get_running_loop().create_future()
        delivery = asyncio.ensure_future(self._ack_when_delivered(stream, events, futures, states, self._states_queued, queued))
        self._states_queued = queued
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)

    def _transact(self, stream, events: list, result, states: list) -> None:
        """Exactly once: per clicks partition, one transaction of its answers, dead letters, states and consumed offset; the acks once all are committed."""
        ends: dict[int, int] = {}
        for e in events:
            partition, offset = e.message.partition, e.message.offset
            if offset >= ends.get(partition, -1):
                ends[partition] = offset
        records: dict[int, list] = {p: [] for p in ends}
        for (key, value), partition in zip(result.recommendations, result.answer_partitions):
            records.setdefault(partition, []).append((self.recommendations, None, key, value))
        for (key, value, _), partition in zip(result.dead_letters, result.dead_letter_partitions):
            records.setdefault(partition, []).append((self.dlq, 0 if key is None else None, key, value))
        changelog = self.table.changelog_topic_name
        for partition, key, raw in states:
            records.setdefault(partition, []).append((changelog, partition, key, raw))
        commits = [self.transactions.transact(p, batch, ends[p] + 1 if p in ends else None) for p, batch in records.items()]
        delivery = asyncio.ensure_future(self._ack_when_committed(stream, events, commits))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)

    async def _ack_when_committed(self, stream, events: list, commits: list) -> None:
        try:
            await asyncio.gather(*commits)
        except Exception as exc:  # fenced (the partition moved), or the broker refused: stop, the next owner reads the clicks again
            log.error("a transaction failed (%r); stopping so that its clicks are consumed again from the last committed offset", exc)
            await self.app.crash(exc)
            return
        for event in events:
            await stream.ack(event)

    def _observe(self, result, records: list) -> None:
        m = self.metrics
        answered = len(result.recommendations)
        m.events.labels("answered").inc(answered)
        m.recommendations.inc(answered)
        if result.dead_letters:
            m.events.labels("dead_lettered").inc(len(result.dead_letters))
            for _, _, reason in result.dead_letters:
                m.dead_letters.labels(reason).inc()
        if result.unknown_items:
            m.unknown_items.inc(result.unknown_items)
        m.batch_size.observe(len(records))
        if result.inference_seconds:
            m.inference.observe(result.inference_seconds)
        for latency in result.latencies:
            m.end_to_end.observe(latency)
        if result.arm_ranks:
            for arm, ranks in result.arm_ranks.items():
                m.observe_online(ranks, arm)
        else:
            m.observe_online(result.online_ranks)
        if result.redelivered:
            m.redelivered.inc(result.redelivered)
        m.active_sessions.set(self.store.count())
        m.last_progress.set(time.time())
        self.watchdog.handled(records)

    async def _ack_when_delivered(self, stream, events: list, futures: list, states: list, previous: asyncio.Future | None, queued: asyncio.Future) -> None:
        """Answers and dead letters confirmed, then the states queued (after the previous batch's) and confirmed, then the acks.

        A batch whose answers failed stops the chain: later states would count its clicks.
        """
        try:
            await asyncio.gather(*futures)
            if previous is not None and not await previous:
                return
            changelog = self.table.changelog_topic_name
            for partition, key, raw in states:
                self.state_outbox.add(changelog, partition, key, raw)
            sent = await self.state_outbox.send(on_sent=self.store.on_sent)
            queued.set_result(True)
            await asyncio.gather(*sent)
        except Exception as exc:  # a send failed after the producer's retries: stop, the events will be redelivered
            log.error("publishing failed (%r); stopping so that the unacknowledged clicks are consumed again", exc)
            await self.app.crash(exc)
            return
        finally:
            if not queued.done():
                queued.set_result(False)
        for event in events:
            await stream.ack(event)

    async def _send_tombstones(self, tombstones: dict[int, list]) -> list:
        """Send the tombstones (partition -> records): under exactly_once one transaction per partition
        ((its future, its records) each), else through the outbox, into the store once confirmed (nothing
        to wait for)."""
        if not tombstones:
            return []
        if self.transactions is not None:
            return [(self.transactions.transact(p, records, None), records) for p, records in tombstones.items()]
        for records in tombstones.values():
            for topic, partition, key, value in records:
                self.outbox.add(topic, partition, key, value)
        await self.outbox.send(on_sent=self.store.on_sent)
        return []

    async def _expire(self) -> None:
        """Remove the state of sessions idle for longer than the TTL: a tombstone each in the changelog
        (under exactly_once in a transaction of the partition's producer)."""
        ttl = self.settings.session_ttl
        now = time.time()
        owned = self._owned_partitions()
        outbox = self.outbox
        transactions = self.transactions
        if outbox is None and transactions is None:  # the agent has not started yet
            return
        store = self.store
        pending = store.pending
        changelog = self.table.changelog_topic_name
        expired = live = 0
        commits = []
        tombstones: dict[int, list] = {}
        for n, (key, raw) in enumerate(store.scan(owned), 1):
            if key in pending:  # a state or tombstone on its way: not idle
                live += 1
            else:
                last_seen, partition = last_seen_of(raw)
                if partition not in owned:
                    store.drop(key)  # left over from a partition this worker no longer owns: not ours to delete
                elif now - last_seen > ttl:
                    store.put(key, None)  # gone for the worker now, from the store once the tombstone is confirmed
                    tombstones.setdefault(partition, []).append((changelog, partition, key, None))
                    expired += 1
                else:
                    live += 1
            if n % EXPIRY_CHUNK == 0:
                commits += await self._send_tombstones(tombstones)
                tombstones = {}
                await asyncio.sleep(0)
        commits += await self._send_tombstones(tombstones)
        store.scanned(live)
        results = await asyncio.gather(*(commit for commit, _ in commits), return_exceptions=True)
        for (_, records), result in zip(commits, results):
            if isinstance(result, NotOwned):  # revoked meanwhile: its next owner expires the sessions
                store.unsent([(key, None) for _, _, key, _ in records])
            elif isinstance(result, Exception):
                log.error("a transaction of tombstones failed (%r); stopping", result)
                await self.app.crash(result)
                return
        if expired:
            self.metrics.expired_sessions.inc(expired)
        self.metrics.active_sessions.set(store.count())
        release_free_heap()  # what the expired states and the scan freed, back to the OS (streamrec.runtime)


def serve(settings: Settings, bundle_dir: Path) -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM."""
    from faust.worker import Worker

    from export.scorer import load_scorer
    from stream.bundles import check_k, probe
    from stream.swap import install

    configure_process(threads=settings.scorer_threads, load=())  # torch's and faiss's threads for whichever scorer (a swap's too) loads them; ONNX needs neither
    arms = settings.experiment_arms()
    scorers = {}
    for arm, path in ([(a.name, Path(a.bundle)) for a in arms] or [(None, bundle_dir)]):
        scorer = scorers[arm] = load_scorer(path, threads=settings.scorer_threads)
        check_k(scorer, settings.k, path)
        probe(scorer, path, settings.batch_size)  # also the warm-up: the scorer's buffers at serving size before the first click
    if settings.store == "rocksdb":
        from stream.store import lock_data_dir

        data_lock = lock_data_dir(settings.worker_data_dir())  # noqa: F841  (held until the process ends)
        log.info("session store: RocksDB in %s", settings.worker_data_dir())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    partitions = loop.run_until_complete(ensure_topics(settings))
    worker = StreamWorker(settings, next(iter(scorers.values())), partitions, arm_scorers=scorers if arms else None)
    install(worker, bundle_dir, loop)
    worker.watchdog.start()
    if settings.metrics_port:
        try:
            serve_http(settings.metrics_host, settings.metrics_port, worker.metrics.registry, worker.watchdog)
        except OSError as e:
            raise UserError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({e.strerror})") from None
    for arm, scorer in scorers.items():
        log.info("serving %s (%s) with k=%d%s", scorer.manifest["model"], scorer.kind, settings.k, f" as arm {arm} of experiment {settings.experiment}" if arm else f" from {bundle_dir}")
    faust_worker = Worker(worker.app, loglevel=settings.log_level, quiet=True, loop=loop)
    # Faust's terminal spinner sets the root logger to DEBUG, so every debug call of aiokafka and
    # Faust built a log record on the hot path only for the handlers to drop it.
    faust_worker.spinner = None
    faust_worker.execute_from_commandline()
