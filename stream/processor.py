"""One micro-batch of click records in, recommendations, dead letters and new session states out.

Plain Python over numpy, no Kafka: the Faust agent (stream/worker.py) feeds it
whatever records have arrived and writes back what it returns.

Order within a session is kept by splitting the batch into rounds: round r
holds every session's r-th event of the batch, so a session appears at most
once per scorer call and its events are applied in arrival order.

Redelivered clicks (at-least-once: after a crash or a rebalance the consumer
resumes from the last committed offset) whose offset the session's state
already holds are skipped, not applied twice: the worker writes a state to the
changelog only once the answers it counts are published, so they were answered.
Events larger than ``max_event_bytes`` (key + value) are dead-lettered as
``too_large`` unparsed, keeping only their first ``max_event_bytes`` bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from export.scorer import StepInput
from stream.bundles import check_k
from stream.events import BadEvent, dead_letter, online_rank, parse_click, recommendation
from stream.migration import model_tag, rebuild_states, vocab_tag
from stream.state import SessionState, arm_tag
from streamrec.contracts import Scorer


class Record(NamedTuple):
    """A consumed Kafka record."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: float  # record timestamp (producer CreateTime), unix seconds


@dataclass
class BatchResult:
    recommendations: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value), in input order
    dead_letters: list[tuple[bytes | None, bytes, str]] = field(default_factory=list)  # (key, value, reason)
    states: dict[bytes, SessionState] = field(default_factory=dict)  # final state of every session touched
    latencies: list[float] = field(default_factory=list)  # seconds, record timestamp -> publish, per answer
    unknown_items: int = 0
    online_evaluated: int = 0
    online_ranks: list[int] = field(default_factory=list)  # rank of every evaluated click, 0 = not in the list
    inference_seconds: float = 0.0
    redelivered: int = 0  # clicks skipped because their session's state already holds them
    arm_ranks: dict[str, list[int]] = field(default_factory=dict)  # online_ranks by A/B arm (stream.experiment), empty without one
    answer_partitions: list[int] = field(default_factory=list)  # the clicks partition of each recommendation's click
    dead_letter_partitions: list[int] = field(default_factory=list)  # the clicks partition of each dead letter's event


class _Pending(NamedTuple):
    index: int  # position among the batch's good events
    record: Record
    session_id: str
    item: int  # model index, 0 = unknown
    timestamp: float


