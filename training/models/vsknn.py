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

from training.data import PreparedData
from training.errors import UserError
from training.models.items import ItemsModel, fill_unscored, item_counts, popularity_fallback
from training.models.neighbors import Queries, SessionIndex, candidates, dense_scores, neighbor_items, per_candidate_max, per_candidate_sum, top_neighbors

POSITION_WEIGHTS = {  # weight of the click at 1-based position i of L
    "same": lambda i, n: np.ones_like(i, dtype=np.float64),
    "div": lambda i, n: i / n,
    "linear": lambda i, n: np.where(i <= 10, 1.0 - 0.1 * (n - i), 0.0),
    "log": lambda i, n: 1.0 / np.log10((n - i) + 1.7),
    "quadratic": lambda i, n: (i / n) ** 2,
}
STEP_DECAYS = {  # decay of a neighbour whose most recent shared click is ``step`` clicks back (1 = last)
    "same": lambda s: np.ones_like(s, dtype=np.float64),
    "div": lambda s: 1.0 / s,
    "linear": lambda s: np.where(s <= 100, 1.0 - 0.1 * s, 0.0),
    "log": lambda s: 1.0 / np.log10(s + 1.7),
    "quadratic": lambda s: 1.0 / (s * s),
}


@dataclass
class VSKNNConfig:
    k: int = 100  # neighbours that vote
    sample_size: int = 1000  # most recent candidate sessions considered (0 = all)
    weighting: str = "quadratic"  # position weight of the session's clicks in the similarity
    weighting_score: str = "quadratic"  # decay of a neighbour's vote by the position of the most recent shared click
    idf_weighting: float = 0.0  # vote * (1 + idf_weighting * idf(item)); 0 = off (session-rec default)


class VSKNN(ItemsModel):
    name = "vsknn"
    Config = VSKNNConfig

    def __init__(self, config: VSKNNConfig, n_items: int, index: SessionIndex, counts: np.ndarray):
        if config.weighting not in POSITION_WEIGHTS or config.weighting_score not in STEP_DECAYS:
            raise UserError(f"vsknn: weighting must be one of {', '.join(POSITION_WEIGHTS)}, got '{config.weighting}' / '{config.weighting_score}'")
        if config.k < 1 or config.sample_size < 0:
            raise UserError(f"vsknn: k must be >= 1 and sample_size >= 0, got {config.k}, {config.sample_size}")
        self.config = config
        self.n_items = n_items
        self.index = index
        self.counts = np.asarray(counts, dtype=np.float64)
        self.fallback = popularity_fallback(self.counts)
        self.idf = index.idf()

    @classmethod
    def train(cls, data: PreparedData, config: VSKNNConfig | None = None, *, progress: bool = True, run_dir=None) -> "VSKNN":
        return cls(config or VSKNNConfig(), data.n_items, SessionIndex.from_sessions(data.train, data.n_items), item_counts(data.train, data.n_items))

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.index.arrays(), "counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: VSKNNConfig, n_items: int) -> "VSKNN":
        return cls(config, n_items, SessionIndex.from_arrays(arrays, n_items), arrays["counts"])

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        cfg = self.config
        q = Queries.build(histories, self.n_items)
        c = candidates(self.index, q, cfg.sample_size)
        weight = POSITION_WEIGHTS[cfg.weighting](q.last_pos.astype(np.float64), q.length[q.query].astype(np.float64))
        similarity = per_candidate_sum(c, weight) / np.maximum(q.n_distinct[c.query], 1)
        nb = top_neighbors(c, similarity, cfg.k)
        step = q.length[c.query[nb]] - per_candidate_max(c, q.last_pos.astype(np.float64))[nb] + 1
        vote = similarity[nb] * STEP_DECAYS[cfg.weighting_score](step)
        owner, flat = neighbor_items(self.index, c.session[nb])
        items = self.index.distinct_items[flat]
        weights = vote[owner] * (1.0 + cfg.idf_weighting * self.idf[items]) if cfg.idf_weighting else vote[owner]
        scores = dense_scores(q.n, self.n_items, c.query[nb][owner], items, weights)
        return fill_unscored(scores, self.fallback)
