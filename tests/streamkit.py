"""Helpers of the reliability tests: synthetic click streams, a paced sender thread, killing
workers, offline reference answers from a bundle's own scorer, a process's listening sockets, and
a TCP relay that cuts the clients off the broker.

Everything is real: clicks go through aiokafka to the broker, workers are `streamrec serve`
processes, reference answers come from ``export.scorer.load_scorer``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream.broker_adapter import broker_adapter
from stream.events import click_value
from stream.settings import Settings
from stream.topics import ensure_topics, producer

REPO = Path(__file__).resolve().parents[1]

#: One more try for the tests whose workers rebalance, restart or are killed on Apache Kafka. The table-recovery
#: stall that made them fail about one suite run in four is found and fixed (docs/reliability.md, "Found and
#: fixed: the table-recovery stall"); the try stays because these tests run several workers, a broker and a
#: paced sender on a shared 2-core box, where a timing limit can still be missed. A rerun shows in pytest's
#: summary ("N rerun") and a second failure fails.
REBALANCE_RERUN = pytest.mark.flaky(reruns=1, reruns_delay=2)


def streamrec(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``streamrec`` CLI in this interpreter (CI does not put the virtualenv on PATH)."""
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def click_stream(item_ids: list[str], n_sessions: int, clicks: int, seed: int, prefix: str = "s") -> tuple[list[tuple[bytes, bytes]], dict[str, list[str]]]:
    """``n_sessions`` sessions of ``clicks`` random known items each, interleaved at random
    (a session's clicks keep their order); returns the (key, value) messages and each session's items."""
    rng = np.random.default_rng(seed)
    items = rng.choice(np.array(item_ids, dtype=object), size=(n_sessions, clicks))
    order = rng.permutation(np.repeat(np.arange(n_sessions), clicks))  # which session clicks next
    taken = np.zeros(n_sessions, dtype=np.int64)
    sessions = {f"{prefix}{s}": [str(x) for x in items[s]] for s in range(n_sessions)}
    messages = []
    for step, s in enumerate(order):
        sid = f"{prefix}{s}"
        messages.append((sid.encode(), click_value(sid, sessions[sid][taken[s]], 1.7e9 + step)))
        taken[s] += 1
    return messages, sessions


def send_all(settings: Settings, messages: list[tuple[bytes | None, bytes | None]], **producer_kwargs) -> list[tuple[int, int]]:
    """Produce (key, value) messages to the clicks topic flat out, in order; their (partition, offset)."""

    async def run() -> list[tuple[int, int]]:
        await ensure_topics(settings)
        p = producer(settings, **producer_kwargs)
        await p.start()
        try:
            futures = [await p.send(settings.clicks_topic, value, key=key) for key, value in messages]
            return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
        finally:
            await p.stop()

    return asyncio.run(run())


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Partition -> end offset of ``topic`` (records written so far, compaction aside)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream.topics import topic_partitions

    async def run() -> dict[int, int]:
        consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = (await topic_partitions(settings, [topic], timeout=10.0))[topic]
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
            return {tp.partition: offset for tp, offset in ends.items()}
        finally:
            await consumer.stop()

    return asyncio.run(run())


class PacedSender(threading.Thread):
    """Produces ``messages`` to the clicks topic at ``rate`` per second from a thread of its own,
    until they run out or ``stop`` is set.

    ``produced`` counts messages handed to the producer (all of them acknowledged once the thread
    ends), ``sent`` those the broker has acknowledged so far; ``error`` holds what stopped it, if anything.
    The producer is idempotent unless the broker is the embedded one (which lacks InitProducerId): a
    request resent after a lost connection must not write a click twice, or the session would hold
    one click more than the test sent.
    """

    def __init__(self, settings: Settings, messages: list[tuple[bytes | None, bytes]], rate: float, **producer_kwargs):
        super().__init__(daemon=True)
        self.settings, self.messages, self.rate, self.producer_kwargs = settings, messages, rate, producer_kwargs
        self.produced = 0
        self.sent = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._send())
        except BaseException as e:  # reported to the test through .error
            self.error = e

    async def _send(self) -> None:
        await ensure_topics(self.settings)
        options = {"enable_idempotence": broker_adapter(self.settings).idempotent_producer, **self.producer_kwargs}
        p = producer(self.settings, acks="all", **options)
        await p.start()
        started = time.perf_counter()
        try:
            pending = []
            for i, (key, value) in enumerate(self.messages):
                wait = i / self.rate - (time.perf_counter() - started)
                if wait > 0.001:
                    await asyncio.sleep(wait)
                if self.stop.is_set():
                    break
                pending.append(await p.send(self.settings.clicks_topic, value, key=key))
                self.produced += 1
                if len(pending) >= 200:
                    await asyncio.gather(*pending)
                    self.sent += len(pending)
                    pending = []
            await asyncio.gather(*pending)
            self.sent += len(pending)
        finally:
            await p.stop()

    def finish(self, timeout: float, stop: bool = False) -> list[tuple[bytes | None, bytes]]:
        """Wait for the thread (stopping it first with ``stop``); the messages it produced."""
        if stop:
            self.stop.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"the sender did not finish within {timeout:.0f}s ({self.sent}/{len(self.messages)} sent)")
        if self.error is not None:
            raise self.error
        return self.messages[: self.produced]


