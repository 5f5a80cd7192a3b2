"""Hot model swap (stream/swap.py): a new bundle takes over a running worker, sessions carry on.

The worker serves bundle A (markov, state = recent items) through a ``current`` symlink, as
deploy/build-bundle.sh lays bundles out. Mid-stream the symlink is switched first to a corrupted
bundle (refused, A keeps serving), then to bundle B (a tiny GRU4Rec, state = hidden vector):
every click is still answered, answers after the swap carry B's version and equal B's offline
answers for the sessions' whole prefixes (the sessions are shorter than the kept window).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import numpy as np
import pytest

from export.scorer import load_scorer
from stream.bundles import load_verified
from stream.migration import model_tag
from stream.processor import BatchProcessor, Record
from stream.state import SessionState
from stream.topics import consume_all
from streamrec.errors import UserError
from tests.streamkit import answers_by_key, assert_same_answer, click_stream, offline_answers
from tests.test_stream_support import gru_bundle, markov_bundle, metric, metrics_text, running_worker, send, stream_data, wait_for, worker_settings  # noqa: F401

K = 20


def switch(link, target) -> None:
    """Point ``link`` at ``target`` in one rename, as deploy/build-bundle.sh does."""
    tmp = link.parent / ".current.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def corrupted_copy(bundle, out):
    shutil.copytree(bundle, out)
    data = bytearray((out / "popularity.npy").read_bytes())
    data[-1] ^= 0xFF
    (out / "popularity.npy").write_bytes(bytes(data))
    return out


def version_of(bundle) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_version"]


def positions(messages) -> list[tuple[str, int]]:
    """(session id, position) of every message, in order."""
    seen: dict[str, int] = {}
    out = []
    for key, _ in messages:
        sid = key.decode()
        seen[sid] = seen.get(sid, 0) + 1
        out.append((sid, seen[sid]))
    return out


def test_a_swapped_processor_continues_sessions_exactly_as_the_new_model(stream_data, markov_bundle, gru_bundle):
    """No broker: markov answers the first clicks, then a GRU processor takes over the same states."""
    (_, bundle_a), (_, bundle_b) = markov_bundle, gru_bundle
    messages, sessions = click_stream(stream_data.vocab.item_ids, n_sessions=30, clicks=12, seed=11)
    half = len(messages) // 2
    store: dict[bytes, bytes] = {}
    docs = []

    def run(processor, chunk, start):
        records = [Record(k, v, "clicks", 0, start + i, 1.7e9) for i, (k, v) in enumerate(chunk)]
        result = processor.process(records, lambda key: SessionState.decode(store[key]) if key in store else None)
        store.update({key: state.encode() for key, state in result.states.items()})
        docs.extend(json.loads(v) for _, v in result.recommendations)

    a = BatchProcessor(load_scorer(bundle_a), K)
    run(a, messages[:half], 0)
    b = BatchProcessor(load_scorer(bundle_b), K)
    assert b.model_tag != a.model_tag
    run(b, messages[half:], half)

    expected_a, expected_b = offline_answers(bundle_a, sessions, K), offline_answers(bundle_b, sessions, K)
    assert len(docs) == len(messages)
    for doc, key in zip(docs, positions(messages)):
        assert (doc["session_id"], doc["position"]) == key
        assert_same_answer(doc, (expected_a if doc["model"] == "markov" else expected_b)[key])
    assert sum(d["model"] == "gru4rec" for d in docs) == len(messages) - half


def test_a_bundle_with_a_bad_checksum_is_refused(gru_bundle, tmp_path):
    _, bundle = gru_bundle
    with pytest.raises(UserError, match="popularity.npy"):
        load_verified(str(corrupted_copy(bundle, tmp_path / "bad")), threads=1, k=K)
    with pytest.raises(UserError, match="k"):
        load_verified(str(bundle), threads=1, k=10_000)


def test_the_probe_scores_a_full_micro_batch_of_new_sessions(gru_bundle, markov_bundle):
    """The probe before serving is as large as the largest micro-batch (the scorer's warm-up, stream.bundles.probe)."""
    from stream.bundles import probe

    for _, bundle in (gru_bundle, markov_bundle):
        scorer = load_verified(str(bundle), threads=1, k=K, rows=256)
        probe(scorer, bundle, 3)  # any size

    class FeatureHungry:
        """A window model that wants event features the stream does not carry: what the scorer raises."""

        def popular(self):
            return load_scorer(gru_bundle[1]).popular()

        def step(self, batch):
            raise ValueError("model 'bst' needs StepInput.features['category']: one array per row, aligned with history")

    with pytest.raises(UserError, match=r"bst-bundle: the model cannot score clicks: model 'bst' needs StepInput.features"):
        probe(FeatureHungry(), "bst-bundle", 256)


@pytest.mark.broker
def test_symlink_switch_swaps_the_model_while_serving(broker, stream_data, markov_bundle, gru_bundle, tmp_path):
    (_, bundle_a), (_, bundle_b) = markov_bundle, gru_bundle
    bad = corrupted_copy(bundle_b, tmp_path / "bad")
    current = tmp_path / "current"
    switch(current, bundle_a)
    settings = worker_settings(broker, bundle_poll_seconds=0.3)
    messages, sessions = click_stream(stream_data.vocab.item_ids, n_sessions=40, clicks=12, seed=12)
    half = len(messages) // 2
    version_a, version_b = version_of(bundle_a), version_of(bundle_b)

    def metric_now(name):
        return metric(metrics_text(settings), name)

    with running_worker(settings, current, tmp_path / "worker.log"):
        send(settings, messages[:half])
        asyncio.run(consume_all(settings, [settings.recommendations_topic], expect={settings.recommendations_topic: half}, timeout=60))
        switch(current, bad)
        assert wait_for(lambda: metric_now("streamrec_model_swap_failures_total") == 1), "the bad bundle was not noticed"
        text = metrics_text(settings)
        assert f'version="{version_a}"' in text and metric(text, "streamrec_model_swaps_total") == 0
        switch(current, bundle_b)
        assert wait_for(lambda: metric_now("streamrec_model_swaps_total") == 1), "the new bundle was not swapped in"
        send(settings, messages[half:])
        records = asyncio.run(consume_all(settings, [settings.recommendations_topic, settings.dlq_topic], expect={settings.recommendations_topic: len(messages)}, timeout=60))
        text = wait_for(lambda: (t := metrics_text(settings)) and metric(t, 'streamrec_events_total{outcome="answered"}') == len(messages) and t)
        assert text, "the answered counter never reached the number of clicks"

    assert_swapped_mid_stream(records, settings, messages, sessions, half, bundle_a, bundle_b)
    assert f'version="{version_b}"' in text and f'version="{version_a}"' not in text
    assert 'state_kind="hidden"' in text
    assert "model swap refused" in (tmp_path / "worker.log").read_text()
    assert model_tag(load_scorer(bundle_a)) != model_tag(load_scorer(bundle_b))


def assert_swapped_mid_stream(records: dict, settings, messages, sessions, half: int, bundle_a, bundle_b) -> None:
    """Every click answered once, none dead-lettered; the first ``half`` by bundle A, the rest by bundle B (GRU4Rec),
    each answer equal to that bundle's own scorer over the session's whole prefix (B's state rebuilt from the kept
    items: as if B had served from the start), and most answers after the swap continue sessions begun before it."""
    assert not records[settings.dlq_topic]
    by_key, total = answers_by_key(records[settings.recommendations_topic])
    keys = positions(messages)
    assert total == len(messages) and set(by_key) == set(keys)  # nothing lost, nothing twice
    continued = 0
    for bundle, part in ((bundle_a, keys[:half]), (bundle_b, keys[half:])):
        expected, version = offline_answers(bundle, sessions, K), version_of(bundle)
        for key in part:
            (doc,) = by_key[key]
            assert doc["model_version"] == version and (bundle == bundle_a or doc["model"] == "gru4rec")
            assert_same_answer(doc, expected[key])
            continued += bundle == bundle_b and key[1] > 1
    assert continued > len(messages) // 3
