"""Session popularity (S-POP): items clicked more often in this session first, then global popularity.

score(i) = clicks on i in the session so far + supp_i / (1 + supp_i)
(session-rec ``SessionPop``), so repeats of the session win and global
popularity orders everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from training.models.items import CountsModel, flatten_histories


@dataclass
class SPopConfig:
    """No settings: session click counts plus training click counts."""


class SessionPopular(CountsModel):
    name = "spop"
    Config = SPopConfig

    @cached_property
    def base(self) -> np.ndarray:
        """supp_i / (1 + supp_i), [n_items + 1] float32: below one session click, ordered by popularity."""
        return (self.counts / (1.0 + self.counts)).astype(np.float32)

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        _, rows, items = flatten_histories(histories)
        width = self.n_items + 1
        session_counts = np.bincount(rows * width + items, minlength=len(histories) * width).reshape(len(histories), width)
        return session_counts.astype(np.float32) + self.base
