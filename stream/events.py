"""What travels on the topics: click events in, recommendations and dead letters out.

Click (topic ``clicks``, key = session id as UTF-8):
    {"session_id": str, "item_id": str | int, "timestamp": float}
Recommendation (topic ``recommendations``, key = session id):
    {"schema": 1, "session_id", "items", "scores", "model", "model_version",
     "position", "event_timestamp", "published_at", "latency_ms"}
    + "experiment", "arm" (optional: only while the worker runs an A/B experiment, stream.experiment)
Dead letter (topic ``clicks-dlq``, key = the click's key):
    {"reason", "detail", "raw" (base64 of the value), "key" (base64 or null),
     "topic", "partition", "offset"}
"""

from __future__ import annotations

import base64
import math
from typing import NamedTuple

import numpy as np
import orjson

SCHEMA = 1
PROBE_SESSION = "streamrec-probe"  # the session of readiness probes (stream.process.wait_until_serving); scoring ignores it
MAX_SESSION_ID = 512  # characters

#: Every dead-letter reason (the ``reason`` label of streamrec_dead_letters_total).
REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_session_id",
    "bad_session_id",
    "missing_item_id",
    "bad_item_id",
    "missing_timestamp",
    "bad_timestamp",
    "key_mismatch",
    "too_large",
)


class Click(NamedTuple):
    session_id: str
    item_id: str
    timestamp: float


class BadEvent(NamedTuple):
    reason: str  # one of REASONS
    detail: str


def parse_click(key: bytes | None, value: bytes | None) -> Click | BadEvent:
    """A click, or why it is not one. The key must be the session id (the state lives on its partition)."""
    if value is None:
        return BadEvent("invalid_json", "empty message (no value)")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as u:
            return BadEvent("invalid_utf8", str(u))
        return BadEvent("invalid_json", str(e))
    if not isinstance(doc, dict):
        return BadEvent("not_an_object", f"JSON {type(doc).__name__}, expected an object")
    session_id = doc.get("session_id")
    if session_id is None:
        return BadEvent("missing_session_id", "no 'session_id'")
    if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_SESSION_ID:
        return BadEvent("bad_session_id", f"'session_id' must be a non-empty string of at most {MAX_SESSION_ID} characters")
    item_id = doc.get("item_id")
    if item_id is None:
        return BadEvent("missing_item_id", "no 'item_id'")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or item_id == "":
        return BadEvent("bad_item_id", "'item_id' must be a non-empty string or an integer")
    timestamp = doc.get("timestamp")
    if timestamp is None:
        return BadEvent("missing_timestamp", "no 'timestamp'")
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
        return BadEvent("bad_timestamp", "'timestamp' must be a finite number (unix seconds)")
    if key != session_id.encode("utf-8"):
        return BadEvent("key_mismatch", "the message key must be the session id (UTF-8)")
    return Click(session_id, str(item_id), float(timestamp))


def click_value(session_id: str, item_id: str | int, timestamp: float) -> bytes:
    return orjson.dumps({"session_id": session_id, "item_id": item_id, "timestamp": timestamp})


def dead_letter(bad: BadEvent, key: bytes | None, value: bytes | None, topic: str, partition: int, offset: int) -> bytes:
    return orjson.dumps(
        {
            "reason": bad.reason,
            "detail": bad.detail,
            "raw": base64.b64encode(value or b"").decode("ascii"),
            "key": base64.b64encode(key).decode("ascii") if key is not None else None,
            "topic": topic,
            "partition": partition,
            "offset": offset,
        }
    )


def recommendation(
    session_id: str, items: list[str], scores: np.ndarray, model: str, model_version: str, position: int, event_timestamp: float, published_at: float, latency_ms: float,
    experiment: str | None = None, arm: str | None = None,
) -> bytes:
    doc = {
        "schema": SCHEMA,
        "session_id": session_id,
        "items": items,
        "scores": scores,
        "model": model,
        "model_version": model_version,
        "position": position,
        "event_timestamp": event_timestamp,
        "published_at": published_at,
        "latency_ms": latency_ms,
    }
    if experiment is not None:  # optional fields: readers of schema 1 without experiments never see them
        doc["experiment"], doc["arm"] = experiment, arm
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def online_rank(top_items: np.ndarray, top_scores: np.ndarray, target: int) -> int:
    """1-based rank of ``target`` in a published list, 0 when it is not (provably) in it.

    Ties are ranked like the offline evaluation does (conservatively): the
    target comes after every listed item with an equal score. When the tie
    reaches the end of the list (two or more listed items share the last
    score), unlisted items may tie too, so the rank is beyond the list: 0.
    """
    where = np.flatnonzero(top_items == target)
    if len(where) == 0:
        return 0
    score = top_scores[where[0]]
    if not math.isfinite(float(score)):
        return 0
    at_least = np.flatnonzero(top_scores >= score)
    rank = int(at_least[-1]) + 1
    if rank == len(top_items) and np.count_nonzero(top_scores == score) > 1:
        return 0
    return rank
