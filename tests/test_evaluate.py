"""Full-ranking metrics on rankings computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamrec.errors import UserError
from training.data import PreparedData, Vocab
from training.evaluate import evaluate, evaluation_positions, format_table, rank_metrics, ranks, ranks_torch
from training.models.base import SessionModel, next_positions
from training.models.pop import MostPopular
from training.sessions import Sessions

# Score row by last input item (column 0 must be ignored by the evaluator).
TABLE = np.array(
    [
        [0, 0, 0, 0, 0],  # unknown input (used only without popularity)
        [9, 0, 5, 5, 1],  # after 1: items 2 and 3 tie at the top
        [0, 1, 2, 3, 4],
        [0, 4, 3, 2, 1],
        [0, 1, 1, 1, 1],
    ],
    dtype=np.float32,
)
POPULARITY = np.array([0, 10, 3, 2, 1], dtype=np.float64)


class TableModel(SessionModel):
    """Scores that depend only on the current input item, read from TABLE."""

    name = "table"
    state_kind = "items"
    n_items = 4

    def score_next(self, sessions, batch_size=512):
        positions = next_positions(sessions)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            yield chunk, TABLE[sessions.items[chunk]]


# A=[1,2,3]: (1->2) cons 2 / opt 1, (2->3) cons 2 / opt 2
# B=[2,0,1]: (2->0) skipped, (0->1) unknown input: popularity ranks 1 first
# C=[3,4]:   (3->4) rank 4 / 4
# D=[4,0]:   (4->0) skipped
SESSIONS = Sessions.from_lists([[1, 2, 3], [2, 0, 1], [3, 4], [4, 0]])


def test_ranks_ties_both_rules():
    scores = np.array([[7, 1, 3, 3, 2], [0, 5, float("nan"), 5, 5]], dtype=np.float32)
    cons, opt = ranks(scores, np.array([2, 1]))
    assert cons.tolist() == [2, 3]
    assert opt.tolist() == [1, 1]


def test_ranks_on_a_gpu_are_computed_there_with_the_same_rules():
    scores = np.array([[7, 1, 3, 3, 2], [0, 5, float("nan"), 5, 5], [1, 2, float("nan"), 0, 3]], dtype=np.float32)
    targets = np.array([2, 1, 2])
    cons, opt = ranks_torch(torch.from_numpy(scores), targets)  # the torch path, run here on the CPU
    want_cons, want_opt = ranks(scores, targets)
    assert cons.tolist() == want_cons.tolist() == [2, 3, 4] and opt.tolist() == want_opt.tolist() == [1, 1, 4]
    assert cons.dtype == opt.dtype == np.int64
    rng = np.random.default_rng(0)
    many = rng.integers(0, 5, size=(64, 40)).astype(np.float32)  # many ties
    targets = rng.integers(1, 40, size=64)
    for got, want in zip(ranks_torch(torch.from_numpy(many), targets), ranks(many, targets)):
        np.testing.assert_array_equal(got, want)


def test_next_mode_hand_computed():
    m = evaluate(TableModel(), SESSIONS, ks=(1, 2), popularity=POPULARITY, progress=False)
    assert m["n_events"] == 4 and m["n_skipped"] == 2 and m["n_unknown_inputs"] == 1
    assert m["HR@1"] == pytest.approx(1 / 4)
    assert m["HR@1_optimistic"] == pytest.approx(2 / 4)
    assert m["HR@2"] == pytest.approx(3 / 4)
    assert m["MRR@2"] == pytest.approx((0.5 + 0.5 + 1) / 4)
    assert m["MRR@2_optimistic"] == pytest.approx((1 + 0.5 + 1) / 4)
    assert m["NDCG@2"] == pytest.approx((2 / math.log2(3) + 1) / 4)
    assert m["coverage@2"] == pytest.approx(1.0)
    # normalised popularity [0, 1, .3, .2, .1]; top-2 lists {2,3} {4,3} {1,2} {1,2}
    assert m["popularity@2"] == pytest.approx((0.25 + 0.15 + 0.65 + 0.65) / 4)
    assert [(b["length"], b["n_events"]) for b in m["by_length"]] == [("2", 1), ("3", 3)]
    assert m["by_length"][0]["HR@2"] == 0.0 and m["by_length"][1]["HR@2"] == pytest.approx(1.0)


def test_unknown_input_without_popularity_uses_model_row():
    m = evaluate(TableModel(), SESSIONS, ks=(1,), progress=False)
    # row of zeros for the unknown input: conservative rank 4, optimistic 1
    assert m["HR@1"] == 0.0
    assert m["HR@1_optimistic"] == pytest.approx(2 / 4)
    assert "popularity@1" not in m


def test_last_mode():
    m = evaluate(TableModel(), SESSIONS, ks=(2,), mode="last", popularity=POPULARITY, progress=False)
    assert m["n_events"] == 3 and m["n_skipped"] == 1
    assert m["HR@2"] == pytest.approx(2 / 3)
    assert m["MRR@2"] == pytest.approx((0.5 + 1) / 3)


def test_exclude_seen_removes_the_sessions_earlier_items_and_a_repeated_target_is_a_miss():
    # [1,3,4]: (1->3) rank 2 either way; (3->4) rank 4, or 2 once items 1 and 3 are gone
    # [2,1,2]: (2->1) rank 4, or 3 without item 2; (1->2) rank 2, or a miss: 2 was seen
    sessions = Sessions.from_lists([[1, 3, 4], [2, 1, 2]])
    table = TABLE.copy()
    kept = evaluate(TableModel(), sessions, ks=(3,), progress=False)
    dropped = evaluate(TableModel(), sessions, ks=(3,), progress=False, exclude_seen=True)
    assert kept["HR@3"] == pytest.approx(2 / 4) and kept["MRR@3"] == pytest.approx((1 / 2 + 1 / 2) / 4)
    assert dropped["HR@3"] == pytest.approx(3 / 4) and dropped["MRR@3"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 4)
    assert dropped["exclude_seen"] is True and kept["exclude_seen"] is False
    assert np.array_equal(TABLE, table)  # the model's scores are not written to


def test_diversity_from_categories_and_embeddings():
    categories = np.array([0, 0, 0, 1, 1])
    m = evaluate(TableModel(), SESSIONS, ks=(2,), popularity=POPULARITY, item_features=categories, progress=False)
    assert m["diversity@2"] == pytest.approx(1 / 4)  # only {2,3} mixes categories
    emb = np.eye(5)[[0, 1, 1, 2, 2]].astype(np.float32)  # same vectors within a category
    m2 = evaluate(TableModel(), SESSIONS, ks=(2,), popularity=POPULARITY, item_features={"emb": emb}, progress=False)
    assert m2["diversity@2_emb"] == pytest.approx(1 / 4)


def test_popularity_model_coverage_and_table():
    data = PreparedData(Vocab(list("abcdef")), Sessions.from_lists([[1, 1, 1, 2, 2, 3, 3], [1, 2, 4, 5, 6]]), SESSIONS)
    model = MostPopular.train(data, MostPopular.Config())
    m = evaluate(model, Sessions.from_lists([[6, 5, 4, 1], [2, 3]]), ks=(2, 3), progress=False)
    assert m["coverage@2"] == pytest.approx(2 / 6) and m["coverage@3"] == pytest.approx(3 / 6)
    # counts 4,3,2,1,1,1: targets 5, 4, 1, 3 ranked 6, 6 (after the tied 4..6), 1, 3
    assert m["HR@3"] == pytest.approx(2 / 4)
    assert m["MRR@3"] == pytest.approx((1 + 1 / 3) / 4)
    text = format_table(m)
    assert "HR" in text and "coverage" in text and "by session length" in text


def test_rank_metrics_empty_and_bad_arguments():
    assert rank_metrics(np.zeros(0, dtype=np.int64), (5,))["HR@5"] == 0.0
    with pytest.raises(UserError, match="mode"):
        evaluate(TableModel(), SESSIONS, mode="first", progress=False)
    with pytest.raises(UserError, match="popularity"):
        evaluate(TableModel(), SESSIONS, popularity=np.ones(3), progress=False)


class ScoreNextOnly(SessionModel):
    """Hides a baseline's score_positions, so the evaluator takes the generic score_next path."""

    state_kind = "items"

    def __init__(self, model):
        self.model, self.n_items = model, model.n_items

    def score_next(self, sessions, batch_size=512):
        return self.model.score_next(sessions, batch_size)


