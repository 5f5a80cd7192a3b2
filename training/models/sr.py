"""Sequential rules (SR; Ludewig & Jannach 2018; session-rec ``SequentialRules``).

A rule a -> b is counted whenever b follows a within ``steps`` clicks in a
training session, weighted by the distance d (div: 1 / d). The next item is
scored by the rules of the session's last item; each item keeps its
``pruning`` strongest rules. Items without a rule follow in popularity order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.items import DISTANCE_DECAYS, LastItemModel, csr_from_pairs, keep_top_per_row

@dataclass
class SRConfig:
    steps: int = 10  # longest distance between the two items of a rule
    weighting: str = "div"  # weight by distance d: same, div (1/d), linear, log, quadratic (1/d^2)
    pruning: int = 20  # rules kept per item, strongest first (0 keeps all)


class SequentialRules(LastItemModel):
    name = "sr"
    Config = SRConfig
    columns = ("successors", "weights")  # rule consequents of each antecedent item, rule weights

    @classmethod
    def item_table(cls, data: PreparedData, config: SRConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if config.steps < 1 or config.weighting not in DISTANCE_DECAYS:
            raise UserError(f"sr: steps must be >= 1 and weighting one of {', '.join(DISTANCE_DECAYS)}, got {config.steps}, '{config.weighting}'")
        train = data.train
        known = train.items > 0
        items, session = train.items[known], train.session_index()[known]
        rows, cols, vals = [], [], []
        for d in range(1, config.steps + 1):  # one vectorized pass per distance
            a = np.flatnonzero(session[:-d] == session[d:]) if len(items) > d else np.zeros(0, dtype=np.int64)
            rows.append(items[a])
            cols.append(items[a + d])
            vals.append(np.full(len(a), DISTANCE_DECAYS[config.weighting](np.float64(d))))
        indptr, succ, weights = csr_from_pairs(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), data.n_items + 1)
        return keep_top_per_row(indptr, succ, weights, config.pruning)
