"""Topic set-up and plain aiokafka clients for the tools around the worker (replay, score-online)."""

from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from stream.settings import Settings
from streamrec.errors import UserError


# The model-updates topic: one partition (updates in one order for every worker), compacted (its
# newest message, the model to serve, is kept however old it is; see stream.model_updates).
MODEL_UPDATES_CONFIG = {"cleanup.policy": "compact"}


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> int:
    """Create the clicks, recommendations, dead-letter and model-updates topics if missing; return the clicks partitions.

    Existing topics are left as they are; the session table always gets as many
    partitions as the clicks topic really has.
    """
    names = dict.fromkeys([settings.clicks_topic, settings.recommendations_topic, settings.dlq_topic])
    topics = [NewTopic(n, settings.partitions, settings.replication_factor) for n in names]
    if settings.model_updates_topic:
        topics.append(_model_updates_topic(settings))
    partitions = (await _create_missing(settings, topics, timeout)).get(settings.clicks_topic)
    if not partitions:
        raise UserError(f"topic '{settings.clicks_topic}' has no partitions with a leader on {settings.broker}")
    return len(partitions)


def _model_updates_topic(settings: Settings) -> NewTopic:
    return NewTopic(settings.model_updates_topic, 1, settings.replication_factor, topic_configs=MODEL_UPDATES_CONFIG)


async def _create_missing(settings: Settings, topics: list[NewTopic], timeout: float) -> dict[str, list[int]]:
    """Create those of ``topics`` that do not exist (existing ones are left alone); every topic's partitions once each has a leader."""
    admin = await _admin(settings, timeout)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # created by another worker meanwhile
        return await _led_partitions(admin, [t.name for t in topics], timeout)
    finally:
        await admin.close()


async def topic_partitions(settings: Settings, topics: list[str], timeout: float = 5.0) -> dict[str, list[int]]:
    """The partitions of each of ``topics`` (an empty list for a topic that is not there within ``timeout``)."""
    admin = await _admin(settings, timeout)
    try:
        return await _led_partitions(admin, topics, timeout)
    finally:
        await admin.close()


async def _admin(settings: Settings, timeout: float):
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs(), request_timeout_ms=int(max(timeout, 5.0) * 1000))
    try:
        await admin.start()
    except (KafkaConnectionError, KafkaError, OSError) as e:
        raise UserError(f"cannot reach the Kafka broker at {settings.broker} ({e})") from None
    return admin


async def _led_partitions(admin, topics: list[str], timeout: float) -> dict[str, list[int]]:
    """Each topic's partitions once every one of them has a leader, waiting up to ``timeout``: Apache Kafka's
    brokers learn of a new topic from the controller a moment after it answers CreateTopics."""
    deadline = time.monotonic() + timeout
    while True:
        out = {}
        for described in await admin.describe_topics(list(topics)):
            partitions = described.get("partitions") or []
            if described.get("error_code", 0) == 0 and partitions and all(p.get("leader", -1) >= 0 for p in partitions):
                out[described["topic"]] = sorted(p["partition"] for p in partitions)
        if len(out) == len(set(topics)) or time.monotonic() > deadline:
            return {t: out.get(t, []) for t in topics}
        await asyncio.sleep(0.1)


async def publish_model_update(settings: Settings, bundle: str, model_version: str, arm: str | None = None) -> tuple[int, int]:
    """Send one model-updates message naming ``bundle`` (for A/B arm ``arm`` if given; creating the topic if missing); its (partition, offset)."""
    from stream.model_updates import UPDATES_KEY, update_message

    if not settings.model_updates_topic:
        raise UserError("--model-updates-topic is empty: there is no topic to publish to")
    if not (await _create_missing(settings, [_model_updates_topic(settings)], 30.0))[settings.model_updates_topic]:
        raise UserError(f"topic '{settings.model_updates_topic}' has no partition with a leader on {settings.broker}")
    p = producer(settings, acks="all")
    await p.start()
    try:
        sent = await p.send_and_wait(settings.model_updates_topic, update_message(bundle, model_version, arm=arm), key=UPDATES_KEY)
    finally:
        await p.stop()
    return sent.partition, sent.offset


def producer(settings: Settings, **kwargs):
    """An aiokafka producer with the settings' connection and security (not started)."""
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(**settings.kafka_kwargs(), **kwargs)


async def consume_all(settings: Settings, topics: list[str], expect: dict[str, int] | None = None, idle: float = 2.0, timeout: float = 120.0) -> dict[str, list]:
    """Every record of ``topics`` from the beginning, by partition in offset order; on Apache Kafka
    as a read_committed consumer reads them (what counts under ``--processing-guarantee exactly_once``).

    Stops when each topic in ``expect`` holds at least that many records and the other topics have
    been read to the end offsets they had then (a reader of answers and clicks gets the clicks the
    answers follow, whichever topic the broker hands over first), or without ``expect`` when every
    partition has reached its end offset and nothing new came
    for ``idle`` seconds (the idle wait also covers brokers whose end offsets
    run short, see stream.broker_adapter). Raises UserError after ``timeout`` seconds
    if ``expect`` is not met.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=50, isolation_level=settings.isolation_level)
    await consumer.start()
    out: dict[str, list] = {t: [] for t in topics}
    try:
        started = time.monotonic()
        known = await topic_partitions(settings, topics, timeout=min(idle, timeout))
        tps = [TopicPartition(topic, p) for topic, partitions in known.items() for p in partitions]
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last_new = time.monotonic()
        rest_ends = None  # end offsets of the topics not in ``expect``, once ``expect`` is met
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=10000)
            now = time.monotonic()
            for tp, records in batch.items():
                out[tp.topic].extend(records)
                last_new = now
            if expect:
                if all(len(out[t]) >= n for t, n in expect.items()):
                    rest = [tp for tp in tps if tp.topic not in expect]
                    if rest_ends is None:
                        rest_ends = await consumer.end_offsets(rest) if rest else {}
                    if all([await consumer.position(tp) >= rest_ends[tp] for tp in rest]):
                        break
                if now - started > timeout:
                    got = ", ".join(f"{t}: {len(out[t])}/{n}" for t, n in expect.items())
                    raise UserError(f"timed out after {timeout:.0f}s waiting for records ({got})")
                continue
            if now - last_new >= idle:
                ends = await consumer.end_offsets(tps)
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                    break
            if now - started > timeout:
                break
    finally:
        await consumer.stop()
    for topic in topics:
        out[topic].sort(key=lambda r: (r.partition, r.offset))
    return out