@pytest.mark.parametrize("mode", ["next", "last"])
def test_score_positions_path_equals_score_next_path(mode):
    from training.models.markov import MarkovChain

    rng = np.random.default_rng(3)
    train = Sessions.from_lists([rng.integers(1, 9, size=rng.integers(2, 7)).tolist() for _ in range(80)])
    test = Sessions.from_lists([rng.integers(0, 9, size=rng.integers(1, 7)).tolist() for _ in range(30)])
    data = PreparedData(Vocab([str(i) for i in range(1, 9)]), train, test)
    model = MarkovChain.train(data, MarkovChain.Config())
    popularity = np.bincount(train.items, minlength=9)
    direct = evaluate(model, test, mode=mode, popularity=popularity, batch_size=7, progress=False)
    generic = evaluate(ScoreNextOnly(model), test, mode=mode, popularity=popularity, batch_size=7, progress=False)
    assert direct == generic
    assert direct["n_events"] + direct["n_skipped"] == (len(evaluation_positions(test, mode)))


class RecordingTable(SessionModel):
    """Integer scores (many ties) by input item from a random table; records the rows of every batch it yields."""

    name = "recording"
    state_kind = "items"

    def __init__(self, n_items: int, seed: int = 0):
        self.n_items = n_items
        self.table = np.random.default_rng(seed).integers(0, 4, size=(n_items + 1, n_items + 1)).astype(np.float32)
        self.rows: list[int] = []

    def score_next(self, sessions, batch_size=512):
        positions = next_positions(sessions)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            self.rows.append(len(chunk))
            yield chunk, self.table[sessions.items[chunk]]