class BatchProcessor:
    """Scores micro-batches with a Scorer; keeps no state of its own between batches."""

    def __init__(self, scorer: Scorer, k: int, exclude_seen: bool = False, clock: Callable[[], float] | None = None, max_event_bytes: int | None = None, experiment: str | None = None, arm: str | None = None):
        check_k(scorer, k)
        self.scorer = scorer
        self.k = k
        self.exclude_seen = exclude_seen
        self.clock = clock or time.time
        self.max_event_bytes = max_event_bytes
        # An A/B arm's processor (stream.experiment) names its arm in every answer and records it in every state it writes.
        self.experiment, self.arm = experiment, arm
        self.arm_tag = arm_tag(arm) if arm is not None else 0
        self.history_len = int(scorer.history_len)
        self.hidden_size = int(scorer.hidden_size) if scorer.kind == "hidden" else 0
        self.model = str(scorer.manifest["model"])
        self.model_version = str(scorer.manifest["model_version"])
        self.model_tag, self.vocab_tag = model_tag(scorer), vocab_tag(scorer.vocab.item_ids)
        self.old_vocabs: dict[int, np.ndarray] = {}  # vocab tag -> item ids of models served before a hot swap (stream.migration)
        self.item_ids = np.array([""] + list(scorer.vocab.item_ids), dtype=object)
        self.index = scorer.vocab.index
        pop_items, pop_scores = scorer.popular()
        self.popular_items = np.asarray(pop_items[:k], dtype=np.int64)
        self.popular_scores = np.asarray(pop_scores[:k], dtype=np.float32)
        self.popular_ids = self.item_ids[self.popular_items].tolist()

    def new_state(self, partition: int) -> SessionState:
        return SessionState(partition=partition, hidden=np.zeros(self.hidden_size, dtype=np.float32), model_tag=self.model_tag, vocab_tag=self.vocab_tag)

    def process(self, records: list[Record], load_state: Callable[[bytes], SessionState | None]) -> BatchResult:
        """Answer every good record in order; ``load_state(key)`` gives a session's stored state or None."""
        out = BatchResult()
        pending: list[_Pending] = []
        states = out.states
        loaded: dict[bytes, SessionState] = {}
        limit = self.max_event_bytes
        for r in records:
            size = len(r.key or b"") + len(r.value or b"")
            if limit is not None and size > limit:
                key = r.key[:limit] if r.key is not None else None
                bad = BadEvent("too_large", f"{size} bytes (key + value), more than --max-event-bytes {limit}; 'key' and 'raw' hold the first {limit} bytes")
                out.dead_letters.append((key, dead_letter(bad, key, (r.value or b"")[:limit], r.topic, r.partition, r.offset), bad.reason))
                out.dead_letter_partitions.append(r.partition)
                continue
            click = parse_click(r.key, r.value)
            if isinstance(click, BadEvent):
                out.dead_letters.append((r.key, dead_letter(click, r.key, r.value, r.topic, r.partition, r.offset), click.reason))
                out.dead_letter_partitions.append(r.partition)
                continue
            state = loaded.get(r.key)
            if state is None:
                state = load_state(r.key)
                loaded[r.key] = state = state if state is not None else self.new_state(r.partition)
            if r.offset <= state.offset and r.partition == state.partition:
                out.redelivered += 1
                continue
            states[r.key] = state
            pending.append(_Pending(len(pending), r, click.session_id, self.index(click.item_id), click.timestamp))

        stale = [s for s in states.values() if s.model_tag != self.model_tag]
        if stale:  # made by the model served before a hot swap: rebuilt for this one (stream.migration)
            rebuild_states(stale, self.scorer, self.model_tag, self.vocab_tag, self.old_vocabs)

        rounds: list[list[_Pending]] = []
        count: dict[bytes, int] = {}
        for p in pending:
            key = p.record.key
            n = count.get(key, 0)
            count[key] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(p)

        answers: list[tuple[np.ndarray, np.ndarray, SessionState]] = [None] * len(pending)  # type: ignore[list-item]
        for rnd in rounds:
            self._round(rnd, states, answers, out)

        published_at = self.clock()
        ids = self.item_ids
        for p, (top, scores, state) in zip(pending, answers):
            state.position += 1  # events of a session come in order, so this is the click's number in it
            state.offset = p.record.offset
            if self.arm_tag:
                state.arm_tag = self.arm_tag
            items = self.popular_ids if top is self.popular_items else ids[top].tolist()
            latency = published_at - p.record.timestamp
            out.latencies.append(latency)
            value = recommendation(p.session_id, items, scores, self.model, self.model_version, state.position, p.timestamp, published_at, round(latency * 1000.0, 3), self.experiment, self.arm)
            out.recommendations.append((p.record.key, value))
            out.answer_partitions.append(p.record.partition)
        if self.arm is not None:
            out.arm_ranks[self.arm] = out.online_ranks
        return out

    def _round(self, rnd: list[_Pending], states: dict[bytes, SessionState], answers: list, out: BatchResult) -> None:
        now = self.clock()
        known = [p for p in rnd if p.item > 0]
        for p in rnd:
            state = states[p.record.key]
            if p.item > 0 and len(state.top_items):
                out.online_evaluated += 1
                out.online_ranks.append(online_rank(state.top_items, state.top_scores, p.item))
            state.last_seen = now
            state.partition = p.record.partition
            if p.item == 0:
                out.unknown_items += 1
                answers[p.index] = (self.popular_items, self.popular_scores, state)
                state.top_items, state.top_scores = self.popular_items, self.popular_scores
        if not known:
            return
        items = np.fromiter((p.item for p in known), dtype=np.int64, count=len(known))
        known_states = [states[p.record.key] for p in known]
        histories = [np.append(s.history, p.item).astype(np.int64) for s, p in zip(known_states, known)]
        hidden = np.stack([s.hidden for s in known_states]) if self.hidden_size else None
        started = time.perf_counter()
        result = self.scorer.step(StepInput(items=items, hidden=hidden, history=histories), exclude_seen=self.exclude_seen)
        out.inference_seconds += time.perf_counter() - started
        top_items = np.asarray(result.top_items[:, : self.k], dtype=np.int64)
        top_scores = np.asarray(result.top_scores[:, : self.k], dtype=np.float32)
        keep = self.history_len
        for row, (p, state, history) in enumerate(zip(known, known_states, histories)):
            if self.hidden_size:
                state.hidden = result.hidden[row]
            state.history = history[-keep:] if keep else history[:0]
            state.top_items, state.top_scores = top_items[row], top_scores[row]
            answers[p.index] = (top_items[row], top_scores[row], state)
