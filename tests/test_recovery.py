"""Killed workers and rebalances: no click is lost, session state comes back exactly.

A click stream of GRU4Rec sessions (the hidden state makes any click applied twice, or lost from
the state, visible in every later answer) is produced at a steady rate while workers are
SIGKILLed and restarted, or while a second worker joins and leaves. Afterwards every click must
have an answer, and every answer (duplicates included) must equal what the bundle's own scorer
gives for the same session prefix: what one uninterrupted worker would have published.

Each runs under both processing guarantees. Under exactly_once the answers are read as a
read_committed consumer reads them, and there must be no duplicate: the workers stopped, the
recommendations topic holds exactly one committed answer per click.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from stream.broker import free_port
from stream.process import start_worker, stop_worker
from stream.topics import consume_all, topic_partitions
from tests.streamkit import REBALANCE_RERUN, PacedSender, answered, answers_by_key, assert_same_answer, click_stream, kill_worker, offline_answers, sessions_of
from tests.test_stream_support import gru_bundle, metric, metrics_text, stream_data, wait_for, worker_settings  # noqa: F401

pytestmark = pytest.mark.broker

K = 20
GUARANTEES = pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])


def check_answers(settings, bundle, sessions: dict[str, list[str]], rate: float, interruptions: int) -> tuple[int, int]:
    """Every click answered, every answer equal to the offline scorer's; returns (answers, duplicates)."""
    expected = offline_answers(bundle, sessions, K)
    records = asyncio.run(consume_all(settings, [settings.recommendations_topic, settings.dlq_topic], expect={settings.recommendations_topic: len(expected)}, timeout=120))
    assert not records[settings.dlq_topic]
    by_key, total = answers_by_key(records[settings.recommendations_topic])
    missing = [k for k in expected if k not in by_key]
    assert not missing, f"{len(missing)} clicks without an answer, e.g. {missing[:5]}"
    extra = [k for k in by_key if k not in expected]
    assert not extra, f"answers for positions that do not exist (a click applied twice?): {extra[:5]}"
    for key, docs in by_key.items():
        for doc in docs:
            assert_same_answer(doc, expected[key])
    duplicates = total - len(by_key)
    if settings.exactly_once:
        assert duplicates == 0, f"{duplicates} duplicate committed answers under exactly_once"
    # At-least-once: a duplicate is a click answered whose state had not reached the changelog when
    # the worker died or lost the partition, i.e. a click of the last micro-batches, never seconds' worth.
    assert duplicates <= interruptions * rate, f"{duplicates} duplicate answers after {interruptions} interruptions at {rate}/s"
    return total, duplicates


def assert_committed_once(settings, clicks: int) -> None:
    """Under exactly_once, with every worker stopped: the recommendations topic, read to its end as a
    read_committed consumer reads it, holds exactly one answer per click (and no dead letter)."""
    if not settings.exactly_once:
        return
    records = asyncio.run(consume_all(settings, [settings.recommendations_topic, settings.dlq_topic], idle=3.0, timeout=60))
    by_key, total = answers_by_key(records[settings.recommendations_topic])
    assert (total, len(by_key), len(records[settings.dlq_topic])) == (clicks, clicks, 0)
    # and they were transactions: every partition's end offset lies past its records (commit markers take offsets)
    ends = asyncio.run(end_offsets(settings, settings.recommendations_topic))
    counts = {p: sum(1 for r in records[settings.recommendations_topic] if r.partition == p) for p in ends}
    assert all(ends[p] > counts[p] for p in ends if counts[p]), (ends, counts)


async def end_offsets(settings, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in (await topic_partitions(settings, [topic]))[topic]]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


@REBALANCE_RERUN
@GUARANTEES
def test_five_sigkills_lose_nothing_and_restore_session_state(broker, stream_data, gru_bundle, tmp_path, guarantee):
    _, bundle = gru_bundle
    settings = worker_settings(broker, partitions=4, processing_guarantee=guarantee)
    rate, kills = 120.0, 5
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=300, clicks=50, seed=5)  # 125 s' worth: stopped earlier
    rng = random.Random(7)
    sender = PacedSender(settings, messages, rate)
    worker = start_worker(settings, bundle, tmp_path / "worker-0.log")
    redelivered = 0.0
    try:
        sender.start()
        for i in range(kills):
            before = answered(settings)
            assert wait_for(lambda: answered(settings) > before, timeout=60), f"worker {i} never answered"
            time.sleep(rng.uniform(0.3, 2.5))  # a random point mid-stream
            assert sender.is_alive(), "the stream ended before the kills did: raise the click count"
            redelivered += metric(metrics_text(settings), "streamrec_redelivered_events_total")
            kill_worker(worker)
            worker = start_worker(settings, bundle, tmp_path / f"worker-{i + 1}.log")
        assert wait_for(lambda: answered(settings) > 0, timeout=60), "the last worker never answered"
        time.sleep(2.0)
        sent = sender.finish(timeout=30, stop=True)
        total, duplicates = check_answers(settings, bundle, sessions_of(sent), rate, kills)
        redelivered += metric(metrics_text(settings), "streamrec_redelivered_events_total")
    finally:
        status = stop_worker(worker)
    assert status == 0, (tmp_path / f"worker-{kills}.log").read_text()[-3000:]
    assert_committed_once(settings, len(sent))
    if settings.exactly_once:
        # a recovered state and the committed offset come from the same transactions: no click is read twice
        assert redelivered == 0
    else:
        # the restarted workers did meet clicks their recovered states already held, and skipped them
        assert redelivered > 0
    print(f"{len(sent):,} clicks, {kills} SIGKILLs: {total:,} answers, {duplicates} duplicates, {redelivered:.0f} redelivered clicks skipped")


