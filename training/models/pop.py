"""Most popular: every session gets the items with the most training clicks.

The floor every other model must clear; also what the stream answers for
unknown items and empty sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.models.items import CountsModel


@dataclass
class PopConfig:
    """No settings: the ranking is fixed by the training click counts."""


class MostPopular(CountsModel):
    name = "pop"
    Config = PopConfig

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        row = self.counts.astype(np.float32)
        return np.broadcast_to(row, (len(histories), self.n_items + 1)).copy()
