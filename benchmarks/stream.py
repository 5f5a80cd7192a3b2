"""Stream throughput and end-to-end latency on Apache Kafka and on the embedded broker, three ways of serving a click.

(a) echo:     a trivial per-event Faust agent that forwards each click (Faust's ceiling);
(b) naive:    a per-event Faust agent that re-runs GRU4Rec in torch eager mode over the whole
              session for every click, batch 1;
(c) streamrec: `streamrec serve` (micro-batches, carried GRU state, ONNX Runtime, bulk delivery).

Each system gets a fresh broker of each engine (``--engines``: Apache Kafka 4.4, one KRaft node;
the embedded Tansu, memory storage) and runs as its own process. For each:
- max sustained events/s: a backlog of clicks is produced flat out, and the rate is
  answers / (last answer received - first click sent);
- latency: clicks offered at a fixed rate (1,000/s) for a while; end-to-end = the time the
  answer reaches a consumer minus the time the click was handed to the producer (same clock);
- CPU per event in the saturation run: of the system under test, of the broker and of the load
  generator (this process), which share the box's cores.

How the load generator's clicks reach the broker: flat out, its producer fills ~16 KB record
batches on its own (``send`` does not yield to the sender between clicks), as a shop's
batching producer would; paced at 1,000/s every click is its own produce request unless
``--producer-linger-ms`` is set. A linger counts in the measured latency (it starts when the
click is handed to the producer), and at 1,000/s it did not lower the broker's CPU per click
measurably, so it is 0 by default.

``--profile`` samples the worker with py-spy (``pip install py-spy``; not a project dependency)
during its saturation run and writes where its time goes into "## Stream: where the time goes".

The model is an untrained GRU4Rec (its cost does not depend on the weights) over a synthetic
catalogue of ~40k items, exported to a bundle with K=20.

    python benchmarks/stream.py            # both engines: writes "## Stream" in docs/performance.md and docs/img/stream_latency.png
    python benchmarks/stream.py --systems c --profile --no-write   # prints the profile table only
    python benchmarks/stream.py --eos-cost     # (c) under at_least_once and exactly_once on Apache Kafka: "## Stream: exactly-once cost"
    python benchmarks/stream.py --bundle DIR   # (c) serving a given bundle on Apache Kafka; one JSON line (benchmarks/catalog_scale.py)

With ``--eos-cost`` the answers of the exactly_once worker are read as a read_committed consumer
reads them (an answer counts once its transaction is committed), those of the other as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _fixtures import untrained_gru4rec_run  # noqa: E402
from _report import produced_by, pyplot, save_figure, table, write_section  # noqa: E402  (benchmarks/ is on sys.path)
from stream.kafka import KAFKA_VERSION  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "img" / "stream_latency.png"
SECTION = "## Stream"
PROFILE_SECTION = "## Stream: where the time goes"
EOS_SECTION = "## Stream: the cost of exactly-once"
IN, OUT = "clicks", "recommendations"
ENGINES = {"kafka": "Apache Kafka 4.4", "tansu": "embedded (Tansu)"}


# ----------------------------------------------------------------------------- systems (a) and (b)


def baseline_app(role: str, broker: str, run_dir: Path | None, fetch_wait_ms: int):
    """A stock per-event Faust agent (Faust's own delivery loop, fetch wait lowered like the worker's)."""
    import faust

    from stream.transport import stream_transport

    app = faust.App(f"bench-{role}", broker=broker, store="memory://", web_enabled=False, topic_partitions=4, consumer_auto_offset_reset="latest", broker_session_timeout=2.0, broker_heartbeat_interval=0.5)
    app.transport = stream_transport(fetch_wait_ms if fetch_wait_ms >= 0 else None, bulk_delivery=False)(app.conf.broker_consumer, app)
    clicks = app.topic(IN, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    out = app.topic(OUT, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    if role == "echo":

        @app.agent(clicks)
        async def echo(stream):
            async for event in stream.events():
                await out.send(key=event.key, value=event.value)

        return app

    import torch

    from training.models import load_run

    torch.set_num_threads(1)
    model = load_run(run_dir)
    step = model.export_module()
    hidden_size = int(model.hidden_size)
    item_ids = ["" ] + json.loads((run_dir / "vocab.json").read_text())["items"]
    index = {item: i for i, item in enumerate(item_ids)}
    sessions: dict[str, list[int]] = {}

    @app.agent(clicks)
    async def naive(stream):
        async for event in stream.events():
            doc = orjson.loads(event.value)
            items = sessions.setdefault(doc["session_id"], [])
            items.append(index.get(str(doc["item_id"]), 0))
            with torch.inference_mode():
                h = torch.zeros(1, hidden_size)
                for item in items:  # the whole session again, every click
                    h, scores = step(torch.tensor([item]), h)
                scores[0, 0] = -torch.inf
                top = torch.topk(scores[0], 20)
            answer = {"session_id": doc["session_id"], "position": len(items), "items": [item_ids[i] for i in top.indices.tolist()], "scores": top.values.tolist()}
            await out.send(key=event.key, value=orjson.dumps(answer))

    return app


def run_role(args) -> None:
    from faust.worker import Worker

    app = baseline_app(args.role, args.broker, Path(args.run) if args.run else None, args.fetch_wait_ms)
    Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


# ----------------------------------------------------------------------------- load generation


def schedule(n: int, sessions: int, items: list[str], rng: np.random.Generator, prefix: str) -> list[tuple[str, str, int]]:
    """(session id, item id, position) of ``n`` clicks over ``sessions`` concurrent sessions."""
    which = rng.integers(0, sessions, n)
    picked = rng.integers(0, len(items), n)
    count = np.zeros(sessions, dtype=np.int64)
    out = []
    for s, i in zip(which, picked):
        count[s] += 1
        out.append((f"{prefix}-{s}", items[i], int(count[s])))
    return out


async def drive(bootstrap: str, clicks: list[tuple[str, str, int]], rate: float | None, timeout: float, linger_ms: int = 0, isolation_level: str = "read_uncommitted") -> tuple[np.ndarray, np.ndarray]:
    """Send ``clicks`` (flat out, or at ``rate``/s) and wait for their answers; (send times, receive times), NaN = no answer."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    where = {(sid, pos): j for j, (sid, _, pos) in enumerate(clicks)}
    sent = np.full(len(clicks), np.nan)
    received = np.full(len(clicks), np.nan)
    from stream.settings import Settings
    from stream.topics import topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5, enable_auto_commit=False, isolation_level=isolation_level)
    await consumer.start()
    partitions = (await topic_partitions(Settings(broker=bootstrap), [OUT]))[OUT]
    tps = [TopicPartition(OUT, p) for p in partitions]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    done = asyncio.Event()
    n_received = 0

    async def receive():
        nonlocal n_received
        while not done.is_set():
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batch.values():
                for r in records:
                    doc = orjson.loads(r.value)
                    j = where.get((doc["session_id"], int(doc["position"])))
                    if j is not None and np.isnan(received[j]):
                        received[j] = now
                        n_received += 1
            if n_received == len(clicks):
                done.set()

    task = asyncio.create_task(receive())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms)
    await producer.start()
    started = time.perf_counter()
    for j, (sid, item, pos) in enumerate(clicks):
        if rate is not None:
            wait = j / rate - (time.perf_counter() - started)
            if wait > 0.0005:
                await asyncio.sleep(wait)
        now = time.time()
        sent[j] = now
        await producer.send(IN, orjson.dumps({"session_id": sid, "item_id": item, "timestamp": now, "position": pos}), key=sid.encode())
    await producer.flush()
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    done.set()
    await task
    await producer.stop()
    await consumer.stop()
    return sent, received


