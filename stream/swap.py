"""Hot model swap: a new bundle takes over a running worker without stopping the consumer.

``BundleWatcher`` polls ``--bundle`` every ``--bundle-poll-seconds`` (a Faust timer): the path with
symlinks resolved (deploy/build-bundle.sh switches a ``current`` symlink) and the manifest's
``model_version``. When either changes, the new bundle is loaded and verified (checksums by
``load_scorer``, k, one probe step) in a thread, off the event loop, and then swapped in on the
loop, between two micro-batches. A bundle that fails is refused with one log line, counted in
``streamrec_model_swap_failures_total``, not retried until it changes, and the old model keeps
serving.

Live sessions carry on. Every session state records the model and vocabulary it was made with
(``SessionState.model_tag`` / ``vocab_tag``); on a session's first click after a swap
``rebuild_states`` adapts it: item indices are remapped to the new vocabulary (when the old one is
known to this worker), the history is cut to the new model's ``history_len``, and for a ``hidden``
model the recent items kept in the state are replayed through the new scorer's ``step`` to rebuild
the hidden state. A session no longer than the kept window thus gets exactly the answers the new
model would have given it from its first click.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
from prometheus_client import Counter

from export.scorer import StepInput
from training.errors import UserError

log = logging.getLogger("streamrec.swap")


def model_tag(scorer) -> int:
    """32-bit tag of the model a state was made with (crc32 of its model_version)."""
    return zlib.crc32(str(scorer.manifest["model_version"]).encode())


def vocab_tag(item_ids) -> int:
    """32-bit tag of a vocabulary (the meaning of the item indices a state holds)."""
    return zlib.crc32("\n".join(map(str, item_ids)).encode())


def rebuild_states(states: list, scorer, new_model_tag: int, new_vocab_tag: int, old_vocabs: dict[int, np.ndarray]) -> None:
    """Adapt states made by another model to ``scorer``, in place (see the module docstring).

    ``old_vocabs``: vocab tag -> item ids (index i + 1 = item_ids[i]) of vocabularies this worker
    served before; the history of a state from an unknown other vocabulary cannot be read and is dropped.
    """
    keep = int(scorer.history_len)
    untagged = [s for s in states if s.model_tag == 0]  # built by hand (tests, tools): taken as the current model's
    for state in untagged:
        state.model_tag, state.vocab_tag = new_model_tag, new_vocab_tag
    states = [s for s in states if s.model_tag != new_model_tag]
    if not states:
        return
    for state in states:
        if state.vocab_tag != new_vocab_tag:
            old = old_vocabs.get(state.vocab_tag)
            if old is None:
                state.history = state.history[:0]
                state.top_items, state.top_scores = state.top_items[:0], state.top_scores[:0]
            else:
                history = scorer.vocab.encode(old[np.asarray(state.history, dtype=np.int64) - 1].tolist()) if len(state.history) else np.zeros(0, np.int64)
                state.history = history[history > 0].astype(np.int32)
                top = np.asarray(state.top_items, dtype=np.int64)
                state.top_items = (scorer.vocab.encode(old[top - 1].tolist()) if len(top) else top).astype(np.int32)  # 0 = not in the new vocabulary: never a hit
        state.history = state.history[-keep:] if keep else state.history[:0]
        state.model_tag, state.vocab_tag = new_model_tag, new_vocab_tag
    if scorer.kind == "hidden":
        _replay_hidden(states, scorer)


def _replay_hidden(states: list, scorer) -> None:
    """The GRU hidden state of every session after its kept items, all sessions in one batch per step."""
    hidden = np.zeros((len(states), scorer.hidden_size), dtype=np.float32)
    lengths = np.fromiter((len(s.history) for s in states), dtype=np.int64, count=len(states))
    if lengths.max(initial=0):
        items = np.zeros((len(states), int(lengths.max())), dtype=np.int64)
        for row, state in enumerate(states):
            items[row, : lengths[row]] = state.history
        for j in range(items.shape[1]):
            rows = np.flatnonzero(lengths > j)
            hidden[rows] = scorer.step(StepInput(items=items[rows, j], hidden=hidden[rows])).hidden
    for row, state in enumerate(states):
        state.hidden = hidden[row]


def bundle_identity(bundle: Path) -> tuple[str, str]:
    """(resolved path, manifest model_version or a marker of why it cannot be read): what the watcher compares."""
    resolved = os.path.realpath(bundle)
    try:
        with open(os.path.join(resolved, "manifest.json"), "rb") as f:
            version = str(json.loads(f.read()).get("model_version"))
    except (OSError, ValueError, AttributeError) as e:
        version = f"<unreadable: {type(e).__name__}>"
    return resolved, version


def load_verified(path: str, threads: int, k: int):
    """Load and check a bundle for serving (runs in a thread): checksums, k, one probe step."""
    from export.scorer import load_scorer

    scorer = load_scorer(path, threads=threads)
    if k > scorer.k:
        raise UserError(f"{path}: the bundle's k ({scorer.k}) is less than --k {k}")
    items, _ = scorer.popular()
    probe = scorer.step(StepInput(items=items[:1], hidden=None, history=[items[:1]]))
    if probe.top_items.shape[0] != 1 or not np.isfinite(probe.top_scores).all():
        raise UserError(f"{path}: the model's probe step gave no finite scores")
    return scorer


class BundleWatcher:
    """Watches a worker's ``--bundle`` and swaps a new one in between micro-batches."""

    def __init__(self, worker, bundle: Path):
        registry = worker.metrics.registry
        self.worker = worker
        self.bundle = Path(bundle)
        self.swaps = Counter("streamrec_model_swaps", "Bundles swapped in while serving.", registry=registry)
        self.failures = Counter("streamrec_model_swap_failures", "New bundles refused (checksum mismatch, unreadable, wrong k, ...); the old model kept serving.", registry=registry)
        self.serving = bundle_identity(self.bundle)
        self.refused: tuple[str, str] | None = None

    def install(self, app, seconds: float) -> None:
        """Poll every ``seconds`` (a Faust timer, so it runs on the worker's loop between batches)."""
        app.timer(seconds, name="streamrec.bundle-watch")(self.poll)

    async def poll(self) -> bool:
        """Swap when the bundle changed; True if a new model now serves."""
        seen = bundle_identity(self.bundle)
        if seen == self.serving or seen == self.refused:
            return False
        return await self.swap_to(seen)

    async def swap_to(self, seen: tuple[str, str]) -> bool:
        path, _ = seen
        settings = self.worker.settings
        old = self.worker.scorer
        try:
            scorer = await asyncio.get_running_loop().run_in_executor(None, load_verified, path, settings.scorer_threads, settings.k)
        except Exception as e:  # anything wrong with the new bundle: refuse it, keep serving
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            log.error("model swap refused: %s (still serving %s)", first_line, old.manifest["model_version"])
            self.failures.inc()
            self.refused = seen
            return False
        self.use(scorer)
        self.serving = seen
        log.warning("model swapped: %s -> %s (%s)", old.manifest["model_version"], scorer.manifest["model_version"], path)
        return True

    def use(self, scorer) -> None:
        """Serve ``scorer`` from the next micro-batch on (call on the worker's event loop)."""
        worker = self.worker
        old_processor, old = worker.processor, worker.scorer
        processor = worker.make_processor(scorer)
        processor.old_vocabs = {**old_processor.old_vocabs, old_processor.vocab_tag: old_processor.item_ids[1:]}
        processor.old_vocabs.pop(processor.vocab_tag, None)
        worker.scorer, worker.processor = scorer, processor
        info = worker.metrics.model_info
        info.remove(str(old.manifest["model"]), str(old.manifest["model_version"]), old.kind)
        info.labels(str(scorer.manifest["model"]), str(scorer.manifest["model_version"]), scorer.kind).set(1)
        self.swaps.inc()
