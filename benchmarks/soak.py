"""Soak: one `streamrec serve` worker for N minutes at a steady click rate with session expiry on.

Sessions never end on their own: each click goes to one of ``--live-sessions`` open sessions,
and a session that has had its clicks (geometric, mean ``--mean-length``) is replaced by a new
id, so the worker only stays bounded if idle sessions expire (``--session-ttl``). Every
``--sample-seconds`` the benchmark records the worker's resident memory (/proc), its active
sessions, expired sessions, clicks answered, /healthz, and the broker's memory (Apache Kafka by
default, `--engine tansu` for the embedded broker, whose memory grows by design: its memory storage
keeps every record; `--broker` for one already running). At the end every click sent must have
been answered, and the worker must still be healthy.

The model is an untrained GRU4Rec (100 units, the serving cost and state size do not depend on
the weights) over a synthetic catalogue, exported to a bundle, as in benchmarks/stream.py.

    python benchmarks/soak.py --minutes 30          # writes "## Soak" in docs/reliability.md and docs/img/soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import command_line, pyplot, save_figure, table, write_section  # noqa: E402  (benchmarks/ is on sys.path)

DOC = ROOT / "docs" / "reliability.md"
PLOT = ROOT / "docs" / "img" / "soak.png"
SECTION = "## Soak"
ENGINES = {"kafka": "Apache Kafka 4.4", "tansu": "the embedded broker"}


def build_bundle(work: Path, items: int, hidden: int) -> tuple[Path, list[str]]:
    import torch

    from export.exporter import export_run
    from training.models import get_model
    from training.synth import synthesize

    data = synthesize(items, items * 3, seed=0, test_fraction=0.05)
    data.save(work / "data")
    cls = get_model("gru4rec")
    torch.manual_seed(0)
    model = cls(data.n_items, cls.Config(layers=(hidden,)))  # untrained: serving cost does not depend on the weights
    run_dir, bundle_dir = work / "run", work / "bundle"
    model.save(run_dir)
    (run_dir / "vocab.json").write_text((work / "data" / "vocab.json").read_text())
    export_run(run_dir, bundle_dir, data_dir=work / "data", k=20, parity_sessions=20, log=lambda _: None)
    return bundle_dir, data.vocab.item_ids


class ClickSource(threading.Thread):
    """Clicks at ``rate``/s over ever-renewed sessions, from a thread with its own event loop."""

    def __init__(self, settings, item_ids: list[str], rate: float, live: int, mean_length: float, seed: int):
        super().__init__(daemon=True)
        self.settings, self.rate = settings, rate
        self.items = np.array(item_ids, dtype=object)
        self.rng = np.random.default_rng(seed)
        self.mean_length = mean_length
        self.live = [self._new_session(i) for i in range(live)]
        self.next_session = live
        self.sent = 0
        self.sessions_started = live
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _new_session(self, n: int) -> list:
        return [f"soak-{n}", int(self.rng.geometric(1.0 / self.mean_length))]

    def run(self) -> None:
        try:
            asyncio.run(self._send())
        except BaseException as e:
            self.error = e

    async def _send(self) -> None:
        from stream.events import click_value
        from stream.topics import producer

        p = producer(self.settings, linger_ms=5)
        await p.start()
        topic = self.settings.clicks_topic
        started = time.perf_counter()
        pending = []
        try:
            while not self.stop.is_set():
                due = self.sent / self.rate - (time.perf_counter() - started)
                if due > 0.001:
                    await asyncio.sleep(due)
                slot = int(self.rng.integers(len(self.live)))
                session = self.live[slot]
                session[1] -= 1
                item = self.items[int(self.rng.integers(len(self.items)))]
                pending.append(await p.send(topic, click_value(session[0], item, time.time()), key=session[0].encode()))
                if session[1] <= 0:
                    self.live[slot] = self._new_session(self.next_session)
                    self.next_session += 1
                    self.sessions_started += 1
                self.sent += 1
                if len(pending) >= 500:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
        finally:
            await p.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


MAPPING_KINDS = {  # where a worker's resident memory lives, by the kind of mapping holding it
    "brk_heap": "main heap ([heap]: glibc's main arena, the event loop's objects over 512 B)",
    "anon_arenas": "anonymous mappings of 60 MB or more (glibc's per-thread arenas)",
    "anon_mid": "anonymous mappings of 1 to 60 MB (pymalloc's arenas, large buffers)",
    "anon_small": "anonymous mappings under 1 MB",
    "file": "file-backed (code, shared libraries, mapped files)",
}


def memory_by_mapping(pid: int) -> dict[str, float]:
    """The worker's resident memory (MB) by kind of mapping (MAPPING_KINDS, from /proc/PID/smaps), with
    ``anon_mb`` their anonymous total, and its threads (each may hold a glibc arena): a creep shows in
    one kind, which says whose allocations grow."""
    kinds = dict.fromkeys(MAPPING_KINDS, 0.0)
    kind = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line: range perms offset dev inode [name]
            start, end = (int(x, 16) for x in head[0].split("-"))
            size, name = (end - start) / 2**20, head[5].strip() if len(head) > 5 else ""
            kind = ("brk_heap" if name == "[heap]" else None if name.startswith("[") else "file" if name
                    else "anon_arenas" if size >= 60 else "anon_mid" if size >= 1 else "anon_small")
        elif line.startswith("Rss:") and kind is not None:
            kinds[kind] += int(line.split()[1]) / 1024.0
    threads = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Threads:"))
    return {**kinds, "anon_mb": sum(v for k, v in kinds.items() if k != "file"), "threads": threads}


def trend_mb_per_hour(samples: list[dict], key: str) -> float:
    """Least-squares slope of ``key`` over the samples, in MB per hour."""
    points = [(s["t"], s[key]) for s in samples if key in s and np.isfinite(s[key])]
    return float(np.polyfit(*zip(*points), 1)[0]) * 3600 if len(points) >= 2 else float("nan")


def scrape(settings) -> dict[str, float]:
    """The worker's figures from /metrics and /healthz; a worker that does not answer within 5 s gives an
    unhealthy sample of NaNs (its event loop was blocked that long), not the end of the soak."""
    base = f"http://{settings.metrics_host}:{settings.metrics_port}"
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:  # a timeout or a refused connection (urllib.error.URLError is an OSError)
        text = ""
    wanted = {
        "answered": 'streamrec_events_total{outcome="answered"}',
        "dead_lettered": 'streamrec_events_total{outcome="dead_lettered"}',
        "active_sessions": "streamrec_active_sessions",
        "expired": "streamrec_expired_sessions_total",
        "stalled": "streamrec_stalled",
    }
    values = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines() if line and not line.startswith("#")}
    out = {name: values.get(key, float("nan")) for name, key in wanted.items()}
    buckets = sorted((float(re.search(r'le="([^"]+)"', k).group(1)), v) for k, v in values.items() if k.startswith("streamrec_end_to_end_seconds_bucket"))
    out["latency_buckets"] = buckets
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            out["healthy"] = r.status == 200
    except OSError:  # urllib.error.HTTPError (not 200) and timeouts alike
        out["healthy"] = False
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Upper bucket bound holding the q-quantile of a cumulative Prometheus histogram."""
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


