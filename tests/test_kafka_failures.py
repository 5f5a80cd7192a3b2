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
from stream.worker import TABLE, start_worker, stop_worker
from tests.conftest import BrokerSpace, need_kafka
from tests.streamkit import RECOVERY_STALL_RERUN, PacedSender, answered, click_stream, sessions_of
from tests.test_recovery import check_answers
from tests.test_stream_support import gru_bundle, stream_data, wait_for, worker_settings  # noqa: F401

pytestmark = [pytest.mark.broker, pytest.mark.slow]

RATE = 100.0


def _stream(stream_data, seed: int, prefix: str):
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=150, clicks=40, seed=seed, prefix=prefix)  # 60 s' worth at RATE
    return messages


@RECOVERY_STALL_RERUN
def test_a_broker_sigkilled_mid_stream_and_restarted_from_its_data_loses_nothing(stream_data, gru_bundle, tmp_path):
    need_kafka()
    _, bundle = gru_bundle
    with KafkaCluster(data_dir=tmp_path / "kafka") as cluster:
        settings = worker_settings(BrokerSpace(cluster, ""), partitions=4, group_session_timeout=10.0)
        sender = PacedSender(settings, _stream(stream_data, 41, "r"), RATE, enable_idempotence=True)
        log_path = tmp_path / "worker.log"
        worker = start_worker(settings, bundle, log_path)
        try:
            sender.start()
            assert wait_for(lambda: answered(settings) > 300, timeout=90), "the worker never got going"
            cluster.kill(1)
            time.sleep(3.0)
            assert worker.poll() is None, "the worker exited while the broker was down:\n" + log_path.read_text()[-3000:]
            assert sender.is_alive(), "the stream ended before the broker came back: raise the click count"
            cluster.restart(1)
            sent = sender.finish(timeout=180)
            assert wait_for(lambda: answered(settings) >= len(sent), timeout=120), f"{answered(settings)} of {len(sent)} answered after the restart"
            total, duplicates = check_answers(settings, bundle, sessions_of(sent), RATE, interruptions=1)
        finally:
            sender.stop.set()
            assert stop_worker(worker) == 0, log_path.read_text()[-3000:]
    print(f"{len(sent):,} clicks, broker SIGKILLed and restarted: {total:,} answers, {duplicates} duplicates")


@RECOVERY_STALL_RERUN
def test_the_leader_of_clicks_and_changelog_partitions_sigkilled_in_a_three_node_cluster_loses_nothing(stream_data, gru_bundle, tmp_path):
    need_kafka()
    _, bundle = gru_bundle
    with KafkaCluster(nodes=3, data_dir=tmp_path / "kafka") as cluster:
        settings = worker_settings(BrokerSpace(cluster, ""), partitions=4, replication_factor=3, group_session_timeout=10.0)
        sender = PacedSender(settings, _stream(stream_data, 43, "l"), RATE, enable_idempotence=True)
        log_path = tmp_path / "worker.log"
        worker = start_worker(settings, bundle, log_path)
        try:
            sender.start()
            assert wait_for(lambda: answered(settings) > 300, timeout=90), "the worker never got going"
            changelog = f"{settings.app_id}-{TABLE}-changelog"
            clicks, states = cluster.leaders(settings.clicks_topic), cluster.leaders(changelog)
            assert len(clicks) == len(states) == 4, (clicks, states)
            # the node that leads the most clicks and changelog partitions, at least one of each
            victim = max(range(1, 4), key=lambda n: (n in clicks.values() and n in states.values(), list(clicks.values()).count(n) + list(states.values()).count(n)))
            assert victim in clicks.values() and victim in states.values(), (clicks, states)
            cluster.kill(victim)
            moved = wait_for(lambda: (c := cluster.leaders(settings.clicks_topic)) and (s := cluster.leaders(changelog)) and victim not in (*c.values(), *s.values()), timeout=60)
            assert moved, "no new leaders were elected"
            assert worker.poll() is None, "the worker exited when the leader died:\n" + log_path.read_text()[-3000:]
            assert sender.is_alive(), "the stream ended before the new leaders took over: raise the click count"
            sent = sender.finish(timeout=180)
            assert wait_for(lambda: answered(settings) >= len(sent), timeout=120), f"{answered(settings)} of {len(sent)} answered after the leader died"
            total, duplicates = check_answers(settings, bundle, sessions_of(sent), RATE, interruptions=1)
        finally:
            sender.stop.set()
            assert stop_worker(worker) == 0, log_path.read_text()[-3000:]
    print(f"{len(sent):,} clicks, node {victim} (leader of clicks {sorted(p for p, n in clicks.items() if n == victim)} and changelog {sorted(p for p, n in states.items() if n == victim)}) SIGKILLed: {total:,} answers, {duplicates} duplicates")
