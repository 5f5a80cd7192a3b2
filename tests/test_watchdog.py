"""Stalls: the watchdog says when the worker stops making progress, /healthz reflects it.

The verdict logic is checked with a hand-driven clock; the live test hangs the real broker with
SIGSTOP while a worker has a backlog (its produce requests then never return, so the agent stops
while clicks wait), watches /healthz, /metrics and the log from outside, resumes the broker and
checks that the worker catches up without losing a click.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream.process import start_worker, stop_worker
from stream.processor import Record
from stream.watchdog import Watchdog
from tests.streamkit import answered, click_stream, send_all
from tests.test_stream_support import markov_bundle, metric, metrics_text, read, stream_data, wait_for, worker_settings  # noqa: F401


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records(partition: int, *offsets: int) -> list[Record]:
    return [Record(b"s", b"{}", "clicks", partition, o, 0.0) for o in offsets]


def test_the_verdict_follows_progress_lag_and_the_event_loop(caplog):
    clock = Clock()
    registry = CollectorRegistry()
    dog = Watchdog(stall_seconds=5.0, registry=registry, clock=clock)
    assert dog.update().state == "starting" and dog.update().ok  # no beat yet: first table recovery

    dog.beat(lag=0, busy=False, assigned=2)
    clock.now += 600
    dog.beat(lag=0, busy=False, assigned=2)
    assert dog.update().ok  # idle for ten minutes is not a stall

    dog.beat(lag=3, busy=False, assigned=2)  # clicks arrive after the long idle: not stalled at once
    assert dog.update().ok
    for _ in range(4):  # the lag grows and no batch finishes
        clock.now += 1.5
        dog.beat(lag=dog._lag + 100, busy=False, assigned=2)
    with caplog.at_level(logging.WARNING, logger="streamrec.watchdog"):
        health = dog.update()
        dog.update()
    assert not health.ok and "no micro-batch finished for 6.0 s while 403 clicks wait" in health.detail
    assert [r.getMessage() for r in caplog.records] == [f"worker stalled: {health.detail}"]  # once, not per check
    text = generate_latest(registry).decode()
    assert "streamrec_stalled 1.0" in text and "streamrec_consumer_lag 403.0" in text and "streamrec_assigned_partitions 2.0" in text

    dog.handled(records(0, 7, 8))  # a micro-batch finishes
    assert dog.update().ok and dog._next == {0: 9}
    clock.now += 6
    dog.beat(lag=300, busy=True, assigned=2)  # a rebalance under way restarts the clock
    assert dog.update().ok
    clock.now += 6
    dog.beat(lag=300, busy=False, assigned=2)
    assert not dog.update().ok

    clock.now += 1
    dog.beat(lag=0, busy=False, assigned=2)
    assert dog.update().ok and "streamrec_stalled 0.0" in generate_latest(registry).decode()
    clock.now += 5.5  # no beat: the event loop is blocked, whatever the lag
    health = dog.update()
    assert not health.ok and "event loop has not run for 5.5 s" in health.detail


def healthz(settings, timeout: float = 2.0) -> tuple[int | None, str]:
    """(status, body) of GET /healthz; (None, why) when nothing answers in time."""
    try:
        with urllib.request.urlopen(f"http://{settings.metrics_host}:{settings.metrics_port}/healthz", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


@pytest.mark.broker
def test_a_hung_broker_is_reported_as_a_stall_and_the_worker_catches_up(broker, stream_data, markov_bundle, tmp_path):
    _, bundle = markov_bundle
    settings = worker_settings(broker, stall_seconds=2.0, group_session_timeout=10.0)
    messages, _ = click_stream(stream_data.vocab.item_ids, n_sessions=500, clicks=40, seed=8)
    send_all(settings, messages)  # a backlog of 20,000 clicks before the worker starts
    log_path = tmp_path / "worker.log"
    worker = start_worker(settings, bundle, log_path)
    try:
        assert wait_for(lambda: answered(settings) > 0, timeout=60, interval=0.02)
        os.killpg(broker.process.pid, signal.SIGSTOP)  # the broker hangs: connections open, no answers
        try:
            status, body = wait_for(lambda: (h := healthz(settings))[0] == 503 and h, timeout=15, interval=0.2) or healthz(settings)
            assert status == 503 and body.startswith("stalled: no micro-batch finished"), body
            assert wait_for(lambda: metric(metrics_text(settings), "streamrec_stalled") == 1, timeout=3)  # the thread's next check
            assert metric(metrics_text(settings), "streamrec_consumer_lag") > 0
            stuck_at = answered(settings)
            assert stuck_at < len(messages)
        finally:
            os.killpg(broker.process.pid, signal.SIGCONT)
        assert wait_for(lambda: answered(settings) == len(messages), timeout=60), f"{answered(settings)} of {len(messages)} answered after the broker came back"
        assert wait_for(lambda: healthz(settings)[0] == 200, timeout=10)
        assert wait_for(lambda: metric(metrics_text(settings), "streamrec_stalled") == 0, timeout=3)
        time.sleep(3 * settings.stall_seconds)  # idle afterwards: still healthy
        assert healthz(settings) == (200, "serving: 0 clicks waiting on 3 partitions\n")

        os.killpg(worker.pid, signal.SIGSTOP)  # a frozen process cannot answer its probe at all
        try:
            assert healthz(settings, timeout=1.0)[0] is None
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        assert wait_for(lambda: healthz(settings)[0] == 200, timeout=10)
    finally:
        assert stop_worker(worker) == 0, log_path.read_text()[-3000:]
    answers = read(settings, {settings.recommendations_topic: len(messages)})[settings.recommendations_topic]
    assert len(answers) == len(messages)  # nothing lost, nothing answered twice
    log = log_path.read_text()
    assert "worker stalled: no micro-batch finished" in log and "worker progressing again" in log
    # with where the consumer stood: flow, the agent's queue, each of its 3 partitions' offsets and fetch state
    states = re.findall(r"consumer state while stalled: (.*)", log)
    assert states and all(s.startswith("flow on, agent queue ") and s.count("high=") == s.count("committed=") == 3 for s in states), states
