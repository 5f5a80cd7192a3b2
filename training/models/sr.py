"""Sequential rules (SR; Ludewig & Jannach 2018; session-rec ``SequentialRules``).

A rule a -> b is counted whenever b follows a within ``steps`` clicks in a
training session, weighted by the distance d (div: 1 / d). The next item is
scored by the rules of the session's last item; each item keeps its
``pruning`` strongest rules. Items without a rule follow in popularity order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data import PreparedData
from training.errors import UserError
from training.models.items import ItemsModel, csr_from_pairs, csr_gather, fill_unscored, item_counts, keep_top_per_row, popularity_fallback

DISTANCE_WEIGHTS = {  # weight of a rule whose items are d clicks apart
    "same": lambda d: np.ones_like(d, dtype=np.float64),
    "div": lambda d: 1.0 / d,
    "linear": lambda d: np.where(d <= 100, 1.0 - 0.1 * d, 0.0),
    "log": lambda d: 1.0 / np.log10(d + 1.7),
    "quadratic": lambda d: 1.0 / (d * d),
}


@dataclass
class SRConfig:
    steps: int = 10  # longest distance between the two items of a rule
    weighting: str = "div"  # weight by distance d: same, div (1/d), linear, log, quadratic (1/d^2)
    pruning: int = 20  # rules kept per item, strongest first (0 keeps all)


class SequentialRules(ItemsModel):
    name = "sr"
    Config = SRConfig

    def __init__(self, config: SRConfig, n_items: int, counts: np.ndarray, indptr: np.ndarray, successors: np.ndarray, weights: np.ndarray):
        self.config = config
        self.n_items = n_items
        self.counts = np.asarray(counts, dtype=np.float64)
        self.indptr, self.successors, self.weights = indptr, successors, weights  # CSR rules, row = antecedent item
        self.fallback = popularity_fallback(self.counts)

    @classmethod
    def train(cls, data: PreparedData, config: SRConfig | None = None, *, progress: bool = True, run_dir=None) -> "SequentialRules":
        config = config or SRConfig()
        if config.steps < 1 or config.weighting not in DISTANCE_WEIGHTS:
            raise UserError(f"sr: steps must be >= 1 and weighting one of {', '.join(DISTANCE_WEIGHTS)}, got {config.steps}, '{config.weighting}'")
        train = data.train
        known = train.items > 0
        items, session = train.items[known], train.session_index()[known]
        rows, cols, vals = [], [], []
        for d in range(1, config.steps + 1):  # one vectorized pass per distance
            a = np.flatnonzero(session[:-d] == session[d:]) if len(items) > d else np.zeros(0, dtype=np.int64)
            rows.append(items[a])
            cols.append(items[a + d])
            vals.append(np.full(len(a), DISTANCE_WEIGHTS[config.weighting](np.float64(d))))
        indptr, succ, weights = csr_from_pairs(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), data.n_items + 1)
        indptr, succ, weights = keep_top_per_row(indptr, succ, weights, config.pruning)
        return cls(config, data.n_items, item_counts(train, data.n_items), indptr, succ, weights)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts, "indptr": self.indptr, "successors": self.successors, "weights": self.weights}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: SRConfig, n_items: int) -> "SequentialRules":
        return cls(config, n_items, arrays["counts"], arrays["indptr"], arrays["successors"], arrays["weights"])

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        last = np.fromiter((h[-1] if len(h) else 0 for h in histories), dtype=np.int64, count=len(histories))
        scores = np.zeros((len(histories), self.n_items + 1), dtype=np.float32)
        owner, flat = csr_gather(self.indptr, last)
        scores[owner, self.successors[flat]] = self.weights[flat]
        return fill_unscored(scores, self.fallback)