def _random_sessions(n_items: int, n: int, seed: int) -> Sessions:
    rng = np.random.default_rng(seed)
    return Sessions.from_lists([rng.integers(0, n_items + 1, size=rng.integers(1, 9)).tolist() for _ in range(n)])


@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("budget_rows", [1, 3])
def test_a_tiny_score_budget_gives_exactly_the_metrics_of_one_large_batch(exclude_seen, budget_rows):
    n_items = 30
    sessions = _random_sessions(n_items, 60, seed=5)
    popularity = np.random.default_rng(6).integers(0, 50, size=n_items + 1).astype(np.float64)
    categories = np.arange(n_items + 1) % 4
    options = dict(ks=(1, 5, 20), popularity=popularity, item_features=categories, exclude_seen=exclude_seen, progress=False)
    whole_model, chunked_model = RecordingTable(n_items), RecordingTable(n_items)
    whole = evaluate(whole_model, sessions, batch_size=10_000, **options)
    chunked = evaluate(chunked_model, sessions, batch_size=10_000, score_budget=budget_rows * (n_items + 1), **options)
    assert whole_model.rows == [len(next_positions(sessions))]  # the reference really is one batch
    assert max(chunked_model.rows) == budget_rows
    assert chunked == whole
    assert whole["HR@5"] != whole["HR@5_optimistic"]  # the table's ties are exercised


def test_the_score_budget_bounds_every_batch_however_large_the_batch_size():
    n_items = 97
    sessions = _random_sessions(n_items, 40, seed=7)
    model = RecordingTable(n_items)
    evaluate(model, sessions, batch_size=512, score_budget=5 * (n_items + 1) + 50, progress=False)
    assert max(model.rows) == 5
    assert sum(model.rows) == len(next_positions(sessions))
    model.rows.clear()
    evaluate(model, sessions, batch_size=512, score_budget=10, progress=False)  # below one row: one row at a time
    assert set(model.rows) == {1}
    with pytest.raises(UserError, match="score budget"):
        evaluate(model, sessions, score_budget=0, progress=False)


def test_a_model_that_ignores_the_batch_size_is_a_user_error():
    class Greedy(RecordingTable):
        def score_next(self, sessions, batch_size=512):
            return super().score_next(sessions, batch_size=10_000)

    with pytest.raises(UserError, match="score rows"):
        evaluate(Greedy(10), _random_sessions(10, 20, seed=1), score_budget=11, progress=False)
