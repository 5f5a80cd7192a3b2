"""Broker trouble: the network between every client and Apache Kafka is cut for 15 s mid-stream and
restored. A TCP relay stands between the clients and the broker (which advertises the relay's
address); cutting it resets every connection and refuses new ones, restoring it lets them through
to the same broker, topics and offsets intact. (A real SIGKILL and restart of the broker is in
tests/test_kafka_failures.py.)
"""

from __future__ import annotations

import time

import pytest

from stream.broker import free_port
from stream.kafka import KafkaCluster
from stream.process import start_worker, stop_worker
from tests.conftest import BrokerSpace, need_kafka
from tests.streamkit import REBALANCE_RERUN, BrokerLink, PacedSender, answered, answers_by_key, click_stream, sessions_of
from tests.test_stream_support import markov_bundle, read, stream_data, wait_for, worker_settings  # noqa: F401
from tests.test_watchdog import healthz

pytestmark = pytest.mark.broker

OUTAGE_SECONDS = 15.0  # longer than the group session timeout below: the broker forgets the worker's membership


@REBALANCE_RERUN
def test_the_worker_survives_the_broker_going_away_and_coming_back(stream_data, markov_bundle, tmp_path):
    need_kafka()
    _, bundle = markov_bundle
    broker_port, relay_port = free_port(), free_port()
    advertise_relay = {"advertised.listeners": f"PLAINTEXT://127.0.0.1:{relay_port}"}  # every client, the cluster's own checks too, goes through the relay
    with BrokerLink(broker_port, relay_port) as link, KafkaCluster(ports=[broker_port], data_dir=tmp_path / "kafka", config=advertise_relay) as cluster:
        settings = worker_settings(BrokerSpace(cluster, ""), group_session_timeout=10.0).replace(broker=f"kafka://127.0.0.1:{relay_port}")
        messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=120, clicks=30, seed=31, prefix="o")  # 36 s' worth at 100/s
        sender = PacedSender(settings, messages, rate=100.0)
        log_path = tmp_path / "worker.log"
        worker = start_worker(settings, bundle, log_path)
        try:
            sender.start()
            assert wait_for(lambda: answered(settings) > 300, timeout=60)
            link.cut()
            time.sleep(OUTAGE_SECONDS / 3)  # clicks already fetched may still be scored; their answers cannot be sent
            during = answered(settings)
            time.sleep(OUTAGE_SECONDS * 2 / 3)
            assert worker.poll() is None, "the worker exited while the broker was away:\n" + log_path.read_text()[-3000:]
            assert answered(settings) == during  # nothing got through: the relay was really cut
            assert sender.is_alive(), "the stream ended before the broker came back: raise the click count"
            link.restore()
            sent = sender.finish(timeout=120)
            assert wait_for(lambda: answered(settings) >= len(sent), timeout=90), f"{answered(settings)} of {len(sent)} answered after the broker came back"
            assert wait_for(lambda: healthz(settings)[0] == 200, timeout=10)
        finally:
            sender.stop.set()
            assert stop_worker(worker) == 0, log_path.read_text()[-3000:]
        answers, n_records = answers_by_key(read(settings, {settings.recommendations_topic: len(sent)})[settings.recommendations_topic])
        expected = {(session, j + 1) for session, items in sessions_of(sent).items() for j in range(len(items))}
        assert set(answers) == expected  # every click answered, no answer for a click never sent
        assert n_records - len(expected) <= 2 * 100, f"{n_records - len(expected)} duplicates"  # at-least-once: about two seconds' worth at most
        assert all(len({tuple(d["items"]) for d in docs}) == 1 for docs in answers.values())  # a duplicate repeats its answer
