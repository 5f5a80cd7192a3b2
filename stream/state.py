"""A session's state as the worker keeps it in its Faust table: compact raw bytes.

Layout (little-endian), one value per session key:

    header   version u8, last_seen f64 (unix s), position u32, partition u16,
             n_hidden u16, n_history u16, n_top u16, offset i64,
             model_tag u32, vocab_tag u32  (37 bytes)
    hidden   float32 [n_hidden]   GRU hidden state (kind "hidden"), else empty
    history  int32   [n_history]  the session's recent known items, oldest first
    top      int32   [n_top]      the item indices last published to the session
    scores   float32 [n_top]      their scores (for the online accuracy ranks)

797 bytes for a 100-unit GRU keeping 50 recent items with K=20.

``model_tag`` / ``vocab_tag`` say which model and vocabulary made the state, so that a session
continues across a hot model swap (stream.swap rebuilds it for the new model on its next click).

``offset`` is the clicks-topic offset of the last click applied (-1: none). A click redelivered
after a crash or a rebalance (at-least-once) that the state already holds is recognised by it
and not applied twice (stream.processor).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

VERSION = 2
HEADER = struct.Struct("<BdIHHHHqII")
_EMPTY_F = np.zeros(0, dtype=np.float32)
_EMPTY_I = np.zeros(0, dtype=np.int32)


class StateError(ValueError):
    """Bytes that are not a session state of this version."""


@dataclass(slots=True)
class SessionState:
    last_seen: float = 0.0
    position: int = 0  # clicks answered so far
    partition: int = 0  # partition of the clicks topic (and of the changelog) the session lives on
    hidden: np.ndarray = field(default_factory=lambda: _EMPTY_F)
    history: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    top_items: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    top_scores: np.ndarray = field(default_factory=lambda: _EMPTY_F)
    offset: int = -1  # clicks-topic offset of the last click applied
    model_tag: int = 0  # stream.swap.model_tag of the model that made the state
    vocab_tag: int = 0  # stream.swap.vocab_tag of the vocabulary its item indices belong to

    def encode(self) -> bytes:
        hidden = np.ascontiguousarray(self.hidden, dtype="<f4")
        history = np.ascontiguousarray(self.history, dtype="<i4")
        top = np.ascontiguousarray(self.top_items, dtype="<i4")
        scores = np.ascontiguousarray(self.top_scores, dtype="<f4")
        if len(top) != len(scores):
            raise StateError("top_items and top_scores differ in length")
        header = HEADER.pack(VERSION, self.last_seen, self.position, self.partition, len(hidden), len(history), len(top), self.offset, self.model_tag, self.vocab_tag)
        return b"".join((header, hidden.tobytes(), history.tobytes(), top.tobytes(), scores.tobytes()))

    @classmethod
    def decode(cls, raw: bytes) -> "SessionState":
        if len(raw) < HEADER.size:
            raise StateError(f"session state of {len(raw)} bytes is shorter than its header")
        version, last_seen, position, partition, nh, nhist, ntop, offset, model_tag, vocab_tag = HEADER.unpack_from(raw)
        if version != VERSION:
            raise StateError(f"session state version {version}, this worker reads {VERSION}")
        expected = HEADER.size + 4 * (nh + nhist + 2 * ntop)
        if len(raw) != expected:
            raise StateError(f"session state is {len(raw)} bytes, its header says {expected}")
        o = HEADER.size
        hidden = np.frombuffer(raw, dtype="<f4", count=nh, offset=o)
        o += 4 * nh
        history = np.frombuffer(raw, dtype="<i4", count=nhist, offset=o)
        o += 4 * nhist
        top = np.frombuffer(raw, dtype="<i4", count=ntop, offset=o)
        o += 4 * ntop
        scores = np.frombuffer(raw, dtype="<f4", count=ntop, offset=o)
        return cls(last_seen, position, partition, hidden, history, top, scores, offset, model_tag, vocab_tag)


def last_seen_of(raw: bytes) -> tuple[float, int]:
    """(last_seen, partition) read from the header only: the expiry scan's fast path."""
    _, last_seen, _, partition, *_ = HEADER.unpack_from(raw)
    return last_seen, partition