def wait_ready(bootstrap: str, items: list[str], process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the benchmarked process exited with status {process.returncode}")
        n += 1
        _, received = asyncio.run(drive(bootstrap, [(f"probe-{n}", items[0], 1)], None, timeout=5.0))
        if not np.isnan(received).any():
            return
    raise SystemExit("the benchmarked process never answered")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def start_profiler(pid: int, path: Path):
    """py-spy sampling ``pid`` into ``path`` (raw collapsed stacks) until it gets SIGINT."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--output", str(path), "--format", "raw", "--rate", "200", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def new_broker(engine: str):
    """A fresh broker of ``engine``: Apache Kafka (one KRaft node, temporary storage) or the embedded Tansu."""
    if engine == "kafka":
        from stream.kafka import KafkaCluster

        return KafkaCluster()
    from stream.broker import EmbeddedBroker

    return EmbeddedBroker()


def measure(name: str, start, items: list[str], args, rng: np.random.Generator, engine: str, profile_path: Path | None = None, isolation_level: str = "read_uncommitted", on_done=None) -> dict:
    """Start a system on a fresh broker, measure its max sustained rate and its latency at the offered rate
    (``on_done``: called while the system still runs, after the last measurement)."""
    from stream.settings import Settings
    from stream.topics import ensure_topics

    linger = args.producer_linger_ms
    print(f"{name} on {ENGINES[engine]}", file=sys.stderr)
    with new_broker(engine) as broker:
        asyncio.run(ensure_topics(Settings(broker=broker.url, partitions=4)))
        process = start(broker)
        try:
            wait_ready(broker.bootstrap, items, process)
            n_sat = args.naive_events if name.startswith("(b)") else args.events
            print(f"{name}: saturation, {n_sat:,} clicks flat out ...", file=sys.stderr)
            profiler = start_profiler(process.pid, profile_path) if profile_path else None
            cpu_before = (cpu_seconds(process.pid), cpu_seconds(broker.process.pid), own_cpu_seconds())
            sent, received = asyncio.run(drive(broker.bootstrap, schedule(n_sat, args.sessions, items, rng, "sat"), None, args.timeout, linger, isolation_level))
            cpu_after = (cpu_seconds(process.pid), cpu_seconds(broker.process.pid), own_cpu_seconds())
            if profiler:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            answered = ~np.isnan(received)
            throughput = answered.sum() / (np.nanmax(received) - sent[0]) if answered.any() else 0.0
            cpu_ms = [1000.0 * (b - a) / n_sat for a, b in zip(cpu_before, cpu_after)]
            n_lat = int(args.rate * (args.naive_seconds if name.startswith("(b)") else args.seconds))
            print(f"{name}: {throughput:,.0f} events/s, CPU ms/event {cpu_ms[0]:.3f} system, {cpu_ms[1]:.3f} broker, {cpu_ms[2]:.3f} load generator; latency at {args.rate:,.0f}/s, {n_lat:,} clicks ...", file=sys.stderr)
            sent_l, received_l = asyncio.run(drive(broker.bootstrap, schedule(n_lat, args.sessions, items, rng, "lat"), args.rate, args.timeout, linger, isolation_level))
            low = None
            if not name.startswith("(b)"):
                n_low = int(args.low_rate * args.low_seconds)
                print(f"{name}: latency at {args.low_rate:,.0f}/s, {n_low:,} clicks ...", file=sys.stderr)
                sent_q, received_q = asyncio.run(drive(broker.bootstrap, schedule(n_low, args.sessions, items, rng, "low"), args.low_rate, args.timeout, linger, isolation_level))
                low = (received_q - sent_q) * 1000.0
            if on_done is not None:
                on_done()
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    latency = (received_l - sent_l) * 1000.0
    ok = ~np.isnan(latency)
    return {
        "name": name,
        "engine": engine,
        "throughput": float(throughput),
        "answered_saturation": f"{int(answered.sum())}/{len(sent)}",
        "cpu_ms": cpu_ms,
        "latency_ms": latency[ok],
        "answered_latency": f"{int(ok.sum())}/{len(latency)}",
        "saturated": throughput < args.rate,
        "low_latency_ms": low[~np.isnan(low)] if low is not None else None,
    }


#: Where a sampled worker stack belongs: the first category with a frame matching one of its patterns.
PROFILE_CATEGORIES = [
    ("scoring: ONNX Runtime", ["Session.run"]),
    ("scoring: rest of `Scorer.step`", ["HiddenScorer.step", "WindowScorer.step", "GraphScorer.step", "ItemsScorer.step"]),
    ("click JSON decode", ["parse_click"]),
    ("answer JSON encode", ["recommendation (stream/events.py"]),
    ("session state decode (table read)", ["SessionState.decode", "_load_state"]),
    ("session state encode + table write", ["SessionState.encode"]),
    ("rounds, histories, online ranks", ["BatchProcessor._round", "online_rank"]),
    ("rest of the batch processor", ["BatchProcessor.process"]),
    ("produce: outbox, aiokafka producer", ["Outbox.", "AIOKafkaProducer", "Sender.", "SendProduceReqHandler", "_ack_when_delivered"]),
    ("streamrec metrics", ["StreamMetrics", "observe_online"]),
    ("Faust dispatch: conductor, message tracking, Faust's Prometheus sensor", ["on_message", "track_message", "SensorDelegate", "PrometheusMonitor", "Conductor", "_drain_messages"]),
    ("fetch: aiokafka fetcher, record batch parsing", ["Fetcher."]),
    ("rest of the agent (`_handle`, acks)", ["StreamWorker."]),
    ("logging", ["Logger."]),
    ("sockets and event loop", ["AIOKafkaConnection", "AIOKafkaClient", "selector_events", "StreamWriter", "_run_once"]),
]


def profile_table(path: Path, result: dict, load: str) -> str:
    """The py-spy samples of the worker's saturation run, by category (idle waits in epoll left out)."""
    counts = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + ["other"], 0)
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack.split(";")[-1].startswith("EpollSelector.select"):
            continue  # a thread waiting for the network: idle, not work
        name = next((name for name, patterns in PROFILE_CATEGORIES if any(p in stack for p in patterns)), "other")
        counts[name] += int(n)
    total = sum(counts.values()) or 1
    cpu = result["cpu_ms"][0]
    rows = [(name, f"{100 * n / total:.1f}%", f"{cpu * n / total * 1000:,.0f}") for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n]
    return "\n".join(
        [
            PROFILE_SECTION,
            "",
            f"py-spy samples (200/s, all threads, waits in epoll left out) of `streamrec serve` on {ENGINES[result['engine']]} during a saturation run like the one of the table above (a run of its own: the profiler takes CPU too) "
            f"({result['throughput']:,.0f} events/s, {cpu:.3f} CPU ms per event in the worker; load average {load}, {date.today().isoformat()}). "
            "The µs column shares the worker's measured CPU time per event out in proportion to the samples; read it as a split, not as exact costs "
            "(on a loaded box a thread that waits for a core is sampled too).",
            "",
            *produced_by(),
            *table(["where", "share of samples", "µs per event"], rows, "-rr"),
            "",
        ]
    )