def plot(samples: list[dict], args) -> None:
    plt = pyplot()
    minutes = [s["t"] / 60 for s in samples]
    by_kind = any("brk_heap" in s for s in samples)
    fig, axes = plt.subplots(3 if by_kind else 2, 1, figsize=(8, 9 if by_kind else 6), sharex=True)
    top, bottom = axes[0], axes[-1]
    top.plot(minutes, [s["worker_mb"] for s in samples], label="worker RSS (MB)", color="tab:blue")
    if not args.broker:
        label = "embedded broker RSS (MB, keeps every record)" if args.engine == "tansu" else "Apache Kafka RSS (MB)"
        top.plot(minutes, [s["broker_mb"] for s in samples], label=label, color="tab:gray", linestyle="--")
    top.set_ylabel("MB")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"streamrec soak: {args.rate:,.0f} clicks/s, session TTL {args.session_ttl:.0f} s")
    if by_kind:
        for kind, label in MAPPING_KINDS.items():
            axes[1].plot(minutes, [s.get(kind, float("nan")) for s in samples], label=label)
        axes[1].set_ylabel("worker MB")
        axes[1].legend(loc="upper left", fontsize=7)
    bottom.plot(minutes, [s["active_sessions"] for s in samples], label="active sessions", color="tab:green")
    bottom.plot(minutes, [max(0.0, s["sent"] - s["answered"]) for s in samples], label="clicks sent but not yet answered", color="tab:red", linewidth=0.8)
    bottom.set_ylabel("count")
    bottom.set_xlabel("minutes")
    bottom.legend(loc="upper left", fontsize=8)
    save_figure(fig, PLOT)


