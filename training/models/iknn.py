"""Item kNN (IKNN; the item-to-item baseline of Hidasi et al. 2016; session-rec ``ItemKNN``).

Two items are similar when they occur in the same training sessions:
sim(i, j) = cooc(i, j) / ((supp_i + lambda)^alpha * (supp_j + lambda)^(1 - alpha)),
where cooc counts pairs of clicks in a session and supp counts clicks
(alpha = 0.5 is cosine; lambda damps rare items). The next item is scored by
the ``n_sims`` most similar items of the session's last item; the rest
follows in popularity order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data import PreparedData
from training.models.items import LastItemModel, csr_from_pairs, csr_gather, item_counts, keep_top_per_row


@dataclass
class IKNNConfig:
    n_sims: int = 100  # neighbours kept per item
    lmbd: float = 20.0  # regularisation of the supports
    alpha: float = 0.5  # 0.5 = cosine, 1.0 = confidence


class ItemKNN(LastItemModel):
    name = "iknn"
    Config = IKNNConfig
    columns = ("neighbors", "similarity")  # most similar items of each item, their similarity

    @classmethod
    def item_table(cls, data: PreparedData, config: IKNNConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = data.n_items
        train = data.train
        known = train.items > 0
        # clicks per (session, item), then every pair of distinct items within a session
        key = train.session_index()[known] * (n + 1) + train.items[known]
        uniq, count = np.unique(key, return_counts=True)
        session, item = uniq // (n + 1), uniq % (n + 1)
        indptr = np.zeros(int(session.max(initial=-1)) + 2, dtype=np.int64)
        np.cumsum(np.bincount(session, minlength=len(indptr) - 1), out=indptr[1:])
        owner, partner = csr_gather(indptr, session)
        rows, cols, vals = item[owner], item[partner], (count[owner] * count[partner]).astype(np.float64)
        off_diagonal = rows != cols
        indptr, nb, cooc = csr_from_pairs(rows[off_diagonal], cols[off_diagonal], vals[off_diagonal], n + 1)
        supp = item_counts(train, n)
        row = np.repeat(np.arange(n + 1), np.diff(indptr))
        sim = cooc / ((supp[row] + config.lmbd) ** config.alpha * (supp[nb] + config.lmbd) ** (1.0 - config.alpha))
        return keep_top_per_row(indptr, nb, sim, config.n_sims)
