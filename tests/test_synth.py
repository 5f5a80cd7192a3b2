"""The synthetic generator: deterministic, time-ordered, and learnable by a first-order model."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from streamrec.errors import UserError
from training.data import PreparedData
from training.readers import read_log
from training.sessions import Sessions
from training.synth import generate_log, synthesize


def transitions(s: Sessions) -> tuple[np.ndarray, np.ndarray]:
    """(current item, next item) for every event that has a next one in its session."""
    has_next = np.ones(s.n_events, dtype=bool)
    has_next[s.offsets[1:][s.lengths > 0] - 1] = False
    at = np.flatnonzero(has_next)
    return s.items[at], s.items[at + 1]


def test_same_seed_same_log_other_seed_other_log():
    a, b, c = generate_log(300, 2000, seed=7), generate_log(300, 2000, seed=7), generate_log(300, 2000, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["item_id"].equals(c["item_id"])


def test_log_shape():
    df = generate_log(200, 3000, seed=1)
    lengths = df.groupby("session_id", sort=False).size()
    assert len(lengths) == 3000 and lengths.min() >= 2
    assert 4.0 < lengths.mean() < 8.0
    assert df["item_id"].nunique() <= 200
    assert (df.groupby("session_id", sort=False)["time"].diff().dropna() > 0).all()  # clicks seconds apart
    span_days = (df["time"].max() - df["time"].min()) / 86400
    assert 25 < span_days < 31
    counts = df["item_id"].value_counts().to_numpy()
    assert counts[:10].mean() > 5 * counts[-100:].mean()  # popularity skew (about 9x at these settings)


def test_first_order_successor_beats_popularity():
    data = synthesize(500, 8000, seed=3, test_fraction=0.2)
    n = data.n_items + 1
    current, nxt = transitions(data.train)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (current, nxt), 1)
    top20_after = np.argsort(-counts, axis=1, kind="stable")[:, :20]
    popular20 = np.argsort(-np.bincount(data.train.items, minlength=n)[1:], kind="stable")[:20] + 1
    current, nxt = transitions(data.test)
    markov_hr = (top20_after[current] == nxt[:, None]).any(axis=1).mean()
    pop_hr = np.isin(nxt, popular20).mean()
    most_frequent_successor_hit = (counts[current].argmax(axis=1) == nxt).mean()
    assert markov_hr > 0.8 and pop_hr < 0.3 and markov_hr > 3 * pop_hr
    assert most_frequent_successor_hit > 0.3


def test_synthesize_split_and_features():
    data = synthesize(400, 5000, seed=0, test_fraction=0.25)
    assert len(data.test) == 1250 and len(data.train) == 3750
    train_start = data.train.times[data.train.offsets[:-1]]
    test_start = data.test.times[data.test.offsets[:-1]]
    assert train_start.max() <= test_start.min()
    assert data.valid is not None and set(data.valid.session_ids) <= set(data.train.session_ids)
    assert data.stats["eval_mode"] == "next" and data.stats["protocol"] == "given"
    category = data.item_features["category"]
    assert category.shape == (data.n_items + 1,) and category[0] == 0 and (category[1:] > 0).all()
    with pytest.raises(UserError, match="test-fraction"):
        synthesize(400, 5000, seed=0, test_fraction=1.5)


def run_main(monkeypatch, *args):
    from stream.cli import main

    monkeypatch.setattr(sys, "argv", ["streamrec", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        return e.code or 0
    return 0


def test_cli_synth_raw_prepare_and_stats(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw.tsv"
    out = tmp_path / "synth"
    assert run_main(monkeypatch, "data", "synth", "--out", out, "--items", 300, "--sessions", 3000, "--seed", 5, "--raw", raw) == 0
    data = PreparedData.load(out)
    assert len(data.train) + len(data.test) == 3000
    # the raw TSV goes through the YooChoose reader and back to the same log
    df = read_log("yoochoose", raw)
    assert len(df) == data.train.n_events + data.test.n_events and df["session_id"].nunique() == 3000
    prepared = tmp_path / "from_raw"
    assert run_main(monkeypatch, "data", "prepare", "--format", "yoochoose", "--input", raw, "--protocol", "session-time", "--test-days", 3, "--out", prepared) == 0
    again = PreparedData.load(prepared)
    assert again.stats["protocol"] == "session-time" and len(again.test) > 0
    capsys.readouterr()
    plot = tmp_path / "stats.png"
    assert run_main(monkeypatch, "data", "stats", out, "--plot", plot) == 0
    report = capsys.readouterr().out
    assert "items: " in report and "train session lengths" in report and "most popular items" in report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_main(monkeypatch, "data", "stats", tmp_path / "nothing") == 2


def test_valid_days_zero_writes_no_validation_split_and_a_negative_one_is_refused():
    data = synthesize(300, 2000, seed=1, test_fraction=0.2, valid_days=0)
    assert data.valid is None or len(data.valid) == 0
    assert data.stats["source"]["synthetic"]["valid_days"] == 0
    assert len(synthesize(300, 2000, seed=1, test_fraction=0.2).valid) > 0
    with pytest.raises(UserError, match="valid-days"):
        synthesize(300, 2000, seed=1, test_fraction=0.2, valid_days=-1)
