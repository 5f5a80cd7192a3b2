"""Most popular: every session gets the items with the most training clicks.

The floor every other model must clear; also what the stream answers for
unknown items and empty sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data import PreparedData
from training.models.items import ItemsModel, item_counts


@dataclass
class PopConfig:
    """No settings: the ranking is fixed by the training click counts."""


class MostPopular(ItemsModel):
    name = "pop"
    Config = PopConfig

    def __init__(self, config: PopConfig, n_items: int, counts: np.ndarray):
        self.config = config
        self.n_items = n_items
        self.counts = np.asarray(counts, dtype=np.float64)

    @classmethod
    def train(cls, data: PreparedData, config: PopConfig | None = None, *, progress: bool = True, run_dir=None) -> "MostPopular":
        return cls(config or PopConfig(), data.n_items, item_counts(data.train, data.n_items))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: PopConfig, n_items: int) -> "MostPopular":
        return cls(config, n_items, arrays["counts"])

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        row = self.counts.astype(np.float32)
        return np.broadcast_to(row, (len(histories), self.n_items + 1)).copy()
