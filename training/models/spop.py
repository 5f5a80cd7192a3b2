"""Session popularity (S-POP): items clicked more often in this session first, then global popularity.

score(i) = clicks on i in the session so far + supp_i / (1 + supp_i)
(session-rec ``SessionPop``), so repeats of the session win and global
popularity orders everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data import PreparedData
from training.models.items import ItemsModel, item_counts


@dataclass
class SPopConfig:
    """No settings: session click counts plus training click counts."""


class SessionPopular(ItemsModel):
    name = "spop"
    Config = SPopConfig

    def __init__(self, config: SPopConfig, n_items: int, counts: np.ndarray):
        self.config = config
        self.n_items = n_items
        self.counts = np.asarray(counts, dtype=np.float64)
        self.base = (self.counts / (1.0 + self.counts)).astype(np.float32)

    @classmethod
    def train(cls, data: PreparedData, config: SPopConfig | None = None, *, progress: bool = True, run_dir=None) -> "SessionPopular":
        return cls(config or SPopConfig(), data.n_items, item_counts(data.train, data.n_items))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: SPopConfig, n_items: int) -> "SessionPopular":
        return cls(config, n_items, arrays["counts"])

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if lengths.sum() else np.zeros(0, dtype=np.int64)
        rows = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
        width = self.n_items + 1
        session_counts = np.bincount(rows * width + flat, minlength=len(histories) * width).reshape(len(histories), width)
        return session_counts.astype(np.float32) + self.base
