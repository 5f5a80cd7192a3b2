"""The worker end to end through Apache Kafka (and, for two of the tests, the embedded broker too), with real trained bundles.

Each test starts `streamrec serve` as a child process, produces clicks with
aiokafka and reads the output topics back.
"""

from __future__ import annotations

import asyncio
import base64

import time

import numpy as np
import orjson
import pytest

from stream.events import click_value
from stream.replay import read_and_score, replay, replay_events
from stream.worker import TABLE
from training.evaluate import evaluate
from training.models import load_run
from training.sessions import Sessions
from tests.streamkit import REBALANCE_RERUN
from tests.test_stream_support import (  # noqa: F401  (fixtures)
    answers_by_position,
    assert_answer_matches,
    gru_bundle,
    markov_bundle,
    metric,
    metrics_text,
    offline_rows,
    read,
    running_worker,
    send,
    stream_data,
    wait_for,
    worker_settings,
)

pytestmark = pytest.mark.broker

UNKNOWN = "no-such-item"

MALFORMED = [
    (b"a", b"\xff\xfe{}", "invalid_utf8"),
    (b"a", b'{"session_id": "a", "item_id": ', "invalid_json"),
    (b"a", b'{"session_id": "a", "item_id": 1, "timestamp": NaN}', "invalid_json"),
    (b"a", b"[1, 2, 3]", "not_an_object"),
    (b"a", b'{"item_id": "1", "timestamp": 1.0}', "missing_session_id"),
    (b"", b'{"session_id": "", "item_id": "1", "timestamp": 1.0}', "bad_session_id"),
    (b"7", b'{"session_id": 7, "item_id": "1", "timestamp": 1.0}', "bad_session_id"),
    (b"a", b'{"session_id": "a", "timestamp": 1.0}', "missing_item_id"),
    (b"a", b'{"session_id": "a", "item_id": true, "timestamp": 1.0}', "bad_item_id"),
    (b"a", b'{"session_id": "a", "item_id": "1"}', "missing_timestamp"),
    (b"a", b'{"session_id": "a", "item_id": "1", "timestamp": "yesterday"}', "bad_timestamp"),
    (b"a", b'{"session_id": "a", "item_id": "1", "timestamp": 1e999}', "invalid_json"),
    (b"b", b'{"session_id": "a", "item_id": "1", "timestamp": 1.0}', "key_mismatch"),
    (None, b'{"session_id": "a", "item_id": "1", "timestamp": 1.0}', "key_mismatch"),
]


def interleaved(sessions: Sessions, vocab) -> tuple[list[tuple[bytes, bytes]], list[int]]:
    """Clicks round-robin over sessions (every session's j-th click before any (j+1)-th), and their flat indices."""
    order = sorted((j, s, p) for s in range(len(sessions)) for j, p in enumerate(range(sessions.offsets[s], sessions.offsets[s + 1])))
    ids = np.array([UNKNOWN] + vocab.item_ids, dtype=object)
    messages, flat = [], []
    for _, s, p in order:
        sid = str(sessions.session_ids[s])
        messages.append((sid.encode(), click_value(sid, ids[sessions.items[p]], float(sessions.times[p]))))
        flat.append(p)
    return messages, flat


def with_unknown_click(sessions: Sessions, n: int) -> Sessions:
    """The first ``n`` sessions, the first one with an unknown item (0) inserted after its second click."""
    lists = [list(sessions.session(s)) for s in range(n)]
    lists[0].insert(2, 0)
    return Sessions.from_lists(lists, session_ids=[str(x) for x in sessions.session_ids[:n]])


