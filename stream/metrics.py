"""The worker's Prometheus metrics: exactly the names of docs/architecture.md's table.

prometheus_client appends ``_total`` to counter names itself, so counters are
declared without it. Each worker has its own registry, served on
``--metrics-host``:``--metrics-port``.

Under an A/B experiment (``arms``) the online accuracy metrics and ``streamrec_model_info`` carry
an ``arm`` label as well: the same names, one series per arm, so that a dashboard's
``sum by (arm)`` works with and without an experiment.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream.events import REASONS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ONLINE_KS = (1, 5, 10, 20, 50, 100)
MODEL_UPDATE_OUTCOMES = ("swapped", "unchanged", "refused", "outside_root", "invalid")  # see stream.model_updates.ModelUpdates


class StreamMetrics:
    def __init__(self, ks: tuple[int, ...], registry: CollectorRegistry | None = None, arms: tuple[str, ...] = ()):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ks = tuple(sorted(set(ks)))
        self.arms = tuple(arms)
        arm = ["arm"] if arms else []
        self.events = Counter("streamrec_events", "Click events processed, by outcome: each published exactly one answer or one dead letter. Redeliveries skipped are not counted here.", ["outcome"], registry=r)
        self.redelivered = Counter("streamrec_redelivered_events", "Click events consumed again (after a crash or rebalance) that their session's state already holds: skipped, nothing published.", registry=r)
        self.unknown_items = Counter("streamrec_unknown_items", "Clicks on items the model does not know (answered by popularity).", registry=r)
        self.dead_letters = Counter("streamrec_dead_letters", "Events sent to the dead-letter topic, by reason.", ["reason"], registry=r)
        self.recommendations = Counter("streamrec_recommendations", "Recommendations published.", registry=r)
        self.inference = Histogram("streamrec_inference_seconds", "Scorer time per micro-batch.", buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end = Histogram("streamrec_end_to_end_seconds", "Click record timestamp to recommendation publish.", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("streamrec_batch_size", "Events per micro-batch.", buckets=BATCH_BUCKETS, registry=r)
        self.active_sessions = Gauge("streamrec_active_sessions", "Sessions with state on this worker.", registry=r)
        self.recovered_records = Counter("streamrec_changelog_records_recovered", "Session changelog records read by Faust's table recovery (a takeover, a restart, a standby): with --store rocksdb only the changelog's tail after the offset the local store holds.", registry=r)
        self.expired_sessions = Counter("streamrec_expired_sessions", "Sessions removed after --session-ttl without clicks.", registry=r)
        self.transactions = Counter("streamrec_transactions", "Kafka transactions committed under --processing-guarantee exactly_once (one per clicks partition per micro-batch, and per expiry round).", registry=r)
        self.model_info = Gauge("streamrec_model_info", "The served model (value 1).", ["model", "version", "state_kind"] + arm, registry=r)
        self.online_hits = Counter("streamrec_online_hits", "Clicks that were in the list published after the session's previous click, by cut-off.", arm + ["k"], registry=r)
        self.online_rr = Counter("streamrec_online_reciprocal_rank", "Sum of 1/rank of those clicks (0 beyond the cut-off), by cut-off.", arm + ["k"], registry=r)
        self.online_evaluated = Counter("streamrec_online_evaluated", "Clicks on known items that followed a published list.", arm, registry=r)
        self.online_hit_rate = Gauge("streamrec_online_hit_rate", "Online HR@k so far.", arm + ["k"], registry=r)
        self.online_mrr = Gauge("streamrec_online_mrr", "Online MRR@k so far.", arm + ["k"], registry=r)
        self.last_progress = Gauge("streamrec_last_progress_timestamp_seconds", "When the worker last finished a micro-batch.", registry=r)
        self.model_swaps = Counter("streamrec_model_swaps", "Bundles swapped in while serving.", registry=r)
        self.model_swap_failures = Counter("streamrec_model_swap_failures", "New bundles refused (checksum mismatch, unreadable, wrong k, ...); the old model kept serving.", registry=r)
        self.model_updates = Counter("streamrec_model_updates", "Messages read from --model-updates-topic, by outcome.", ["outcome"], registry=r)
        for outcome in ("answered", "dead_lettered"):
            self.events.labels(outcome)
        for reason in REASONS:
            self.dead_letters.labels(reason)
        for outcome in MODEL_UPDATE_OUTCOMES:
            self.model_updates.labels(outcome)
        groups = [(a,) for a in self.arms] or [()]  # the label values before k: one arm each, or none
        self._hits = {(g, k): 0 for g in groups for k in self.ks}
        self._rr = {(g, k): 0.0 for g in groups for k in self.ks}
        self._evaluated = {g: 0 for g in groups}
        for g in groups:
            if g:
                self.online_evaluated.labels(*g)
            for k in self.ks:
                self.online_hits.labels(*g, str(k))
                self.online_rr.labels(*g, str(k))
                self.online_hit_rate.labels(*g, str(k)).set(0)
                self.online_mrr.labels(*g, str(k)).set(0)

    def observe_online(self, ranks: list[int], arm: str | None = None) -> None:
        """Add evaluated clicks (rank 0 = not in the list) to the online accuracy counters and gauges (of ``arm`` under an experiment)."""
        if not ranks:
            return
        g = (arm,) if self.arms else ()
        self._evaluated[g] += len(ranks)
        evaluated = self._evaluated[g]
        (self.online_evaluated.labels(*g) if g else self.online_evaluated).inc(len(ranks))
        for k in self.ks:
            hits = [r for r in ranks if 0 < r <= k]
            rr = sum(1.0 / r for r in hits)
            self._hits[g, k] += len(hits)
            self._rr[g, k] += rr
            label = str(k)
            self.online_hits.labels(*g, label).inc(len(hits))
            self.online_rr.labels(*g, label).inc(rr)
            self.online_hit_rate.labels(*g, label).set(self._hits[g, k] / evaluated)
            self.online_mrr.labels(*g, label).set(self._rr[g, k] / evaluated)

    def model_labels(self, scorer, arm: str | None = None) -> tuple[str, ...]:
        """The ``streamrec_model_info`` label values of a served scorer (and its arm under an experiment)."""
        return (str(scorer.manifest["model"]), str(scorer.manifest["model_version"]), scorer.kind) + ((arm,) if self.arms else ())


def online_ks(k: int) -> tuple[int, ...]:
    """The cut-offs the worker reports: 20 and the usual others up to the published list length."""
    return tuple(x for x in ONLINE_KS if x <= k) or (k,)
