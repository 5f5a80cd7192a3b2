"""Takeover with many live sessions: memory vs RocksDB store, with and without a standby replica.

On one Apache Kafka node (KRaft), for each number of live sessions N (``--sessions``):

1. two `streamrec serve` workers (memory store) on 4 partitions are given one click per session,
   N sessions, sent flat out by a batching producer outside the workers, and answer them all: the
   session changelog then holds N states (one record each);
2. for each store (memory, rocksdb) and standby count (0, 1): the two workers are replaced by two
   fresh ones of that configuration (RocksDB in empty data directories of their own). They first
   configuration: the first alone until it answers on every partition ("cold start": it rebuilds
   all N states from the changelog), then the second, which takes half the partitions over. Once
   their recovery counters have settled (with a standby each also reads the other's partitions), the
   first is SIGKILLed: the survivor never owned its partitions, so what it has of them locally is
   what it stood by for. Takeover = from the SIGKILL to the first answer
   on a partition the killed worker owned: new probe sessions are clicked on those partitions every
   50 ms and read back from ``recommendations``. It includes the consumer group's session timeout
   (``--group-session-timeout``, the time the group needs to notice the death), the rebalance and
   Faust's table recovery of the moved partitions (``recovered``: changelog records the survivor
   read, its streamrec_changelog_records_recovered_total);
3. RSS: of each worker before the kill (the first held all N states during its cold start, the
   second about N/2) and of the survivor after the takeover (all N sessions).

Also measured: the expiry scan's cost (stream.worker._expire walks every session every TTL/10),
outside the worker: the survivor's RocksDB databases (all N states) read back with the worker's own
SessionStore.scan + last_seen_of, and the same loop over a dict of N states (the memory store).

The model is an untrained GRU4Rec (``--hidden`` units; a state is ~800 bytes at 100 units with 50
recent items and K=20) over a small synthetic catalogue: what is measured here does not depend on the
model's cost beyond the populating run.

    python benchmarks/takeover.py --sessions 10000,100000,1000000    # writes "## Takeover and sizing" in docs/stream.md
    python benchmarks/takeover.py --sessions 10000 --no-write        # prints the table only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _fixtures import untrained_gru4rec_run  # noqa: E402
from _report import load_average, produced_by, table, write_section  # noqa: E402  (benchmarks/ is on sys.path)

DOC = ROOT / "docs" / "stream.md"
SECTION = "### Takeover and sizing: measured"
PARTITIONS = 4
CONFIGS = [("memory", 0), ("memory", 1), ("rocksdb", 0), ("rocksdb", 1)]


def build_bundle(work: Path, items: int, hidden: int) -> tuple[Path, list[str]]:
    from export.exporter import export_run
    from training.synth import synthesize

    data = synthesize(items, 20 * items, seed=0, test_fraction=0.05)
    run_dir, bundle_dir = untrained_gru4rec_run(work, data, hidden), work / "bundle"
    export_run(run_dir, bundle_dir, data_dir=work / "data", k=20, parity_sessions=20, log=lambda line: None)
    return bundle_dir, list(data.vocab.item_ids)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(settings, name: str) -> float:
    """A worker's sample ``name``, 0 while its endpoint is not up."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


ANSWERED = 'streamrec_events_total{outcome="answered"}'
RECOVERED = "streamrec_changelog_records_recovered_total"


async def populate(settings, n: int, items: list[str], prefix: str) -> float:
    """One click per session, N sessions, flat out through one batching producer; seconds taken."""
    from stream.events import click_value
    from stream.topics import ensure_topics, producer

    await ensure_topics(settings)
    p = producer(settings, acks=1, linger_ms=20, max_batch_size=256 * 1024)
    await p.start()
    rng = np.random.default_rng(1)
    chosen = rng.integers(0, len(items), size=n)
    started = time.perf_counter()
    try:
        pending = []
        now = time.time()
        for i in range(n):
            sid = f"{prefix}{i}"
            pending.append(await p.send(settings.clicks_topic, click_value(sid, items[chosen[i]], now), key=sid.encode()))
            if len(pending) >= 20000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await p.stop()
    return time.perf_counter() - started