def test_every_click_answered_or_dead_lettered_and_answers_match_offline(each_broker, stream_data, markov_bundle, tmp_path):
    run_dir, bundle = markov_bundle
    settings = worker_settings(each_broker)
    sessions = with_unknown_click(stream_data.test, 40)
    good, flat = interleaved(sessions, stream_data.vocab)
    messages = list(good)
    for i, (key, value, _) in enumerate(MALFORMED):  # spread the bad ones through the stream
        messages.insert(7 * i + 3, (key, value))

    with running_worker(settings, bundle, tmp_path / "worker.log"):
        send(settings, messages)
        topics = read(settings, {settings.recommendations_topic: len(good), settings.dlq_topic: len(MALFORMED)})
        text = wait_for(lambda: (t := metrics_text(settings)) and metric(t, 'streamrec_events_total{outcome="answered"}') == len(good) and t)
        assert text, "the worker's counters never reached the number of good clicks"

    answers, letters = topics[settings.recommendations_topic], topics[settings.dlq_topic]
    assert len(answers) == len(good) and len(letters) == len(MALFORMED)  # nothing lost, nothing extra
    # Kafka timestamps in epoch milliseconds of now: stamped in seconds they read as 1970, and Apache
    # Kafka's time retention deleted the answers minutes after they were written
    assert all(abs(r.timestamp / 1000 - time.time()) < 600 for r in answers + letters)
    expected_reasons = sorted(reason for _, _, reason in MALFORMED)
    docs = [orjson.loads(r.value) for r in letters]
    assert sorted(d["reason"] for d in docs) == expected_reasons
    assert sorted(base64.b64decode(d["raw"]) for d in docs) == sorted(v for _, v, _ in MALFORMED)
    assert all(d["topic"] == settings.clicks_topic and d["offset"] >= 0 for d in docs)

    model = load_run(run_dir)
    popularity = np.bincount(stream_data.train.items, minlength=stream_data.n_items + 1)
    rows = offline_rows(model, sessions, popularity)
    by_position = answers_by_position(answers)
    assert len(by_position) == len(good)
    for s in range(len(sessions)):
        sid = str(sessions.session_ids[s])
        for j, p in enumerate(range(sessions.offsets[s], sessions.offsets[s + 1])):
            doc = by_position[(sid, j + 1)]
            assert doc["schema"] == 1 and doc["model"] == "markov" and doc["event_timestamp"] == float(sessions.times[p])
            if p + 1 < sessions.offsets[s + 1]:
                assert_answer_matches(doc, rows[p], stream_data.vocab, k=20)
    # the unknown click got the popularity list and did not move the session's state on
    first = str(sessions.session_ids[0])
    top_popular = np.argsort(-popularity[1:], kind="stable")[:20] + 1
    assert set(by_position[(first, 3)]["items"]) == set(stream_data.vocab.decode(top_popular))

    assert metric(text, 'streamrec_events_total{outcome="dead_lettered"}') == len(MALFORMED)
    assert metric(text, "streamrec_recommendations_total") == len(good)
    assert metric(text, "streamrec_unknown_items_total") == 1
    assert metric(text, 'streamrec_dead_letters_total{reason="key_mismatch"}') == 2
    assert metric(text, "streamrec_active_sessions") == len(sessions)
    evaluated = metric(text, "streamrec_online_evaluated_total")
    assert evaluated == len(good) - len(sessions) - 1  # every click after the first, except the unknown one
    assert metric(text, 'streamrec_online_hits_total{k="20"}') <= evaluated
    hit_rate = metric(text, 'streamrec_online_hit_rate{k="20"}')
    assert hit_rate == pytest.approx(metric(text, 'streamrec_online_hits_total{k="20"}') / evaluated)
    assert 'streamrec_model_info{model="markov"' in text
    assert "faust_" in text  # Faust's own consumer metrics on the same endpoint


@pytest.mark.parametrize("store", ["memory", "rocksdb"])
def test_replayed_test_split_scores_online_as_offline(store, broker, stream_data, gru_bundle, tmp_path):
    run_dir, bundle = gru_bundle
    settings = worker_settings(broker, store=store, data_dir=str(tmp_path / "state"))
    events = replay_events(stream_data, "test")
    with running_worker(settings, bundle, tmp_path / "worker.log"):
        asyncio.run(replay(settings, events, progress=False))
        known = set(stream_data.vocab.item_ids)
        online = asyncio.run(read_and_score(settings, (5, 10, 20), known, expect_answers=len(events), timeout=90))
        text = metrics_text(settings)

    model = load_run(run_dir)
    popularity = np.bincount(stream_data.train.items, minlength=stream_data.n_items + 1)
    offline = evaluate(model, stream_data.test, ks=(5, 10, 20), popularity=popularity, progress=False)
    got = online.metrics()
    assert got["unanswered"] == 0 and got["answered"] == len(events)
    assert got["n_events"] == offline["n_events"]
    for name in ("HR@5", "HR@10", "HR@20", "MRR@5", "MRR@10", "MRR@20"):
        assert abs(got[name] - offline[name]) <= 0.001, (name, got[name], offline[name])
    assert metric(text, 'streamrec_online_hit_rate{k="20"}') == pytest.approx(got["HR@20"], abs=1e-9)
    assert metric(text, 'streamrec_online_mrr{k="20"}') == pytest.approx(got["MRR@20"], abs=1e-9)


