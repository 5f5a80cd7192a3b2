"""Parity: the served scorer must rank like the trained torch/numpy model on real test prefixes.

``replay`` drives a ``Scorer`` exactly as the stream does: sessions advance one
click per round, every active session at most once per ``step`` call, unknown
items (0) skipped (state unchanged, answered by popularity), the hidden state
carried between rounds. ``check_parity`` compares the answer at every known
position with the model's own ``score_next`` row for that position:

- the served top-K scores equal the reference's K best scores (|diff| <= tol),
- each served item's reference score equals its served score (|diff| <= tol),

which together say "the served list is a top-K of the reference row", ties
aside. The share of positions whose item lists match exactly is reported too.

An ``ann`` bundle (candidates from an index, re-scored exactly) must pass the
second check only: its top K may miss items the index did not propose. How
many it misses is ``top_k_recall``: the share of served items whose reference
score reaches the reference's K-th best (ties count as hits), 1.0 for exact
scoring; the exporter refuses an ann bundle under ``--min-recall``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.scorer import Scorer, StepInput
from streamrec.errors import UserError
from training.models.items import HistoryIndex
from training.sessions import Sessions

TOLERANCE = 1e-4
SCORE_CELLS = 1 << 24  # reference scores held at once by the parity check: 64 MB of float32, 16 rows at 1M items


@dataclass
class Replay:
    """Served answers at every known position of a Sessions (flat index order), and the wall time."""

    positions: np.ndarray  # [P] flat positions answered (item > 0)
    top_items: np.ndarray  # [P, K]
    top_scores: np.ndarray  # [P, K]
    seconds: float
    steps: int  # step() calls made


def sample_sessions(sessions: Sessions, n_sessions: int, seed: int = 0) -> Sessions:
    """Up to ``n_sessions`` sessions with >= 2 events, drawn reproducibly."""
    usable = np.flatnonzero(sessions.lengths >= 2)
    if len(usable) == 0:
        raise UserError("no test session has two or more events: nothing to check parity on")
    chosen = np.sort(np.random.default_rng(seed).choice(usable, size=min(n_sessions, len(usable)), replace=False))
    mask = np.zeros(len(sessions), dtype=bool)
    mask[chosen] = True
    return sessions.select(mask)


def replay(scorer: Scorer, sessions: Sessions, exclude_seen: bool = False, batch_size: int | None = None, record: list | None = None) -> Replay:
    """Feed every session click by click through ``scorer.step`` (rounds of at most ``batch_size`` sessions).

    ``record``, when given, receives every StepInput sent (to time other scorers on the same calls).
    """
    import time

    history = HistoryIndex(sessions)
    feature_names = scorer.features
    known_features = {name: sessions.features[name][sessions.items > 0] for name in feature_names}
    lengths = sessions.lengths
    hidden = np.zeros((len(sessions), scorer.hidden_size), dtype=np.float32) if scorer.kind == "hidden" else None
    k = min(scorer.k, scorer.n_items)
    out_items = np.zeros((sessions.n_events, k), dtype=np.int64)
    out_scores = np.zeros((sessions.n_events, k), dtype=np.float32)
    answered = np.zeros(sessions.n_events, dtype=bool)
    steps = 0
    started = time.perf_counter()
    for t in range(int(lengths.max()) if len(sessions) else 0):
        active = np.flatnonzero(lengths > t)
        pos = sessions.offsets[active] + t
        known = sessions.items[pos] > 0
        active, pos = active[known], pos[known]
        size = batch_size or max(len(active), 1)
        for lo in range(0, len(active), size):
            rows, p = active[lo : lo + size], pos[lo : lo + size]
            starts, ends = history.start[p], history.known_upto[p]
            features = {name: [v[a:b] for a, b in zip(starts, ends)] for name, v in known_features.items()} or None
            batch = StepInput(items=sessions.items[p], hidden=hidden[rows] if hidden is not None else None, history=history.at(p), features=features)
            result = scorer.step(batch, exclude_seen=exclude_seen)
            steps += 1
            if record is not None:
                record.append(batch)
            if hidden is not None:
                hidden[rows] = result.hidden
            out_items[p], out_scores[p], answered[p] = result.top_items, result.top_scores, True
    seconds = time.perf_counter() - started
    positions = np.flatnonzero(answered)
    return Replay(positions, out_items[positions], out_scores[positions], seconds, steps)


def check_parity(model, scorer: Scorer, sessions: Sessions, tol: float = TOLERANCE, score_cells: int = SCORE_CELLS) -> dict:
    """Compare ``scorer`` with ``model.score_next`` on ``sessions``; raise UserError on a mismatch, else a report.

    The reference rows are dense ``[rows, n_items + 1]``: ``score_cells`` bounds rows x columns per chunk
    (and the chunk's copies), so memory stays bounded at a million items.
    """
    served = replay(scorer, sessions)
    approximate = scorer.ann is not None
    where = np.full(sessions.n_events, -1, dtype=np.int64)
    where[served.positions] = np.arange(len(served.positions))
    k = served.top_items.shape[1]
    n_checked = n_exact = n_bad = 0
    hits = 0.0
    worst = 0.0
    for positions, scores in model.score_next(sessions, batch_size=max(1, score_cells // (scorer.n_items + 1))):
        rows = where[positions]
        keep = rows >= 0  # positions with an unknown input item are answered by popularity, not the model
        if not keep.any():
            continue
        ref = np.asarray(scores, dtype=np.float32)[keep]  # a copy (boolean index)
        ref[:, 0] = -np.inf
        items, got = served.top_items[rows[keep]], served.top_scores[rows[keep]]
        best = top_k_values(ref, k)
        at_served = np.take_along_axis(ref, items, 1)
        diff = _gap(got, at_served).max(1) if approximate else np.maximum(_gap(got, best).max(1), _gap(got, at_served).max(1))
        hits += float((at_served >= best[:, -1:] - tol).sum())
        worst = max(worst, float(diff.max()))
        n_bad += int((diff > tol).sum())
        n_exact += int((items == _stable_top(ref, k)).all(1).sum())
        n_checked += len(ref)
    if n_checked == 0:
        raise UserError("parity check found no test position to compare (every test item unknown?)")
    report = {"positions": n_checked, "sessions": len(sessions), "max_score_diff": worst, "exact_top_k_share": n_exact / n_checked, "top_k_recall": hits / (n_checked * k), "tolerance": tol}
    if n_bad:
        raise UserError(f"parity check failed: {n_bad} of {n_checked} test prefixes differ from the trained model (max score difference {worst:.3g} > {tol:g}); nothing written")
    return report


def time_steps(scorer: Scorer, batches: list[StepInput], repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds for ``scorer`` to answer ``batches``."""
    import time

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            scorer.step(batch)
        best = min(best, time.perf_counter() - started)
    return best


def _gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b|, 0 where both are the same infinity."""
    with np.errstate(invalid="ignore"):
        return np.where(a == b, 0.0, np.abs(a - b))


def top_k_values(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best values of every row, best first, without sorting (or copying twice) whole rows."""
    part = -np.partition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else scores
    return -np.sort(-part, axis=1)


def _stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(-scores, kind="stable")[:, :k]`` (ties: lower index first), looking only at columns reaching the k-th best."""
    kth = top_k_values(scores, k)[:, -1]
    out = np.empty((len(scores), k), dtype=np.int64)
    for r, row in enumerate(scores):
        cols = np.flatnonzero(row >= kth[r])  # ascending, so a stable sort of these keeps the full sort's tie order
        out[r] = cols[np.argsort(-row[cols], kind="stable")[:k]]
    return out
