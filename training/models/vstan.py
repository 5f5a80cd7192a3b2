"""V-STAN (Ludewig et al., "Empirical analysis of session-based recommendation algorithms", UMUAI 2021).

STAN plus two ideas from V-SKNN (session-rec ``VSKNN_STAN``):
- lambda_ipw: a neighbour's vote decays with how far back in the current
  session its most recent shared click lies, exp((i - L) / lambda_ipw);
- lambda_idf: a voted item is boosted by its idf, vote * (1 + lambda_idf * idf).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.models.neighbors import Candidates, Queries, SessionIndex, per_candidate_max
from training.models.stan import STAN, STANConfig


@dataclass
class VSTANConfig(STANConfig):
    k: int = 500  # neighbours that vote
    lambda_ipw: float = 1.02  # decay by the position of the most recent shared click (0 = off)
    lambda_idf: float = 5.0  # idf boost of voted items (0 = off)


class VSTAN(STAN):
    name = "vstan"
    Config = VSTANConfig

    def __init__(self, config: VSTANConfig, n_items: int, index: SessionIndex, counts: np.ndarray):
        super().__init__(config, n_items, index, counts)
        self.idf = index.idf()

    def neighbor_weight(self, q: Queries, c: Candidates, nb: np.ndarray) -> np.ndarray:
        if not self.config.lambda_ipw:
            return np.ones(len(nb))
        last_shared = per_candidate_max(c, q.last_pos.astype(np.float64))[nb]
        return np.exp((last_shared - q.length[c.query[nb]]) / self.config.lambda_ipw)

    def item_weight(self, items: np.ndarray) -> np.ndarray:
        return 1.0 + self.config.lambda_idf * self.idf[items]
