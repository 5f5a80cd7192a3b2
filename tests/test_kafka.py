"""Apache Kafka, the broker of record: installed from Maven Central at the pinned version, run by
`streamrec broker --engine kafka` in KRaft mode, kept on disk across a SIGKILL, and refused in one
line where Java or the jars are missing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.broker import free_port
from stream.kafka import KAFKA_VERSION, KafkaCluster
from stream.settings import Settings
from stream.topics import consume_all, ensure_topics, producer
from tests.conftest import need_kafka
from tests.streamkit import REPO

pytestmark = pytest.mark.broker


def test_the_pom_the_constant_and_the_compose_images_name_one_kafka_version():
    pom = (REPO / "deploy" / "kafka" / "pom.xml").read_text()
    assert re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1) == KAFKA_VERSION
    for compose in ("docker-compose.yml", "docker-compose.kafka-cluster.yml"):
        tags = set(re.findall(r"image: apache/kafka:(\S+)", (REPO / "deploy" / compose).read_text()))
        assert tags == {KAFKA_VERSION}, compose


def test_a_missing_java_or_missing_jars_is_one_line_that_says_what_to_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    no_java = dict(env, PATH=str(Path(sys.executable).parent))  # python, but no java
    done = subprocess.run([sys.executable, "-m", "stream.cli", "broker", "--port", str(free_port())], capture_output=True, text=True, cwd=REPO, env=no_java, timeout=60)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "java" in done.stderr and "apt-get install" in done.stderr and "Traceback" not in done.stderr
    no_jars = dict(env, STREAMREC_KAFKA_LIBS=str(tmp_path / "nothing"))
    done = subprocess.run([sys.executable, "-m", "stream.cli", "broker", "--port", str(free_port())], capture_output=True, text=True, cwd=REPO, env=no_jars, timeout=60)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "make kafka" in done.stderr and "Traceback" not in done.stderr


def _start_cli(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`streamrec broker ARGS` in its own process group; its bootstrap address, printed once it answers metadata."""
    out = open(log, "ab")
    process = subprocess.Popen([sys.executable, "-m", "stream.cli", "broker", *args], stdout=subprocess.PIPE, stderr=out, cwd=REPO, start_new_session=True)
    out.close()
    line = process.stdout.readline().decode().strip()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", line), f"no bootstrap line: {line!r}\n{log.read_text()[-2000:]}"
    return process, line


def test_the_kafka_engine_keeps_topics_records_and_offsets_across_a_sigkill(tmp_path):
    """`streamrec broker --engine kafka --data-dir`: SIGKILL the whole command (the broker dies with it),
    start it again on the same folder, and every topic, record and committed offset is there."""
    need_kafka()
    from aiokafka import AIOKafkaConsumer, TopicPartition

    port, data = free_port(), tmp_path / "kafka-data"
    args = ["--engine", "kafka", "--port", str(port), "--data-dir", str(data)]
    settings = Settings(broker=f"kafka://127.0.0.1:{port}", partitions=3)

    async def fill() -> None:
        await ensure_topics(settings)
        p = producer(settings, acks="all")
        await p.start()
        for i in range(300):
            await p.send(settings.clicks_topic, b"v%d" % i, key=b"k%d" % (i % 17))
        await p.flush()
        await p.stop()
        c = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id="g", enable_auto_commit=False)
        await c.start()
        tp = TopicPartition(settings.clicks_topic, 0)
        c.assign([tp])
        await c.commit({tp: 42})
        await c.stop()

    async def committed() -> int | None:
        c = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id="g", enable_auto_commit=False)
        await c.start()
        try:
            return await c.committed(TopicPartition(settings.clicks_topic, 0))
        finally:
            await c.stop()

    process, bootstrap = _start_cli(args, tmp_path / "broker-1.log")
    assert bootstrap == f"127.0.0.1:{port}"
    try:
        asyncio.run(fill())
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    deadline = time.monotonic() + 30  # the broker follows its parent (PR_SET_PDEATHSIG)
    while subprocess.run(["pgrep", "-f", f"{data}/node-1/server.properties"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the broker outlived the killed command"
        time.sleep(0.2)

    process, _ = _start_cli(args, tmp_path / "broker-2.log")
    try:
        records = asyncio.run(consume_all(settings, [settings.clicks_topic], expect={settings.clicks_topic: 300}, timeout=60))[settings.clicks_topic]
        assert sorted(r.value for r in records) == sorted(b"v%d" % i for i in range(300))
        assert asyncio.run(committed()) == 42
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(60) == 0
    assert "broker stopped" in (tmp_path / "broker-2.log").read_text()


def test_a_three_node_cluster_replicates_every_topic_three_times_with_two_in_sync(tmp_path):
    need_kafka()
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    with KafkaCluster(nodes=3, data_dir=tmp_path / "kafka") as cluster:
        assert cluster.brokers() == [1, 2, 3]
        settings = Settings(broker=cluster.url, partitions=3, replication_factor=3)

        async def describe():
            await ensure_topics(settings)
            admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap.split(","))
            await admin.start()
            try:
                (topic,) = await admin.describe_topics([settings.clicks_topic])
                (config,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.clicks_topic)])
                return topic, config
            finally:
                await admin.close()

        topic, config = asyncio.run(describe())
        assert all(len(p["replicas"]) == 3 for p in topic["partitions"])
        values = {entry[0]: entry[1] for entry in config.resources[0][4]}
        assert values["min.insync.replicas"] == "2"


def test_reading_until_the_expected_answers_also_reads_the_other_topics_to_their_end(broker):
    """consume_all with ``expect`` on one topic returns every record the other topics held by then: a
    reader of answers and clicks (score-online, the demo) must not score against half the clicks
    because the broker handed the answers over first."""
    settings = Settings(**broker.settings(), partitions=2)

    async def fill() -> None:
        await ensure_topics(settings)
        p = producer(settings, acks="all")
        await p.start()
        for i in range(8000):  # 8 MB: several fetches, while the one answer comes in the first
            await p.send(settings.clicks_topic, (b"c%d" % i).ljust(1000, b"."), key=b"k%d" % (i % 31))
        await p.send_and_wait(settings.recommendations_topic, b"a", key=b"k")
        await p.stop()

    asyncio.run(fill())
    for _ in range(3):
        out = asyncio.run(consume_all(settings, [settings.clicks_topic, settings.recommendations_topic], expect={settings.recommendations_topic: 1}, timeout=60))
        assert len(out[settings.recommendations_topic]) == 1 and len(out[settings.clicks_topic]) == 8000