class Prober:
    """Clicks new probe sessions on chosen partitions and waits for their answers on ``recommendations``."""

    def __init__(self, settings):
        self.settings = settings
        self.count = 0

    async def __aenter__(self):
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from stream.topics import producer

        self.producer = producer(self.settings, acks=1)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(**self.settings.kafka_kwargs(), enable_auto_commit=False, fetch_max_wait_ms=20)
        await self.consumer.start()
        tps = [TopicPartition(self.settings.recommendations_topic, p) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        return self

    async def __aexit__(self, *exc):
        await self.producer.stop()
        await self.consumer.stop()

    async def click(self, partition: int) -> str:
        from stream.events import click_value

        self.count += 1
        sid = f"probe-{partition}-{self.count}-{time.time_ns()}"
        await self.producer.send(self.settings.clicks_topic, click_value(sid, "unknown-item", time.time()), key=sid.encode(), partition=partition)
        return sid

    async def first_answer(self, partitions: list[int], timeout: float, every: float = 0.05) -> tuple[float | None, int | None]:
        """Click a new probe session on each of ``partitions`` every ``every`` s until one is answered:
        (monotonic time of the answer, its partition), (None, None) after ``timeout``."""
        import orjson

        waiting: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        next_click = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_click:
                for p in partitions:
                    waiting[await self.click(p)] = p
                next_click = time.monotonic() + every
            batch = await self.consumer.getmany(timeout_ms=20)
            for records in batch.values():
                for r in records:
                    sid = orjson.loads(r.value)["session_id"]
                    if sid in waiting:
                        return time.monotonic(), waiting[sid]
        return None, None


async def owners(workers: list, settings_of: list, timeout: float = 120.0) -> dict[int, int]:
    """Partition -> index of the worker that answers it, found by one probe each (every partition answered)."""
    out = {}
    async with Prober(settings_of[0]) as prober:
        for p in range(PARTITIONS):
            before = [metric(s, ANSWERED) for s in settings_of]
            at, _ = await prober.first_answer([p], timeout, every=1.0)
            if at is None:
                raise SystemExit(f"partition {p} was not answered within {timeout:.0f}s")
            await asyncio.sleep(0.3)
            after = [metric(s, ANSWERED) for s in settings_of]
            grew = [i for i in range(len(workers)) if after[i] > before[i]]
            out[p] = grew[0] if grew else -1
    return out


def split_owners(workers: list, settings_of: list, timeout: float) -> tuple[dict[int, int], float]:
    """Owners once the two workers split the partitions and the split holds on a second look; and the
    monotonic time the first split was seen (both workers answering)."""
    deadline = time.monotonic() + timeout
    first_split = None
    while time.monotonic() < deadline:
        where = asyncio.run(owners(workers, settings_of, timeout=max(deadline - time.monotonic(), 1.0)))
        if set(where.values()) == {0, 1}:
            first_split = first_split or time.monotonic()
            time.sleep(2.0)
            if asyncio.run(owners(workers, settings_of, timeout=max(deadline - time.monotonic(), 1.0))) == where:
                return where, first_split
        else:
            time.sleep(1.0)
    raise SystemExit(f"the two workers did not split the partitions within {timeout:.0f}s")


def settle(settings_of: list, quiet: float = 3.0, timeout: float = 600.0) -> list[float]:
    """Wait until every worker's recovered-records counter has not moved for ``quiet`` s; their values."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = [metric(s, RECOVERED) for s in settings_of]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
        time.sleep(0.5)
    return last


def scan_seconds(rocks_dir: Path | None, states: dict | None) -> tuple[float, int]:
    """Seconds and sessions of one pass of the expiry scan's loop (SessionStore.scan + last_seen_of)."""
    from stream.state import last_seen_of

    started = time.perf_counter()
    n = 0
    if states is not None:
        for key in list(states.keys()):
            raw = states.get(key)
            last_seen_of(raw)
            n += 1
        return time.perf_counter() - started, n
    import rocksdict
    from faust.stores.rocksdb import RocksDBOptions

    from stream.store import ROCKSDB_OPTIONS

    options = RocksDBOptions(**ROCKSDB_OPTIONS, use_rocksdict=True)
    seconds = 0.0
    for path in sorted(rocks_dir.rglob("*.db")):
        db = rocksdict.Rdict(str(path), options=options.as_options())
        started = time.perf_counter()  # opening is not part of the scan
        for key, raw in db.items():
            if key != b"__faust\0offset__":
                last_seen_of(raw)
                n += 1
        seconds += time.perf_counter() - started
        db.close()
    return seconds, n


def run_size(n: int, cluster, bundle: Path, items: list[str], work: Path, args) -> list[dict]:
    from stream.broker import free_port
    from stream.process import start_worker, stop_worker
    from stream.settings import Settings

    prefix = f"n{n}-"
    base = Settings(
        broker=cluster.url,
        clicks_topic=f"{prefix}clicks",
        recommendations_topic=f"{prefix}recommendations",
        dlq_topic=f"{prefix}clicks-dlq",
        model_updates_topic="",
        app_id=f"{prefix}streamrec",
        partitions=PARTITIONS,
        session_ttl=86400.0,
        group_session_timeout=args.group_session_timeout,
        bundle_poll_seconds=0,
        faust_metrics=False,
    )

    def pair(store: str, standby: int, tag: str):
        settings_of = [base.replace(metrics_port=free_port(), store=store, standby_replicas=standby, data_dir=str(work / f"{prefix}{tag}-{i}")) for i in range(2)]
        procs = [start_worker(s, bundle, work / f"{prefix}{tag}-{i}.log") for i, s in enumerate(settings_of)]
        return procs, settings_of

    def one_then_another(store: str, standby: int, tag: str):
        """Worker 0 alone until it answers every partition (the cold start: it rebuilds all N states), then
        worker 1; returns the processes, their settings and the cold start's seconds."""
        settings_of = [base.replace(metrics_port=free_port(), store=store, standby_replicas=standby, data_dir=str(work / f"{prefix}{tag}-{i}")) for i in range(2)]
        started = time.monotonic()
        procs = [start_worker(settings_of[0], bundle, work / f"{prefix}{tag}-0.log")]
        asyncio.run(owners(procs, settings_of[:1], timeout=args.timeout))
        cold = time.monotonic() - started
        procs.append(start_worker(settings_of[1], bundle, work / f"{prefix}{tag}-1.log"))
        return procs, settings_of, cold

    print(f"\n== {n:,} live sessions", file=sys.stderr)
    procs, settings_of = pair("memory", 0, "populate")
    owners_at = asyncio.run(owners(procs, settings_of))
    sent_s = asyncio.run(populate(base, n, items, "s"))
    started = time.monotonic()
    while sum(metric(s, ANSWERED) for s in settings_of) < n + PARTITIONS:
        if time.monotonic() - started > args.timeout:
            raise SystemExit(f"populating {n:,} sessions: {sum(metric(s, ANSWERED) for s in settings_of):,.0f} answered after {args.timeout:.0f}s")
        time.sleep(1.0)
    answered_s = time.monotonic() - started
    print(f"populated: {n:,} clicks sent in {sent_s:.1f}s, all answered {answered_s:.1f}s later (owners {owners_at})", file=sys.stderr)
    for p in procs:
        stop_worker(p, timeout=60)

    rows = []
    for store, standby in CONFIGS:
        tag = f"{store}-{standby}"
        load = load_average()
        procs, settings_of, cold = one_then_another(store, standby, tag)
        try:
            where, _ = split_owners(procs, settings_of, args.timeout)
            recovered_before = settle(settings_of)
            rss_each = [rss_mb(p.pid) for p in procs]
            # the victim is worker 0, which once held every partition: the survivor never owned the moved ones,
            # so what it has of them locally is what it stood by for
            victim, survivor = 0, 1
            moved = sorted(p for p, w in where.items() if w == victim)
            cpu_before = cpu_seconds(procs[survivor].pid)

            async def takeover() -> tuple[float | None, int | None, float]:
                async with Prober(settings_of[survivor]) as prober:
                    os.killpg(procs[victim].pid, signal.SIGKILL)
                    killed = time.monotonic()
                    at, partition = await prober.first_answer(moved, args.timeout)
                    return (at - killed if at is not None else None), partition, killed

            took, partition, _ = asyncio.run(takeover())
            procs[victim].wait(timeout=10)
            cpu = cpu_seconds(procs[survivor].pid) - cpu_before
            recovered = metric(settings_of[survivor], RECOVERED) - recovered_before[survivor]
            time.sleep(1.0)
            rss_survivor = rss_mb(procs[survivor].pid)
        finally:
            for p in procs:
                if p.poll() is None:
                    stop_worker(p, timeout=60)
        scan = scan_seconds(work / f"{prefix}{tag}-{survivor}", None) if store == "rocksdb" else (None, None)
        stalled = sum(open(work / f"{prefix}{tag}-{i}.log", errors="replace").read().count("No event received for active tp") for i in range(2))
        row = dict(sessions=n, store=store, standby=standby, cold_s=cold, takeover_s=took, moved=moved, partition=partition, recovered=recovered, survivor_cpu_s=cpu, rss_each_mb=rss_each, rss_survivor_mb=rss_survivor, scan=scan, load=load, stall_warnings=stalled)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
        for i in range(2):  # the next configuration starts on empty data directories; keep the disk free
            shutil.rmtree(work / f"{prefix}{tag}-{i}", ignore_errors=True)
    return rows


def memory_scan(n: int) -> float:
    """The expiry scan's loop over a dict of N ~800-byte states (the memory store)."""
    from stream.state import HEADER

    raw = HEADER.pack(2, time.time(), 1, 0, 100, 50, 20, 1, 0, 0) + bytes(760)
    states = {f"s{i}".encode(): bytes(raw) for i in range(n)}
    seconds, _ = scan_seconds(None, states)
    return seconds


def render(rows: list[dict], scans: dict[int, float], args, populate_note: str) -> str:
    from _report import environment

    def fmt(x, spec=".1f"):
        return "—" if x is None else format(x, spec)

    lines = [SECTION, ""]
    lines += [
        f"Measured with `benchmarks/takeover.py` ({environment('faust-streaming', 'rocksdict')}; 1-minute load average at each start in the last column: the box is shared, "
        f"so timings swing with it). Two workers on {PARTITIONS} partitions, one Apache Kafka node, group session timeout {args.group_session_timeout:g} s "
        f"(part of every takeover: the time the group needs to notice a SIGKILLed worker). {populate_note}",
        "",
    ]
    header = ["live sessions", "store", "standby", "cold start s", "takeover s", "records read in takeover", "survivor CPU s in takeover", "RSS MB before the kill: first worker (held N at its cold start) / second (N/2)", "survivor RSS MB after the takeover (N)", "load"]
    body = []
    for r in rows:
        body.append([f"{r['sessions']:,}", r["store"], r["standby"], fmt(r["cold_s"]), fmt(r["takeover_s"]), f"{r['recovered']:,.0f}", fmt(r["survivor_cpu_s"]), " / ".join(f"{x:,.0f}" for x in r["rss_each_mb"]), f"{r['rss_survivor_mb']:,.0f}", f"{r['load']:.1f}"])
    lines += table(header, body, "rlrrrrrrrr")
    slopes = []
    for store, standby in CONFIGS:
        mine = sorted((r for r in rows if r["store"] == store and r["standby"] == standby and r["takeover_s"] is not None), key=lambda r: r["sessions"])
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        moved = (hi["sessions"] - lo["sessions"]) / 2  # the victim held half the sessions
        per_takeover = (hi["takeover_s"] - lo["takeover_s"]) / moved * 1e6
        per_cold = (hi["cold_s"] - lo["cold_s"]) / (hi["sessions"] - lo["sessions"]) * 1e6
        per_rss = (hi["rss_survivor_mb"] - lo["rss_survivor_mb"]) * 1024**2 / (hi["sessions"] - lo["sessions"])
        slopes.append([store, standby, f"{lo['sessions']:,} → {hi['sessions']:,}", f"{per_takeover:,.1f}", f"{per_cold:,.1f}", f"{per_rss:,.0f}"])
    if slopes:
        lines += ["", "Per session, between the smallest and the largest N measured (differences of the rows above):", ""]
        lines += table(["store", "standby", "N", "takeover µs per moved session", "cold start µs per session", "survivor RSS bytes per session"], slopes, "lrrrrr")
    lines += ["", "Expiry scan (one pass of `_expire`'s loop over all N states, outside the worker):", ""]
    scan_rows = []
    for n, seconds in scans.items():
        rocks = [r["scan"] for r in rows if r["sessions"] == n and r["store"] == "rocksdb" and r["scan"][0] is not None]
        scan_rows.append([f"{n:,}", f"{seconds:.2f}", " / ".join(f"{s:.2f} ({k:,} states)" for s, k in rocks) or "—"])
    lines += table(["live sessions", "memory (dict) s", "RocksDB (the survivor's databases) s"], scan_rows, "rrr")
    lines += ["", *produced_by()]
    return "\n".join(lines)


def measure_all(sizes: list[int], work: Path, args) -> list[dict]:
    """Every configuration at every size, on one Apache Kafka node; the rows (also appended to --rows)."""
    from stream.kafka import KafkaCluster

    rows = []
    bundle, items = build_bundle(work, args.items, args.hidden)
    with KafkaCluster(data_dir=work / "kafka") as cluster:
        for n in sizes:
            measured = run_size(n, cluster, bundle, items, work, args)
            scan = memory_scan(n)
            print(f"memory scan of {n:,}: {scan:.2f}s", file=sys.stderr)
            for row in measured:
                row["memory_scan_s"] = scan
            rows += measured
            if args.rows:
                with open(args.rows, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in measured)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="10000,100000,1000000", help="live-session counts, comma-separated (empty with --rows: render that file's rows only)")
    parser.add_argument("--items", type=int, default=2000, help="synthetic catalogue size")
    parser.add_argument("--hidden", type=int, default=100, help="GRU4Rec hidden units (sets the state size)")
    parser.add_argument("--group-session-timeout", type=float, default=10.0, help="the workers' --group-session-timeout")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest wait for one step")
    parser.add_argument("--rows", type=Path, help="also append each measured row (JSON lines) to this file, and render the table from all rows in it (runs of different sizes, one table)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()

    sizes = [int(x) for x in args.sessions.split(",") if x]
    rows = []
    if sizes:
        with tempfile.TemporaryDirectory(prefix="streamrec-takeover-") as tmp:
            rows = measure_all(sizes, Path(tmp), args)
    if args.rows:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    note = f"One run per row, single measurements, not averages{f'; the rows are in `{args.rows}`' if args.rows else ''}."
    section = render(rows, {r["sessions"]: r["memory_scan_s"] for r in rows}, args, note)
    print(section)
    if not args.no_write:
        write_section(DOC, section)
        print(f"wrote {DOC} ({SECTION})", file=sys.stderr)


if __name__ == "__main__":
    main()
