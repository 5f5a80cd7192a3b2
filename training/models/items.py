"""What every non-neural baseline (state kind "items") shares.

These models keep no hidden state: the prediction after a click is a function
of the session's known items so far (most recent last). One method,
``score_histories``, answers both the offline evaluator (through
``score_next``) and the stream (through the exported arrays), so both rank
identically. Weights are plain named arrays, saved as ``model.npz`` without pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.base import SessionModel, next_positions, write_run_config
from training.sessions import Sessions


class ItemsModel(SessionModel):
    """Base for baselines scored from item histories; subclasses implement the four methods below."""

    state_kind = "items"

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to score, as named numpy arrays (what the bundle stores)."""
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config, n_items: int) -> "ItemsModel":
        raise NotImplementedError

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        """Scores [B, n_items + 1] float32 for each history (known items so far, most recent last)."""
        raise NotImplementedError

    def score_next(self, sessions: Sessions, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.score_positions(sessions, next_positions(sessions), batch_size)

    def score_positions(self, sessions: Sessions, positions: np.ndarray, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``score_next`` restricted to some positions (the evaluator's last-item mode scores only those)."""
        history = HistoryIndex(sessions)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            yield chunk, self.score_histories(history.at(chunk))

    def save(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        write_run_config(run_dir, self)
        np.savez_compressed(run_dir / "model.npz", **self.arrays())

    @classmethod
    def load(cls, run_dir: Path) -> "ItemsModel":
        run_dir = Path(run_dir)
        try:
            doc = json.loads((run_dir / "config.json").read_text())
            config = cls.Config(**doc["config"])
            n_items = int(doc["n_items"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{run_dir / 'config.json'}: not a {cls.name} run config ({e})") from None
        if doc.get("model") != cls.name:
            raise UserError(f"{run_dir}: holds a '{doc.get('model')}' model, not '{cls.name}'")
        path = run_dir / "model.npz"
        if not path.is_file():
            raise UserError(f"{path}: model weights missing")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls.from_arrays(arrays, config, n_items)


class CountsModel(ItemsModel):
    """Base for baselines whose only weights are the training click counts (pop, spop); subclasses score."""

    def __init__(self, config, n_items: int, counts: np.ndarray):
        self.config = config
        self.n_items = n_items
        self.counts = np.asarray(counts, dtype=np.float64)

    @classmethod
    def train(cls, data: PreparedData, config=None, *, progress: bool = True, run_dir=None) -> "CountsModel":
        return cls(config or cls.Config(), data.n_items, item_counts(data.train, data.n_items))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config, n_items: int) -> "CountsModel":
        return cls(config, n_items, arrays["counts"])


class LastItemModel(ItemsModel):
    """Base for baselines that score the next item from the row of the session's last item in an item-to-item table.

    The table is CSR over items (row = last item, columns = the items it points to, with a weight);
    items outside the row follow in popularity order. Subclasses build the table in ``item_table``
    and name its two arrays in ``columns`` (the names ``arrays()`` and model.npz use).
    """

    columns: ClassVar[tuple[str, str]]  # names of the (target items, weights) arrays

    def __init__(self, config, n_items: int, counts: np.ndarray, indptr: np.ndarray, targets: np.ndarray, weights: np.ndarray):
        self.config = config
        self.n_items = n_items
        self.counts = np.asarray(counts, dtype=np.float64)
        self.indptr, self.targets, self.weights = indptr, targets, weights
        self.fallback = popularity_fallback(self.counts)

    @classmethod
    def item_table(cls, data: PreparedData, config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The CSR table (indptr [n_items + 2], target items, weights) learnt from ``data.train``."""
        raise NotImplementedError

    @classmethod
    def train(cls, data: PreparedData, config=None, *, progress: bool = True, run_dir=None) -> "LastItemModel":
        config = config or cls.Config()
        return cls(config, data.n_items, item_counts(data.train, data.n_items), *cls.item_table(data, config))

    def arrays(self) -> dict[str, np.ndarray]:
        targets, weights = self.columns
        return {"counts": self.counts, "indptr": self.indptr, targets: self.targets, weights: self.weights}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config, n_items: int) -> "LastItemModel":
        targets, weights = cls.columns
        return cls(config, n_items, arrays["counts"], arrays["indptr"], arrays[targets], arrays[weights])

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        last = np.fromiter((h[-1] if len(h) else 0 for h in histories), dtype=np.int64, count=len(histories))
        scores = np.zeros((len(histories), self.n_items + 1), dtype=np.float32)
        owner, flat = csr_gather(self.indptr, last)
        scores[owner, self.targets[flat]] = self.weights[flat]
        return fill_unscored(scores, self.fallback)


class HistoryIndex:
    """Known-item histories at any flat position of a Sessions, without copying per event.

    The history at position p is the session's items up to and including p,
    with unknown items (0) dropped, as the stream keeps it.
    """

    def __init__(self, sessions: Sessions):
        known = sessions.items > 0
        self.known_items = sessions.items[known]
        self.known_upto = np.cumsum(known)  # known items in items[:p + 1]
        first = sessions.offsets[:-1]
        before = np.concatenate([[0], self.known_upto])[first]  # known items before the session starts
        self.start = np.repeat(before, sessions.lengths)

    def at(self, positions: np.ndarray) -> list[np.ndarray]:
        ends = self.known_upto[positions]
        return [self.known_items[a:b] for a, b in zip(self.start[positions], ends)]


def flatten_histories(histories: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of histories as flat int64 arrays: (lengths [B], row [N] = history of each click, items [N])."""
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    items = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if lengths.sum() else np.zeros(0, dtype=np.int64)
    return lengths, np.repeat(np.arange(len(histories), dtype=np.int64), lengths), items


DISTANCE_DECAYS = {  # weight of something d >= 1 clicks away (session-rec's decay functions)
    "same": lambda d: np.ones_like(d, dtype=np.float64),
    "div": lambda d: 1.0 / d,
    "linear": lambda d: np.where(d <= 100, 1.0 - 0.1 * d, 0.0),
    "log": lambda d: 1.0 / np.log10(d + 1.7),
    "quadratic": lambda d: 1.0 / (d * d),
}


def item_counts(sessions: Sessions, n_items: int) -> np.ndarray:
    """Training clicks per item, [n_items + 1] float64 (index 0 = unknown, set to 0)."""
    counts = np.bincount(sessions.items, minlength=n_items + 1)[: n_items + 1].astype(np.float64)
    counts[0] = 0.0
    return counts


def popularity_fallback(counts: np.ndarray) -> np.ndarray:
    """Scores in [-1, 0) that order items by training clicks, for items a model gives no score.

    Baselines score only what their rules or neighbours reach (scores > 0); the
    rest of the catalogue follows in popularity order, as the stream answers
    unknown items, instead of one big tie.
    """
    counts = np.asarray(counts, dtype=np.float64)
    return (counts / (counts.max(initial=0.0) + 1.0) - 1.0).astype(np.float32)


def fill_unscored(scores: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Replace zero scores by the popularity fallback row (in place, float32), returns ``scores``."""
    s = torch.from_numpy(scores)
    torch.where(s == 0, torch.from_numpy(fallback), s, out=s)
    return scores


def csr_from_pairs(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum duplicate (row, col) pairs into CSR arrays (indptr [n_rows + 1], indices, data), columns sorted."""
    if len(rows) == 0:
        return np.zeros(n_rows + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    n_cols = int(cols.max()) + 1
    key = rows.astype(np.int64) * n_cols + cols.astype(np.int64)
    uniq, inverse = np.unique(key, return_inverse=True)
    data = np.bincount(inverse, weights=values, minlength=len(uniq))
    r, c = uniq // n_cols, uniq % n_cols
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
    return indptr, c.astype(np.int64), data


def csr_gather(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For CSR rows ``rows``: (owner [nnz] = position in ``rows``, flat index [nnz] into indices/data)."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return owner, np.arange(int(lengths.sum()), dtype=np.int64) + shift


def keep_top_per_row(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``keep`` largest entries of each CSR row (ties: lower column first); 0 keeps all."""
    if keep <= 0 or len(indices) == 0:
        return indptr, indices, data
    row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    order = np.lexsort((indices, -data, row))
    rank = np.arange(len(order)) - indptr[row[order]]
    kept = np.sort(order[rank < keep])
    new_indptr = np.zeros_like(indptr)
    np.cumsum(np.bincount(row[kept], minlength=len(indptr) - 1), out=new_indptr[1:])
    return new_indptr, indices[kept], data[kept]
