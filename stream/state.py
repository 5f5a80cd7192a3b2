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

Version 3 (written only for a session in an A/B experiment, stream.experiment) adds ``arm_tag u32``
after ``vocab_tag`` (41-byte header): the arm the session was assigned to, kept so that a restart,
a rebalance, a hot swap or new arm weights never move it. Without an experiment the worker writes
version 2 exactly as before; both versions are read.

``model_tag`` / ``vocab_tag`` say which model and vocabulary made the state, so that a session
continues across a hot model swap (stream.migration rebuilds it for the new model on its next click).

``offset`` is the clicks-topic offset of the last click applied (-1: none). A click redelivered
after a crash or a rebalance (at-least-once) that the state already holds is recognised by it
and not applied twice (stream.processor).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

VERSION = 2  # written without an arm
ARM_VERSION = 3  # written with an arm (stream.experiment)
HEADER = struct.Struct("<BdIHHHHqII")
ARM_HEADER = struct.Struct("<BdIHHHHqIII")
_EMPTY_F = np.zeros(0, dtype=np.float32)
_EMPTY_I = np.zeros(0, dtype=np.int32)


def arm_tag(arm: str) -> int:
    """32-bit tag of an A/B arm name, as the state records it (crc32; never 0, which means no arm)."""
    return zlib.crc32(arm.encode()) or 1


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
    model_tag: int = 0  # stream.migration.model_tag of the model that made the state
    vocab_tag: int = 0  # stream.migration.vocab_tag of the vocabulary its item indices belong to
    arm_tag: int = 0  # stream.experiment.arm_tag of the session's A/B arm, 0 = none

    def encode(self) -> bytes:
        hidden = np.ascontiguousarray(self.hidden, dtype="<f4")
        history = np.ascontiguousarray(self.history, dtype="<i4")
        top = np.ascontiguousarray(self.top_items, dtype="<i4")
        scores = np.ascontiguousarray(self.top_scores, dtype="<f4")
        if len(top) != len(scores):
            raise StateError("top_items and top_scores differ in length")
        fields = (self.last_seen, self.position, self.partition, len(hidden), len(history), len(top), self.offset, self.model_tag, self.vocab_tag)
        header = ARM_HEADER.pack(ARM_VERSION, *fields, self.arm_tag) if self.arm_tag else HEADER.pack(VERSION, *fields)
        return b"".join((header, hidden.tobytes(), history.tobytes(), top.tobytes(), scores.tobytes()))

    @classmethod
    def decode(cls, raw: bytes) -> "SessionState":
        if len(raw) < HEADER.size:
            raise StateError(f"session state of {len(raw)} bytes is shorter than its header")
        version = raw[0]
        if version == VERSION:
            header, arm_tag = HEADER, 0
            _, last_seen, position, partition, nh, nhist, ntop, offset, model_tag, vocab_tag = HEADER.unpack_from(raw)
        elif version == ARM_VERSION and len(raw) >= ARM_HEADER.size:
            header = ARM_HEADER
            _, last_seen, position, partition, nh, nhist, ntop, offset, model_tag, vocab_tag, arm_tag = ARM_HEADER.unpack_from(raw)
        else:
            raise StateError(f"session state version {version} ({len(raw)} bytes), this worker reads {VERSION} and {ARM_VERSION}")
        expected = header.size + 4 * (nh + nhist + 2 * ntop)
        if len(raw) != expected:
            raise StateError(f"session state is {len(raw)} bytes, its header says {expected}")
        o = header.size
        hidden = np.frombuffer(raw, dtype="<f4", count=nh, offset=o)
        o += 4 * nh
        history = np.frombuffer(raw, dtype="<i4", count=nhist, offset=o)
        o += 4 * nhist
        top = np.frombuffer(raw, dtype="<i4", count=ntop, offset=o)
        o += 4 * ntop
        scores = np.frombuffer(raw, dtype="<f4", count=ntop, offset=o)
        return cls(last_seen, position, partition, hidden, history, top, scores, offset, model_tag, vocab_tag, arm_tag)


def last_seen_of(raw: bytes) -> tuple[float, int]:
    """(last_seen, partition) read from the header only (the same place in versions 2 and 3): the expiry scan's fast path."""
    _, last_seen, _, partition, *_ = HEADER.unpack_from(raw)
    return last_seen, partition
