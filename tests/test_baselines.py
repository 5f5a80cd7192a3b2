"""Non-neural baselines: known answers on tiny data, structure beats popularity, save/load, real-data order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import PreparedData, Vocab, sessions_from_frame, vocab_from_train
from training.evaluate import evaluate
from training.models import get_model, load_run
from training.models.items import item_counts
from training.sessions import Sessions


def prepared(train: list[list[int]], test: list[list[int]] | None = None, n_items: int | None = None, times=None) -> PreparedData:
    n = n_items or max(max(s) for s in train)
    return PreparedData(Vocab([f"i{i}" for i in range(1, n + 1)]), Sessions.from_lists(train, times=times), Sessions.from_lists(test or [[1, 2]]))


def top(model, history: list[int], k: int = 3) -> list[int]:
    scores = model.score_histories([np.asarray(history, dtype=np.int64)])[0]
    scores[0] = -np.inf
    return np.argsort(-scores, kind="stable")[:k].tolist()


def test_pop_ranks_by_training_clicks():
    model = get_model("pop").train(prepared([[3, 3, 3, 2, 2], [1, 3, 2]]), get_model("pop").Config())
    assert top(model, []) == [3, 2, 1]
    assert top(model, [1, 2]) == [3, 2, 1]


def test_markov_first_order_then_popularity():
    data = prepared([[1, 2], [1, 2], [1, 3], [4, 4, 4, 4]])
    model = get_model("markov").train(data, get_model("markov").Config())
    assert top(model, [5, 1], 4) == [2, 3, 4, 1]  # successors of 1 by count, then the rest by popularity
    assert top(model, [3], 2) == [4, 1]  # 3 was never followed: popularity
    assert top(model, [], 1) == [4]


def test_markov_orders_equal_counts_by_popularity():
    data = prepared([[1, 2], [1, 3], [3, 3, 3]])
    model = get_model("markov").train(data, get_model("markov").Config())
    assert top(model, [1], 2) == [3, 2]  # one transition each; 3 has more clicks


def test_markov_backs_off_from_unseen_longer_context():
    data = prepared([[1, 2, 3], [4, 2, 5], [4, 2, 5]])
    model = get_model("markov").train(data, get_model("markov").Config(order=2))
    assert top(model, [1, 2], 1) == [3]
    assert top(model, [4, 2], 1) == [5]
    assert top(model, [3, 2], 1) == [5]  # (3, 2) unseen: order-1 counts after 2 (5 twice, 3 once)
    assert top(model, [2], 1) == [5]


def test_markov_pruning_keeps_most_frequent_successors():
    data = prepared([[1, 2], [1, 2], [1, 3], [1, 4], [1, 4], [1, 4], [5, 5, 5, 5, 5, 5, 5]])
    model = get_model("markov").train(data, get_model("markov").Config(pruning=2))
    assert top(model, [1], 3) == [4, 2, 5]  # 3 pruned: falls to its popularity rank below 5


def random_walk_data(seed: int = 0, n_items: int = 60, n_train: int = 600, n_test: int = 150) -> PreparedData:
    """Sessions walking a random sparse transition graph (3 successors per item), 10% random jumps."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, n_items + 1, size=(n_items + 1, 3))

    def walk(n: int) -> list[list[int]]:
        out = []
        for _ in range(n):
            s = [int(rng.integers(1, n_items + 1))]
            for _ in range(int(rng.integers(2, 9))):
                nxt = successors[s[-1], rng.integers(3)] if rng.random() < 0.9 else rng.integers(1, n_items + 1)
                s.append(int(nxt))
            out.append(s)
        return out

    return prepared(walk(n_train), walk(n_test), n_items=n_items)


STRUCTURED = ["markov", "sr", "iknn", "sknn", "vsknn", "stan", "vstan"]


@pytest.mark.parametrize("name", STRUCTURED)
def test_baseline_beats_popularity_on_structured_sessions(name):
    data = random_walk_data()
    popularity = item_counts(data.train, data.n_items)
    pop = evaluate(get_model("pop").train(data, get_model("pop").Config()), data.test, popularity=popularity, progress=False)
    cls = get_model(name)
    m = evaluate(cls.train(data, cls.Config(), progress=False), data.test, popularity=popularity, progress=False)
    assert m["MRR@20"] > 1.5 * pop["MRR@20"]
    assert m["HR@5"] > 1.5 * pop["HR@5"]