# ----------------------------------------------------------------------------- set-up and report


def build_bundle(work: Path, args) -> tuple[Path, Path, list[str]]:
    from export.exporter import export_run
    from training.synth import synthesize

    print(f"synthesizing {args.items_asked:,} items ...", file=sys.stderr)
    data = synthesize(args.items_asked, args.catalogue_sessions, seed=0, test_fraction=0.05)
    run_dir, bundle_dir = untrained_gru4rec_run(work, data, args.hidden), work / "bundle"
    export_run(run_dir, bundle_dir, data_dir=work / "data", k=20, parity_sessions=20, log=lambda line: print(line, file=sys.stderr))
    export_run(run_dir, work / "bundle-int8", data_dir=work / "data", k=20, int8=True, min_overlap=0.0, parity_sessions=20, log=lambda line: print(line, file=sys.stderr))
    return run_dir, bundle_dir, data.vocab.item_ids


def measure_given_bundle(bundle_dir: Path, args) -> dict:
    """(c) serving ``bundle_dir`` on a fresh Apache Kafka node: max events/s, CPU per event, latency at
    ``--rate`` and the worker's RSS at the end; for benchmarks that build their own bundles."""
    from export.bundle import open_bundle
    from stream.process import start_worker
    from stream.settings import Settings

    items = open_bundle(bundle_dir).vocab.item_ids
    rng = np.random.default_rng(0)
    peak = {}

    with tempfile.TemporaryDirectory(prefix="streamrec-stream-bundle-") as tmp:
        def start(broker):
            settings = Settings(broker=broker.url, broker_quirks=broker.quirks, group_session_timeout=2.0, metrics_port=0, scorer_threads=args.scorer_threads)
            process = start_worker(settings, bundle_dir, Path(tmp) / "streamrec.log")
            peak["pid"] = process.pid
            return process

        result = measure("(c) streamrec worker", start, items, args, rng, "kafka", on_done=lambda: peak.update(rss_mb=rss_mb(peak["pid"])))
    latency, low = result.pop("latency_ms"), result.pop("low_latency_ms")
    result.update({f"p{q}_ms": float(np.percentile(latency, q)) if len(latency) else None for q in (50, 90, 99)})
    result.update({f"low_p{q}_ms": float(np.percentile(low, q)) if low is not None and len(low) else None for q in (50, 90, 99)})
    result["worker_rss_mb"] = peak.get("rss_mb")
    result["saturated"] = bool(result["saturated"])
    return result


