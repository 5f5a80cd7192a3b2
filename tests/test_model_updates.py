"""Model updates by message, the worker's event accounting and its Faust settings (stream/model_updates.py, stream/swap.py,
stream/metrics.py, stream/settings.py).

Through the embedded broker with real `streamrec serve` processes: a `model-updates` message swaps
the model of every worker of the group mid-stream (bad messages and bad bundles leave the old model
serving; a worker that starts later catches up with the topic), and a rewound consumer group shows
redelivered clicks counted apart from the answered and dead-lettered ones.
"""

from __future__ import annotations

import asyncio
import json
import os

import orjson
import pytest

from stream.broker import free_port
from stream.model_updates import UPDATES_KEY, UpdateError, parse_update, update_message
from stream.settings import Settings
from stream.topics import consume_all, publish_model_update, producer
from streamrec.errors import UserError
from tests.streamkit import REBALANCE_RERUN, PacedSender, answered, answers_by_key, assert_same_answer, click_stream, offline_answers, streamrec
from tests.test_hot_swap import corrupted_copy, positions, version_of
from tests.test_stream_support import gru_bundle, markov_bundle, metric, metrics_text, running_worker, send, stream_data, wait_for, worker_settings  # noqa: F401

K = 20


@pytest.mark.parametrize(
    "value,problem",
    [
        (None, "empty"),
        (b"", "empty"),
        (b"\xff", "not JSON"),
        (b"{'bundle': 1}", "not JSON"),
        (b'["/srv/bundles/a"]', "not a JSON object"),
        (b'{"model_version": "v1"}', "'bundle'"),
        (b'{"bundle": ""}', "'bundle'"),
        (b'{"bundle": 7}', "'bundle'"),
        (b'{"bundle": "/srv/a", "model_version": 3}', "'model_version'"),
    ],
)
def test_a_bad_update_message_says_what_is_wrong(value, problem):
    with pytest.raises(UpdateError, match=problem):
        parse_update(value)


def test_update_messages_round_trip():
    assert parse_update(update_message("/srv/bundles/a", "gru4rec-1")) == ("/srv/bundles/a", "gru4rec-1")
    assert parse_update(b'{"bundle": "/srv/bundles/a"}') == ("/srv/bundles/a", None)
    with pytest.raises(UserError, match="--model-updates-topic"):
        Settings(model_updates_topic="clicks")


def test_group_settings_reach_faust_and_a_long_session_timeout_is_accepted(markov_bundle):
    """Faust refuses a session timeout above its request timeout (90 s by default): the request timeout follows."""
    from export.scorer import load_scorer
    from stream.worker import StreamWorker

    scorer = load_scorer(markov_bundle[1])

    async def consumer_of(settings: Settings):
        worker = StreamWorker(settings, scorer, partitions=3)
        consumer = worker.app.consumer._thread._create_worker_consumer(worker.app.transport)  # where Faust checks the timeouts
        await consumer.stop()
        return worker.app.conf, consumer

    conf, consumer = asyncio.run(consumer_of(Settings(group_session_timeout=600.0, standby_replicas=2)))
    assert conf.table_standby_replicas == 2
    assert consumer._session_timeout_ms == 600_000 and consumer._rebalance_timeout_ms == 600_000
    assert consumer._client._request_timeout_ms > consumer._rebalance_timeout_ms  # a JoinGroup may wait that long on the broker
    conf, consumer = asyncio.run(consumer_of(Settings()))
    assert conf.table_standby_replicas == 0 and conf.broker_request_timeout == 90.0 and consumer._session_timeout_ms == 10_000


