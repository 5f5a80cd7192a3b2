"""Security on a real broker: Apache Kafka with SASL/SCRAM-SHA-256 over TLS and ACLs (tests/securekit.py).

One secured broker for the module (StandardAuthorizer, ``allow.everyone.if.no.acl.found=false``: a
principal may do only what an ACL allows) and one `streamrec serve` worker on it, authenticated as
its own user ``streamrec-worker`` with exactly ``securekit.worker_acls``. The tests show that it
serves with those rights and has no others, that a client without Write on ``model-updates``
cannot swap the model, and that a worker obeys a model-updates message only for a bundle inside
``--bundle-root``: before, any writer of that topic could point every worker at any directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from stream.broker import free_port
from stream.bundles import bundle_root, inside_root
from stream.model_updates import UPDATES_KEY, update_message
from stream.settings import Settings
from stream.topics import consume_all, producer, publish_model_update
from streamrec.errors import UserError
from tests.conftest import need_kafka
from tests.securekit import ADMIN, TOPIC, READ, WRITE, Acl, client_settings, create_acls, create_topics, secure_cluster, worker_acls, worker_topics
from tests.streamkit import answered, answers_by_key, assert_same_answer, click_stream, offline_answers, streamrec
from tests.test_hot_swap import version_of
from tests.test_stream_support import gru_bundle, markov_bundle, metric, metrics_text, running_worker, stream_data, wait_for  # noqa: F401

K = 20
USERS = {"streamrec-worker": "worker-secret", "shop": "shop-secret", "publisher": "publisher-secret", "outsider": "outsider-secret"}


# -- the pure check (no broker) -----------------------------------------------------------------


def test_the_bundle_root_check_resolves_the_named_path_before_it_compares(tmp_path):
    root = tmp_path / "bundles"
    (root / "v1").mkdir(parents=True)
    (tmp_path / "bundles-evil").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "current").symlink_to(root / "v1")
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    r = bundle_root("", root / "v1")  # empty: the directory that holds --bundle
    assert r == os.path.realpath(root)
    assert inside_root(str(root / "v1"), r) and inside_root(str(root / "current"), r)
    assert inside_root(str(root / "not-there-yet"), r)  # inside; the swap then refuses it as no bundle
    for outside in (root / ".." / "elsewhere", tmp_path / "elsewhere", root / "escape", root / "escape" / "x", tmp_path / "bundles-evil", root, Path("/")):
        assert not inside_root(str(outside), r), outside
    assert not inside_root("../elsewhere", r)  # relative: to the worker's working directory
    assert bundle_root(str(root / "current"), tmp_path / "elsewhere" / "b") == os.path.realpath(root / "v1")  # a set root is resolved too
    (tmp_path / "link-to-bundles").symlink_to(root)
    assert bundle_root("", tmp_path / "link-to-bundles" / "v1") == r


def test_a_bundle_root_that_is_no_directory_is_one_line_error(markov_bundle, tmp_path):
    with pytest.raises(UserError, match="--bundle-root"):
        Settings(bundle_root=str(tmp_path / "missing"))
    done = streamrec("serve", "--bundle", str(markov_bundle[1]), "--bundle-root", str(tmp_path / "missing"), "--broker", "kafka://127.0.0.1:1", timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: --bundle-root {tmp_path / 'missing'}: no such directory"], done.stderr


def test_a_new_kafka_cluster_id_never_starts_with_a_dash():
    """One in 64 did, and `kafka-storage format -t -...` then failed to start the secured broker of this module."""
    from stream.kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(3000)]  # without the check: about 47 start with '-'
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


# -- the secured broker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory):
    """Apache Kafka on SASL_SSL (SCRAM-SHA-256, a throwaway CA) with ACLs enforced, for this module."""
    need_kafka()
    if shutil.which("openssl") is None:
        pytest.fail("the security tests need the openssl command") if os.environ.get("CI") else pytest.skip("no openssl command")
    with secure_cluster(tmp_path_factory.mktemp("secure-kafka"), USERS) as cluster:
        yield cluster


@dataclass
class Served:
    """The secured worker and what the tests need around it."""

    worker: Settings  # the worker's own settings (its principal)
    admin: Settings
    root: Path  # --bundle-root: the directory that holds --bundle
    elsewhere: Path  # bundles outside it
    log: Path
    process: object

    def as_user(self, user: str) -> Settings:
        return self.worker.replace(sasl_username=user, sasl_password=USERS[user], metrics_port=0)


@pytest.fixture(scope="module")
def served(secure_kafka, markov_bundle, gru_bundle, tmp_path_factory):
    """Topics made by the admin, the worker's ACLs and the test users' ACLs, then one worker serving markov."""
    base = tmp_path_factory.mktemp("secure-worker")
    root, elsewhere = base / "bundles", base / "elsewhere"
    shutil.copytree(markov_bundle[1], root / "markov")
    shutil.copytree(gru_bundle[1], root / "gru")
    shutil.copytree(gru_bundle[1], elsewhere / "gru")
    (root / "escape").symlink_to(elsewhere / "gru")
    worker = client_settings(
        secure_kafka,
        "streamrec-worker",
        USERS["streamrec-worker"],
        app_id="secure-streamrec",
        clicks_topic="secure-clicks",
        recommendations_topic="secure-recommendations",
        dlq_topic="secure-clicks-dlq",
        model_updates_topic="secure-model-updates",
        partitions=3,
        group_session_timeout=2.0,
        metrics_port=free_port(),
        bundle_poll_seconds=0,
    )
    admin = worker.replace(sasl_username=ADMIN[0], sasl_password=ADMIN[1], metrics_port=0)
    create_topics(admin, worker_topics(worker))
    others = [
        Acl("shop", TOPIC, worker.clicks_topic, WRITE),  # the shop's click producer
        Acl("publisher", TOPIC, worker.model_updates_topic, WRITE),  # the release pipeline
        Acl("outsider", TOPIC, worker.model_updates_topic, READ),  # may look at the updates, not make one
    ]
    create_acls(admin, worker_acls(worker, "streamrec-worker") + others)
    log = base / "worker.log"
    with running_worker(worker, root / "markov", log) as process:
        assert wait_for(lambda: _assigned(worker) == worker.partitions or process.poll() is not None, timeout=90) and process.poll() is None, log.read_text()[-3000:]
        yield Served(worker, admin, root, elsewhere, log, process)


def _assigned(settings: Settings) -> float:
    """Clicks partitions the worker consumes (0 while its endpoint is not up): all of them once Faust runs."""
    try:
        return metric(metrics_text(settings), "streamrec_assigned_partitions")
    except OSError:
        return 0.0


def _produce(settings: Settings, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    """Produce as the user of ``settings`` (acks=all); raises what the broker answers, e.g. TopicAuthorizationFailedError."""

    async def run():
        p = producer(settings, acks="all", request_timeout_ms=15000)
        await p.start()
        try:
            for future in [await p.send(topic, value, key=key) for key, value in messages]:
                await future
        finally:
            await p.stop()

    asyncio.run(run())


def _publish(settings: Settings, bundle: Path | str, version: str | None = None) -> None:
    """One model-updates message naming ``bundle`` (and ``version`` when given), sent as the user of ``settings``."""
    value = update_message(str(bundle), version) if version else json.dumps({"bundle": str(bundle)}).encode()
    _produce(settings, settings.model_updates_topic, [(UPDATES_KEY, value)])


def _end_offset(settings: Settings, topic: str) -> int:
    async def run():
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(**settings.kafka_kwargs())
        await c.start()
        try:
            tp = TopicPartition(topic, 0)
            return (await c.end_offsets([tp]))[tp]
        finally:
            await c.stop()

    return asyncio.run(run())


def _serving_version(settings: Settings) -> str:
    (line,) = [x for x in metrics_text(settings).splitlines() if x.startswith("streamrec_model_info{")]
    return line.split('version="')[1].split('"')[0]


def _count(settings: Settings, name: str) -> float:
    return metric(metrics_text(settings), name)


@pytest.mark.broker
def test_the_worker_serves_every_click_with_its_own_principal_and_only_the_acls_it_uses(served, stream_data):
    messages, sessions = click_stream(stream_data.vocab.item_ids, n_sessions=20, clicks=6, seed=13, prefix="sec")
    before = answered(served.worker)
    _produce(served.as_user("shop"), served.worker.clicks_topic, messages + [(b"sec-bad", b"{not json")])
    topics = [served.worker.recommendations_topic, served.worker.dlq_topic]
    records = asyncio.run(consume_all(served.admin, topics, expect={topics[0]: len(messages), topics[1]: 1}, timeout=90))
    assert wait_for(lambda: answered(served.worker) - before >= len(messages)), served.log.read_text()[-3000:]
    by_key, _ = answers_by_key(records[topics[0]])
    version = version_of(served.root / "markov")
    expected = offline_answers(served.root / "markov", sessions, K)
    mine = {key: docs for key, docs in by_key.items() if key in expected}
    assert set(mine) == set(expected)  # every click answered
    for key, docs in mine.items():
        assert len(docs) == 1 and docs[0]["model_version"] == version, key
        assert_same_answer(docs[0], expected[key])
    assert any(b"sec-bad" == r.key for r in records[topics[1]])  # the dead letter went out too
    assert "uthorization" not in served.log.read_text()  # not one refused request on the way


@pytest.mark.broker
def test_the_worker_principal_has_no_right_beyond_those(served):
    """Its credentials cannot feed it clicks, swap the fleet's model, read the answers or create topics."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    worker = served.as_user("streamrec-worker")
    for topic in (worker.clicks_topic, worker.model_updates_topic):
        with pytest.raises(TopicAuthorizationFailedError):
            _produce(worker, topic, [(b"k", b"{}")])

    async def read_answers():
        c = AIOKafkaConsumer(**worker.kafka_kwargs(), auto_offset_reset="earliest")
        await c.start()
        try:
            c.assign([TopicPartition(worker.recommendations_topic, 0)])
            await c.getmany(timeout_ms=10000)
        finally:
            await c.stop()

    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(read_answers())

    async def create_topic():
        admin = AIOKafkaAdminClient(**worker.kafka_kwargs())
        await admin.start()
        try:
            return (await admin.create_topics([NewTopic("secure-anything", 1, 1)])).topic_errors
        finally:
            await admin.close()

    ((name, code, *_),) = asyncio.run(create_topic())
    assert (name, code) == ("secure-anything", TopicAuthorizationFailedError.errno)


