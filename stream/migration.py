"""State migration after a hot model swap: session states made by one model adapted to another (pure).

Every session state records the model and vocabulary it was made with (``SessionState.model_tag`` /
``vocab_tag``); on a session's first click after a swap (stream.swap) the processor
(stream/processor.py) calls ``rebuild_states``: item indices are remapped to the new vocabulary
(when the old one is known to this worker), the history is cut to the new model's ``history_len``,
and for a ``hidden`` model the recent items kept in the state are replayed through the new scorer's
``step`` to rebuild the hidden state. A session no longer than the kept window thus gets exactly the
answers the new model would have given it from its first click.

No Kafka, no I/O: numpy over the states and the scorer.
"""

from __future__ import annotations

import zlib

import numpy as np

from export.scorer import StepInput
from streamrec.contracts import Scorer


def model_tag(scorer: Scorer) -> int:
    """32-bit tag of the model a state was made with (crc32 of its model_version)."""
    return zlib.crc32(str(scorer.manifest["model_version"]).encode())


def vocab_tag(item_ids) -> int:
    """32-bit tag of a vocabulary (the meaning of the item indices a state holds)."""
    return zlib.crc32("\n".join(map(str, item_ids)).encode())


def rebuild_states(states: list, scorer: Scorer, new_model_tag: int, new_vocab_tag: int, old_vocabs: dict[int, np.ndarray]) -> None:
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


def _replay_hidden(states: list, scorer: Scorer) -> None:
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
