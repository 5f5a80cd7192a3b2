"""Left-padded windows of recent items, built for many positions at once.

Window models (Caser, SASRec, BERT4Rec, BST, SR-GNN) read a session as "the
last L known items, padded with 0 on the left"; the stream keeps exactly that
history per session. Unknown items (0) are dropped, never placed in a window,
because the stream never appends them to a session's history.

Everything here is gather arithmetic over the flat ``Sessions`` arrays: the
known events of all sessions are compacted into one array, and the window for
a flat position ``p`` is the ``L`` compacted entries ending at ``p`` that lie
in ``p``'s session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.sessions import Sessions


@dataclass
class KnownEvents:
    """The known (non-zero) events of ``sessions``, compacted, with lookups back.

    ``end[p]`` is one past the compacted index of the last known event at or
    before flat position ``p``; ``start[p]`` is the compacted index where
    ``p``'s session begins. ``end - start`` is how many known items the
    session has seen up to and including ``p``.
    """

    items: np.ndarray  # [K] known items in flat order
    features: dict[str, np.ndarray]  # [K] per-event features of those items
    start: np.ndarray  # [N] compacted session start of every flat position
    end: np.ndarray  # [N] compacted end (exclusive) of every flat position
    session_start: np.ndarray  # [S] compacted start of every session
    session_end: np.ndarray  # [S] compacted end (exclusive) of every session

    @classmethod
    def of(cls, sessions: Sessions) -> "KnownEvents":
        known = sessions.items > 0
        before = np.concatenate([[0], np.cumsum(known, dtype=np.int64)])  # before[p]: known events before p
        session_start, session_end = before[sessions.offsets[:-1]], before[sessions.offsets[1:]]
        feats = {name: np.asarray(v, dtype=np.int64)[known] for name, v in sessions.features.items()}
        return cls(sessions.items[known], feats, np.repeat(session_start, sessions.lengths), before[1:], session_start, session_end)

    def gather(self, ends: np.ndarray, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Compacted indices [P, length] of windows ending (exclusively) at ``ends``, and their validity mask."""
        idx = ends[:, None] - length + np.arange(length, dtype=np.int64)[None, :]
        valid = idx >= starts[:, None]
        return np.where(valid, idx, 0), valid


def prefix_windows(sessions: Sessions, positions: np.ndarray, length: int, features: tuple[str, ...] = (), known: KnownEvents | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Windows [P, length] of the last ``length`` known items up to and including each flat position.

    Returns the item windows and one window per named event feature (same
    layout, 0 where the item window is padding).
    """
    known = known or KnownEvents.of(sessions)
    positions = np.asarray(positions, dtype=np.int64)
    idx, valid = known.gather(known.end[positions], known.start[positions], length)
    return _take(known, idx, valid, features)


def next_item_pairs(sessions: Sessions, length: int, targets: int = 1, features: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Training pairs for "given the last ``length`` items, predict the next ``targets`` items".

    One pair per known event that has a known successor in its session: the
    window ends at that event, the targets are the next ``targets`` known items
    (0 past the session's end). Returns (windows [P, length], targets [P, T],
    feature windows).
    """
    known = KnownEvents.of(sessions)
    counts = known.session_end - known.session_start
    starts = np.repeat(known.session_start, counts)  # per compacted event
    ends = np.repeat(known.session_end, counts)
    anchors = np.flatnonzero(np.arange(len(known.items)) + 1 < ends)
    idx, valid = known.gather(anchors + 1, starts[anchors], length)
    windows, feats = _take(known, idx, valid, features)
    tidx = anchors[:, None] + 1 + np.arange(targets, dtype=np.int64)[None, :]
    tvalid = tidx < ends[anchors][:, None]
    target_items = np.where(tvalid, known.items[np.where(tvalid, tidx, 0)], 0) if len(anchors) else np.zeros((0, targets), dtype=np.int64)
    return windows, target_items, feats


def sequence_chunks(sessions: Sessions, length: int, features: tuple[str, ...] = (), last_only: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Left-padded chunks [C, length] covering every session's known items, for sequence-to-sequence training.

    A session of n known items gives chunks ending at n, n - (length - 1),
    n - 2 (length - 1), ... so that consecutive chunks overlap by one item and
    every item after the first is a next-item target (chunk[t] -> chunk[t+1])
    exactly once. Sessions with fewer than two known items give nothing.
    ``last_only``: only the chunk ending at n (a session's last ``length`` items).
    """
    if length < 2:
        raise ValueError("sequence_chunks needs length >= 2")
    known = KnownEvents.of(sessions)
    counts = known.session_end - known.session_start
    stride = length - 1
    n_chunks = np.where(counts >= 2, -(-(counts - 1) // stride), 0)
    if last_only:
        n_chunks = np.minimum(n_chunks, 1)
    owner = np.repeat(np.arange(len(counts)), n_chunks)
    rank = np.arange(n_chunks.sum()) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    idx, valid = known.gather(known.session_end[owner] - rank * stride, known.session_start[owner], length)
    return _take(known, idx, valid, features)


def _take(known: KnownEvents, idx: np.ndarray, valid: np.ndarray, features: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if len(known.items) == 0:
        zeros = np.zeros(idx.shape, dtype=np.int64)
        return zeros, {name: zeros.copy() for name in features}
    windows = np.where(valid, known.items[idx], 0)
    feats = {name: np.where(valid, known.features[name][idx], 0) for name in features}
    return windows, feats