@REBALANCE_RERUN
def test_state_survives_a_worker_handover(each_broker, stream_data, gru_bundle, tmp_path):
    """Stop a worker mid-sessions; the next one recovers the GRU states from the changelog and answers as offline."""
    run_dir, bundle = gru_bundle
    settings = worker_settings(each_broker)
    sessions = stream_data.test.select(np.arange(len(stream_data.test)) < 60)
    messages, flat = interleaved(sessions, stream_data.vocab)
    position_in_session = np.arange(sessions.n_events) - np.repeat(sessions.offsets[:-1], sessions.lengths)
    first_half = [m for m, p in zip(messages, flat) if position_in_session[p] < 3]
    second_half = [m for m, p in zip(messages, flat) if position_in_session[p] >= 3]

    with running_worker(settings, bundle, tmp_path / "worker-a.log"):
        send(settings, first_half)
        read(settings, {settings.recommendations_topic: len(first_half)})
    with running_worker(settings, bundle, tmp_path / "worker-b.log"):
        send(settings, second_half)
        topics = read(settings, {settings.recommendations_topic: len(messages)})

    model = load_run(run_dir)
    popularity = np.bincount(stream_data.train.items, minlength=stream_data.n_items + 1)
    rows = offline_rows(model, sessions, popularity)
    by_position = answers_by_position(topics[settings.recommendations_topic])
    checked = 0
    for s in range(len(sessions)):
        sid = str(sessions.session_ids[s])
        for j, p in enumerate(range(sessions.offsets[s], sessions.offsets[s + 1] - 1)):
            assert_answer_matches(by_position[(sid, j + 1)], rows[p], stream_data.vocab, k=20)
            checked += j >= 3
    assert checked > 50


@pytest.mark.parametrize("guarantee,store", [("at_least_once", "memory"), ("exactly_once", "memory"), ("at_least_once", "rocksdb"), ("exactly_once", "rocksdb")])
def test_idle_sessions_expire_with_a_tombstone(broker, stream_data, markov_bundle, tmp_path, guarantee, store):
    """Under exactly_once the tombstones go in transactions: the changelog is read as read_committed.
    With RocksDB a state or tombstone reaches the store once confirmed (committed, under exactly_once)."""
    _, bundle = markov_bundle
    settings = worker_settings(broker, session_ttl=1.0, processing_guarantee=guarantee, store=store, data_dir=str(tmp_path / "state"))
    sessions = stream_data.test.select(np.arange(len(stream_data.test)) < 5)
    messages, _ = interleaved(sessions, stream_data.vocab)
    with running_worker(settings, bundle, tmp_path / "worker.log"):
        send(settings, messages)
        read(settings, {settings.recommendations_topic: len(messages)})
        assert wait_for(lambda: metric(metrics_text(settings), "streamrec_expired_sessions_total") == len(sessions), timeout=30)
        assert metric(metrics_text(settings), "streamrec_active_sessions") == 0
        again = messages[0]
        send(settings, [again])
        topics = read(settings, {settings.recommendations_topic: len(messages) + 1})
    docs = [orjson.loads(r.value) for r in topics[settings.recommendations_topic]]
    sid = again[0].decode()
    assert [d["position"] for d in docs if d["session_id"] == sid][-1] == 1  # a fresh session after expiry
    changelog = f"{settings.app_id}-{TABLE}-changelog"
    records = asyncio.run(_read_all(settings, changelog))
    tombstones = {r.key.decode() for r in records if r.value is None}
    assert tombstones == {str(x) for x in sessions.session_ids}


async def _read_all(settings, topic):
    from stream.topics import consume_all

    return (await consume_all(settings, [topic], idle=1.0, timeout=30))[topic]


def test_records_skipped_while_rebalancing_are_read_again_never_skipped_over():
    """The fetch loop's decision after a rebalance (stream.transport): records it skipped unread are
    read again from the first one, unless the rebalance's seek already went back that far."""
    from stream.transport import SkippedWhileRebalancing

    skipped = SkippedWhileRebalancing()
    for offset in range(3920, 4433):  # fetched before the seek to the committed offset 3920
        skipped.skip("p0", offset)
    for offset in range(3920, 3990):  # fetched after it, still before the rebalance ended
        skipped.skip("p0", offset)
    skipped.skip("p1", 700)
    assert skipped.seek_back("p0", 3990) == 3920  # the first record after the rebalance is past them: seek back
    assert skipped.seek_back("p0", 3990) is None  # once
    assert skipped.seek_back("p1", 700) is None  # the seek already went back that far: read on, no seek
    skipped.skip("p2", 500)
    assert skipped.seek_back("p2", 400) is None  # never a seek forward over records not read yet
    skipped.skip("p3", 10)
    skipped.forget(["p3"])  # revoked: its next owner reads from the committed offset
    assert skipped.seek_back("p3", 20) is None
    assert skipped.first == {}


