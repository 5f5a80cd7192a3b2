"""Shared fixtures: the real click logs (skipped when absent) and the brokers.

``broker`` is Apache Kafka, the broker of record: one cluster for the whole test session, and each
test gets topics, consumer group and changelog of its own (``BrokerSpace``). ``tansu_broker`` is a
fresh embedded broker for the smoke subset that keeps the no-Java path honest.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, the real click logs; tests needing them skip when it is absent (never in CI)."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing on CI")
        pytest.skip(f"real click logs not found at {SHARED_DATA} (they are not part of the repo)")
    return SHARED_DATA


def need_kafka() -> None:
    """Skip (fail on CI) where Apache Kafka cannot run: no Java or no jars (`make kafka`)."""
    from stream.kafka import kafka_available

    why = kafka_available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """One Apache Kafka node (KRaft) for the whole test session."""
    need_kafka()
    from stream.kafka import KafkaCluster

    with KafkaCluster(data_dir=tmp_path_factory.mktemp("kafka")) as cluster:
        yield cluster


@dataclass(frozen=True)
class BrokerSpace:
    """A test's own corner of a shared broker: the broker's address plus topic and group names no
    other test uses. ``settings()`` gives the Settings fields that say so."""

    cluster: object
    prefix: str

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def process(self):
        return self.cluster.process

    @property
    def quirks(self) -> str:
        return self.cluster.quirks

    def settings(self) -> dict:
        p = self.prefix
        return dict(
            broker=self.url,
            broker_quirks=self.quirks,
            clicks_topic=f"{p}clicks",
            recommendations_topic=f"{p}recommendations",
            dlq_topic=f"{p}clicks-dlq",
            model_updates_topic=f"{p}model-updates",
            app_id=f"{p}streamrec",
        )


_spaces = itertools.count(1)


@pytest.fixture()
def broker(kafka):
    """Apache Kafka, with names of this test's own (see BrokerSpace)."""
    return BrokerSpace(kafka, f"t{next(_spaces)}-")


@pytest.fixture(params=["kafka", "tansu"])
def each_broker(request):
    """Apache Kafka, then the embedded broker: for the end-to-end tests that also keep the embedded path honest."""
    return request.getfixturevalue("broker" if request.param == "kafka" else "tansu_broker")


@pytest.fixture()
def tansu_broker():
    """A fresh embedded Kafka-protocol broker (Tansu, memory storage) on a free loopback port."""
    from stream.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield BrokerSpace(b, "")
