"""The session index shared by the session-kNN family (SKNN, V-SKNN, STAN, V-STAN).

Follows session-rec (rn5l/session-rec, algorithms/knn): the candidate
neighbours of a session are the training sessions that share an item with it;
when there are more than ``sample_size`` of them only the most recent ones
(by training session END time) are kept; the ``k`` most similar candidates
vote for their items.

Everything here is batched: a batch of B histories becomes flat arrays of
(query, item) entries and (query, candidate session) pairs, so the work is a
handful of sorts and bincounts, never a Python loop over items or sessions.
Training sessions are renumbered by end time, so "more recent" is simply "larger
session number", and the inverted index lists each item's sessions newest first.
Only an item's ``sample_size`` newest sessions can be among a query's
``sample_size`` newest candidates, so the index lists are cut there, and every
candidate is reached through every history item it contains (the
intersection comes for free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.items import ItemsModel, csr_gather, flatten_histories, item_counts, popularity_fallback
from training.sessions import Sessions


class SessionIndex:
    """Training sessions (newest last) with an inverted index item -> sessions (newest first)."""

    def __init__(self, indptr: np.ndarray, items: np.ndarray, end_time: np.ndarray, n_items: int):
        self.indptr = np.asarray(indptr, dtype=np.int64)  # [S + 1] over items, sessions in end-time order
        self.items = np.asarray(items, dtype=np.int64)  # click sequence of every session, in order
        self.end_time = np.asarray(end_time, dtype=np.float64)  # [S], non-decreasing
        self.n_items = n_items
        self.n_sessions = len(self.end_time)
        lengths = np.diff(self.indptr)
        session = np.repeat(np.arange(self.n_sessions, dtype=np.int64), lengths)
        self.position = np.arange(len(self.items), dtype=np.int64) - np.repeat(self.indptr[:-1], lengths) + 1  # 1-based
        # last occurrence of each (session, item): the distinct items of a session, with their last position
        key = session * (n_items + 1) + self.items
        order = np.lexsort((self.position, key))
        last = np.r_[key[order][1:] != key[order][:-1], True]
        entries = np.sort(order[last])  # back in session order
        self.distinct_session = session[entries]
        self.distinct_items = self.items[entries]
        self.distinct_last_pos = self.position[entries]
        self.distinct_indptr = np.zeros(self.n_sessions + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.distinct_session, minlength=self.n_sessions), out=self.distinct_indptr[1:])
        self.n_distinct = np.diff(self.distinct_indptr)
        # inverted index: for every item its sessions, newest (largest number) first
        inv = np.lexsort((-self.distinct_session, self.distinct_items))
        self.item_sessions = self.distinct_session[inv]
        self.item_indptr = np.zeros(n_items + 2, dtype=np.int64)
        np.cumsum(np.bincount(self.distinct_items, minlength=n_items + 1), out=self.item_indptr[1:])

    @classmethod
    def from_sessions(cls, sessions: Sessions, n_items: int) -> "SessionIndex":
        """Drop unknown items and empty sessions, order sessions by end time (stable)."""
        known = sessions.items > 0
        session = sessions.session_index()[known]
        items = sessions.items[known]
        lengths = np.bincount(session, minlength=len(sessions))
        end = np.full(len(sessions), -np.inf)
        np.maximum.at(end, session, sessions.times[known])
        keep = np.flatnonzero(lengths > 0)
        order = keep[np.argsort(end[keep], kind="stable")]
        rank = np.empty(len(sessions), dtype=np.int64)
        rank[order] = np.arange(len(order))
        events = np.lexsort((np.arange(len(items)), rank[session]))  # sessions by rank, clicks in order
        indptr = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=indptr[1:])
        return cls(indptr, items[events], end[order], n_items)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"session_indptr": self.indptr, "session_items": self.items, "session_end_time": self.end_time}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_items: int) -> "SessionIndex":
        return cls(arrays["session_indptr"], arrays["session_items"], arrays["session_end_time"], n_items)

    def idf(self) -> np.ndarray:
        """log(number of sessions / clicks on the item), [n_items + 1] (session-rec's idf; 0 for unseen items)."""
        clicks = np.bincount(self.items, minlength=self.n_items + 1).astype(np.float64)
        out = np.zeros(self.n_items + 1)
        seen = clicks > 0
        out[seen] = np.log(self.n_sessions / clicks[seen])
        return out


class SessionKNNModel(ItemsModel):
    """Base of the session-kNN models: their weights are the training session index and the click counts.

    A subclass's config has at least ``k`` (neighbours that vote) and ``sample_size``; it scores.
    """

    def __init__(self, config, n_items: int, index: SessionIndex, counts: np.ndarray):
        if config.k < 1 or config.sample_size < 0:
            raise UserError(f"{self.name}: k must be >= 1 and sample_size >= 0, got {config.k}, {config.sample_size}")
        self.config = config
        self.n_items = n_items
        self.index = index
        self.counts = np.asarray(counts, dtype=np.float64)
        self.fallback = popularity_fallback(self.counts)

    @classmethod
    def train(cls, data: PreparedData, config=None, *, progress: bool = True, run_dir=None) -> "SessionKNNModel":
        return cls(config or cls.Config(), data.n_items, SessionIndex.from_sessions(data.train, data.n_items), item_counts(data.train, data.n_items))

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.index.arrays(), "counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config, n_items: int) -> "SessionKNNModel":
        return cls(config, n_items, SessionIndex.from_arrays(arrays, n_items), arrays["counts"])


@dataclass
class Queries:
    """A batch of histories as flat distinct (query, item) entries."""

    n: int  # B
    length: np.ndarray  # [B] clicks in the history (repeats included)
    n_distinct: np.ndarray  # [B]
    query: np.ndarray  # [M] row of the entry
    item: np.ndarray  # [M] distinct item of that history
    last_pos: np.ndarray  # [M] 1-based position of the item's last click in the history
    keys: np.ndarray  # [M] query * (n_items + 1) + item, sorted

    @classmethod
    def build(cls, histories: list[np.ndarray], n_items: int) -> "Queries":
        length, query, flat = flatten_histories(histories)
        pos = np.arange(len(flat), dtype=np.int64) - np.repeat(np.cumsum(length) - length, length) + 1
        keys = query * (n_items + 1) + flat
        order = np.lexsort((pos, keys))
        last = np.r_[keys[order][1:] != keys[order][:-1], True] if len(order) else np.zeros(0, dtype=bool)
        kept = order[last]  # sorted by key, the last click of each (query, item)
        return cls(len(histories), length, np.bincount(query[kept], minlength=len(histories)), query[kept], flat[kept], pos[kept], keys[kept])

    def lookup(self, query: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
        """Entry index of (query, item) pairs, -1 where the item is not in that history."""
        key = query * (n_items + 1) + item
        at = np.minimum(np.searchsorted(self.keys, key), max(len(self.keys) - 1, 0))
        found = (self.keys[at] == key) if len(self.keys) else np.zeros(len(key), dtype=bool)
        return np.where(found, at, -1)


@dataclass
class Candidates:
    """(query, session) candidate pairs and the history entries each one contains."""

    query: np.ndarray  # [C]
    session: np.ndarray  # [C] training session number (larger = more recent)
    match_candidate: np.ndarray  # [T] candidate of each match
    match_entry: np.ndarray  # [T] Queries entry (history item) the candidate session contains


def candidates(index: SessionIndex, queries: Queries, sample_size: int) -> Candidates:
    """Sessions sharing an item with each history; only the ``sample_size`` most recent if more (0 = all)."""
    lists = index.item_indptr[queries.item]
    counts = index.item_indptr[queries.item + 1] - lists
    if sample_size > 0:
        counts = np.minimum(counts, sample_size)
    entry = np.repeat(np.arange(len(queries.item), dtype=np.int64), counts)
    flat = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(lists - (np.cumsum(counts) - counts), counts)
    session = index.item_sessions[flat]
    s_total = index.n_sessions
    key = queries.query[entry] * s_total + (s_total - 1 - session)  # per query, newest first
    uniq, inverse = np.unique(key, return_inverse=True)
    cand_query = uniq // s_total
    cand_session = s_total - 1 - uniq % s_total
    if sample_size > 0 and len(uniq):
        first = np.searchsorted(cand_query, cand_query, side="left")
        keep = (np.arange(len(uniq)) - first) < sample_size
        renumber = np.cumsum(keep) - 1
        matched = keep[inverse]
        return Candidates(cand_query[keep], cand_session[keep], renumber[inverse[matched]], entry[matched])
    return Candidates(cand_query, cand_session, inverse.ravel(), entry)


def top_neighbors(cands: Candidates, similarity: np.ndarray, k: int) -> np.ndarray:
    """Indices of each query's ``k`` most similar candidates with similarity > 0.

    Ties go to the more recent session; similarities equal to 12 significant
    digits count as ties, so the choice does not hang on summation order.
    """
    order = np.lexsort((-cands.session, -_round_significant(similarity), cands.query))
    q = cands.query[order]
    first = np.searchsorted(q, q, side="left")
    keep = ((np.arange(len(order)) - first) < k) & (similarity[order] > 0)
    return order[keep]


def _round_significant(x: np.ndarray, digits: int = 12) -> np.ndarray:
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x)))))
    return np.round(x * scale) / scale


