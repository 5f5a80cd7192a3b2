"""The embedded broker: starts on a free loopback port, speaks Kafka, stops with its process group."""

from __future__ import annotations

import asyncio

import pytest

from stream.broker import EmbeddedBroker, kafka_api_ready
from stream.settings import Settings
from stream.topics import consume_all, ensure_topics, producer

pytestmark = pytest.mark.broker


def test_broker_fixture_speaks_kafka(broker):
    assert broker.bootstrap == f"127.0.0.1:{broker.port}" and broker.url == f"kafka://127.0.0.1:{broker.port}"
    assert kafka_api_ready(broker.port)
    settings = Settings(broker=broker.url, partitions=2)
    assert asyncio.run(ensure_topics(settings)) == 2

    async def round_trip():
        p = producer(settings)
        await p.start()
        await p.send_and_wait(settings.clicks_topic, b"v", key=b"k")
        await p.stop()
        return await consume_all(settings, [settings.clicks_topic], expect={settings.clicks_topic: 1}, timeout=20)

    records = asyncio.run(round_trip())[settings.clicks_topic]
    assert [(r.key, r.value) for r in records] == [(b"k", b"v")]


def test_broker_stops_with_the_block():
    with EmbeddedBroker() as b:
        process = b.process
        assert process.poll() is None
    assert process.poll() is not None
    assert not kafka_api_ready(b.port, timeout=0.2)


def test_single_record_batches_give_true_end_offsets(broker):
    """The premise of --broker-quirks tansu: with one record per batch the end offset is right."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    settings = Settings(broker=broker.url, partitions=1)

    async def run():
        await ensure_topics(settings)
        p = producer(settings, max_batch_size=1, linger_ms=20)
        await p.start()
        futures = [await p.send(settings.clicks_topic, b"x%d" % i, key=b"k") for i in range(7)]
        await asyncio.gather(*futures)
        await p.stop()
        c = AIOKafkaConsumer(**settings.kafka_kwargs())
        await c.start()
        tp = TopicPartition(settings.clicks_topic, 0)
        ends = await c.end_offsets([tp])
        await c.stop()
        return ends[tp]

    assert asyncio.run(run()) == 7
