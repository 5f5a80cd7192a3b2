"""ONNX export of the neural models, with the top-K selection inside the graph.

The model's ``export_module()`` computes full score rows [B, n_items + 1]; the
wrappers here cut column 0 (padding) off, take ``torch.topk`` of
``candidates = K + history_len`` items and return the first K as
``top_items`` / ``top_scores`` and all of them as ``candidate_items`` /
``candidate_scores`` (what ``exclude_seen`` filters). ONNX Runtime returns
only the outputs asked for, so the full score matrix never leaves the graph.

Graph interfaces (batch axis dynamic):
- hidden: inputs ``item_idx [B] int64``, ``hidden [B, H] float32``;
  outputs ``next_hidden [B, H]`` (ONNX forbids an output sharing an input's
  name), ``top_items [B, K] int64``, ``top_scores [B, K] float32``,
  ``candidate_items [B, C]``, ``candidate_scores [B, C]``.
- window: inputs ``window [B, L] int64`` (left-padded) and one ``[B, L] int64``
  input per feature, named after it; outputs ``top_items``, ``top_scores``,
  ``candidate_items``, ``candidate_scores``.

Exporter choices (torch 2.13): the dynamo exporter (``dynamo=True``) with
``external_data=False`` so the weights live inside ``model.onnx`` instead of a
``model.onnx.data`` side file; ``dynamic_shapes`` given as a tuple mirroring the
forward's arguments (the dict form is keyed by argument names; a ``*features``
argument is one nested tuple). The legacy TorchScript exporter
constant-folds ``embedding.weight.T`` into a second copy of the embedding (a
file twice the parameter size); ``check_size`` refuses any file much larger
than the parameters, whichever exporter made it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

STEP_INPUTS = ("item_idx", "hidden")
STEP_OUTPUTS = ("next_hidden", "top_items", "top_scores", "candidate_items", "candidate_scores")
WINDOW_OUTPUTS = ("top_items", "top_scores", "candidate_items", "candidate_scores")


class TopK(nn.Module):
    """Wraps a scoring module; ``select`` turns score rows into (top K, top C candidates), padding column cut off."""

    def __init__(self, module: nn.Module, k: int, candidates: int):
        super().__init__()
        self.module, self.k, self.candidates = module, k, candidates

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        values, indices = torch.topk(scores[:, 1:], self.candidates, dim=1)
        indices = indices + 1
        return indices[:, : self.k], values[:, : self.k], indices, values


class StepTopK(TopK):
    """hidden kind: (item_idx, hidden) -> (next_hidden, top K, top C candidates)."""

    def forward(self, item_idx: torch.Tensor, hidden: torch.Tensor):
        next_hidden, scores = self.module(item_idx, hidden)
        return next_hidden, *self.select(scores)


class WindowTopK(TopK):
    """window kind: (window, *features) -> (top K, top C candidates)."""

    def forward(self, window: torch.Tensor, *features: torch.Tensor):
        return self.select(self.module(window, *features))


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of distinct parameters and buffers (tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


BATCH = torch.export.Dim("batch", min=1, max=1 << 20)


def export_onnx(wrapper: nn.Module, example_args: tuple, dynamic_shapes: tuple, input_names: list[str], output_names: list[str], path: Path) -> None:
    """Export ``wrapper`` to one self-contained ``path``; ``dynamic_shapes`` mirrors ``example_args``."""
    wrapper = wrapper.eval()
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            example_args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    check_size(path, parameter_bytes(wrapper))


def check_size(path: Path, param_bytes: int) -> None:
    """Refuse an ONNX file that duplicated weights (e.g. a constant-folded transpose) or left them outside."""
    side = Path(str(path) + ".data")
    if side.exists():
        raise RuntimeError(f"ONNX export wrote external data {side.name}; the bundle wants one self-contained file")
    size = path.stat().st_size
    if size > 1.1 * param_bytes + (1 << 20):
        raise RuntimeError(f"{path.name} is {size / 1e6:.1f} MB for {param_bytes / 1e6:.1f} MB of parameters: the exporter duplicated weights")


def export_step_model(module: nn.Module, hidden_size: int, k: int, candidates: int, path: Path) -> None:
    """hidden kind (GRU4Rec): ``module(item_idx [B], hidden [B, H]) -> (hidden, scores)``."""
    example = (torch.ones(2, dtype=torch.int64), torch.zeros(2, hidden_size))
    export_onnx(StepTopK(module, k, candidates), example, ({0: BATCH}, {0: BATCH}), list(STEP_INPUTS), list(STEP_OUTPUTS), path)


def export_window_model(module: nn.Module, window_len: int, features: list[str], k: int, candidates: int, path: Path) -> None:
    """window kind: ``module(window [B, L], *features [B, L]) -> scores``."""
    window = torch.zeros(2, window_len, dtype=torch.int64)
    window[:, -2:] = 1
    feats = tuple(torch.zeros(2, window_len, dtype=torch.int64) for _ in features)
    shapes = ({0: BATCH}, tuple({0: BATCH} for _ in features)) if features else ({0: BATCH},)  # *features is one nested tuple
    export_onnx(WindowTopK(module, k, candidates), (window, *feats), shapes, ["window", *features], list(WINDOW_OUTPUTS), path)


def export_step_query_model(module: nn.Module, hidden_size: int, path: Path) -> None:
    """hidden kind, ann retrieval: ``module(item_idx, hidden) -> (next_hidden, query [B, D])``; no catalogue product in the graph."""
    example = (torch.ones(2, dtype=torch.int64), torch.zeros(2, hidden_size))
    export_onnx(module, example, ({0: BATCH}, {0: BATCH}), list(STEP_INPUTS), ["next_hidden", "query"], path)


def export_window_query_model(module: nn.Module, window_len: int, features: list[str], path: Path) -> None:
    """window kind, ann retrieval: ``module(window, *features) -> query [B, D]``."""
    window = torch.zeros(2, window_len, dtype=torch.int64)
    window[:, -2:] = 1
    feats = tuple(torch.zeros(2, window_len, dtype=torch.int64) for _ in features)
    shapes = ({0: BATCH}, tuple({0: BATCH} for _ in features)) if features else ({0: BATCH},)
    export_onnx(module, (window, *feats), shapes, ["window", *features], ["query"], path)
