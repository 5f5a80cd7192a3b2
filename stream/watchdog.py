"""Is the worker making progress? The stall watchdog behind ``GET /healthz``.

A worker can hang without dying: its event loop stuck in a call that never returns, or its agent
waiting forever on a broker that takes connections but no longer answers produce requests. The
process stays up, so a supervisor needs a liveness endpoint that says so.

Two signals, checked by a thread every ``CHECK_SECONDS``:

- the event loop's heartbeat: a Faust timer (``observe``) ticking every ``BEAT_SECONDS``. Faust
  starts timers once the first table recovery is done; until then the worker is "starting",
  which is healthy (a supervisor's start-up grace covers it).
- progress while clicks wait: at each tick the timer reads, per owned partition of the clicks
  topic, the consumer's high watermark minus the next offset the agent will handle (the lag the
  worker knows of; partitions it has not handled a click of yet are not counted). When that lag
  stays above zero for ``--stall-seconds`` without a finished micro-batch, the worker is
  stalled. Idle is not stalled; a rebalance or a table recovery restarts the clock.

Stalled: ``streamrec_stalled`` = 1, one warning in the log (and one line when it ends), and
``/healthz`` answers 503 with the reason (200 otherwise). ``streamrec_consumer_lag`` is the lag.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger("streamrec.watchdog")

BEAT_SECONDS = 0.5  # how often the event loop reports lag (the Faust timer)
CHECK_SECONDS = 0.5  # how often the thread re-evaluates health


class Health(NamedTuple):
    ok: bool
    state: str  # "starting" | "serving" | "stalled"
    detail: str


class Watchdog:
    """Progress bookkeeping (fed on the event loop) and its verdict (read from any thread)."""

    def __init__(self, stall_seconds: float, registry: CollectorRegistry, clock=time.monotonic):
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.stalled = Gauge("streamrec_stalled", "1 while the worker makes no progress although clicks wait (or its event loop is blocked), else 0.", registry=registry)
        self.lag = Gauge("streamrec_consumer_lag", "Clicks on this worker's partitions not yet handled, as far as the worker knows.", registry=registry)
        self.assigned = Gauge("streamrec_assigned_partitions", "Partitions of the clicks topic assigned to this worker.", registry=registry)
        self._next: dict[int, int] = {}  # partition -> next offset the agent will handle
        self._beat: float | None = None
        self._progress = clock()
        self._busy = float("-inf")
        self._waiting_since: float | None = None
        self._lag = 0
        self._assigned = 0
        self.health = Health(True, "starting", "waiting for the first table recovery")
        self._stop = threading.Event()

    def handled(self, records) -> None:
        """A micro-batch is done (called by the agent with its records)."""
        self._next.update((r.partition, r.offset + 1) for r in records)
        self._progress = self.clock()

    def beat(self, lag: int, busy: bool, assigned: int = 0) -> None:
        """The event loop's tick: the known lag, whether a rebalance or recovery is under way, the partitions owned."""
        now = self.clock()
        self._beat = now
        self._lag = lag
        self._assigned = assigned
        if busy:
            self._busy = now
        if lag <= 0:
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = now

    def observe(self, app, topic: str) -> None:
        """``beat`` from a Faust app's consumer: high watermark minus next offset, per owned partition."""
        consumer = app.consumer
        lag = assigned = 0
        for tp in consumer.assignment():
            if tp.topic != topic:
                continue
            assigned += 1
            high, handled = consumer.highwater(tp), self._next.get(tp.partition)
            if high is not None and handled is not None:
                lag += max(0, high - handled)
        self.beat(lag, bool(app.rebalancing or app.in_recovery), assigned)

    def check(self) -> Health:
        now = self.clock()
        if self._beat is None:
            return Health(True, "starting", "waiting for the first table recovery")
        silent = now - self._beat
        if silent > self.stall_seconds:
            return Health(False, "stalled", f"the event loop has not run for {silent:.1f} s")
        if self._lag > 0:
            since = max(self._progress, self._busy, self._waiting_since or now)
            if now - since > self.stall_seconds:
                return Health(False, "stalled", f"no micro-batch finished for {now - since:.1f} s while {self._lag} clicks wait")
        return Health(True, "serving", f"{self._lag} clicks waiting on {self._assigned} partitions")

    def update(self) -> Health:
        """Re-evaluate, set the gauges, log when the verdict changes."""
        health = self.check()
        self.stalled.set(0 if health.ok else 1)
        self.lag.set(self._lag)
        self.assigned.set(self._assigned)
        if health.ok != self.health.ok:
            if health.ok:
                log.warning("worker progressing again (%s)", health.detail)
            else:
                log.warning("worker stalled: %s", health.detail)
        self.health = health
        return health

    def start(self) -> threading.Thread:
        """Run ``update`` every ``CHECK_SECONDS`` in a daemon thread (it keeps going while the loop is blocked)."""

        def run() -> None:
            while not self._stop.wait(CHECK_SECONDS):
                self.update()

        thread = threading.Thread(target=run, name="streamrec-watchdog", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # no access log
        pass


def serve_http(host: str, port: int, registry: CollectorRegistry, watchdog: Watchdog):
    """The worker's HTTP endpoint in a daemon thread: ``/healthz`` (200 or 503, one line of text),
    every other path the Prometheus metrics of ``registry``. Returns the server."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            health = watchdog.check()
            start_response("200 OK" if health.ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{health.state}: {health.detail}\n".encode()]
        return metrics_app(environ, start_response)

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="streamrec-http", daemon=True).start()
    return server
