"""Failures only a real broker allows: Apache Kafka SIGKILLed mid-stream and restarted from its data
directory, and in a 3-node cluster the leader of clicks and changelog partitions SIGKILLed for good.

Both run a `streamrec serve` process (GRU4Rec bundle, session state in the changelog) against clicks
sent at a steady rate by an idempotent producer, and then check, with a reader of their own, that
every click has an answer, that every answer equals the offline scorer's over the same session
prefix (streamkit.offline_answers) and that no good click went to the dead-letter topic.
"""

from __future__ import annotations

import time

import pytest

from stream.kafka import KafkaCluster
from stream.process import start_worker, stop_worker
from stream.worker import TABLE
from tests.conftest import BrokerSpace, need_kafka
from tests.streamkit import REBALANCE_RERUN, PacedSender, answered, click_stream, sessions_of
from tests.test_recovery import check_answers
from tests.test_stream_support import gru_bundle, stream_data, wait_for, worker_settings  # noqa: F401

pytestmark = [pytest.mark.broker, pytest.mark.slow]

RATE = 100.0


def _stream(stream_data, seed: int, prefix: str):
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=150, clicks=40, seed=seed, prefix=prefix)  # 60 s' worth at RATE
    return messages


def _survives(cluster, settings, bundle, messages, log_path, fault) -> tuple[int, int, int]:
    """Serve ``messages`` at RATE; once 300 are answered run ``fault()`` (the worker must live through it and
    the stream still be flowing), then check every answer; (clicks sent, answers, duplicates)."""
    sender = PacedSender(settings, messages, RATE)
    worker = start_worker(settings, bundle, log_path)
    try:
        sender.start()
        assert wait_for(lambda: answered(settings) > 300, timeout=90), "the worker never got going"
        fault()
        assert worker.poll() is None, "the worker exited during the fault:\n" + log_path.read_text()[-3000:]
        assert sender.is_alive(), "the stream ended before the fault was over: raise the click count"
        sent = sender.finish(timeout=180)
        assert wait_for(lambda: answered(settings) >= len(sent), timeout=120), f"{answered(settings)} of {len(sent)} answered after the fault"
        total, duplicates = check_answers(settings, bundle, sessions_of(sent), RATE, interruptions=1)
    finally:
        sender.stop.set()
        assert stop_worker(worker) == 0, log_path.read_text()[-3000:]
    return len(sent), total, duplicates


@REBALANCE_RERUN
def test_a_broker_sigkilled_mid_stream_and_restarted_from_its_data_loses_nothing(stream_data, gru_bundle, tmp_path):
    need_kafka()
    _, bundle = gru_bundle
    with KafkaCluster(data_dir=tmp_path / "kafka") as cluster:
        settings = worker_settings(BrokerSpace(cluster, ""), partitions=4, group_session_timeout=10.0)

        def fault() -> None:
            cluster.kill(1)
            time.sleep(3.0)
            cluster.restart(1)

        sent, total, duplicates = _survives(cluster, settings, bundle, _stream(stream_data, 41, "r"), tmp_path / "worker.log", fault)
    print(f"{sent:,} clicks, broker SIGKILLed and restarted: {total:,} answers, {duplicates} duplicates")


@REBALANCE_RERUN
def test_the_leader_of_clicks_and_changelog_partitions_sigkilled_in_a_three_node_cluster_loses_nothing(stream_data, gru_bundle, tmp_path):
    need_kafka()
    _, bundle = gru_bundle
    with KafkaCluster(nodes=3, data_dir=tmp_path / "kafka") as cluster:
        settings = worker_settings(BrokerSpace(cluster, ""), partitions=4, replication_factor=3, group_session_timeout=10.0)
        changelog = f"{settings.app_id}-{TABLE}-changelog"
        killed = {}

        def fault() -> None:
            clicks, states = cluster.leaders(settings.clicks_topic), cluster.leaders(changelog)
            assert len(clicks) == len(states) == 4, (clicks, states)
            # the node that leads the most clicks and changelog partitions, at least one of each
            victim = max(range(1, 4), key=lambda n: (n in clicks.values() and n in states.values(), list(clicks.values()).count(n) + list(states.values()).count(n)))
            assert victim in clicks.values() and victim in states.values(), (clicks, states)
            cluster.kill(victim)
            moved = wait_for(lambda: (c := cluster.leaders(settings.clicks_topic)) and (s := cluster.leaders(changelog)) and victim not in (*c.values(), *s.values()), timeout=60)
            assert moved, "no new leaders were elected"
            killed.update(node=victim, clicks=sorted(p for p, n in clicks.items() if n == victim), changelog=sorted(p for p, n in states.items() if n == victim))

        sent, total, duplicates = _survives(cluster, settings, bundle, _stream(stream_data, 43, "l"), tmp_path / "worker.log", fault)
    print(f"{sent:,} clicks, node {killed['node']} (leader of clicks {killed['clicks']} and changelog {killed['changelog']}) SIGKILLed: {total:,} answers, {duplicates} duplicates")
