"""The typed contracts between the packages: what export needs of a trained model, and what the stream needs of a scorer.

``training/`` implements ``ExportableModel`` (every model in ``training.models.MODELS``) and, per state
kind, the part of it export uses (``KIND_CONTRACTS``); ``export/`` implements ``Scorer`` (every class
in ``export.scorer.KINDS``) and relies on the model contracts; ``stream/`` relies on ``Scorer``.
Both sides import this module, which imports neither: the protocols are structural
(``typing.Protocol``), checked at run time where export branches on them, and by
``tests/test_contracts.py`` for every registered model and every scorer kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from export.scorer import StepInput, StepOutput
    from training.sessions import Sessions


@runtime_checkable
class ExportableModel(Protocol):
    """What `streamrec export` (export/exporter.py, export/parity.py) uses of every trained model."""

    name: str  # the registry name (training.models.MODELS)
    state_kind: str  # "hidden", "window", "graph" or "items": how it is served (KIND_CONTRACTS)
    n_items: int
    config: Any  # a dataclass, written into the manifest

    def score_next(self, sessions: Sessions, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, scores [b, n_items + 1]) batches: the parity check's reference."""
        ...

    def save(self, run_dir: Path) -> None: ...


@runtime_checkable
class HiddenStateModel(ExportableModel, Protocol):
    """State kind ``hidden`` (GRU4Rec): one ONNX step over (item, hidden state)."""

    hidden_size: int

    def export_module(self) -> Any:
        """The torch module exported to ONNX (export.onnx_export.export_step_model)."""
        ...


@runtime_checkable
class WindowStateModel(ExportableModel, Protocol):
    """State kinds ``window`` (exported to ONNX over the last ``history_len`` items) and ``graph`` (served by torch)."""

    history_len: int
    net_args: dict  # "event_features": event feature name -> cardinality, the ONNX model's extra inputs

    def export_module(self) -> Any: ...


@runtime_checkable
class ItemsStateModel(ExportableModel, Protocol):
    """State kind ``items`` (non-neural): numpy arrays in the bundle, scored from the history alone."""

    def arrays(self) -> dict[str, np.ndarray]:
        """What the bundle's model.npz holds."""
        ...

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: Any, n_items: int) -> ItemsStateModel:
        """The model again from ``arrays()`` (export.scorer.ItemsScorer)."""
        ...

    def score_histories(self, histories: list[np.ndarray]) -> np.ndarray:
        """Scores [B, n_items + 1] of the next item after each history."""
        ...


KIND_CONTRACTS: dict[str, type] = {"hidden": HiddenStateModel, "window": WindowStateModel, "graph": WindowStateModel, "items": ItemsStateModel}


@runtime_checkable
class Scorer(Protocol):
    """What the stream (stream/processor.py, stream/bundles.py, stream/migration.py, stream/swap.py) uses of a loaded bundle."""

    kind: str  # the bundle's state kind
    manifest: dict
    vocab: Any  # training.data.Vocab: item ids <-> model indices
    n_items: int
    k: int  # items per answer the bundle gives at most
    history_len: int  # recent items a session state keeps
    hidden_size: int  # the hidden state's width (kind "hidden"), else 0
    model: str
    model_version: str
    retrieval: dict  # {"mode": "exact"} or the ann settings
    ann: Any  # the ann index, None for exact retrieval
    features: dict  # event feature name -> cardinality the model reads (window models; else empty)

    def step(self, batch: StepInput, exclude_seen: bool = False) -> StepOutput:
        """One micro-batch round: the sessions' next hidden states (kind "hidden") and top-K answers."""
        ...

    def popular(self) -> tuple[np.ndarray, np.ndarray]:
        """(top items [K], scores [K]): the answer for a session with no known item."""
        ...
