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

from training.models.items import fill_unscored
from training.models.neighbors import Queries, SessionKNNModel, candidates, dense_scores, neighbor_items, top_neighbors


@dataclass
class SKNNConfig:
    k: int = 100  # neighbours that vote
    sample_size: int = 500  # most recent candidate sessions considered (0 = all)


class SKNN(SessionKNNModel):
    name = "sknn"
    Config = SKNNConfig

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        q = Queries.build(histories, self.n_items)
        c = candidates(self.index, q, self.config.sample_size)
        shared = np.bincount(c.match_candidate, minlength=len(c.query)).astype(np.float64)
        similarity = shared / np.sqrt(self.index.n_distinct[c.session] * q.n_distinct[c.query])
        nb = top_neighbors(c, similarity, self.config.k)
        owner, flat = neighbor_items(self.index, c.session[nb])
        scores = dense_scores(q.n, self.n_items, c.query[nb][owner], self.index.distinct_items[flat], similarity[nb][owner])
        return fill_unscored(scores, self.fallback)