def test_publish_model_refuses_a_corrupted_bundle_in_one_line(markov_bundle, tmp_path):
    bad = corrupted_copy(markov_bundle[1], tmp_path / "bad")
    done = streamrec("publish-model", str(bad), "--broker", "kafka://127.0.0.1:1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "popularity.npy is corrupted" in done.stderr, done.stderr


def publish_raw(settings: Settings, values: list[bytes]) -> None:
    async def run():
        p = producer(settings)
        await p.start()
        try:
            for value in values:
                await p.send_and_wait(settings.model_updates_topic, value, key=UPDATES_KEY)
        finally:
            await p.stop()

    asyncio.run(run())


def updates(settings: Settings, outcome: str) -> float:
    return metric(metrics_text(settings), f'streamrec_model_updates_total{{outcome="{outcome}"}}')


def serving(settings: Settings) -> bool:
    """The worker's metrics endpoint is up: it has read the model-updates topic and listens for more."""
    try:
        return bool(metrics_text(settings))
    except OSError:
        return False


@REBALANCE_RERUN
@pytest.mark.broker
def test_a_model_update_message_swaps_every_worker_mid_stream(broker, stream_data, markov_bundle, gru_bundle, tmp_path):
    (_, bundle_a), (_, bundle_b) = markov_bundle, gru_bundle
    version_a, version_b = version_of(bundle_a), version_of(bundle_b)
    bad = corrupted_copy(bundle_b, tmp_path / "bad")
    first = worker_settings(broker, bundle_poll_seconds=0, bundle_root=os.path.commonpath([bundle_a, bundle_b, tmp_path]))  # the bundles live in different temporary folders
    second = first.replace(metrics_port=free_port())
    messages, sessions = click_stream(stream_data.vocab.item_ids, n_sessions=40, clicks=12, seed=21)
    phase1, phase2 = messages[:300], messages[300:]

    with running_worker(first, bundle_a, tmp_path / "worker-1.log"):
        assert wait_for(lambda: serving(first), timeout=60), "the worker did not start"
        publish_raw(first, [b"{not json", b'{"model_version": "v"}', update_message(str(bad), version_of(bad)), update_message(str(bundle_b), "not-its-version")])
        assert wait_for(lambda: updates(first, "invalid") == 2 and updates(first, "refused") == 2), "the bad updates were not all seen"
        text = metrics_text(first)
        assert metric(text, "streamrec_model_swap_failures_total") == 2 and metric(text, "streamrec_model_swaps_total") == 0
        assert f'version="{version_a}"' in text  # the old model keeps serving

        sender = PacedSender(first, phase1, rate=60.0)  # 5 s of clicks; the update lands in the middle
        sender.start()
        assert wait_for(lambda: answered(first) >= 60), "the worker does not answer"
        asyncio.run(publish_model_update(first, str(bundle_b), version_b))
        assert wait_for(lambda: metric(metrics_text(first), "streamrec_model_swaps_total") == 1), "the update was not swapped in"
        sender.finish(60)
        asyncio.run(consume_all(first, [first.recommendations_topic], expect={first.recommendations_topic: len(phase1)}, timeout=60))

        with running_worker(second, bundle_a, tmp_path / "worker-2.log"):  # started on A: catches up with the topic
            assert wait_for(lambda: _assigned(first) + _assigned(second) == first.partitions and _assigned(second) > 0, timeout=60), "the partitions were not split"
            text = metrics_text(second)
            assert f'version="{version_b}"' in text and metric(text, 'streamrec_model_updates_total{outcome="swapped"}') == 1
            assert metric(text, 'streamrec_model_updates_total{outcome="invalid"}') == 0  # old bad messages are history, not news

            done = streamrec("publish-model", str(bundle_a), "--broker", first.broker, "--model-updates-topic", first.model_updates_topic)
            assert done.returncode == 0, done.stderr
            assert wait_for(lambda: all(metric(metrics_text(s), "streamrec_model_swaps_total") == 2 for s in (first, second))), "not every worker swapped"
            send(first, phase2)
            records = asyncio.run(consume_all(first, [first.recommendations_topic], expect={first.recommendations_topic: len(messages)}, timeout=60))
            second_answered = answered(second)

    by_key, total = answers_by_key(records[first.recommendations_topic])
    keys = positions(messages)
    assert total == len(messages) and set(by_key) == set(keys)  # nothing lost, nothing twice
    expected = {version_a: offline_answers(bundle_a, sessions, K), version_b: offline_answers(bundle_b, sessions, K)}
    served = {version_a: 0, version_b: 0}
    for i, key in enumerate(keys):
        (doc,) = by_key[key]
        assert doc["model_version"] in expected and (i < len(phase1) or doc["model_version"] == version_a), (key, doc["model_version"])
        assert_same_answer(doc, expected[doc["model_version"]][key])  # sessions carry on: as if that model had served them from the start
        served[doc["model_version"]] += i < len(phase1)
    assert served[version_a] >= 60 and served[version_b] > 0, served  # the update landed mid-stream
    assert second_answered > 0
    log = (tmp_path / "worker-1.log").read_text()
    assert "model update ignored: not JSON" in log and "model swap refused" in log and "not-its-version" in log


def _assigned(settings: Settings) -> float:
    try:
        return metric(metrics_text(settings), "streamrec_assigned_partitions")
    except OSError:
        return 0.0


async def _rewind_group(settings: Settings) -> None:
    """Commit offset 0 on every clicks partition for the worker's consumer group: all is consumed again."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

    class Assignor(RoundRobinPartitionAssignor):
        name = "faust"  # the embedded broker keeps an empty group's protocol: join under Faust's name

    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id=settings.app_id, enable_auto_commit=False, session_timeout_ms=2000, heartbeat_interval_ms=500, partition_assignment_strategy=(Assignor,))
    await consumer.start()
    try:
        consumer.subscribe([settings.clicks_topic])  # a member of the (empty) group: the broker takes its commit
        for _ in range(100):
            await consumer.getmany(timeout_ms=200)
            if consumer.assignment():
                break
        await consumer.commit({TopicPartition(settings.clicks_topic, p): 0 for p in range(settings.partitions)})
    finally:
        await consumer.stop()


@pytest.mark.broker
def test_redelivered_clicks_are_counted_apart_from_answers_and_dead_letters(broker, stream_data, markov_bundle, tmp_path, monkeypatch):
    # Faust's own stall check, from 1 s after start and every half second (2.5 commit intervals): it
    # used to report our agent, which reads its queue in bulk, as "Stream has not started processing".
    monkeypatch.setenv("STREAM_PROCESSING_TIMEOUT", "1")
    monkeypatch.setenv("BROKER_COMMIT_INTERVAL", "0.2")
    _, bundle = markov_bundle
    settings = worker_settings(broker)
    good, _ = click_stream(stream_data.vocab.item_ids, n_sessions=120, clicks=20, seed=5)
    early, late = good[:2000], good[2000:]
    bad = [(b"s1", b"{not json"), (b"s2", b'{"session_id": "s3", "item_id": "1", "timestamp": 1}'), (None, b"[]")]
    first = list(early)
    for i, message in enumerate(bad):
        first.insert(400 * i + 7, message)

    with running_worker(settings, bundle, tmp_path / "worker-1.log"):
        assert wait_for(lambda: serving(settings), timeout=60), "the worker did not start"
        sender = PacedSender(settings, first, rate=500.0)  # 4 s of steady traffic: Faust checks each partition every second
        sender.start()
        sender.finish(60)
        assert wait_for(lambda: answered(settings) == len(early)), "not every click was answered"
        text = metrics_text(settings)
    assert metric(text, 'streamrec_events_total{outcome="answered"}') == len(early)
    assert metric(text, 'streamrec_events_total{outcome="dead_lettered"}') == len(bad)
    assert metric(text, "streamrec_redelivered_events_total") == 0
    log = (tmp_path / "worker-1.log").read_text()  # (the second worker's start with a backlog is a true "not started")
    assert "Stream has not started processing" not in log and "Stream stopped processing" not in log

    asyncio.run(_rewind_group(settings))
    with running_worker(settings, bundle, tmp_path / "worker-2.log"):  # consumes everything again, then the new clicks
        send(settings, late)
        topics = asyncio.run(consume_all(settings, [settings.recommendations_topic, settings.dlq_topic], expect={settings.recommendations_topic: len(good), settings.dlq_topic: 2 * len(bad)}, timeout=60))
        assert wait_for(lambda: answered(settings) == len(late) and metric(metrics_text(settings), "streamrec_redelivered_events_total") == len(early)), "the redelivered clicks were not all counted"
        text = metrics_text(settings)

    # consumed again = redelivered (skipped, nothing published) + dead letters sent again; new = answered
    assert metric(text, 'streamrec_events_total{outcome="answered"}') == len(late)
    assert metric(text, 'streamrec_events_total{outcome="dead_lettered"}') == len(bad)
    assert metric(text, "streamrec_redelivered_events_total") == len(early)
    by_key, total = answers_by_key(topics[settings.recommendations_topic])
    assert total == len(good) == len(by_key)  # one answer per click, none twice
    letters = [orjson.loads(r.value) for r in topics[settings.dlq_topic]]
    assert len({(d["partition"], d["offset"]) for d in letters}) == len(bad)  # each bad click dead-lettered twice, identically
    assert json.dumps(sorted(letters, key=lambda d: (d["partition"], d["offset"]))[::2], sort_keys=True) == json.dumps(sorted(letters, key=lambda d: (d["partition"], d["offset"]))[1::2], sort_keys=True)
