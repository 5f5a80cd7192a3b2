"""Sequence and Time Aware Neighbourhood (STAN; Garg et al., SIGIR 2019; session-rec ``STAN``).

Session kNN with three exponential decays:
- lambda_spw: a click i positions before the end of a session of L clicks
  weighs exp((i - L) / lambda_spw) in the (cosine) similarity;
- lambda_snh: a neighbour that ended t seconds before the current event
  weighs exp(-t / (lambda_snh days));
- lambda_inh: a neighbour's item votes exp(-|p - p*| / lambda_inh), where p
  is its position in the neighbour and p* the neighbour's last position that
  holds an item of the current session.
All candidate sessions (the ``sample_size`` most recent sharing an item) are
compared; the ``k`` most similar vote. Items no neighbour contains follow in
popularity order.

The time decay needs no clock: scaling every neighbour of a query by the same
factor changes neither which neighbours win nor the ranking, so the age is
measured from the newest candidate of the query instead of the event time.
Serving and offline evaluation therefore rank identically without timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.models.items import fill_unscored
from training.models.neighbors import Candidates, Queries, SessionKNNModel, candidates, dense_scores, neighbor_items, per_candidate_sum, top_neighbors

DAY = 24 * 3600.0


@dataclass
class STANConfig:
    k: int = 100  # neighbours that vote
    sample_size: int = 5000  # most recent candidate sessions considered (0 = all)
    lambda_spw: float = 1.02  # position decay inside the current session (0 = off)
    lambda_snh: float = 5.0  # neighbour age decay, days (0 = off)
    lambda_inh: float = 2.05  # position decay inside the neighbour (0 = off)


class STAN(SessionKNNModel):
    name = "stan"
    Config = STANConfig

    def neighbor_weight(self, q: Queries, c: Candidates, nb: np.ndarray) -> np.ndarray:
        """Extra factor on each neighbour's vote (V-STAN adds one); 1 for STAN."""
        return np.ones(len(nb))

    def item_weight(self, items: np.ndarray) -> np.ndarray:
        """Extra factor per voted item (V-STAN's idf); 1 for STAN."""
        return np.ones(len(items))

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        cfg, index = self.config, self.index
        q = Queries.build(histories, self.n_items)
        c = candidates(index, q, cfg.sample_size)
        if cfg.lambda_spw:
            weight = np.exp((q.last_pos - q.length[q.query]) / cfg.lambda_spw)
        else:
            weight = np.ones(len(q.item))
        norm = np.sqrt(np.bincount(q.query, weights=weight**2, minlength=q.n))
        similarity = per_candidate_sum(c, weight) / (norm[c.query] * np.sqrt(index.n_distinct[c.session]))
        if cfg.lambda_snh and len(c.query):
            newest = np.full(q.n, -np.inf)
            np.maximum.at(newest, c.query, index.end_time[c.session])
            similarity *= np.exp(-(newest[c.query] - index.end_time[c.session]) / (cfg.lambda_snh * DAY))
        nb = top_neighbors(c, similarity, cfg.k)
        vote = similarity[nb] * self.neighbor_weight(q, c, nb)
        owner, flat = neighbor_items(index, c.session[nb])
        items = index.distinct_items[flat]
        weights = vote[owner] * self.item_weight(items)
        if cfg.lambda_inh:
            # p*: the neighbour's last position holding an item of the current session
            shared = q.lookup(c.query[nb][owner], items, self.n_items) >= 0
            p_star = np.zeros(len(nb))
            np.maximum.at(p_star, owner[shared], index.distinct_last_pos[flat[shared]])
            weights = weights * np.exp(-np.abs(index.distinct_last_pos[flat] - p_star[owner]) / cfg.lambda_inh)
        scores = dense_scores(q.n, self.n_items, c.query[nb][owner], items, weights)
        return fill_unscored(scores, self.fallback)