def answered(settings: Settings) -> float:
    """The worker's ``streamrec_events_total{outcome="answered"}``, 0 while its endpoint is not up."""
    import urllib.request

    url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith('streamrec_events_total{outcome="answered"} '):
            return float(line.split()[-1])
    return 0.0


def kill_worker(process) -> None:
    """SIGKILL the worker's process group: no commit, no LeaveGroup, no flush."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def sessions_of(messages: list[tuple[bytes | None, bytes]]) -> dict[str, list[str]]:
    """Each session's items, in order, from click messages."""
    out: dict[str, list[str]] = defaultdict(list)
    for _, value in messages:
        doc = orjson.loads(value)
        out[doc["session_id"]].append(str(doc["item_id"]))
    return dict(out)


def offline_answers(bundle_dir: Path, sessions: dict[str, list[str]], k: int) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """(session id, position) -> (top item ids, top scores) of the bundle's own scorer after the first
    ``position`` clicks, computed with nothing but the scorer, all sessions' j-th clicks in one
    step: what an uninterrupted worker publishes. Sessions must hold known items only."""
    from export.scorer import StepInput, load_scorer

    scorer = load_scorer(bundle_dir)
    ids = np.array([""] + list(scorer.vocab.item_ids), dtype=object)
    names = list(sessions)
    items = [np.asarray(scorer.vocab.encode(sessions[s]), dtype=np.int64) for s in names]
    assert all((row > 0).all() for row in items), "offline_answers wants known items only"
    lengths = np.array([len(row) for row in items])
    hidden = np.zeros((len(names), scorer.hidden_size), dtype=np.float32) if scorer.kind == "hidden" else None
    out = {}
    for j in range(int(lengths.max(initial=0))):
        rows = np.flatnonzero(lengths > j)
        history = [items[r][max(0, j - scorer.history_len) : j + 1] for r in rows]  # what the worker keeps, plus the click
        result = scorer.step(StepInput(items=np.array([items[r][j] for r in rows]), hidden=hidden[rows] if hidden is not None else None, history=history))
        if hidden is not None:
            hidden[rows] = result.hidden
        for i, r in enumerate(rows):
            out[(names[r], j + 1)] = (ids[result.top_items[i, :k]], result.top_scores[i, :k])
    return out


def assert_same_answer(doc: dict, expected: tuple[np.ndarray, np.ndarray]) -> None:
    """A published list equals the reference: same scores, same items except the order within ties."""
    items, scores = expected
    got = np.asarray(doc["scores"], dtype=np.float32)
    np.testing.assert_allclose(got, scores, rtol=1e-4, atol=1e-5, err_msg=f"{doc['session_id']} position {doc['position']}")
    strict = scores > scores[-1] + 1e-5  # above the last score: no tie at the cut-off can swap them
    assert set(np.asarray(doc["items"], dtype=object)[strict]) == set(items[strict]), (doc["session_id"], doc["position"])


def answers_by_key(records) -> tuple[dict[tuple[str, int], list[dict]], int]:
    """Recommendation records grouped by (session id, position), and how many records there were."""
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        doc = orjson.loads(r.value)
        out[(doc["session_id"], doc["position"])].append(doc)
    return out, len(records)


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process ``pid`` listens on, read from /proc (no psutil)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            if family == socket.AF_INET:
                raw = raw[::-1]
            else:  # four little-endian 32-bit words
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
            out.add((socket.inet_ntop(family, raw), int(port, 16)))
    return out


class BrokerLink(threading.Thread):
    """A TCP relay between every client and the broker that a test can cut and restore.

    Cut, the broker is gone as far as clients can tell: open connections are reset and new ones
    refused. Restored, it answers again with all its topics, offsets and groups. The broker must
    advertise the relay's port (Apache Kafka's ``advertised.listeners``, or
    ``EmbeddedBroker(advertised_port=...)``).
    """

    def __init__(self, broker_port: int, port: int) -> None:
        super().__init__(daemon=True)
        self.broker_port, self.port = broker_port, port
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.connections: set = set()
        self.started = threading.Event()

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._listen())
        self.started.set()
        self.loop.run_forever()

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)

    async def _relay(self, client_reader, client_writer) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            client_writer.transport.abort()
            return
        pair = {client_writer, broker_writer}
        self.connections |= pair

        async def pipe(reader, writer) -> None:
            try:
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_reader, broker_writer), pipe(broker_reader, client_writer))
        self.connections -= pair

    async def _cut(self) -> None:
        self.server.close()
        for writer in list(self.connections):
            writer.transport.abort()
        self.connections.clear()

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cut(), self.loop).result(10)

    def restore(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)

    def __enter__(self) -> "BrokerLink":
        self.start()
        self.started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
