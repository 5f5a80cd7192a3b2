"""Sessions as flat arrays (CSR layout), the one in-memory form of click logs.

Every reader produces it, every model trains on it and the evaluator walks it.
A session ``s`` is ``items[offsets[s]:offsets[s + 1]]``; item ``0`` means
"unknown / padding" and real items are ``1..n_items``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from streamrec.errors import UserError


@dataclass
class Sessions:
    """A set of sessions, each an ordered run of item indices with times."""

    session_ids: np.ndarray  # [S] str
    offsets: np.ndarray  # [S + 1] int64, offsets[0] == 0, offsets[-1] == len(items)
    items: np.ndarray  # [N] int64 model item indices, 0 = unknown
    times: np.ndarray  # [N] float64 unix seconds
    features: dict[str, np.ndarray] = field(default_factory=dict)  # per-event int64 [N]

    def __post_init__(self) -> None:
        self.session_ids = np.asarray(self.session_ids).astype(str)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        self.times = np.asarray(self.times, dtype=np.float64)
        if len(self.offsets) != len(self.session_ids) + 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.items):
            raise ValueError("Sessions: offsets do not match session_ids/items")
        if len(self.times) != len(self.items):
            raise ValueError("Sessions: times and items differ in length")

    def __len__(self) -> int:
        return len(self.session_ids)

    @property
    def n_events(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def session(self, s: int) -> np.ndarray:
        return self.items[self.offsets[s] : self.offsets[s + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for s in range(len(self)):
            yield self.session(s)

    def session_index(self) -> np.ndarray:
        """Session number of every event, [N]."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)

    def select(self, mask: np.ndarray) -> "Sessions":
        """The sessions where ``mask`` (over sessions) is true."""
        mask = np.asarray(mask, dtype=bool)
        ev = mask[self.session_index()]
        lengths = self.lengths[mask]
        return Sessions(
            self.session_ids[mask],
            np.concatenate([[0], np.cumsum(lengths)]),
            self.items[ev],
            self.times[ev],
            {k: v[ev] for k, v in self.features.items()},
        )

    @classmethod
    def from_lists(cls, sessions: list[list[int]], session_ids=None, times=None) -> "Sessions":
        """Build from Python lists (tests and small tools)."""
        lengths = [len(s) for s in sessions]
        items = np.array([i for s in sessions for i in s], dtype=np.int64)
        if times is None:
            times = np.arange(len(items), dtype=np.float64)
        if session_ids is None:
            session_ids = [str(i) for i in range(len(sessions))]
        return cls(np.asarray(session_ids), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), items, np.asarray(times, dtype=np.float64))

    def save(self, path: str | Path) -> None:
        arrays = {
            "session_ids": self.session_ids,
            "offsets": self.offsets,
            "items": self.items,
            "times": self.times,
        }
        arrays.update({f"feature_{k}": v for k, v in self.features.items()})
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Sessions":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such sessions file")
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = {k[len("feature_"):]: z[k] for k in z.files if k.startswith("feature_")}
                return cls(z["session_ids"], z["offsets"], z["items"], z["times"], feats)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"{path}: not a streamrec sessions file ({e})") from None
