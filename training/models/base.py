"""The small interface every model answers, neural or not.

- how it is trained:      ``Model.train(data, config, progress=...)`` (classmethod) -> model
- how it is evaluated:    ``model.score_next(sessions)`` yields (positions, scores) batches
- what state serving needs: ``Model.state_kind`` in {"hidden", "window", "graph", "items"}
- how it is saved:        ``model.save(run_dir)`` / ``Model.load(run_dir)``
- how it is exported:     see export/ (ONNX module for neural models, arrays for the rest)

Conventions: item 0 is padding/unknown, real items are 1..n_items, score
matrices have n_items + 1 columns (column 0 is ignored by everyone). An unknown
input item (0) leaves the session state unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from streamrec.errors import UserError
from training.data import PreparedData
from training.sessions import Sessions

STATE_KINDS = ("hidden", "window", "graph", "items")


class SessionModel:
    """Base class: subclasses set name, state_kind, Config and implement the methods."""

    name: ClassVar[str]
    state_kind: ClassVar[str]
    Config: ClassVar[type]

    config: Any
    n_items: int

    @classmethod
    def train(cls, data: PreparedData, config, *, progress: bool = True, run_dir: Path | None = None) -> "SessionModel":
        raise NotImplementedError

    def score_next(self, sessions: Sessions, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (positions [b], scores [b, n_items + 1] float32).

        ``positions`` are flat event indices p of ``sessions`` that have a next
        event in the same session; ``scores[j]`` ranks the next item given the
        session's items up to and including position ``positions[j]``.
        Every such position is yielded exactly once.
        """
        raise NotImplementedError

    def save(self, run_dir: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, run_dir: Path) -> "SessionModel":
        raise NotImplementedError


def next_positions(sessions: Sessions) -> np.ndarray:
    """Flat indices of every event that has a next event in its session."""
    last = np.zeros(sessions.n_events, dtype=bool)
    last[sessions.offsets[1:][sessions.lengths > 0] - 1] = True
    return np.flatnonzero(~last)


def config_from_options(config_cls: type, options: dict[str, str]) -> Any:
    """Build a config dataclass from string options (``--set key=value``), one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in fields:
            raise UserError(f"unknown setting '{key}' for {config_cls.__qualname__} (known: {', '.join(sorted(fields))})")
        kind = type(field_default(fields[key]))
        try:
            if kind is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                kwargs[key] = raw.lower() in ("1", "true", "yes")
            elif kind in (int, float, str):
                kwargs[key] = kind(raw)
            elif kind in (list, tuple):  # a JSON list; a lone JSON value is a list of one
                value = json.loads(raw)
                kwargs[key] = kind(value if isinstance(value, list) else [value])
            elif kind is dict:
                value = json.loads(raw)
                if not isinstance(value, dict):
                    raise ValueError(raw)
                kwargs[key] = value
            else:
                kwargs[key] = json.loads(raw)
        except ValueError:
            raise UserError(f"setting '{key}' wants a {kind.__name__}, got '{raw}'") from None
    return config_cls(**kwargs)


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value, made by its ``default_factory`` if it has one; "" when it has neither (read as a string)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return ""


def write_run_config(run_dir: Path, model: SessionModel, extra: dict | None = None) -> None:
    """config.json: which model, its config and catalogue size; read by load_run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"model": model.name, "state_kind": model.state_kind, "n_items": model.n_items, "config": dataclasses.asdict(model.config)}
    doc.update(extra or {})
    (run_dir / "config.json").write_text(json.dumps(doc, indent=2))
