"""Replay a prepared split as click events, and score what the worker answered (online HR/MRR).

Replay interleaves the split's sessions by click time (a stable sort, so a
session's clicks keep their order). Test items unseen in training are index 0
in prepared data; they are replayed as ``unknown-<event number>``, an id no
vocabulary holds.

Online scoring pairs each click with the list published after the previous
click of the same session (matched by the recommendation's ``position``) and
ranks the clicked item in it like the offline evaluation does (see
``stream.events.online_rank``). Clicks on items the model does not know are
skipped, as offline, when the bundle's vocabulary is given.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import orjson
from tqdm.auto import tqdm

from stream.events import PROBE_SESSION, BadEvent, click_value, online_rank, parse_click
from stream.settings import Settings
from stream.topics import consume_all, ensure_topics, producer
from streamrec.errors import UserError
from training.data import PreparedData
from training.sessions import Sessions


@dataclass
class ReplayEvent:
    session_id: str
    item_id: str
    timestamp: float


def replay_events(data: PreparedData, split: str, max_sessions: int | None = None) -> list[ReplayEvent]:
    """The split's clicks in time order (sessions interleaved), with original item ids."""
    sessions: Sessions = data.split(split)
    if max_sessions is not None:
        sessions = sessions.select(np.arange(len(sessions)) < max_sessions)
    order = np.argsort(sessions.times, kind="stable")
    session_of = sessions.session_index()
    item_ids = np.array([""] + data.vocab.item_ids, dtype=object)[sessions.items]
    unknown = np.flatnonzero(sessions.items == 0)
    item_ids[unknown] = [f"unknown-{i}" for i in unknown]
    sids = sessions.session_ids
    return [ReplayEvent(str(sids[session_of[i]]), str(item_ids[i]), float(sessions.times[i])) for i in order]


async def replay(settings: Settings, events: list[ReplayEvent], rate: float | None = None, speedup: float | None = None, progress: bool = True) -> dict:
    """Send ``events`` to the clicks topic; paced at ``rate`` events/s, or at ``speedup`` x real time, or flat out."""
    if rate is not None and speedup is not None:
        raise UserError("give --rate or --speedup, not both")
    if (rate is not None and rate <= 0) or (speedup is not None and speedup <= 0):
        raise UserError("--rate and --speedup must be positive")
    await ensure_topics(settings)
    p = producer(settings)
    await p.start()
    topic = settings.clicks_topic
    started = time.perf_counter()
    t0 = events[0].timestamp if events else 0.0
    try:
        for i, e in enumerate(tqdm(events, desc="replay", unit="event", disable=not progress, mininterval=0.5)):
            if rate is not None:
                due = i / rate
            elif speedup is not None:
                due = (e.timestamp - t0) / speedup
            else:
                due = None
            if due is not None:
                wait = due - (time.perf_counter() - started)
                if wait > 0.001:
                    await asyncio.sleep(wait)
            await p.send(topic, click_value(e.session_id, e.item_id, e.timestamp), key=e.session_id.encode("utf-8"))
        await p.flush()
    finally:
        await p.stop()
    seconds = time.perf_counter() - started
    return {"events": len(events), "seconds": seconds, "events_per_second": len(events) / seconds if seconds > 0 else 0.0}


@dataclass
class OnlineScore:
    ks: tuple[int, ...]
    hits: dict[int, int] = field(default_factory=dict)
    rr: dict[int, float] = field(default_factory=dict)
    evaluated: int = 0
    clicks: int = 0
    answered: int = 0
    unanswered: int = 0  # good clicks with no recommendation (still in flight, or lost)
    skipped_unknown: int = 0
    no_previous_list: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def metrics(self) -> dict:
        out: dict = {}
        n = self.evaluated
        for k in self.ks:
            out[f"HR@{k}"] = self.hits.get(k, 0) / n if n else 0.0
            out[f"MRR@{k}"] = self.rr.get(k, 0.0) / n if n else 0.0
        out.update(n_events=n, clicks=self.clicks, answered=self.answered, unanswered=self.unanswered, n_skipped=self.skipped_unknown)
        return out


def score_online(
    click_values: list[tuple[bytes | None, bytes]], recommendation_values: list[bytes], ks: tuple[int, ...] = (5, 10, 20), known_items: set[str] | None = None,
    ranks_out: list | None = None, experiment: str | None = None,
) -> OnlineScore:
    """HR@K/MRR@K of the published lists against the clicks that followed them.

    ``click_values``: (key, value) of the clicks topic in partition order;
    ``recommendation_values``: values of the recommendations topic.
    Readiness probes (session ``PROBE_SESSION``) are not user clicks and are left out.
    ``ranks_out``, if given, gets (session id, arm, rank) of every evaluated click: the arm the previous
    list names for ``experiment`` (None when it names none), for `streamrec experiment report`.
    """
    score = OnlineScore(tuple(sorted(ks)))
    clicks: dict[str, list[str]] = defaultdict(list)
    for key, value in click_values:
        c = parse_click(key, value)
        if isinstance(c, BadEvent) or c.session_id == PROBE_SESSION:
            continue
        clicks[c.session_id].append(c.item_id)
        score.clicks += 1
    lists: dict[tuple[str, int], tuple[list[str], np.ndarray, str | None]] = {}
    for value in recommendation_values:
        doc = orjson.loads(value)
        if doc["session_id"] == PROBE_SESSION:
            continue
        key = (doc["session_id"], int(doc["position"]))
        if key not in lists:  # at-least-once: a duplicate answer carries the same position
            arm = doc.get("arm") if experiment is not None and doc.get("experiment") == experiment else None
            lists[key] = (doc["items"], np.asarray(doc["scores"], dtype=np.float32), arm)
            score.latencies_ms.append(float(doc["latency_ms"]))
    score.answered = len(lists)
    for session_id, items in clicks.items():
        for position, item in enumerate(items, start=1):
            if (session_id, position) not in lists:
                score.unanswered += 1
            if position == 1:
                continue
            if known_items is not None and item not in known_items:
                score.skipped_unknown += 1
                continue
            previous = lists.get((session_id, position - 1))
            if previous is None:
                score.no_previous_list += 1
                continue
            listed, scores, arm = previous
            ids = np.array(listed, dtype=object)
            rank = online_rank(ids, scores, item)
            score.evaluated += 1
            if ranks_out is not None:
                ranks_out.append((session_id, arm, rank))
            for k in score.ks:
                if 0 < rank <= k:
                    score.hits[k] = score.hits.get(k, 0) + 1
                    score.rr[k] = score.rr.get(k, 0.0) + 1.0 / rank
    return score


async def read_and_score(settings: Settings, ks: tuple[int, ...], known_items: set[str] | None, expect_answers: int | None = None, idle: float = 2.0, timeout: float = 120.0) -> OnlineScore:
    """Read the clicks and recommendations topics from the start and score them."""
    topics = await consume_all(settings, [settings.clicks_topic, settings.recommendations_topic], expect={settings.recommendations_topic: expect_answers} if expect_answers else None, idle=idle, timeout=timeout)
    click_values = [(r.key, r.value) for r in topics[settings.clicks_topic]]
    return score_online(click_values, [r.value for r in topics[settings.recommendations_topic]], ks, known_items)