@REBALANCE_RERUN
@GUARANTEES
def test_a_second_worker_joining_and_leaving_loses_nothing(broker, stream_data, gru_bundle, tmp_path, guarantee):
    _, bundle = gru_bundle
    settings = worker_settings(broker, partitions=4, processing_guarantee=guarantee)
    second = settings.replace(metrics_port=free_port())
    rate = 120.0
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=200, clicks=40, seed=6, prefix="r")  # 67 s' worth: stopped earlier
    sender = PacedSender(settings, messages, rate)
    first_worker = start_worker(settings, bundle, tmp_path / "worker-a.log")
    try:
        sender.start()
        assert wait_for(lambda: answered(settings) > 0, timeout=60)
        second_worker = start_worker(second, bundle, tmp_path / "worker-b.log")
        try:
            assert wait_for(lambda: answered(second) > 0, timeout=60), "the joining worker was given no partition"
            time.sleep(2.0)
            assert sender.is_alive(), "the stream ended before the second worker left: raise the click count"
        finally:
            assert stop_worker(second_worker) == 0, (tmp_path / "worker-b.log").read_text()[-3000:]
        time.sleep(2.0)
        sent = sender.finish(timeout=30, stop=True)
        total, duplicates = check_answers(settings, bundle, sessions_of(sent), rate, interruptions=2)
    finally:
        status = stop_worker(first_worker)
    assert status == 0, (tmp_path / "worker-a.log").read_text()[-3000:]
    assert_committed_once(settings, len(sent))
    print(f"{len(sent):,} clicks, a worker joined and left: {total:,} answers, {duplicates} duplicates")


@REBALANCE_RERUN
def test_a_worker_paused_until_its_partitions_move_commits_nothing_afterwards(broker, stream_data, gru_bundle, tmp_path):
    """Exactly once against a zombie: worker A is SIGSTOPped until worker B has taken over all its
    partitions, then SIGCONTed. Whatever A still had fetched it scores and tries to commit with its
    old transactional producers, which B's fenced: none of it becomes visible."""
    _, bundle = gru_bundle
    settings = worker_settings(broker, partitions=4, processing_guarantee="exactly_once")
    second = settings.replace(metrics_port=free_port())
    rate = 120.0
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=200, clicks=40, seed=8, prefix="z")  # 67 s' worth: stopped earlier
    sender = PacedSender(settings, messages, rate)
    zombie = start_worker(settings, bundle, tmp_path / "worker-a.log")
    survivor = None
    try:
        sender.start()
        assert wait_for(lambda: answered(settings) > 0, timeout=60)
        survivor = start_worker(second, bundle, tmp_path / "worker-b.log")
        assert wait_for(lambda: answered(second) > 0, timeout=60), "the joining worker was given no partition"
        time.sleep(1.0)
        os.killpg(zombie.pid, signal.SIGSTOP)
        paused_at = answered(settings)

        def answers_everything() -> bool:  # B answers the whole stream: A's partitions have moved to it
            before = answered(second)
            time.sleep(2.0)
            return answered(second) - before >= 0.8 * 2.0 * rate

        assert wait_for(answers_everything, timeout=60), "the paused worker's partitions never moved"
        os.killpg(zombie.pid, signal.SIGCONT)
        # A scores what it had fetched (answers that would be duplicates, were they committed)
        assert wait_for(lambda: answered(settings) > paused_at, timeout=15), "the resumed worker scored nothing: no zombie to fence"
        resumed = answered(settings) - paused_at
        time.sleep(3.0)  # and tries to commit it
        assert sender.is_alive(), "the stream ended before the check: raise the click count"
        sent = sender.finish(timeout=30, stop=True)
        total, _ = check_answers(second, bundle, sessions_of(sent), rate, interruptions=2)
    finally:
        os.killpg(zombie.pid, signal.SIGCONT)
        if survivor is not None:
            assert stop_worker(survivor) == 0, (tmp_path / "worker-b.log").read_text()[-3000:]
        zombie_status = stop_worker(zombie)
    assert_committed_once(settings, len(sent))
    log = (tmp_path / "worker-a.log").read_text()
    print(f"{len(sent):,} clicks, a worker paused until its partitions moved: {total:,} answers, 0 duplicates; after resuming it scored {resumed:.0f} clicks, exit status {zombie_status}, {log.count('transaction of partition')} transactions refused")