@pytest.mark.parametrize("name", ["pop", "spop"] + STRUCTURED)
def test_save_load_and_arrays_round_trip(name, tmp_path):
    data = random_walk_data(seed=1, n_train=100, n_test=20)
    cls = get_model(name)
    model = cls.train(data, cls.Config(), progress=False)
    model.save(tmp_path)
    again = load_run(tmp_path)
    with np.load(tmp_path / "model.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(model.arrays())
    rebuilt = cls.from_arrays(model.arrays(), model.config, model.n_items)
    (pos_a, sc_a), (pos_b, sc_b) = next(model.score_next(data.test)), next(again.score_next(data.test))
    assert np.array_equal(pos_a, pos_b) and np.array_equal(sc_a, sc_b)
    histories = [data.test.session(0)[:1], data.test.session(1)]
    assert np.array_equal(rebuilt.score_histories(histories), model.score_histories(histories))
    assert sc_a.dtype == np.float32 and sc_a.shape[1] == data.n_items + 1


def test_score_next_matches_score_histories_with_unknown_items():
    data = random_walk_data(seed=2, n_train=100, n_test=5)
    test = Sessions.from_lists([[3, 0, 5, 7], [0, 2], [4, 4, 0]])
    for name in ["pop", "spop"] + STRUCTURED:
        cls = get_model(name)
        model = cls.train(data, cls.Config(), progress=False)
        positions, scores = next(model.score_next(test))
        histories = [np.array([3]), np.array([3]), np.array([3, 5]), np.array([], dtype=np.int64), np.array([4]), np.array([4, 4])]
        assert positions.tolist() == [0, 1, 2, 4, 6, 7]
        assert np.array_equal(scores, model.score_histories(histories)), name


def load_yoochoose(shared: Path) -> PreparedData:
    folder = shared / "yoochoose-rsc15-100k"

    def read(split: str) -> pd.DataFrame:
        df = pd.read_csv(folder / f"yoochoose-clicks-100k_{split}.txt", sep="\t", dtype={"SessionId": str, "ItemId": str})
        return df.rename(columns={"SessionId": "session_id", "ItemId": "item_id", "Time": "time"})

    train, test = read("train_full"), read("test")
    vocab = vocab_from_train(train)
    return PreparedData(vocab, sessions_from_frame(train, vocab), sessions_from_frame(test, vocab))


@pytest.mark.shared_data
def test_yoochoose_order_of_baselines(shared_data):
    data = load_yoochoose(shared_data)
    popularity = item_counts(data.train, data.n_items)
    mrr = {}
    for name in ["pop", "markov", "vsknn"]:
        cls = get_model(name)
        m = evaluate(cls.train(data, cls.Config(), progress=False), data.test, popularity=popularity, progress=False)
        assert m["n_events"] == 10_152
        mrr[name] = m["MRR@20"]
    assert mrr["vsknn"] > mrr["markov"] > mrr["pop"]


def test_spop_session_counts_then_popularity():
    model = get_model("spop").train(prepared([[3, 3, 3, 2, 2], [1, 3, 2, 4]]), get_model("spop").Config())
    assert top(model, [1, 4, 1], 4) == [1, 4, 3, 2]
    assert top(model, [], 2) == [3, 2]


def test_sknn_votes_of_the_most_similar_recent_sessions():
    # sessions end at increasing times: later sessions are more recent
    data = prepared([[1, 2, 3], [1, 4], [1, 2, 5], [6, 7]], times=np.arange(10.0))
    model = get_model("sknn").train(data, get_model("sknn").Config(k=2, sample_size=10))
    scores = model.score_histories([np.array([1, 2])])[0]
    # cos({1,2},{1,2,3}) = cos({1,2},{1,2,5}) = 2/sqrt(6) > cos({1,2},{1,4}) = 1/2: k=2 keeps the first two
    assert scores[1] == pytest.approx(2 * 2 / np.sqrt(6)) and scores[3] == pytest.approx(2 / np.sqrt(6))
    assert scores[4] < 0 and scores[6] < 0  # not voted: popularity fallback below every vote
    sampled = get_model("sknn").train(data, get_model("sknn").Config(k=2, sample_size=1))
    votes = sampled.score_histories([np.array([1, 2])])[0]
    assert votes[5] > 0 and votes[3] < 0  # only the most recent session sharing an item is a candidate


# Straightforward per-session re-statements of session-rec's algorithms, to check the batched versions.

def _recent_candidates(train, end, history, sample):
    cands = {s for s, sess in enumerate(train) if set(sess) & set(history)}
    return sorted(cands, key=lambda s: -end[s])[:sample] if sample else sorted(cands)


def _vote(train, end, neighbors, k):
    ranked = sorted(neighbors, key=lambda t: (-round(t[1], 12), -end[t[0]]))
    return [t for t in ranked if t[1] > 0][:k]


def reference_sknn(train, end, h, k, sample, **_):
    cands = _recent_candidates(train, end, h, sample)
    sims = [(s, len(set(h) & set(train[s])) / np.sqrt(len(set(train[s])) * len(set(h)))) for s in cands]
    scores = {}
    for s, sim in _vote(train, end, sims, k):
        for i in set(train[s]):
            scores[i] = scores.get(i, 0.0) + sim
    return scores


def reference_vsknn(train, end, h, k, sample, **_):
    L = len(h)
    pos = {item: (p / L) ** 2 for p, item in enumerate(h, 1)}  # quadratic, last click of an item wins
    cands = _recent_candidates(train, end, h, sample)
    sims = [(s, sum(pos[i] for i in set(h) & set(train[s])) / len(pos)) for s in cands]
    scores = {}
    for s, sim in _vote(train, end, sims, k):
        step = next(n for n, item in enumerate(reversed(h), 1) if item in set(train[s]))
        for i in set(train[s]):
            scores[i] = scores.get(i, 0.0) + sim / step**2
    return scores


def reference_stan(train, end, h, k, sample, ipw=None, idf=None, **_):
    L = len(h)
    pos = {item: np.exp((p - L) / 1.02) for p, item in enumerate(h, 1)}
    norm = np.sqrt(sum(w * w for w in pos.values()))
    cands = _recent_candidates(train, end, h, sample)
    newest = max(end[s] for s in cands) if cands else 0.0
    sims = [(s, sum(pos[i] for i in set(h) & set(train[s])) / (norm * np.sqrt(len(set(train[s])))) * np.exp(-(newest - end[s]) / (5 * 86400))) for s in cands]
    scores = {}
    for s, sim in _vote(train, end, sims, k):
        sess = train[s]
        p_star = max(p for p, item in enumerate(sess, 1) if item in set(h))
        last = {item: p for p, item in enumerate(sess, 1)}
        decay = 1.0
        if ipw:
            decay = np.exp((max(p for p, item in enumerate(h, 1) if item in set(sess)) - L) / ipw)
        for i in set(sess):
            w = sim * np.exp(-abs(last[i] - p_star) / 2.05) * decay
            if idf:
                w *= 1 + idf[0] * idf[1][i]
            scores[i] = scores.get(i, 0.0) + w
    return scores


def reference_vstan(train, end, h, k, sample, n_items):
    clicks = np.bincount([i for s in train for i in s], minlength=n_items + 1)
    idf = {i: np.log(len(train) / clicks[i]) for i in range(1, n_items + 1) if clicks[i]}
    return reference_stan(train, end, h, k, sample, ipw=1.02, idf=(5.0, idf))


def reference_sr(train, h, steps=4):
    rules = {}
    for s in train:
        for j in range(1, len(s)):
            for d in range(1, min(steps, j) + 1):
                rules.setdefault(s[j - d], {}).setdefault(s[j], 0.0)
                rules[s[j - d]][s[j]] += 1.0 / d
    return rules.get(h[-1], {})


def reference_iknn(train, h, n_items, lmbd=20.0):
    supp = np.bincount([i for s in train for i in s], minlength=n_items + 1).astype(float)
    cooc = np.zeros((n_items + 1, n_items + 1))
    for s in train:
        for a in s:
            for b in s:
                cooc[a, b] += 1
    last = h[-1]
    sims = cooc[last] / (np.sqrt(supp[last] + lmbd) * np.sqrt(supp + lmbd))
    sims[last] = 0
    return {i: sims[i] for i in range(1, n_items + 1) if sims[i] > 0}


@pytest.mark.parametrize(
    "name, reference, config",
    [
        ("sknn", reference_sknn, {"k": 6, "sample_size": 25}),
        ("vsknn", reference_vsknn, {"k": 6, "sample_size": 25}),
        ("stan", reference_stan, {"k": 6, "sample_size": 25}),
        ("vstan", reference_vstan, {"k": 6, "sample_size": 25}),
        ("sr", None, {"steps": 4, "pruning": 0}),
        ("iknn", None, {"n_sims": 1000}),
    ],
)
def test_batched_scores_match_a_per_session_reference(name, reference, config):
    rng = np.random.default_rng(7)
    n_items = 30
    train = [rng.integers(1, n_items + 1, size=rng.integers(1, 8)).tolist() for _ in range(120)]
    n_items = max(max(s) for s in train)
    times = np.arange(sum(len(s) for s in train), dtype=np.float64) * 3600.0  # session order = recency order
    data = prepared(train, n_items=n_items, times=times)
    end = np.cumsum([len(s) for s in train]) * 3600.0
    histories = [rng.integers(1, n_items + 1, size=rng.integers(1, 6)).tolist() for _ in range(40)]
    histories += [[3, 3, 7, 3], [train[5][0]], train[10]]
    cls = get_model(name)
    model = cls.train(data, cls.Config(**config), progress=False)
    scores = model.score_histories([np.array(h, dtype=np.int64) for h in histories])
    for h, row in zip(histories, scores):
        if name == "sr":
            expected = reference_sr(train, h)
        elif name == "iknn":
            expected = reference_iknn(train, h, n_items)
        elif name == "vstan":
            expected = reference(train, end, h, config["k"], config["sample_size"], n_items)
        else:
            expected = reference(train, end, h, config["k"], config["sample_size"])
        voted = np.flatnonzero(row[1:] >= 0) + 1
        assert sorted(voted.tolist()) == sorted(expected), (h, expected)
        for item, value in expected.items():
            assert row[item] == pytest.approx(value, rel=1e-4), (h, item)


@pytest.mark.parametrize("name, setting", [("vsknn", {"weighting": "cubic"}), ("sknn", {"k": 0}), ("sr", {"steps": 0}), ("markov", {"order": 0})])
def test_bad_settings_are_user_errors(name, setting):
    from streamrec.errors import UserError

    cls = get_model(name)
    with pytest.raises(UserError, match=name):
        cls.train(random_walk_data(n_train=20, n_test=5), cls.Config(**setting), progress=False)