@pytest.mark.broker
def test_a_client_without_write_rights_on_model_updates_cannot_swap_the_model(served):
    worker, outsider = served.worker, served.as_user("outsider")
    serving, swaps = _serving_version(worker), _count(worker, "streamrec_model_swaps_total")
    target = served.root / ("gru" if serving == version_of(served.root / "markov") else "markov")
    end = _end_offset(served.admin, worker.model_updates_topic)
    with pytest.raises(TopicAuthorizationFailedError):
        _publish(outsider, target, version_of(target))
    assert _end_offset(served.admin, worker.model_updates_topic) == end  # nothing was written
    assert _serving_version(worker) == serving and _count(worker, "streamrec_model_swaps_total") == swaps
    # the same message from the user allowed to write the topic swaps the worker: the refusal above was the ACL's.
    # It goes through `streamrec publish-model`'s own function, which needs no right beyond Write on model-updates.
    asyncio.run(publish_model_update(served.as_user("publisher"), str(target), version_of(target)))
    assert wait_for(lambda: _serving_version(worker) == version_of(target), timeout=60), served.log.read_text()[-3000:]
    assert _count(worker, "streamrec_model_swaps_total") == swaps + 1


@pytest.mark.broker
def test_a_worker_obeys_a_model_update_only_for_a_bundle_inside_its_bundle_root(served):
    """--bundle-root is left empty: the directory that holds --bundle. Each path outside it is refused
    in one log line and counted as outside_root before anything is read from it; a symlink inside
    the root to a bundle inside it (a `current` link) is obeyed."""
    worker, publisher, root = served.worker, served.as_user("publisher"), served.root
    serving = _serving_version(worker)
    before = {name: _count(worker, name) for name in ("streamrec_model_swaps_total", "streamrec_model_swap_failures_total", 'streamrec_model_updates_total{outcome="outside_root"}')}
    outside = [
        f"{root}/../elsewhere/gru",  # climbs out
        str(served.elsewhere / "gru"),  # absolute, elsewhere
        str(root / "escape"),  # a symlink inside the root to a bundle outside it
        "../elsewhere/gru",  # relative (to the worker's working directory)
        str(root),  # the root itself is no bundle under it
    ]
    for path in outside:
        _publish(publisher, path)
    assert wait_for(lambda: _count(worker, 'streamrec_model_updates_total{outcome="outside_root"}') == before['streamrec_model_updates_total{outcome="outside_root"}'] + len(outside), timeout=60), served.log.read_text()[-3000:]
    assert _serving_version(worker) == serving
    for name in ("streamrec_model_swaps_total", "streamrec_model_swap_failures_total"):
        assert _count(worker, name) == before[name], name  # no swap, and no bundle was even tried
    refusals = [line for line in served.log.read_text().splitlines() if "not under --bundle-root" in line]
    assert len(refusals) == len(outside) and all(f"not under --bundle-root {os.path.realpath(root)} " in line for line in refusals), refusals
    for path, line in zip(outside, refusals):
        assert f"model swap refused: {path} resolves to " in line, line

    target = "gru" if serving == version_of(root / "markov") else "markov"
    (root / "current").symlink_to(root / target)
    _publish(publisher, root / "current", version_of(root / target))
    assert wait_for(lambda: _serving_version(worker) == version_of(root / target), timeout=60), served.log.read_text()[-3000:]
    assert _count(worker, 'streamrec_model_updates_total{outcome="swapped"}') >= 1
