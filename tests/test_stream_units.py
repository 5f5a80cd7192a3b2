"""Stream logic without a broker: state bytes, event parsing, online ranks, settings, micro-batches."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given, settings as hsettings, strategies as st

from stream.events import REASONS, BadEvent, Click, click_value, online_rank, parse_click
from stream.processor import BatchProcessor, Record
from stream.settings import Settings, env_name, flag_name, markdown_table
from stream.state import HEADER, VERSION, SessionState, StateError, last_seen_of
from streamrec.errors import UserError
from tests.test_stream_support import assert_answer_matches, markov_bundle, offline_rows, stream_data  # noqa: F401

DOCS = Path(__file__).resolve().parents[1] / "docs" / "stream.md"

floats = st.floats(width=32, allow_nan=False)


@given(
    last_seen=st.floats(0, 2e9),
    position=st.integers(0, 2**32 - 1),
    partition=st.integers(0, 2**16 - 1),
    hidden=st.lists(floats, max_size=64),
    history=st.lists(st.integers(1, 2**31 - 1), max_size=50),
    top=st.lists(st.tuples(st.integers(1, 2**31 - 1), floats), max_size=30),
)
@hsettings(max_examples=60, deadline=None)
def test_state_round_trips_through_bytes(last_seen, position, partition, hidden, history, top):
    state = SessionState(last_seen, position, partition, np.array(hidden, np.float32), np.array(history, np.int32), np.array([t[0] for t in top], np.int32), np.array([t[1] for t in top], np.float32))
    raw = state.encode()
    assert len(raw) == HEADER.size + 4 * (len(hidden) + len(history) + 2 * len(top))
    back = SessionState.decode(raw)
    assert (back.last_seen, back.position, back.partition) == (last_seen, position, partition)
    for name in ("hidden", "history", "top_items", "top_scores"):
        np.testing.assert_array_equal(getattr(back, name), getattr(state, name))
    assert last_seen_of(raw) == (last_seen, partition)


def test_state_is_compact_and_rejects_foreign_bytes():
    state = SessionState(1.0, 3, 0, np.zeros(100, np.float32), np.arange(1, 51, dtype=np.int32), np.arange(1, 21, dtype=np.int32), np.ones(20, np.float32))
    raw = state.encode()
    assert len(raw) == HEADER.size + 4 * 190  # 100 floats + 50 items + 20 items + 20 scores, no JSON
    for bad in (b"", raw[:-1], raw + b"\0", bytes([VERSION + 1]) + raw[1:], orjson.dumps({"hidden": [0.0] * 100})):
        with pytest.raises(StateError):
            SessionState.decode(bad)


def test_parse_click_accepts_string_and_integer_items():
    assert parse_click(b"s1", b'{"session_id": "s1", "item_id": "214", "timestamp": 1.5}') == Click("s1", "214", 1.5)
    assert parse_click(b"s1", b'{"session_id": "s1", "item_id": 214, "timestamp": 2, "extra": null}') == Click("s1", "214", 2.0)
    assert parse_click("sé".encode(), click_value("sé", "x", 0.0)) == Click("sé", "x", 0.0)


@pytest.mark.parametrize(
    "key,value,reason",
    [
        (b"s", None, "invalid_json"),
        (b"s", b"\xc3\x28", "invalid_utf8"),
        (b"s", b"", "invalid_json"),
        (b"s", b'{"session_id": "s", "item_id": 1, "timestamp": Infinity}', "invalid_json"),
        (b"s", b'"just a string"', "not_an_object"),
        (b"s", b'{"session": "s", "item_id": 1, "timestamp": 1}', "missing_session_id"),
        (b"s", b'{"session_id": ["s"], "item_id": 1, "timestamp": 1}', "bad_session_id"),
        (b"s" * 600, orjson.dumps({"session_id": "s" * 600, "item_id": 1, "timestamp": 1}), "bad_session_id"),
        (b"s", b'{"session_id": "s", "timestamp": 1}', "missing_item_id"),
        (b"s", b'{"session_id": "s", "item_id": 1.5, "timestamp": 1}', "bad_item_id"),
        (b"s", b'{"session_id": "s", "item_id": "", "timestamp": 1}', "bad_item_id"),
        (b"s", b'{"session_id": "s", "item_id": false, "timestamp": 1}', "bad_item_id"),
        (b"s", b'{"session_id": "s", "item_id": 1, "timestamp": null}', "missing_timestamp"),
        (b"s", b'{"session_id": "s", "item_id": 1, "timestamp": true}', "bad_timestamp"),
        (b"s", b'{"session_id": "s", "item_id": 1, "timestamp": "1"}', "bad_timestamp"),
        (b"t", b'{"session_id": "s", "item_id": 1, "timestamp": 1}', "key_mismatch"),
        (None, b'{"session_id": "s", "item_id": 1, "timestamp": 1}', "key_mismatch"),
    ],
)
def test_parse_click_names_what_is_wrong(key, value, reason):
    bad = parse_click(key, value)
    assert isinstance(bad, BadEvent) and bad.reason == reason and bad.reason in REASONS and bad.detail


def test_online_rank_ranks_ties_like_the_offline_evaluation():
    items = np.array([5, 6, 7, 8])
    assert online_rank(items, np.array([4.0, 3.0, 2.0, 1.0]), 7) == 3
    assert online_rank(items, np.array([4.0, 3.0, 2.0, 1.0]), 9) == 0
    assert online_rank(items, np.array([4.0, 3.0, 3.0, 1.0]), 6) == 3  # after its tie
    assert online_rank(items, np.array([4.0, 3.0, 1.0, 1.0]), 7) == 0  # tie reaching the end: more may tie beyond the list
    assert online_rank(items, np.array([4.0, 3.0, 2.0, 1.0]), 8) == 4
    assert online_rank(np.array(["a", "b"], dtype=object), np.array([2.0, 1.0], np.float32), "b") == 2


def test_every_setting_has_a_flag_an_env_var_and_a_row_in_the_docs():
    table = markdown_table()
    doc = DOCS.read_text()
    for f in dataclasses.fields(Settings):
        row = f"| `--{flag_name(f.name)}` | `{env_name(f.name)}` |"
        assert row in table and row in doc, f"{f.name} missing from docs/stream.md's settings table"
    assert table in doc, "docs/stream.md's settings table is stale: paste stream.settings.markdown_table()"


def test_settings_come_from_flags_and_environment():
    from stream.commands import score_online

    with pytest.raises(UserError, match="--broker"):
        Settings(broker="localhost")
    with pytest.raises(UserError, match="--batch-size"):
        Settings(batch_size=0)
    with pytest.raises(UserError, match="--sasl-username"):
        Settings(security_protocol="SASL_SSL")
    assert Settings(broker="kafka://a:1,b:2").bootstrap_servers() == ["a:1", "b:2"]
    sasl = Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username="u", sasl_password="p").kafka_kwargs()
    assert sasl["sasl_mechanism"] == "SCRAM-SHA-256" and sasl["sasl_plain_username"] == "u" and sasl["security_protocol"] == "SASL_PLAINTEXT"
    assert Settings(security_protocol="SASL_PLAINTEXT", sasl_username="u").faust_credentials()["broker_credentials"].username == "u"
    assert Settings(**{"exclude_seen": True}).to_env()["STREAMREC_EXCLUDE_SEEN"] == "1"
    result = CliRunner().invoke(score_online, ["--help"], env={"STREAMREC_CLICKS_TOPIC": "from-env"})
    assert "--clicks-topic" in result.output and "--broker-quirks" in result.output


def test_exactly_once_is_refused_on_the_embedded_broker_in_one_line():
    from tests.streamkit import streamrec

    with pytest.raises(UserError, match="exactly_once needs Kafka transactions"):
        Settings(processing_guarantee="exactly_once", broker_quirks="tansu")
    with pytest.raises(UserError, match="--processing-guarantee must be one of at_least_once, exactly_once"):
        Settings(processing_guarantee="exactly-twice")
    r = streamrec("serve", "--processing-guarantee", "exactly_once", "--broker-quirks", "tansu", "--bundle", "/nowhere")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --processing-guarantee exactly_once needs Kafka transactions, which the embedded broker (--broker-quirks tansu) does not have; use Apache Kafka"
    )
    # the project's readers read committed transactions only, except on the embedded broker
    assert (Settings().isolation_level, Settings(broker_quirks="tansu").isolation_level) == ("read_committed", "read_uncommitted")


def _records(sessions, vocab, order, unknown="nope") -> list[Record]:
    ids = np.array([unknown] + vocab.item_ids, dtype=object)
    out = []
    for p in order:
        s = int(np.searchsorted(sessions.offsets, p, side="right") - 1)
        sid = str(sessions.session_ids[s])
        out.append(Record(sid.encode(), click_value(sid, ids[sessions.items[p]], float(p)), "clicks", 0, int(p), time.time()))
    return out


def test_a_micro_batch_keeps_each_sessions_order_and_matches_offline(stream_data, markov_bundle):
    """All clicks of 30 sessions in ONE batch: rounds apply each session's clicks in order."""
    from export.scorer import load_scorer
    from training.models import load_run

    run_dir, bundle = markov_bundle
    sessions = stream_data.test.select(np.arange(len(stream_data.test)) < 30)
    processor = BatchProcessor(load_scorer(bundle), k=20)
    records = _records(sessions, stream_data.vocab, np.arange(sessions.n_events))  # session by session
    bad = Record(b"x", b"{", "clicks", 0, 999, time.time())
    result = processor.process(records[:10] + [bad] + records[10:], lambda key: None)
    assert len(result.recommendations) == sessions.n_events and len(result.dead_letters) == 1  # in == answered + dead-lettered
    assert len(result.states) == len(sessions)
    popularity = np.bincount(stream_data.train.items, minlength=stream_data.n_items + 1)
    rows = offline_rows(load_run(run_dir), sessions, popularity)
    docs = [orjson.loads(v) for _, v in result.recommendations]
    for p, doc in enumerate(docs):
        s = int(np.searchsorted(sessions.offsets, p, side="right") - 1)
        assert doc["position"] == p - sessions.offsets[s] + 1
        if p in rows:
            assert_answer_matches(doc, rows[p], stream_data.vocab, k=20)
    evaluated = sessions.n_events - len(sessions) - int((sessions.items[np.setdiff1d(np.arange(sessions.n_events), sessions.offsets[:-1])] == 0).sum())
    assert result.online_evaluated == evaluated