def per_candidate_sum(cands: Candidates, values: np.ndarray) -> np.ndarray:
    """Sum over each candidate's matched history entries of ``values[entry]``."""
    return np.bincount(cands.match_candidate, weights=values[cands.match_entry], minlength=len(cands.query))


def per_candidate_max(cands: Candidates, values: np.ndarray) -> np.ndarray:
    """Max over each candidate's matched history entries of ``values[entry]``."""
    out = np.full(len(cands.query), -np.inf)
    np.maximum.at(out, cands.match_candidate, values[cands.match_entry])
    return out


def neighbor_items(index: SessionIndex, sessions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner [E] = position in ``sessions``, flat index [E] into the distinct_* arrays) for their items."""
    return csr_gather(index.distinct_indptr, sessions)


def dense_scores(n_rows: int, n_items: int, rows: np.ndarray, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum ``weights`` into a [n_rows, n_items + 1] float32 score matrix (a torch scatter-add: fast, no float64 copy)."""
    out = torch.zeros(n_rows * (n_items + 1), dtype=torch.float32)
    out.index_add_(0, torch.from_numpy(rows * (n_items + 1) + items), torch.from_numpy(np.asarray(weights, dtype=np.float32)))
    return out.numpy().reshape(n_rows, n_items + 1)
