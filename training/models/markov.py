"""Order-k Markov chain with backoff: the next item follows the most specific context seen in training.

For a context of the last j items (j = order down to 1) the score of an item
is how often it followed that context in the training sessions, plus its
training popularity scaled into [0, 1): the longest context that was seen
wins, equal counts are ordered by popularity, and items the context never led
to (or every item, when no context was seen) follow in popularity order.
With order 1 this is the "first-order Markov" baseline of session-rec
(``MarkovModel``, successors pruned to the 20 most frequent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.items import ItemsModel, csr_from_pairs, csr_gather, item_counts, keep_top_per_row


@dataclass
class MarkovConfig:
    order: int = 1  # longest context (k); shorter contexts are the backoff
    pruning: int = 20  # successors kept per context, most frequent first (0 keeps all)


def last_items(histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """([B, k] the last k known items right-aligned, 0-padded on the left; [B] history lengths)."""
    out = np.zeros((len(histories), k), dtype=np.int64)
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    for b, h in enumerate(histories):
        tail = h[-k:]
        if len(tail):
            out[b, k - len(tail):] = tail
    return out, lengths


class MarkovChain(ItemsModel):
    name = "markov"
    Config = MarkovConfig

    def __init__(self, config: MarkovConfig, n_items: int, counts: np.ndarray, tables: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
        self.config = config
        self.n_items = n_items
        self.counts = np.asarray(counts, dtype=np.float64)
        self.tables = tables  # per order j = 1..k: (context keys sorted, indptr, successor items, successor counts)
        self.tie_break = (self.counts / (self.counts.max(initial=0.0) + 1.0)).astype(np.float32)  # in [0, 1): below one click

    @classmethod
    def train(cls, data: PreparedData, config: MarkovConfig | None = None, *, progress: bool = True, run_dir=None) -> "MarkovChain":
        config = config or MarkovConfig()
        n_items = data.n_items
        if config.order < 1:
            raise UserError(f"markov: order must be >= 1, got {config.order}")
        if (n_items + 1) ** config.order >= 2**63:
            raise UserError(f"markov: order {config.order} is too long for {n_items} items (context keys overflow int64)")
        train = data.train
        items, session = train.items, train.session_index()
        tables = []
        for j in range(1, config.order + 1):
            start = np.flatnonzero(session[: len(items) - j] == session[j:]) if len(items) > j else np.zeros(0, dtype=np.int64)
            keys = context_keys(np.stack([items[start + m] for m in range(j)], axis=1), n_items) if len(start) else np.zeros(0, dtype=np.int64)
            context, row = np.unique(keys, return_inverse=True)
            indptr, succ, cnt = csr_from_pairs(row, items[start + j], np.ones(len(start)), len(context))
            tables.append((context, *keep_top_per_row(indptr, succ, cnt, config.pruning)))
        return cls(config, n_items, item_counts(train, n_items), tables)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"counts": self.counts}
        for j, (keys, indptr, succ, cnt) in enumerate(self.tables, start=1):
            out.update({f"keys_{j}": keys, f"indptr_{j}": indptr, f"successors_{j}": succ, f"successor_counts_{j}": cnt})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: MarkovConfig, n_items: int) -> "MarkovChain":
        tables = [(arrays[f"keys_{j}"], arrays[f"indptr_{j}"], arrays[f"successors_{j}"], arrays[f"successor_counts_{j}"]) for j in range(1, config.order + 1)]
        return cls(config, n_items, arrays["counts"], tables)

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        k = self.config.order
        tail, lengths = last_items(histories, k)
        rows = np.full(len(histories), -1, dtype=np.int64)
        order = np.zeros(len(histories), dtype=np.int64)
        for j in range(k, 0, -1):
            keys, indptr, _, _ = self.tables[j - 1]
            todo = np.flatnonzero((rows < 0) & (lengths >= j))
            if len(todo) == 0 or len(keys) == 0:
                continue
            key = context_keys(tail[todo, k - j :], self.n_items)
            at = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
            found = keys[at] == key
            rows[todo[found]] = at[found]
            order[todo[found]] = j
        scores = np.broadcast_to(self.tie_break, (len(histories), self.n_items + 1)).copy()
        for j in range(1, k + 1):
            sel = np.flatnonzero(order == j)
            if len(sel):
                _, indptr, succ, cnt = self.tables[j - 1]
                owner, flat = csr_gather(indptr, rows[sel])
                scores[sel[owner], succ[flat]] += cnt[flat].astype(np.float32)
        return scores


def context_keys(contexts: np.ndarray, n_items: int) -> np.ndarray:
    """One int64 per context row [C, j] (base n_items + 1 digits, most recent item last)."""
    keys = np.zeros(len(contexts), dtype=np.int64)
    for m in range(contexts.shape[1]):
        keys = keys * (n_items + 1) + contexts[:, m]
    return keys