def test_an_unknown_item_is_answered_by_popularity_and_leaves_the_state(stream_data, markov_bundle):
    from export.scorer import load_scorer

    _, bundle = markov_bundle
    scorer = load_scorer(bundle)
    processor = BatchProcessor(scorer, k=10)
    first = processor.process([Record(b"s", click_value("s", stream_data.vocab.item_ids[3], 1.0), "clicks", 0, 0, time.time())], lambda key: None)
    state = first.states[b"s"]
    before = state.encode()
    second = processor.process([Record(b"s", click_value("s", "never-seen", 2.0), "clicks", 0, 1, time.time())], lambda key: SessionState.decode(before))
    after = second.states[b"s"]
    assert second.unknown_items == 1 and orjson.loads(second.recommendations[0][1])["items"] == stream_data.vocab.decode(scorer.popular()[0][:10])
    np.testing.assert_array_equal(after.history, SessionState.decode(before).history)  # the model state did not move
    assert after.position == 2


def test_one_k_check_with_one_message_for_the_processor_the_worker_and_a_swap(markov_bundle):
    """stream.bundles.check_k: a processor, the worker's start (per bundle) and a hot swap (load_verified) refuse a --k above the bundle's k alike."""
    from export.scorer import load_scorer
    from stream.bundles import check_k, load_verified

    _, bundle = markov_bundle
    scorer = load_scorer(bundle)
    too_many = scorer.k + 1
    message = f"--k {too_many} is more than the bundle's k ({scorer.k})"
    with pytest.raises(UserError, match=re.escape(message + "; export the bundle with a larger --k")):
        BatchProcessor(scorer, k=too_many)
    with pytest.raises(UserError, match=re.escape(f"{message} of {bundle}; export the bundle with a larger --k")):
        check_k(scorer, too_many, bundle)
    with pytest.raises(UserError, match=re.escape(f"{message} of {bundle}; export the bundle with a larger --k")):
        load_verified(str(bundle), 1, too_many)
    check_k(scorer, scorer.k)
