"""The prepared dataset on disk (DATA_DIR) and the frame-to-dataset step all readers share.

DATA_DIR layout:
  vocab.json     {"items": [original item id as str, ...]}  list position i -> model index i + 1
  train.npz      Sessions (see training/sessions.py)
  valid.npz      Sessions, optional (carved from train for early stopping)
  test.npz       Sessions; test items unseen in train have index 0
  item_features.npz  optional: per-item int64 arrays [n_items + 1] (row 0 = padding)
  stats.json     counts and provenance
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.errors import UserError
from training.sessions import Sessions


@dataclass
class Vocab:
    """Original item ids <-> model indices (0 = padding/unknown)."""

    item_ids: list[str]
    _index: dict[str, int] = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.item_ids = [str(i) for i in self.item_ids]
        self._index = {item: i + 1 for i, item in enumerate(self.item_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def index(self, item_id) -> int:
        """Model index of an original id, 0 if unknown."""
        return self._index.get(str(item_id), 0)

    def encode(self, item_ids) -> np.ndarray:
        get = self._index.get
        return np.fromiter((get(str(i), 0) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def decode(self, indices) -> list[str]:
        ids = self.item_ids
        return [ids[i - 1] if i > 0 else "" for i in indices]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"items": self.item_ids}))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: vocabulary file missing")
        try:
            return cls(json.loads(path.read_text())["items"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a streamrec vocabulary ({e})") from None


@dataclass
class PreparedData:
    """A prepared dataset: vocabulary plus train/valid/test sessions."""

    vocab: Vocab
    train: Sessions
    test: Sessions
    valid: Sessions | None = None
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    def split(self, name: str) -> Sessions:
        sessions = {"train": self.train, "test": self.test, "valid": self.valid}.get(name)
        if sessions is None:
            raise UserError(f"dataset has no '{name}' split (have: train, test{', valid' if self.valid is not None else ''})")
        return sessions

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.vocab.save(out / "vocab.json")
        self.train.save(out / "train.npz")
        self.test.save(out / "test.npz")
        if self.valid is not None:
            self.valid.save(out / "valid.npz")
        if self.item_features:
            np.savez_compressed(out / "item_features.npz", **self.item_features)
        stats = dict(self.stats)
        stats.update(describe(self))
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        self.path = out

    @classmethod
    def load(cls, path: str | Path) -> "PreparedData":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: no such data directory (make one with `streamrec data prepare` or `streamrec data synth`)")
        for name in ("vocab.json", "train.npz", "test.npz"):
            if not (path / name).is_file():
                raise UserError(f"{path}: not a prepared dataset ({name} missing)")
        valid = Sessions.load(path / "valid.npz") if (path / "valid.npz").is_file() else None
        feats = {}
        if (path / "item_features.npz").is_file():
            with np.load(path / "item_features.npz", allow_pickle=False) as z:
                feats = {k: z[k] for k in z.files}
        stats = json.loads((path / "stats.json").read_text()) if (path / "stats.json").is_file() else {}
        return cls(Vocab.load(path / "vocab.json"), Sessions.load(path / "train.npz"), Sessions.load(path / "test.npz"), valid, feats, stats, path)


def describe(data: PreparedData) -> dict:
    """Counts for stats.json."""
    out = {"n_items": data.n_items}
    for name in ("train", "valid", "test"):
        s = getattr(data, name)
        if s is None:
            continue
        out[name] = {
            "sessions": len(s),
            "events": int(s.n_events),
            "unknown_items": int((s.items == 0).sum()),
            "mean_length": float(s.lengths.mean()) if len(s) else 0.0,
        }
    return out


def sessions_from_frame(df: pd.DataFrame, vocab: Vocab, feature_columns: tuple[str, ...] = ()) -> Sessions:
    """Turn a frame with columns session_id, item_id, time (+ features) into Sessions.

    Rows are ordered by (first time of the session, session, time) with a stable
    sort, so events with equal times keep their file order.
    """
    if df.empty:
        return Sessions(np.array([], dtype=str), np.zeros(1, dtype=np.int64), np.array([], dtype=np.int64), np.array([], dtype=np.float64))
    df = df.reset_index(drop=True)
    df["_row"] = np.arange(len(df))
    df["_start"] = df.groupby("session_id", sort=False)["time"].transform("min")
    df = df.sort_values(["_start", "session_id", "time", "_row"], kind="stable")
    sid = df["session_id"].astype(str).to_numpy()
    change = np.r_[True, sid[1:] != sid[:-1]]
    starts = np.flatnonzero(change)
    offsets = np.r_[starts, len(df)].astype(np.int64)
    items = vocab.encode(df["item_id"].astype(str).tolist())
    feats = {c: df[c].to_numpy(dtype=np.int64) for c in feature_columns}
    return Sessions(sid[starts], offsets, items, df["time"].to_numpy(dtype=np.float64), feats)


def vocab_from_train(train_df: pd.DataFrame) -> Vocab:
    """Vocabulary of the training items, most popular first (ties by first appearance)."""
    counts = train_df["item_id"].astype(str).value_counts(sort=False)
    order = np.argsort(-counts.to_numpy(), kind="stable")
    return Vocab(counts.index.to_numpy()[order].tolist())
