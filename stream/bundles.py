"""Bundles as the worker sees them: loaded, checked for serving, and located.

- ``check_k``: the one check that a bundle answers ``--k`` items (the worker at start, each arm, a
  hot swap and every ``BatchProcessor`` make it, with one message).
- ``probe``: one step as large as a micro-batch, which must give finite scores (also the scorer's warm-up).
- ``load_verified``: load (checksums, by ``export.scorer.load_scorer``), ``check_k`` and ``probe``:
  what a hot swap runs in a thread before it serves a bundle (stream.swap).
- ``bundle_identity``: (resolved path, model_version), what the bundle watcher compares.
- ``bundle_root`` / ``inside_root``: ``--bundle-root``, and whether a path named by a
  model-updates message lies inside it (stream.model_updates).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from export.scorer import StepInput
from streamrec.contracts import Scorer
from streamrec.errors import UserError


def check_k(scorer: Scorer, k: int, path=None) -> None:
    """UserError unless the bundle (at ``path``, when given) answers at least ``k`` items."""
    if k > scorer.k:
        raise UserError(f"--k {k} is more than the bundle's k ({scorer.k}){f' of {path}' if path is not None else ''}; export the bundle with a larger --k")


def bundle_identity(bundle: Path) -> tuple[str, str]:
    """(resolved path, manifest model_version or a marker of why it cannot be read): what the watcher compares."""
    resolved = os.path.realpath(bundle)
    try:
        with open(os.path.join(resolved, "manifest.json"), "rb") as f:
            version = str(json.loads(f.read()).get("model_version"))
    except (OSError, ValueError, AttributeError) as e:
        version = f"<unreadable: {type(e).__name__}>"
    return resolved, version


def load_verified(path: str, threads: int, k: int, rows: int = 1) -> Scorer:
    """Load and check a bundle for serving (runs in a thread): checksums, k, one probe step of ``rows`` sessions."""
    from export.scorer import load_scorer

    scorer = load_scorer(path, threads=threads)
    check_k(scorer, k, path)
    probe(scorer, path, rows)
    return scorer


def probe(scorer: Scorer, path, rows: int) -> None:
    """Score ``rows`` new sessions at once; UserError unless every row gets finite scores.

    With ``rows`` = the largest micro-batch this is also the scorer's warm-up: ONNX Runtime's memory
    arena keeps what the largest batch so far needed (about 40 MB more for 256 rows than for 64 over
    20,000 items), so without it a worker's memory steps up whenever a backlog first brings a larger
    batch, and that batch pays for the allocation.
    """
    items, _ = scorer.popular()
    clicked = np.resize(items[:1], rows)
    try:
        out = scorer.step(StepInput(items=clicked, hidden=None, history=[clicked[:1]] * rows))
    except ValueError as e:  # e.g. a window model that wants event features, which the stream does not carry
        raise UserError(f"{path}: the model cannot score clicks: {e}") from None
    if out.top_items.shape[0] != rows or not np.isfinite(out.top_scores).all():
        raise UserError(f"{path}: the model's probe step gave no finite scores")


def bundle_root(setting: str, bundle: Path) -> str:
    """The resolved ``--bundle-root`` (``setting``, or the directory that holds ``bundle`` when empty); UserError if it is no directory."""
    root = setting or os.path.dirname(os.path.abspath(bundle))
    resolved = os.path.realpath(root)
    if not os.path.isdir(resolved):
        raise UserError(f"--bundle-root {root}: no such directory")
    return resolved


def inside_root(path: str, root: str) -> bool:
    """True when ``path``, resolved (symlinks, ``..``), lies strictly inside the resolved directory ``root``."""
    resolved = os.path.realpath(path)
    return resolved != root and os.path.commonpath([resolved, root]) == root