def test_fetched_records_not_handed_over_are_put_back_unless_a_seek_moved_the_partition_since(broker):
    """stream.transport point 3, through Apache Kafka: records fetched when a rebalance stops the fetch loop
    are read again from the first one not handed over (a changelog partition has no committed offset for a
    later seek to go back to); a partition sought elsewhere since the fetch is left where that seek put it."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from stream.settings import Settings
    from stream.topics import ensure_topics, producer
    from stream.transport import put_back

    settings = Settings(**broker.settings(), partitions=2)

    async def scenario():
        await ensure_topics(settings)
        p = producer(settings, acks="all")
        await p.start()
        try:
            for i in range(10):
                await p.send_and_wait(settings.clicks_topic, b"%d" % i, partition=0)
                await p.send_and_wait(settings.clicks_topic, b"%d" % i, partition=1)
        finally:
            await p.stop()
        consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        tp0, tp1 = TopicPartition(settings.clicks_topic, 0), TopicPartition(settings.clicks_topic, 1)
        try:
            consumer.assign([tp0, tp1])
            fetched = {tp0: [], tp1: []}
            while sum(map(len, fetched.values())) < 20:
                for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                    fetched[tp] += records
            assert await consumer.position(tp0) == 10 and await consumer.position(tp1) == 10
            # Records 4..9 of partition 0 and 2..9 of partition 1 were not handed over; partition 1 was sought to 7 since.
            consumer.seek(tp1, 7)
            done = await put_back(consumer, {tp0: (4, 10), tp1: (2, 10), TopicPartition(settings.clicks_topic, 5): (0, 3)})
            assert done == {tp0: (4, 10)}  # partition 5 is not assigned: left alone
            again = {tp0: [], tp1: []}
            deadline = time.monotonic() + 20
            while (len(again[tp0]) < 6 or len(again[tp1]) < 3) and time.monotonic() < deadline:
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    again[tp] += records
            return [r.offset for r in again[tp0]], [r.offset for r in again[tp1]]
        finally:
            await consumer.stop()

    read0, read1 = asyncio.run(scenario())
    assert read0 == [4, 5, 6, 7, 8, 9]  # read again, in order, none skipped
    assert read1 == [7, 8, 9]  # the later seek decided


def test_the_tansu_fetch_wait_grows_while_fetches_come_back_empty_and_returns_to_the_setting():
    """--broker-quirks tansu (stream.transport, point 3): an answer with no records although the partition
    has some doubles the next fetch's wait, up to a ceiling; other answers take a quarter off, down to the setting."""
    from stream.broker_adapter import TANSU_FETCH_WAIT_MAX_MS, TansuFetchWait

    wait = TansuFetchWait(10)
    assert [wait.after_fetch(True) for _ in range(3)] == [20, 40, 80]
    assert max(wait.after_fetch(True) for _ in range(20)) == TANSU_FETCH_WAIT_MAX_MS
    assert [wait.after_fetch(False) for _ in range(2)] == [TANSU_FETCH_WAIT_MAX_MS * 3 // 4, TANSU_FETCH_WAIT_MAX_MS * 9 // 16]
    while wait.ms > 10:
        wait.after_fetch(False)
    assert wait.after_fetch(False) == 10  # never below the setting
    assert TansuFetchWait(0).after_fetch(True) == 20  # a zero setting still grows
    assert TansuFetchWait(5000).after_fetch(True) == 5000  # a setting above the ceiling is kept


SMALL = dict(epochs=1, threads=1, patience=0, batch_size=64, hidden_size=32, embedding_size=32, history_len=8, blocks=1, heads=2)


@pytest.mark.parametrize("name", ["sasrec", "srgnn"])
def test_window_and_graph_models_answer_every_click_as_their_own_scorer(name, broker, stream_data, tmp_path):
    """The state kinds beyond items (markov) and hidden (GRU4Rec): a window model and a graph model, end to end
    on Apache Kafka, sessions longer than the kept history; every answer equals the bundle's own scorer over
    the same session prefix."""
    import dataclasses

    from tests.streamkit import answers_by_key, assert_same_answer, click_stream, offline_answers, send_all
    from tests.test_stream_support import _train_and_export
    from training.models import get_model

    fields = {f.name for f in dataclasses.fields(get_model(name).Config)}
    _, bundle = _train_and_export(stream_data, name, tmp_path, **{k: v for k, v in SMALL.items() if k in fields})
    settings = worker_settings(broker)
    messages, sessions = click_stream(stream_data.vocab.item_ids, n_sessions=30, clicks=12, seed=17, prefix=name)
    with running_worker(settings, bundle, tmp_path / "worker.log"):
        send_all(settings, messages)
        records = read(settings, {settings.recommendations_topic: len(messages)})[settings.recommendations_topic]
    by_key, total = answers_by_key(records)
    expected = offline_answers(bundle, sessions, 20)
    assert total == len(messages) and set(by_key) == set(expected)
    for key, docs in by_key.items():
        (doc,) = docs
        assert doc["model"] == name
        assert_same_answer(doc, expected[key])
