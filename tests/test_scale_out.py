"""Scale-out: two workers in one consumer group split the clicks' partitions; when one is SIGKILLed
the survivor takes over its partitions with the session states recovered from the changelog.

(tests/test_recovery.py covers a single worker killed and restarted, and a second worker joining
and leaving with SIGTERM; this is the case in between: two workers serving, one dies for good.)
Answers are checked against the bundle's own scorer for every session prefix, i.e. what one
uninterrupted worker would have published; the GRU hidden state makes any lost or doubled state
update visible in every later answer.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from aiokafka.partitioner import DefaultPartitioner

from stream.broker import free_port
from stream.process import start_worker, stop_worker
from stream.topics import consume_all
from tests.streamkit import REBALANCE_RERUN, PacedSender, answers_by_key, assert_same_answer, click_stream, kill_worker, offline_answers, sessions_of
from tests.test_stream_support import gru_bundle, metric, metrics_text, stream_data, wait_for, worker_settings  # noqa: F401

pytestmark = pytest.mark.broker

K = 20
PARTITIONS = 4


def answered(settings) -> float:
    try:
        return metric(metrics_text(settings), 'streamrec_events_total{outcome="answered"}')
    except OSError:  # not serving yet
        return 0.0


def clicks_partitions(settings) -> set[int]:
    """Partitions of the clicks topic this worker has committed offsets of (Faust's own per-partition gauge)."""
    out = set()
    for line in metrics_text(settings).splitlines():
        if line.startswith("faust_topic_partition_offset_commited{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("topic") == settings.clicks_topic:
                out.add(int(labels["partition"]))
    return out


@REBALANCE_RERUN
@pytest.mark.parametrize("store,standby", [("memory", 0), ("rocksdb", 1)])
def test_the_survivor_takes_over_a_killed_workers_sessions(broker, stream_data, gru_bundle, tmp_path, store, standby):
    """With RocksDB and a standby the survivor already holds the moved sessions: its recovery takes
    milliseconds, the window in which Faust dropped fetched clicks (docs/reliability.md, "Found and fixed")."""
    _, bundle = gru_bundle
    first = worker_settings(broker, partitions=PARTITIONS, store=store, standby_replicas=standby, data_dir=str(tmp_path / "state-a"))
    second = first.replace(metrics_port=free_port(), data_dir=str(tmp_path / "state-b"))
    rate = 120.0
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=60, clicks=100, seed=21, prefix="x")  # 50 s' worth: stopped earlier
    sender = PacedSender(first, messages, rate)
    workers = [start_worker(first, bundle, tmp_path / "worker-a.log"), start_worker(second, bundle, tmp_path / "worker-b.log")]
    try:
        sender.start()
        assert wait_for(lambda: answered(first) > 0 and answered(second) > 0, timeout=60), "the two workers did not both get partitions"
        time.sleep(1.0)
        assert wait_for(lambda: clicks_partitions(first) and clicks_partitions(second), timeout=15), "no offset commits"
        owned_by_killed = clicks_partitions(first) - clicks_partitions(second)  # a gauge stays after a rebalance: drop shared ones
        assert owned_by_killed and owned_by_killed != set(range(PARTITIONS))  # the group split the partitions
        assert sender.is_alive(), "the stream ended before the kill: raise the click count"
        killed_at = time.time()
        kill_worker(workers[0])
        survivor_before = answered(second)
        # the survivor takes over (group session timeout, then recovery) and answers a further 5 s of clicks
        assert wait_for(lambda: answered(second) > survivor_before + 5 * rate, timeout=60), "the survivor stopped answering"
        assert sender.is_alive(), "the stream ended before the takeover was seen: raise the click count"
        sessions = sessions_of(sender.finish(timeout=30, stop=True))
        expected = offline_answers(bundle, sessions, K)
        records = asyncio.run(consume_all(first, [first.recommendations_topic, first.dlq_topic], expect={first.recommendations_topic: len(expected)}, timeout=60))
    finally:
        status = stop_worker(workers[1])
    assert status == 0, (tmp_path / "worker-b.log").read_text()[-3000:]

    assert not records[first.dlq_topic]
    by_key, total = answers_by_key(records[first.recommendations_topic])
    missing = [k for k in expected if k not in by_key]
    assert not missing, f"{len(missing)} clicks without an answer, e.g. {missing[:5]}"
    assert set(by_key) == set(expected), "answers for positions that do not exist (a click applied twice?)"
    for key, docs in by_key.items():
        for doc in docs:  # duplicates (at-least-once after the kill) included
            assert_same_answer(doc, expected[key])
    assert total - len(by_key) <= rate  # re-answered clicks: the killed worker's last unconfirmed batches only

    partition_of = DefaultPartitioner()
    moved = {sid for sid in sessions if partition_of(sid.encode(), list(range(PARTITIONS)), list(range(PARTITIONS))) in owned_by_killed}
    continued = [doc for key, docs in by_key.items() if key[0] in moved for doc in docs if doc["published_at"] > killed_at and doc["position"] > 1]
    assert len(continued) >= 10, "the survivor answered few clicks of the killed worker's sessions"
    # Only the survivor can publish after the kill: answers there, on every partition the killed worker owned,
    # prove the takeover (Faust's commit gauge is no proof: a partition with nothing new to commit never shows).
    taken_over = {partition_of(doc["session_id"].encode(), list(range(PARTITIONS)), list(range(PARTITIONS))) for doc in continued}
    assert taken_over == owned_by_killed, f"the survivor answered nothing on partitions {sorted(owned_by_killed - taken_over)}"
    print(f"{len(expected):,} clicks, 2 workers, one SIGKILLed: {total:,} answers, {total - len(by_key)} duplicates, {len(moved)} sessions moved, {len(continued)} of their clicks answered by the survivor")