def render(samples: list[dict], summary: dict, args) -> str:
    warm = [s for s in samples if s["t"] >= summary["warmup_s"]]
    warm_anon = [s["anon_mb"] for s in (warm or samples)]
    step = max(1, len(samples) // 12)
    rows = [
        (f"{s['t'] / 60:.1f}", f"{s['worker_mb']:.0f}", f"{s['anon_mb']:.0f}", f"{s['active_sessions']:,.0f}", f"{s['expired']:,.0f}", f"{s['answered']:,.0f}",
         f"{max(0.0, s['sent'] - s['answered']):,.0f}", "yes" if s["healthy"] else "NO")
        for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    ]
    figures = [
        ("clicks sent / answered (within 2 minutes of the end)", f"{summary['sent']:,} / {summary['answered']:,.0f}{'' if summary['answered'] == summary['sent'] else ' — **not all answered**'}"),
        ("sessions started / expired", f"{summary['sessions_started']:,} / {summary['expired']:,.0f}"),
        ("active sessions after warm-up (min – max)", f"{min(s['active_sessions'] for s in warm):,.0f} – {max(s['active_sessions'] for s in warm):,.0f}"),
        ("worker RSS at warm-up end → end", f"{summary['rss_warm']:.0f} MB → {summary['rss_end']:.0f} MB"),
        ("worker anonymous memory at warm-up end → end", f"{warm_anon[0]:.0f} MB → {warm_anon[-1]:.0f} MB"),
        *([("worker memory trend after warm-up, by mapping (MB/hour)", ", ".join(f"{k} {trend_mb_per_hour(warm, k):+.1f}" for k in MAPPING_KINDS))] if warm and "brk_heap" in warm[0] else []),
        ("worker RSS trend after warm-up / over the last half (least squares)", f"{summary['slope_mb_per_hour']:+.1f} / {summary['late_slope_mb_per_hour']:+.1f} MB/hour"),
        ("most clicks sent but not yet answered in a sample", f"{max(max(0.0, s['sent'] - s['answered']) for s in samples):,.0f}"),
        *([(f"{ENGINES[args.engine]} RSS start → end", f"{samples[0]['broker_mb']:.0f} MB → {samples[-1]['broker_mb']:.0f} MB")] if not args.broker else []),
        ("end-to-end latency p50 / p99 (histogram bucket bounds)", f"{_bound(summary['p50'])} / {_bound(summary['p99'])}"),
        ("/healthz not 200 in a sample", f"{summary['unhealthy_samples']} of {len(samples)}"),
    ]
    lines = [
        SECTION,
        "",
        f"Measured {date.today():%Y-%m-%d} on {platform.machine()} ({summary['cpus']} cores shared with other work), "
        f"{summary['minutes']:.1f} minutes at {args.rate:,.0f} clicks/s, `--session-ttl {args.session_ttl:g}`, "
        f"{args.live_sessions:,} open sessions renewed after a mean of {args.mean_length:g} clicks, untrained GRU4Rec "
        f"({args.hidden} units, {summary['n_items']:,} items), one worker on {ENGINES[args.engine] if not args.broker else args.broker}:",
        "",
        "```",
        summary["command"],
        "```",
        "",
        *table(["figure", "value"], figures),
        "",
        f"Warm-up = the first {summary['warmup_s'] / 60:.1f} minutes (session TTL plus the time for the first sessions to age out). "
        + ("The embedded broker's memory grows by design (memory storage, no retention); the worker's" if args.engine == "tansu" and not args.broker else "The worker's") + " memory is what must stay flat.",
        "",
        *table(["minute", "worker RSS MB", "of it anonymous", "active sessions", "expired (total)", "answered (total)", "not yet answered", "healthy"], rows, "rrrrrrrc"),
        "",
        "![soak](img/soak.png)",
        "",
    ]
    return "\n".join(lines)


def _bound(seconds: float) -> str:
    return f"≤ {seconds * 1000:,.0f} ms" if np.isfinite(seconds) else "> 10 s (beyond the last bucket)"


def main() -> None:
    import os

    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--rate", type=float, default=200.0, help="clicks per second")
    parser.add_argument("--session-ttl", type=float, default=60.0, help="the worker's --session-ttl (seconds)")
    parser.add_argument("--live-sessions", type=int, default=500, help="sessions open at any time")
    parser.add_argument("--mean-length", type=float, default=8.0, help="mean clicks of a session before it is replaced")
    parser.add_argument("--items", type=int, default=20_000, help="catalogue size asked of the generator")
    parser.add_argument("--hidden", type=int, default=100, help="GRU4Rec hidden units")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="time between samples")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="kafka", help="the broker to start: Apache Kafka (default) or the embedded one (slows down as its memory store fills)")
    parser.add_argument("--broker", default=None, help="kafka://HOST:PORT of a running Apache Kafka instead of starting one")
    parser.add_argument("--no-write", action="store_true", help="print the figures only")
    parser.add_argument("--samples-json", type=Path, default=None, help="also write every sample to this JSON file")
    parser.add_argument("--from-samples", type=Path, default=None, help="run nothing: report the run whose --samples-json this is (give it the run's other flags too)")
    args = parser.parse_args()
    if min(args.minutes, args.rate, args.session_ttl, args.sample_seconds, args.mean_length) <= 0 or args.live_sessions < 1:
        parser.error("--minutes, --rate, --session-ttl, --sample-seconds, --mean-length and --live-sessions must be positive")

    if args.from_samples:
        if not args.from_samples.is_file():
            parser.error(f"--from-samples {args.from_samples}: no such file")
        data = json.loads(args.from_samples.read_text())
        report(data["samples"], data["summary"], args)
        return

    from stream.broker import EmbeddedBroker, free_port
    from stream.kafka import KafkaCluster
    from stream.process import start_worker, stop_worker, wait_until_serving
    from stream.settings import Settings

    command = command_line()
    with tempfile.TemporaryDirectory(prefix="streamrec-soak-") as tmp:
        work = Path(tmp)
        print("building the bundle ...", file=sys.stderr)
        bundle, item_ids = build_bundle(work, args.items, args.hidden)
        if args.broker:
            started = contextlib.nullcontext()
        else:
            started = KafkaCluster(data_dir=work / "kafka") if args.engine == "kafka" else EmbeddedBroker(log_path=work / "broker.log")
        with started as broker:
            url, quirks = (broker.url, broker.quirks) if broker is not None else (args.broker, "none")
            settings = Settings(broker=url, broker_quirks=quirks, metrics_port=free_port(), session_ttl=args.session_ttl)
            worker = start_worker(settings, bundle, work / "worker.log")
            try:
                wait_until_serving(settings, worker, timeout=180)
                source = ClickSource(settings, item_ids, args.rate, args.live_sessions, args.mean_length, seed=0)
                source.start()
                samples: list[dict] = []
                started = time.monotonic()
                total = args.minutes * 60
                with tqdm(total=round(total), unit="s", desc="soak", mininterval=5) as bar:
                    while (elapsed := time.monotonic() - started) < total:
                        time.sleep(min(args.sample_seconds, total - elapsed))
                        if worker.poll() is not None:
                            raise SystemExit(f"the worker exited (status {worker.returncode}); log: {work / 'worker.log'}")
                        if source.error is not None:
                            raise source.error
                        s = scrape(settings)
                        s.update(t=time.monotonic() - started, worker_mb=rss_mb(worker.pid), broker_mb=rss_mb(broker.process.pid) if broker is not None else float("nan"), sent=source.sent, **memory_by_mapping(worker.pid))
                        samples.append(s)
                        bar.update(round(s["t"]) - bar.n)
                        bar.set_postfix_str(f"rss {s['worker_mb']:.0f} MB, sessions {s['active_sessions']:,.0f}, answered {s['answered']:,.0f}/{source.sent:,}")
                source.stop.set()
                source.join(60)
                deadline = time.monotonic() + 120
                while not (final := scrape(settings))["answered"] + final["dead_lettered"] >= source.sent + 1 and time.monotonic() < deadline:  # +1: the readiness probe
                    time.sleep(1)
                final_rss = rss_mb(worker.pid)
            finally:
                status = stop_worker(worker)
        if status != 0:
            raise SystemExit(f"the worker exited with status {status}")

    warmup = min(args.session_ttl + 2 * args.live_sessions * args.mean_length / args.rate, 0.5 * total)
    warm = [s for s in samples if s["t"] >= warmup] or samples[-2:]
    slope = trend_mb_per_hour(warm, "worker_mb")
    late_slope = trend_mb_per_hour(samples[len(samples) // 2 :], "worker_mb")
    summary = {
        "command": command,
        "cpus": os.cpu_count(),
        "minutes": samples[-1]["t"] / 60,
        "n_items": len(item_ids),
        "sent": source.sent,
        "answered": final["answered"] - 1,
        "expired": final["expired"],
        "sessions_started": source.sessions_started,
        "warmup_s": warmup,
        "rss_warm": warm[0]["worker_mb"],
        "rss_end": final_rss,
        "slope_mb_per_hour": slope,
        "late_slope_mb_per_hour": late_slope,
        "p50": quantile(final["latency_buckets"], 0.5),
        "p99": quantile(final["latency_buckets"], 0.99),
        "unhealthy_samples": sum(not s["healthy"] for s in samples),
    }
    if args.samples_json:
        args.samples_json.write_text(json.dumps({"summary": summary, "samples": samples}, indent=0))
    report(samples, summary, args)


def report(samples: list[dict], summary: dict, args) -> None:
    """Print the section, write it with the plot (unless --no-write), and fail if a click went unanswered."""
    section = render(samples, summary, args)
    print(section)
    print(json.dumps({k: v for k, v in summary.items() if k != "command"}, indent=1), file=sys.stderr)
    if not args.no_write:
        plot(samples, args)
        write_section(DOC, section)
        print(f"wrote {DOC.relative_to(ROOT)} ({SECTION}) and {PLOT.relative_to(ROOT)}", file=sys.stderr)
    if summary["answered"] != summary["sent"]:
        raise SystemExit(f"{summary['sent'] - summary['answered']:,.0f} clicks were not answered within 2 minutes of the end")

if __name__ == "__main__":
    main()
