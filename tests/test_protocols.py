"""Protocols on small hand-made logs (expected output checked by hand) and on the real YooChoose files."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from streamrec.errors import UserError
from training import protocols
from training.data import PreparedData

DAY = 86400.0


def log(rows) -> pd.DataFrame:
    """rows: (session, item, time in days, *features)."""
    df = pd.DataFrame([r[:3] for r in rows], columns=["session_id", "item_id", "time"])
    df["time"] = df["time"].astype(float) * DAY
    return df.astype({"session_id": str, "item_id": str})


def items_of(data: PreparedData, split: str) -> dict[str, list[str]]:
    """{session id: [original item ids]} ("" = unknown item)."""
    s = data.split(split)
    return {sid: data.vocab.decode(s.session(i)) for i, sid in enumerate(s.session_ids)}


# ------------------------------------------------------------------ given


def test_given_keeps_everything_and_maps_unseen_test_items_to_zero():
    train = log([("A", "1", 0.0), ("A", "2", 0.1), ("A", "3", 0.2), ("B", "2", 1.0), ("B", "3", 1.1)])
    test = log([("C", "3", 3.0), ("C", "9", 3.1), ("D", "9", 3.2)])
    data = protocols.given(train, test, valid_days=0)
    # popularity order, ties by first appearance: 2 (x2), 3 (x2), 1
    assert data.vocab.item_ids == ["2", "3", "1"]
    assert items_of(data, "train") == {"A": ["1", "2", "3"], "B": ["2", "3"]}
    assert data.test.items.tolist() == [2, 0, 0]  # 9 is unknown; D (length 1) is kept: nothing filtered
    assert list(data.test.session_ids) == ["C", "D"]
    assert data.valid is None and data.stats["eval_mode"] == "next" and data.stats["protocol"] == "given"


def test_given_valid_is_last_days_of_train_filtered_like_session_rec():
    train = log(
        [
            ("A", "1", 0.0), ("A", "2", 0.1),
            ("B", "2", 1.0), ("B", "3", 1.1),
            ("C", "1", 2.5), ("C", "2", 2.6), ("C", "7", 2.7),  # ends in the last day: valid; 7 unseen before -> dropped
            ("D", "7", 2.8), ("D", "3", 2.9),  # valid, but only 3 is known -> too short -> dropped
            ("E", "3", 1.95), ("E", "1", 2.1),  # starts before the cut, ends after it: valid (rule is on the last event)
        ]
    )
    test = log([("T", "1", 4.0), ("T", "2", 4.1)])
    data = protocols.given(train, test, valid_days=1)
    assert items_of(data, "valid") == {"E": ["3", "1"], "C": ["1", "2"]}
    assert set(data.train.session_ids) == set("ABCDE")  # train stays complete
    fit, valid = protocols.early_stopping_split(data)
    assert sorted(fit.session_ids) == ["A", "B"]  # D was held out too (then dropped as too short)
    with pytest.raises(UserError, match="holds out all of train"):
        protocols.given(train, test, valid_days=10)


# ------------------------------------------------------------------ session-time


def session_time_log() -> pd.DataFrame:
    return log(
        [
            # a chain that only a repeat-until-stable filter removes (min support 2):
            # x has support 1 -> S1 becomes [y] -> dropped -> y support 1 -> S2 becomes [z] -> ...
            ("S1", "x", 0.0), ("S1", "y", 0.01),
            ("S2", "y", 0.1), ("S2", "z", 0.11),
            ("S3", "z", 0.2), ("S3", "u", 0.21),
            ("S4", "u", 0.3), ("S4", "v", 0.31), ("S4", "v", 0.32),
            ("L", "a", 0.4),  # length 1
            ("A", "a", 0.5), ("A", "b", 0.51), ("A", "c", 0.52),
            ("B", "a", 1.0), ("B", "b", 1.01),
            ("C", "b", 1.5), ("C", "c", 1.51), ("C", "a", 1.52),
            # last day (last event at day 3.2, cut at 2.2)
            ("T1", "a", 3.0), ("T1", "t", 3.01), ("T1", "b", 3.02), ("T1", "t", 3.03),  # t: not in train
            ("T2", "c", 3.1), ("T2", "t", 3.2),  # only c known -> length 1 -> dropped
            ("T3", "b", 2.1), ("T3", "c", 2.3),  # last event after the cut -> test
        ]
    )


def test_session_time_filter_repeats_until_stable():
    df, rounds = protocols.filter_sessions(session_time_log(), min_item_support=2)
    kept = df.groupby("session_id", sort=False)["item_id"].apply(list).to_dict()
    assert kept == {
        "S4": ["v", "v"],
        "A": ["a", "b", "c"],
        "B": ["a", "b"],
        "C": ["b", "c", "a"],
        "T1": ["a", "t", "b", "t"],
        "T2": ["c", "t"],
        "T3": ["b", "c"],
    }
    assert rounds == 5  # four rounds remove x, y, z, u one after another; the fifth changes nothing


def test_session_time_split_and_test_filter():
    data = protocols.session_time(session_time_log(), test_days=1, valid_days=0, min_item_support=2)
    assert items_of(data, "train") == {"S4": ["v", "v"], "A": ["a", "b", "c"], "B": ["a", "b"], "C": ["b", "c", "a"]}
    assert data.vocab.item_ids == ["a", "b", "v", "c"]  # a, b: 3 each; v, c: 2 each; ties by first appearance (S4 before A)
    assert items_of(data, "test") == {"T3": ["b", "c"], "T1": ["a", "b"]}
    assert (data.test.items > 0).all()
    assert data.stats["filter"]["test_events_dropped_unknown_or_short"] == 4
    assert data.stats["eval_mode"] == "next"


def test_session_time_one_pass_would_differ():
    """Guard that the hand log really needs repetition: one pass keeps S1 = [y]."""
    df = session_time_log()
    lengths = df.groupby("session_id")["item_id"].transform("size")
    df = df[lengths > 1]
    support = df.groupby("item_id")["session_id"].transform("size")
    assert "S1" in set(df[support >= 2]["session_id"])


def test_session_time_valid_and_errors():
    df = session_time_log()
    data = protocols.session_time(df, test_days=1, valid_days=0.5, min_item_support=2)
    # train (S4, A, B, C) ends at day 1.52; valid = sessions ending at or after 1.02: C
    assert items_of(data, "valid") == {"C": ["b", "c", "a"]}
    fit, _ = protocols.early_stopping_split(data)
    assert list(fit.session_ids) == ["S4", "A", "B"]
    # with 1 day, A, B and C are held out, the rest (S4 = [v, v]) knows none of their items
    data = protocols.session_time(df, test_days=1, valid_days=1, min_item_support=2)
    assert data.valid is None and "empty" in data.stats["valid_note"]
    with pytest.raises(UserError, match="holds out every session"):
        protocols.session_time(df, test_days=30, valid_days=0, min_item_support=2)
    with pytest.raises(UserError, match="no events left"):
        protocols.session_time(df, test_days=1, valid_days=0, min_item_support=100)


# ------------------------------------------------------------------ leave-one-out


def loo_log() -> pd.DataFrame:
    # file order differs from time order for U1: the reader's time decides
    return log(
        [
            ("U1", "4", 9.0), ("U1", "1", 1.0), ("U1", "2", 2.0), ("U1", "3", 3.0),
            ("U2", "2", 1.0), ("U2", "3", 2.0),  # 2 events: train only
            ("U3", "3", 1.0), ("U3", "1", 1.0), ("U3", "5", 2.0),  # tie at 1.0 keeps file order; 5 only as a test target
        ]
    )


def test_leave_one_out_splits():
    data = protocols.leave_one_out(loo_log(), min_core=0)
    assert items_of(data, "train") == {"U1": ["1", "2", "3"], "U2": ["2", "3"], "U3": ["3", "1"]}
    assert items_of(data, "valid") == {"U1": ["1", "2", "3"], "U3": ["3", "1"]}
    assert items_of(data, "test") == {"U1": ["1", "2", "3", "4"], "U3": ["3", "1", "5"]}
    # train items by popularity (3: x3, 1: x2, 2: x2), then test-only targets in order
    assert data.vocab.item_ids == ["3", "1", "2", "4", "5"]
    assert data.stats["eval_mode"] == "last"
    assert data.stats["filter"]["users_train_only"] == 1 and data.stats["filter"]["items_only_in_test"] == 2
    fit, valid = protocols.early_stopping_split(data)
    assert {sid: data.vocab.decode(fit.session(i)) for i, sid in enumerate(fit.session_ids)} == {
        "U1": ["1", "2"],
        "U2": ["2", "3"],
        "U3": ["3"],
    }


def test_k_core_repeats_until_stable():
    df = log([("a", "1", 0), ("a", "2", 1), ("b", "1", 0), ("b", "2", 1), ("c", "1", 0), ("c", "3", 1)])
    # k=2: item 3 has 1 event -> c becomes [1] -> c dropped -> items 1, 2 have 2 each: stable
    kept, rounds = protocols.k_core(df, 2)
    assert sorted(kept["session_id"].unique()) == ["a", "b"] and rounds == 3
    assert protocols.k_core(df, 0)[0].equals(df)
    with pytest.raises(UserError, match="3 or more events"):
        protocols.leave_one_out(log([("a", "1", 0), ("a", "2", 1)]), min_core=0)


# ------------------------------------------------------------------ side features


def test_event_and_item_features():
    train = log([("A", "1", 0.0), ("A", "2", 0.1), ("B", "1", 1.0), ("B", "3", 1.1)])
    train["city"] = ["Rome", "Rome", "Oslo", None]
    train["price"] = [10.0, 50.0, 30.0, np.nan]
    train["genre"] = ["drama", "comedy", "drama", None]
    test = log([("C", "1", 3.0), ("C", "2", 3.1)])
    test["city"] = ["Lima", "Oslo"]
    test["price"] = [20.0, np.nan]
    test["genre"] = ["comedy", "comedy"]
    data = protocols.given(train, test, valid_days=0, event_features=("city", "missing"), item_features=("price", "genre"))
    assert data.stats["feature_vocab"]["city"] == ["Rome", "Oslo"]
    assert data.train.features["city"].tolist() == [1, 1, 2, 0]
    assert data.test.features["city"].tolist() == [0, 2]  # Lima is not in train
    assert data.stats["event_features"] == ["city"] and "missing" not in data.train.features
    # item 1: prices 10, 30, 20 -> median 20; item 2: 50; item 3: unknown
    assert data.vocab.item_ids == ["1", "2", "3"]
    price = data.item_features["price"]
    assert price[0] == 0 and price[3] == 0 and 0 < price[1] < price[2]
    # genre: item 1 is drama (2 of 3), item 2 comedy; ids ordered by how many items have the value
    genre_vocab = data.stats["feature_vocab"]["genre"]
    genre = data.item_features["genre"]
    assert [genre_vocab[g - 1] for g in genre[1:3]] == ["drama", "comedy"] and genre[3] == 0


def test_saved_dataset_round_trip(tmp_path):
    data = protocols.leave_one_out(loo_log(), min_core=0)
    data.save(tmp_path)
    back = PreparedData.load(tmp_path)
    assert back.stats["eval_mode"] == "last" and back.vocab.item_ids == data.vocab.item_ids
    np.testing.assert_array_equal(back.test.items, data.test.items)


# ------------------------------------------------------------------ real data through the CLI


def run_main(monkeypatch, *args):
    from stream.cli import main

    monkeypatch.setattr(sys, "argv", ["streamrec", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.shared_data
def test_prepare_yoochoose_given_counts(shared_data, tmp_path, monkeypatch):
    folder = shared_data / "yoochoose-rsc15-100k"
    code = run_main(
        monkeypatch, "data", "prepare", "--format", "yoochoose",
        "--train", folder / "yoochoose-clicks-100k_train_full.txt",
        "--test", folder / "yoochoose-clicks-100k_test.txt", "--out", tmp_path,
    )
    assert code in (0, None)
    data = PreparedData.load(tmp_path)
    assert data.n_items == 2_933
    assert (len(data.train), data.train.n_events) == (17_794, 70_278)
    assert (len(data.test), data.test.n_events) == (3_416, 13_568)
    assert (data.test.items == 0).sum() == 0  # README: every test item occurs in train_full
    # valid.npz is exactly session-rec's train_valid file (4,084 sessions, 16,539 events)
    assert (len(data.valid), data.valid.n_events) == (4_084, 16_539)
    fit, _ = protocols.early_stopping_split(data)
    assert (len(fit), fit.n_events) == (13_629, 53_254)  # = train_tr
    assert data.stats["eval_mode"] == "next"


@pytest.mark.shared_data
def test_leave_one_out_on_sasrec_video(shared_data):
    from training.readers import read_log

    data = protocols.leave_one_out(read_log("sasrec", shared_data / "amazon-video-games-sasrec/Video.txt"), min_core=0)
    assert data.n_items == 23_715
    assert len(data.train) == 31_013 and data.train.n_events + len(data.test) == 287_107
    # per evaluable user: valid = test without its last event, train = valid
    assert len(data.test) == len(data.valid) == 31_013 - data.stats["filter"]["users_train_only"]
    np.testing.assert_array_equal(data.valid.lengths, data.test.lengths - 1)
    np.testing.assert_array_equal(data.test.session_ids, data.valid.session_ids)
    keep = np.ones(data.test.n_events, dtype=bool)
    keep[data.test.offsets[1:] - 1] = False
    np.testing.assert_array_equal(data.test.items[keep], data.valid.items)


def test_early_stopping_split_without_valid_cut_leaves_valid_sessions_out():
    from training.data import Vocab
    from training.sessions import Sessions

    train = Sessions.from_lists([[1, 2], [2, 3], [3, 1]], session_ids=["a", "b", "c"])
    valid = Sessions.from_lists([[3, 1]], session_ids=["c"])
    data = PreparedData(Vocab(["x", "y", "z"]), train, train, valid)
    fit, _ = protocols.early_stopping_split(data)
    assert list(fit.session_ids) == ["a", "b"]
    with pytest.raises(UserError, match="no validation split"):
        protocols.early_stopping_split(PreparedData(Vocab(["x"]), train, train))
