"""Hostile input: whatever arrives on `clicks`, the worker neither crashes nor stalls, and every event
is answered or dead-lettered with its reason (in == answered + dead-lettered).

Two layers: a hypothesis property over the batch processor (arbitrary bytes and JSON, no broker),
and a deterministic corpus of 10,000+ hostile events through a `streamrec serve` process on the
embedded broker, each dead letter matched back to the event it came from.
"""

from __future__ import annotations

import base64
import json
import random
import time
import urllib.request
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from stream.events import REASONS, click_value
from stream.processor import BatchProcessor, Record
from stream.settings import Settings
from stream.topics import consume_all
from tests.streamkit import send_all
from tests.test_stream_support import markov_bundle, metric, metrics_text, running_worker, stream_data, wait_for, worker_settings  # noqa: F401

MB = 1 << 20
LIMIT = Settings().max_event_bytes
KAFKA_MESSAGE_MAX_BYTES = 1_048_588  # Apache Kafka's default message.max.bytes
BIG = 500_000  # the big hostile parts: even a record with a big key and a big value fits the broker's limit, as it must to reach a worker


def dead_letter_bound(limit: int) -> int:
    """Largest dead letter (key + value bytes) an event can cause: its key, and key and raw in base64."""
    return limit + 2 * (4 * limit // 3 + 4) + 1024


# ---------------------------------------------------------------- the batch processor, any input


SESSION_IDS = ["s1", "s2", "sé", ""]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(SESSION_IDS + ["1", "214", "-5", "x" * 600]),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
click_docs = st.fixed_dictionaries(
    {},
    optional={
        "session_id": st.sampled_from(SESSION_IDS) | json_values,
        "item_id": st.sampled_from(["1", "2", "nope"]) | st.integers(-(2**70), 2**70) | json_values,
        "timestamp": st.floats(allow_nan=True, allow_infinity=True) | json_values,
        "extra": json_values,
    },
)
values = st.one_of(
    st.none(),
    st.binary(max_size=64),
    click_docs.map(lambda d: json.dumps(d).encode()),  # stdlib: NaN/Infinity tokens, big ints, \ud800 escapes
    click_docs.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(900, 3000).map(lambda n: json.dumps({"session_id": "s1", "item_id": "x" * n, "timestamp": 1.0}).encode()),
)
keys = st.one_of(st.none(), st.sampled_from([s.encode() for s in SESSION_IDS]), st.binary(max_size=12), st.integers(1000, 2000).map(lambda n: b"k" * n))


@pytest.fixture(scope="module")
def small_limit_processor(markov_bundle):
    from export.scorer import load_scorer

    return BatchProcessor(load_scorer(markov_bundle[1]), k=10, max_event_bytes=1024)


@given(batch=st.lists(st.tuples(keys, values), min_size=1, max_size=40))
@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_any_batch_is_answered_or_dead_lettered_and_a_redelivered_batch_changes_nothing(small_limit_processor, batch):
    processor = small_limit_processor
    records = [Record(k, v, "clicks", 0, offset, time.time()) for offset, (k, v) in enumerate(batch)]
    stored = {}
    first = processor.process(records, stored.get)
    assert len(first.recommendations) + len(first.dead_letters) == len(records) and first.redelivered == 0
    for key, value, reason in first.dead_letters:
        assert reason in REASONS
        assert len(key or b"") + len(value) <= dead_letter_bound(1024)
        doc = orjson.loads(value)
        record = records[doc["offset"]]
        kept = 1024 if reason == "too_large" else None
        assert base64.b64decode(doc["raw"]) == (record.value or b"")[:kept]
        assert doc["reason"] == reason and doc["detail"]
    positions = Counter()
    for key, value in first.recommendations:
        doc = orjson.loads(value)
        positions[key] += 1
        assert doc["session_id"].encode() == key and doc["position"] == positions[key] and len(doc["items"]) == 10
    stored.update(first.states)
    again = processor.process(records, stored.get)  # the whole batch again, its states stored: at-least-once
    assert again.redelivered == len(first.recommendations) and not again.recommendations
    assert len(again.dead_letters) == len(first.dead_letters)  # dead letters hold no state: sent again


# ---------------------------------------------------------------- 10,000+ events through a worker


def hostile_corpus(item_ids: list[str], n: int, seed: int) -> list[tuple[bytes | None, bytes | None, str]]:
    """``n`` small hostile events plus a few of about 0.5 MB: (key, value, expected), expected = "answer" or a reason."""
    rng = random.Random(seed)

    def doc(sid, **fields) -> bytes:
        return orjson.dumps({"session_id": sid, **fields})

    def case(sid: str, item: str, ts: float) -> tuple[bytes | None, bytes | None, str]:
        k = sid.encode()
        good = click_value(sid, item, ts)
        cases = [
            (k, good, "answer"),
            (k, good, "answer"),
            (k, click_value(sid, f"never-seen-{rng.random()}", ts), "answer"),  # unknown item: popularity
            (k, doc(sid, item_id=item, timestamp=ts, extra={"nested": [1, None]}, user=None), "answer"),
            (k, doc(sid, item_id=rng.choice([2**64 - 1, -7, 0]), timestamp=ts), "answer"),  # huge, negative ids
            (k, click_value(sid, item, rng.choice([-1e9, 0.0, -0.0, 1e300, ts - 1e6])), "answer"),  # negative, out of order
            (k, b'{"session_id": "%s", "item_id": 100000000000000000000000000000, "timestamp": 1}' % k, "bad_item_id"),
            (k, doc(sid, item_id=rng.choice([True, 1.5, [1], {}, ""]), timestamp=ts), "bad_item_id"),
            (k, doc(sid, item_id=None, timestamp=ts), "missing_item_id"),
            (k, b'{"session_id": "%s", "item_id": "1", "timestamp": %s}' % (k, rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"])), "invalid_json"),
            (k, doc(sid, item_id=item, timestamp=rng.choice(["yesterday", True, [1]])), "bad_timestamp"),
            (k, doc(sid, item_id=item), "missing_timestamp"),
            (b"", doc("", item_id=item, timestamp=ts), "bad_session_id"),
            (b"s" * 513, doc("s" * 513, item_id=item, timestamp=ts), "bad_session_id"),
            (b"7", orjson.dumps({"session_id": 7, "item_id": item, "timestamp": ts}), "bad_session_id"),
            (k, orjson.dumps({"item_id": item, "timestamp": ts}), "missing_session_id"),
            (None, good, "key_mismatch"),
            (b"", good, "key_mismatch"),
            (k + b" ", good, "key_mismatch"),
            (b"\xff" + k, good, "key_mismatch"),
            (b"other-" + k, good, "key_mismatch"),
            (k, None, "invalid_json"),
            (k, b"", "invalid_json"),
            (k, rng.choice([b"\xff\xfe" + good, b'{"session_id": "\xc0\xaf"}', good[:5] + b"\xe2\x82"]), "invalid_utf8"),
            (k, rng.choice([good[:-3], b"\xef\xbb\xbf" + good, good + b"x", good.replace(b'"', b"'"), b'{"session_id": "\\ud800"}', b'{"session_id": "a\x01"}']), "invalid_json"),
            (k, rng.choice([b"[1, 2]", b'"str"', b"42", b"null", b"true"]), "not_an_object"),
            (k, b"[" * 3000 + b"]" * 3000, "invalid_json"),  # nesting beyond the parser's limit
        ]
        return rng.choice(cases)

    out, previous_good = [], None
    for i in range(n):
        sid = f"h{rng.randrange(600)}"
        if previous_good is not None and rng.random() < 0.03:
            out.append(previous_good)  # an exact duplicate: a second click as far as anyone can tell
            continue
        event = case(sid, rng.choice(item_ids), 1.7e9 + i)
        out.append(event)
        if event[2] == "answer":
            previous_good = event
    big = [
        (b"b1", click_value("b1", "x" * BIG, 1.0), "too_large"),
        (b"s" * BIG, click_value("s" * BIG, "1", 1.0), "too_large"),
        (b"k" * BIG, click_value("b2", "1", 1.0), "too_large"),
        (b"b3", rng.randbytes(BIG), "too_large"),
        (b"b4", click_value("b4", "y" * (LIMIT - 100), 1.0), "answer"),  # just under the limit: unknown item
        (b"b5", click_value("b5", "y" * LIMIT, 1.0), "too_large"),
        (b"z" * (LIMIT // 2 - 100), click_value("z" * (LIMIT // 2 - 100), "1", 1.0), "bad_session_id"),  # a big dead letter
    ]
    for event in big:
        out.insert(rng.randrange(len(out)), event)
    return out


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_ten_thousand_hostile_events_all_answered_or_dead_lettered(broker, stream_data, markov_bundle, tmp_path, guarantee):
    _, bundle = markov_bundle
    settings = worker_settings(broker, processing_guarantee=guarantee)
    corpus = hostile_corpus(stream_data.vocab.item_ids, 10_000, seed=11)
    expected = Counter(e for _, _, e in corpus)
    assert len(expected) == len(REASONS) + 1  # every reason and answers
    n_answers = expected.pop("answer")
    with running_worker(settings, bundle, tmp_path / "worker.log") as process:
        started = time.monotonic()
        where = send_all(settings, [(k, v) for k, v, _ in corpus], max_request_size=4 * MB)

        def handled() -> float:
            try:
                text = metrics_text(settings)
            except OSError:  # not serving yet
                return 0
            return metric(text, 'streamrec_events_total{outcome="answered"}') + metric(text, 'streamrec_events_total{outcome="dead_lettered"}')

        assert wait_for(lambda: handled() >= len(corpus), timeout=90), f"only {handled()} of {len(corpus)} events handled"
        seconds = time.monotonic() - started
        topics = _read_everything(settings)
        # still alive and responsive after all that: a fresh click is answered, /healthz says ok
        send_all(settings, [(b"after", click_value("after", stream_data.vocab.item_ids[0], 1.0))])
        assert wait_for(lambda: metric(metrics_text(settings), 'streamrec_events_total{outcome="answered"}') == n_answers + 1, timeout=10)
        with urllib.request.urlopen(f"http://{settings.metrics_host}:{settings.metrics_port}/healthz", timeout=5) as r:
            assert r.status == 200
        text = metrics_text(settings)
        assert process.poll() is None

    answers, letters = topics[settings.recommendations_topic], topics[settings.dlq_topic]
    assert len(answers) == n_answers and len(letters) == sum(expected.values())  # in == answered + dead-lettered, exactly
    by_offset = {pw: (k, v, e) for pw, (k, v, e) in zip(where, corpus)}
    for record in letters:
        doc = orjson.loads(record.value)
        key, value, reason = by_offset[(doc["partition"], doc["offset"])]
        assert doc["reason"] == reason, (key[:40] if key else key, (value or b"")[:80], doc["reason"], doc["detail"])
        kept = LIMIT if reason == "too_large" else None
        assert base64.b64decode(doc["raw"]) == (value or b"")[:kept]
        assert (base64.b64decode(doc["key"]) if doc["key"] is not None else None) == (key[:kept] if key is not None else None)
        assert len(record.key or b"") + len(record.value) <= min(dead_letter_bound(LIMIT), KAFKA_MESSAGE_MAX_BYTES)
    assert Counter(orjson.loads(r.value)["reason"] for r in letters) == expected
    for reason, count in expected.items():
        assert metric(text, f'streamrec_dead_letters_total{{reason="{reason}"}}') == count
    # answers: every session's clicks numbered 1..n in order, duplicates and odd timestamps included
    per_session = Counter(k for k, _, e in corpus if e == "answer")
    positions: dict[bytes, list[int]] = {}
    for record in answers:
        positions.setdefault(record.key, []).append(orjson.loads(record.value)["position"])
    assert {k: len(p) for k, p in positions.items()} == dict(per_session)
    assert all(p == list(range(1, len(p) + 1)) for p in positions.values())
    print(f"{len(corpus):,} hostile events handled in {seconds:.1f}s: {n_answers:,} answered, {sum(expected.values()):,} dead-lettered")


def _read_everything(settings: Settings) -> dict[str, list]:
    """Every record of the answer and dead-letter topics, read until nothing new comes for 2 s."""
    import asyncio

    return asyncio.run(consume_all(settings, [settings.recommendations_topic, settings.dlq_topic], idle=2.0, timeout=60))