def rss_mb(pid: int) -> float | None:
    """Resident MB of a running process (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def scorer_ceiling(bundle_dir: Path, batch: int = 256, seconds: float = 3.0) -> tuple[float, float]:
    """``Scorer.step`` alone at ``batch`` rows (1 thread): (events/s, events per CPU second). The worker cannot beat it.

    On a shared box the first depends on what else runs; the second much less.
    """
    from export.scorer import StepInput, load_scorer

    scorer = load_scorer(bundle_dir)
    rng = np.random.default_rng(0)
    items = rng.integers(1, scorer.n_items + 1, batch)
    step = StepInput(items, np.zeros((batch, scorer.hidden_size), np.float32), [np.array([i]) for i in items])
    scorer.step(step)
    n, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        scorer.step(step)
        n += batch
    return n / (time.perf_counter() - started), n / (time.process_time() - cpu)


def render(results: list[dict], args, n_items: int, load: str, ceilings: dict[str, tuple[float, float]]) -> str:
    rate, low_rate = f"{args.rate:,.0f}/s", f"{args.low_rate:,.0f}/s"
    header = ["broker", "system", "max sustained events/s", "CPU ms/event: system / broker / load generator", f"p50 ms @{rate}", f"p90 ms @{rate}", f"p99 ms @{rate}",
              f"answered @{rate}", f"p50 ms @{low_rate}", f"p90 ms @{low_rate}", f"p99 ms @{low_rate}", "note"]
    rows = []
    for r in results:
        lat = r["latency_ms"]
        p = np.percentile(lat, [50, 90, 99]) if len(lat) else [np.nan] * 3
        low = r["low_latency_ms"]
        q = np.percentile(low, [50, 90, 99]) if low is not None and len(low) else None
        lows = [f"{v:,.1f}" for v in q] if q is not None else ["", "", ""]
        note = "saturated below the offered rate: latency grows with the queue" if r["saturated"] else ""
        cpu = " / ".join(f"{c:.3f}" for c in r["cpu_ms"])
        rows.append([ENGINES[r["engine"]], r["name"], f"{r['throughput']:,.0f}", cpu, *(f"{v:,.1f}" for v in p), r["answered_latency"], *lows, note])
    ratios, checks = [], []
    for engine in dict.fromkeys(r["engine"] for r in results):
        of = {r["name"][:3]: r for r in results if r["engine"] == engine}
        a, b, c = of.get("(a)"), of.get("(b)"), next((r for r in results if r["engine"] == engine and r["name"] == "(c) streamrec worker"), None)
        where = ENGINES[engine]
        if c and b and b["throughput"]:
            ratios.append(f"{where}: (c)/(b) = {c['throughput'] / b['throughput']:,.0f}x")
        if c and a and a["throughput"]:
            ratios.append(f"{where}: (c)/(a) = {c['throughput'] / a['throughput']:.2f}x")
        if c and engine == "kafka":  # the targets are Apache Kafka's (issue 13)
            p90, p99 = np.percentile(c["latency_ms"], [90, 99]) if len(c["latency_ms"]) else (np.nan, np.nan)
            checks += [
                (f"{where}: (c) max sustained >= 10,000 events/s", c["throughput"] >= 10_000, f"{c['throughput']:,.0f}"),
                (f"{where}: (c) p90 <= 7 ms at {rate}", p90 <= 7, f"{p90:,.1f} ms"),
                (f"{where}: (c) p99 <= 20 ms at {rate}", p99 <= 20, f"{p99:,.1f} ms"),
                (f"{where}: (c) >= (a)", bool(a and c["throughput"] >= a["throughput"]), f"{c['throughput'] / a['throughput']:.2f}x" if a and a["throughput"] else "n/a"),
            ]
    targets = ["", *table(["target", "this run", "met"], [(t, v, "yes" if ok else "**no**") for t, ok, v in checks], "-r-")] if checks else []
    return "\n".join(
        [
            SECTION,
            "",
            f"End to end through Apache Kafka {KAFKA_VERSION} (one KRaft node, java, storage on disk) and through the embedded broker (Tansu, memory storage), "
            f"each with 4 partitions, every system on a fresh broker of each kind, all in one run, on this project's box: 2 cores shared by the "
            f"broker, the load generator and the system under test (and other jobs: load average {load}), {platform.machine()}, {date.today().isoformat()}. "
            f"Model: GRU4Rec with {args.hidden} hidden units, untrained (serving cost does not depend on the weights), over {n_items:,} synthetic items, K=20, "
            f"{args.sessions:,} concurrent sessions with uniformly random clicks. "
            "Max sustained events/s: a backlog produced flat out, answers / (last answer received - first click sent). "
            f"Latency: clicks offered at {args.rate:,.0f}/s and at {args.low_rate:,.0f}/s, end-to-end = answer received by a consumer - click handed to the producer. "
            f"(a) is a stock per-event Faust agent that forwards each click; (b) the naive path: a per-event Faust agent re-running GRU4Rec in torch eager mode "
            "over the whole session for every click, batch 1; (c) `streamrec serve` with its defaults (batch up to 256), on Apache Kafka without "
            f"`--broker-quirks`, on the embedded broker with `--broker-quirks tansu`. On the embedded broker all three use a {args.fetch_wait_ms} ms fetch wait (it holds every fetch that long); on Apache Kafka, which answers a fetch as soon as data arrives, Faust's own 1.5 s. "
            f"The load generator's producer lingers {args.producer_linger_ms} ms: flat out it still sends ~16 KB record batches "
            "(as a shop's batching producer would); paced, each click is its own produce request. "
            "CPU ms/event: CPU time of the system under test, of the broker and of the load generator (which also reads the answers) during the saturation run, "
            f"per click: the three share 2 cores, so no system can go beyond about 2,000 / (their sum) events/s. Ratios: {'; '.join(ratios)}. "
            f"For scale, `Scorer.step` alone (no Kafka, 1 thread, batch 256) ran at {ceilings['bundle'][0]:,.0f} events/s "
            f"({ceilings['bundle'][1]:,.0f} per CPU second) for this bundle and {ceilings['bundle-int8'][0]:,.0f} events/s "
            f"({ceilings['bundle-int8'][1]:,.0f} per CPU second) for its int8 version in the same run: no worker can exceed its scorer.",
            "",
            *produced_by(),
            *table(header, rows, "--rrrrr-rrr-"),
            *targets,
            "",
            f"![end-to-end latency at {args.rate:,.0f} events/s](img/{PLOT.name})",
            "",
        ]
    )


def render_eos(results: list[dict], args, load: str) -> str:
    """The section of ``--eos-cost``: (c) under both processing guarantees, in one run."""
    rate, low_rate = f"{args.rate:,.0f}/s", f"{args.low_rate:,.0f}/s"
    header = ["system", "max sustained events/s", "CPU ms/event: system / broker / load generator", f"p50 ms @{rate}", f"p90 ms @{rate}", f"p99 ms @{rate}", f"answered @{rate}", f"p50 ms @{low_rate}", f"p90 ms @{low_rate}", f"p99 ms @{low_rate}", "note"]
    rows = []
    for r in results:
        p = np.percentile(r["latency_ms"], [50, 90, 99]) if len(r["latency_ms"]) else [np.nan] * 3
        q = np.percentile(r["low_latency_ms"], [50, 90, 99]) if r["low_latency_ms"] is not None and len(r["low_latency_ms"]) else [np.nan] * 3
        note = "saturated below the offered rate: latency grows with the queue" if r["saturated"] else ""
        rows.append([r["name"], f"{r['throughput']:,.0f}", " / ".join(f"{c:.3f}" for c in r["cpu_ms"]), *(f"{v:,.1f}" for v in p), r["answered_latency"], *(f"{v:,.1f}" for v in q), note])
    return "\n".join(
        [
            EOS_SECTION,
            "",
            f"`streamrec serve` with `--processing-guarantee at_least_once` (the default) and `exactly_once`, one after the other in one run, each on a fresh "
            f"Apache Kafka {KAFKA_VERSION} node (4 partitions), measured as in \"Stream\" above (same model, load and box: 2 cores shared by the broker, "
            f"the load generator and the worker; load average {load}; {platform.machine()}, {date.today().isoformat()}). Under exactly_once an answer counts "
            "when a read_committed consumer gets it, i.e. once its transaction is committed. Per clicks partition one transaction at a time, holding "
            "every micro-batch that arrived while the one before was in flight (docs/stream.md, \"Delivery guarantees\").",
            "",
            *produced_by(),
            *table(header, rows, "-r-rrr-rrr-"),
            "",
        ]
    )


def plot(results: list[dict], rate: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        lat = np.sort(r["latency_ms"])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{r['name']}, {ENGINES[r['engine']]}", linestyle="-" if r["engine"] == "kafka" else ":")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (ms, log scale)")
    ax.set_ylabel("share of clicks answered within")
    ax.set_title(f"Clicks offered at {rate:,.0f}/s (solid: Apache Kafka, dotted: embedded)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    save_figure(fig, PLOT, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["echo", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--items-asked", type=int, default=40_000, help="catalogue size asked of the generator")
    parser.add_argument("--catalogue-sessions", type=int, default=100_000, help="synthetic sessions generated (they set the catalogue)")
    parser.add_argument("--hidden", type=int, default=100, help="GRU4Rec hidden units")
    parser.add_argument("--sessions", type=int, default=2000, help="concurrent sessions in the load")
    parser.add_argument("--events", type=int, default=40_000, help="clicks in the saturation run of (a) and (c)")
    parser.add_argument("--naive-events", type=int, default=1500, help="clicks in the saturation run of (b)")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered clicks/s in the latency run")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the latency run")
    parser.add_argument("--low-rate", type=float, default=100.0, help="offered clicks/s of the low-load latency run of (a) and (c)")
    parser.add_argument("--low-seconds", type=float, default=5.0, help="length of the low-load latency run")
    parser.add_argument("--naive-seconds", type=float, default=3.0, help="length of (b)'s latency run")
    parser.add_argument("--timeout", type=float, default=180.0, help="longest wait for the answers of one run")
    parser.add_argument("--systems", default="a,b,c,c8")
    parser.add_argument("--fetch-wait-ms", type=int, default=10, help="consumer fetch wait of every system on the embedded broker (the worker's default; on Apache Kafka Faust's 1.5 s stands)")
    parser.add_argument("--engines", default="kafka,tansu", help="brokers, in order: kafka (Apache Kafka), tansu (embedded); every system runs on each")
    parser.add_argument("--producer-linger-ms", type=int, default=0, help="linger of the load generator's producer (0: paced clicks go one per produce request)")
    parser.add_argument("--eos-cost", action="store_true", help="only (c) under at_least_once and exactly_once, on Apache Kafka, and write their section")
    parser.add_argument("--profile", action="store_true", help="only profile (c) with py-spy during saturation and write its section")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--bundle", type=Path, help="only (c), serving this bundle, on Apache Kafka; prints one JSON line (no docs written)")
    parser.add_argument("--scorer-threads", type=int, default=1, help="the worker's --scorer-threads")
    args = parser.parse_args()
    if args.role:
        run_role(args)
        return
    if args.bundle:
        print(json.dumps(measure_given_bundle(args.bundle, args)))
        return

    if args.profile and shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="streamrec-stream-bench-") as tmp:
        work = Path(tmp)
        run_dir, bundle_dir, items = build_bundle(work, args)
        me = [sys.executable, str(Path(__file__).resolve())]
        env = dict(os.environ, PYTHONPATH=str(ROOT))

        def start_baseline(role):
            # the worker's rule: the fetch wait is set on the embedded broker only (-1: Faust's own 1.5 s)
            return lambda broker: subprocess.Popen(me + ["--role", role, "--broker", broker.url, "--run", str(run_dir), "--fetch-wait-ms", str(args.fetch_wait_ms if broker.quirks == "tansu" else -1)], env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{role}.log", "wb"))

        def start_streamrec(bundle, guarantee: str = "at_least_once"):
            def start(broker):
                from stream.process import start_worker
                from stream.settings import Settings

                settings = Settings(broker=broker.url, broker_quirks=broker.quirks, group_session_timeout=2.0, metrics_port=0, fetch_wait_ms=args.fetch_wait_ms, processing_guarantee=guarantee)
                return start_worker(settings, bundle, work / "streamrec.log")

            return start

        systems = {
            "a": ("(a) Faust echo, per event", start_baseline("echo")),
            "b": ("(b) naive: eager torch, whole session, batch 1", start_baseline("naive")),
            "c": ("(c) streamrec worker", start_streamrec(bundle_dir)),
            "c8": ("(c) streamrec worker, int8 bundle", start_streamrec(work / "bundle-int8")),
        }
        engines = args.engines.split(",")
        if not engines or any(e not in ENGINES for e in engines):
            raise SystemExit(f"--engines takes {', '.join(ENGINES)}, got {args.engines!r}")
        if args.eos_cost:
            results = [
                measure(systems["c"][0] + ", at_least_once", systems["c"][1], items, args, rng, "kafka"),
                measure(systems["c"][0] + ", exactly_once", start_streamrec(bundle_dir, "exactly_once"), items, args, rng, "kafka", isolation_level="read_committed"),
            ]
            section = render_eos(results, args, f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
            print(section)
            if not args.no_write:
                write_section(DOC, section)
                print(f"wrote {DOC} ({EOS_SECTION})", file=sys.stderr)
            return
        if args.profile:
            result = measure(systems["c"][0], systems["c"][1], items, args, rng, engines[0], profile_path=work / "profile.txt")
            section = profile_table(work / "profile.txt", result, f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
            print(section)
            if not args.no_write:
                write_section(DOC, section)
                print(f"wrote {DOC} ({PROFILE_SECTION})", file=sys.stderr)
            return
        ceilings = {name: scorer_ceiling(work / name) for name in ("bundle", "bundle-int8")}
        print(f"Scorer.step alone at batch 256 (events/s, events per CPU second): {ceilings}", file=sys.stderr)
        results = [measure(systems[s][0], systems[s][1], items, args, rng, engine) for engine in engines for s in args.systems.split(",")]
    load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    section = render(results, args, len(items), load, ceilings)
    print(section)
    if not args.no_write:
        plot(results, args.rate)
        write_section(DOC, section)
        print(f"wrote {DOC} ({SECTION}) and {PLOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
