"""Session-based kNN (SKNN; Jannach & Ludewig, RecSys 2017; session-rec ``ContextKNN``).

The session so far is compared with recent training sessions that share an
item with it (binary cosine over item sets); the ``k`` most similar vote for
their items with their similarity. Candidates are the ``sample_size`` most
recent such sessions by training end time. Items no neighbour contains
follow in popularity order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data import PreparedData
from training.errors import UserError
from training.models.items import ItemsModel, fill_unscored, item_counts, popularity_fallback
from training.models.neighbors import Queries, SessionIndex, candidates, dense_scores, neighbor_items, top_neighbors


@dataclass
class SKNNConfig:
    k: int = 100  # neighbours that vote
    sample_size: int = 500  # most recent candidate sessions considered (0 = all)


class SKNN(ItemsModel):
    name = "sknn"
    Config = SKNNConfig

    def __init__(self, config: SKNNConfig, n_items: int, index: SessionIndex, counts: np.ndarray):
        if config.k < 1 or config.sample_size < 0:
            raise UserError(f"sknn: k must be >= 1 and sample_size >= 0, got {config.k}, {config.sample_size}")
        self.config = config
        self.n_items = n_items
        self.index = index
        self.counts = np.asarray(counts, dtype=np.float64)
        self.fallback = popularity_fallback(self.counts)

    @classmethod
    def train(cls, data: PreparedData, config: SKNNConfig | None = None, *, progress: bool = True, run_dir=None) -> "SKNN":
        return cls(config or SKNNConfig(), data.n_items, SessionIndex.from_sessions(data.train, data.n_items), item_counts(data.train, data.n_items))

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.index.arrays(), "counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: SKNNConfig, n_items: int) -> "SKNN":
        return cls(config, n_items, SessionIndex.from_arrays(arrays, n_items), arrays["counts"])

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        q = Queries.build(histories, self.n_items)
        c = candidates(self.index, q, self.config.sample_size)
        shared = np.bincount(c.match_candidate, minlength=len(c.query)).astype(np.float64)
        similarity = shared / np.sqrt(self.index.n_distinct[c.session] * q.n_distinct[c.query])
        nb = top_neighbors(c, similarity, self.config.k)
        owner, flat = neighbor_items(self.index, c.session[nb])
        scores = dense_scores(q.n, self.n_items, c.query[nb][owner], self.index.distinct_items[flat], similarity[nb][owner])
        return fill_unscored(scores, self.fallback)
