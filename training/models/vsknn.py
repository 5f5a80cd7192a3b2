"""Vector multiplication session kNN (V-SKNN; Ludewig & Jannach 2018; session-rec ``VMContextKNN``).

Like SKNN, but recent clicks of the session count more: the similarity to a
candidate is the sum of the position weights of the shared items (weight of
an item = ``weighting`` of its last click position i in a session of L
clicks, quadratic: (i / L)^2) divided by the number of distinct items. A
neighbour's vote is decayed by how far back the most recent shared click lies
(``weighting_score``, quadratic: 1 / step^2) and optionally boosted by item idf.
Items no neighbour contains follow in popularity order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.errors import UserError
from training.models.items import DISTANCE_DECAYS, fill_unscored
from training.models.neighbors import Queries, SessionIndex, SessionKNNModel, candidates, dense_scores, neighbor_items, per_candidate_max, per_candidate_sum, top_neighbors

POSITION_WEIGHTS = {  # weight of the click at 1-based position i of L
    "same": lambda i, n: np.ones_like(i, dtype=np.float64),
    "div": lambda i, n: i / n,
    "linear": lambda i, n: np.where(i <= 10, 1.0 - 0.1 * (n - i), 0.0),
    "log": lambda i, n: 1.0 / np.log10((n - i) + 1.7),
    "quadratic": lambda i, n: (i / n) ** 2,
}


@dataclass
class VSKNNConfig:
    k: int = 100  # neighbours that vote
    sample_size: int = 1000  # most recent candidate sessions considered (0 = all)
    weighting: str = "quadratic"  # position weight of the session's clicks in the similarity
    weighting_score: str = "quadratic"  # decay of a neighbour's vote by the position of the most recent shared click
    idf_weighting: float = 0.0  # vote * (1 + idf_weighting * idf(item)); 0 = off (session-rec default)


class VSKNN(SessionKNNModel):
    name = "vsknn"
    Config = VSKNNConfig

    def __init__(self, config: VSKNNConfig, n_items: int, index: SessionIndex, counts: np.ndarray):
        if config.weighting not in POSITION_WEIGHTS or config.weighting_score not in DISTANCE_DECAYS:
            raise UserError(f"vsknn: weighting must be one of {', '.join(POSITION_WEIGHTS)}, got '{config.weighting}' / '{config.weighting_score}'")
        super().__init__(config, n_items, index, counts)
        self.idf = index.idf()

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        cfg = self.config
        q = Queries.build(histories, self.n_items)
        c = candidates(self.index, q, cfg.sample_size)
        weight = POSITION_WEIGHTS[cfg.weighting](q.last_pos.astype(np.float64), q.length[q.query].astype(np.float64))
        similarity = per_candidate_sum(c, weight) / np.maximum(q.n_distinct[c.query], 1)
        nb = top_neighbors(c, similarity, cfg.k)
        step = q.length[c.query[nb]] - per_candidate_max(c, q.last_pos.astype(np.float64))[nb] + 1
        vote = similarity[nb] * DISTANCE_DECAYS[cfg.weighting_score](step)
        owner, flat = neighbor_items(self.index, c.session[nb])
        items = self.index.distinct_items[flat]
        weights = vote[owner] * (1.0 + cfg.idf_weighting * self.idf[items]) if cfg.idf_weighting else vote[owner]
        scores = dense_scores(q.n, self.n_items, c.query[nb][owner], items, weights)
        return fill_unscored(scores, self.fallback)
