"""The retraining loop on a drifting stream: online HR@20 over time around a promotion (docs/experiments.md).

A GRU4Rec is trained on one synthetic item graph (``generate_log(seed=1)``) and served by a
`streamrec serve` worker on Apache Kafka. Clicks are streamed at ``--rate`` per second: first
held-out sessions of that graph, then, from ``--drift-at`` seconds on, sessions of another graph
over the same items (``seed=2``: other successors, other popular items). `streamrec retrain --every
PERIOD --window PERIOD` runs alongside from ``--retrain-at`` on, as an operator would run it, and
is stopped with SIGTERM at the end. Afterwards the script reads both topics, pairs every click with
the list published after its session's previous click (as `streamrec score-online` does), and plots
online HR@20 per ``--bucket`` seconds of click time, with the drift, each round and the swap marked.

    python benchmarks/retrain_drift.py                 # writes docs/img/retrain_drift.png, prints rounds.jsonl
    python benchmarks/retrain_drift.py --keep runs/drift   # also keeps data, bundles, rounds, logs and summary.json
    python benchmarks/retrain_drift.py --replot runs/drift/summary.json   # redraws the plot only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream.broker import free_port  # noqa: E402
from stream.events import click_value, online_rank, parse_click  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.topics import consume_all, ensure_topics, producer  # noqa: E402


def messages(df, prefix: str) -> list[tuple[bytes, bytes]]:
    df = df.sort_values("time", kind="stable")
    return [((prefix + s).encode(), click_value(prefix + s, i, t)) for s, i, t in zip(df["session_id"], df["item_id"], df["time"])]


async def paced(settings: Settings, msgs, rate: float, stop: threading.Event) -> float:
    """Send ``msgs`` at ``rate`` per second; the wall time the last one was sent."""
    p = producer(settings)
    await p.start()
    started = time.perf_counter()
    try:
        for i, (key, value) in enumerate(msgs):
            wait = i / rate - (time.perf_counter() - started)
            if wait > 0.001:
                await asyncio.sleep(wait)
            if stop.is_set():
                break
            await p.send(settings.clicks_topic, value, key=key)
        await p.flush()
    finally:
        await p.stop()
    return time.time()


def online_by_time(clicks, recs, t0: float, bucket: float, k: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bucket start in seconds since t0, HR@k, evaluated clicks) of every click that followed a published list."""
    lists = {}
    for r in recs:
        doc = orjson.loads(r.value)
        lists.setdefault((doc["session_id"], int(doc["position"])), (np.array(doc["items"], dtype=object), np.asarray(doc["scores"], dtype=np.float32)))
    position: dict[str, int] = defaultdict(int)
    hits, counts = defaultdict(int), defaultdict(int)
    for r in clicks:
        c = parse_click(r.key, r.value)
        position[c.session_id] += 1
        previous = lists.get((c.session_id, position[c.session_id] - 1))
        if previous is None:
            continue
        b = int((r.timestamp / 1000.0 - t0) // bucket)
        rank = online_rank(previous[0], previous[1], c.item_id)
        counts[b] += 1
        hits[b] += 0 < rank <= k
    keys = sorted(counts)
    return np.array(keys) * bucket, np.array([hits[b] / counts[b] for b in keys]), np.array([counts[b] for b in keys])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100.0, help="clicks per second")
    ap.add_argument("--drift-at", type=float, default=60.0, help="seconds after the start when the new graph takes over")
    ap.add_argument("--retrain-at", type=float, default=50.0, help="seconds after the start of `streamrec retrain --every`")
    ap.add_argument("--period", type=float, default=60.0, help="--every and --window of the retrain loop, seconds")
    ap.add_argument("--seconds", type=float, default=240.0, help="length of the stream")
    ap.add_argument("--bucket", type=float, default=10.0, help="seconds of click time per plotted point")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work directory here")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "retrain_drift.png")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the plot from a run's summary.json")
    args = ap.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.plot)
        return

    import shutil

    from export.exporter import export_run
    from stream.kafka import KafkaCluster
    from stream.process import start_worker, stop_worker, wait_until_serving
    from streamrec.runtime import configure_process
    from training.models import get_model
    from training.synth import generate_log, synthesize

    work = args.keep or Path(tempfile.mkdtemp(prefix="retrain-drift-"))
    work.mkdir(parents=True, exist_ok=True)
    n_old = int(args.drift_at * args.rate / 6) + 200  # held-out sessions of the old graph, ~6 clicks each
    n_new = int((args.seconds - args.drift_at) * args.rate / 6) + 200
    stale_data = synthesize(args.items, 4 * n_old, seed=1, test_fraction=0.25)
    stale_data.save(work / "data-stale")
    cls = get_model("gru4rec")
    config = cls.Config(layers=(64,), epochs=args.epochs, n_sample=256, batch_size=32, threads=1)
    configure_process(threads=config.threads, keep_freed_memory=True)  # torch's threads and glibc's allocator, before anything trains
    t = time.perf_counter()
    run_dir = work / "run-stale"
    model = cls.train(stale_data, config, progress=True, run_dir=run_dir)
    model.save(run_dir)
    shutil.copyfile(work / "data-stale" / "vocab.json", run_dir / "vocab.json")
    print(f"stale GRU4Rec trained in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    root = work / "bundles"
    export_run(run_dir, root / "stale", data_dir=work / "data-stale", force=True, log=lambda _: None)
    old_log = generate_log(args.items, 4 * n_old, seed=1)
    old_ids = sorted(old_log["session_id"].unique(), key=int)[-n_old:]  # the newest sessions: the stale model's test split
    new_log = generate_log(args.items, n_new, seed=2)
    old_msgs = messages(old_log[old_log["session_id"].isin(set(old_ids))], "old-")[: int(args.drift_at * args.rate)]
    new_msgs = messages(new_log, "new-")[: int((args.seconds - args.drift_at) * args.rate)]

    with KafkaCluster(data_dir=work / "kafka") as kafka:
        settings = Settings(broker=kafka.url, broker_quirks=kafka.quirks, metrics_port=free_port(), partitions=3)
        asyncio.run(ensure_topics(settings))
        worker = start_worker(settings, root / "stale", work / "worker.log")
        try:
            wait_until_serving(settings, worker, timeout=120)
            stop = threading.Event()
            t0 = time.time()
            retrainer = None

            def start_retrain() -> subprocess.Popen:
                cmd = [sys.executable, "-m", "stream.cli", "retrain", "--broker", kafka.url, "--serving", str(root / "stale"), "--out", str(root / "retrain"),
                       "--window", f"{args.period:g}s", "--every", f"{args.period:g}s", "--epochs", str(args.epochs), "--margin", "0.01"]
                print("$ streamrec " + " ".join(cmd[3:]), file=sys.stderr)
                return subprocess.Popen(cmd, cwd=REPO, stdout=open(work / "retrain.log", "ab"), stderr=subprocess.STDOUT)

            timer = threading.Timer(args.retrain_at, lambda: retrainers.append(start_retrain()))
            retrainers: list = []
            timer.start()
            asyncio.run(paced(settings, old_msgs + new_msgs, args.rate, stop))
            timer.cancel()
            ended = time.time()
            for retrainer in retrainers:
                retrainer.send_signal(signal.SIGTERM)  # it finishes its round and stops
                retrainer.wait(timeout=600)
                print(f"retrain loop exited with status {retrainer.returncode}", file=sys.stderr)
            topics = asyncio.run(consume_all(settings, [settings.clicks_topic, settings.recommendations_topic], expect={settings.recommendations_topic: len(old_msgs) + len(new_msgs) + 1}, timeout=300))
        finally:
            stop_worker(worker)
    clicks = [r for r in topics[settings.clicks_topic] if not r.key.startswith(b"streamrec-probe")]
    clicks.sort(key=lambda r: (r.partition, r.offset))
    recs = topics[settings.recommendations_topic]
    when, hr, n = online_by_time(clicks, recs, t0, args.bucket)
    path = root / "retrain" / "rounds.jsonl"
    rounds = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    swaps = {}
    for r in recs:
        doc = orjson.loads(r.value)
        if doc["session_id"] != "streamrec-probe":
            swaps.setdefault(doc["model_version"], r.timestamp / 1000.0 - t0)  # first answer by each version
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "stream_seconds": ended - t0,
        "buckets": [{"t": float(a), "hr20": float(b), "clicks": int(c)} for a, b, c in zip(when, hr, n)],
        "swaps": swaps,
        "rounds": [{**rd, "window_end": rd["window"]["until_unix"] - t0} for rd in rounds],
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.plot)
    print(f"wrote {args.plot} and {work / 'summary.json'}; stream {ended - t0:.0f}s", file=sys.stderr)
    for line in path.read_text().splitlines() if rounds else []:
        print(line)


def plot(summary: dict, out: Path) -> None:
    """Online HR@20 per bucket of click time (buckets with under a quarter of the usual clicks left out), drift, rounds and swaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary["settings"]
    full = s["bucket"] * s["rate"] / 4
    points = [b for b in summary["buckets"] if b["clicks"] >= full]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.plot([b["t"] + s["bucket"] / 2 for b in points], [b["hr20"] for b in points], marker="o", ms=3, color="tab:blue", label=f"online HR@20 per {s['bucket']:g} s of clicks")
    ax.axvline(s["drift_at"], color="tab:red", ls="--", label="item graph changes")
    for i, rd in enumerate(summary["rounds"]):
        ax.axvline(rd["window_end"], color="tab:gray", ls=":", label="retrain round starts (its window ends)" if i == 0 else None)
        ax.annotate(f"round {rd['round']}: {rd['decision']}", (rd["window_end"] + 1, 0.03 + 0.06 * (i % 2)), fontsize=8)
    for i, (version, at) in enumerate(list(summary["swaps"].items())[1:]):
        ax.axvline(at, color="tab:green", label="first answer by a promoted model" if i == 0 else None)
    ax.set_xlabel(f"seconds since the stream started ({s['rate']:g} clicks/s)")
    ax.set_ylabel("online HR@20")
    ax.set_ylim(0, 1)
    ax.legend(loc="center left", bbox_to_anchor=(0.01, 0.4), fontsize=8)  # below the first minute's line
    ax.set_title("streamrec retrain --every on a drifting stream (Apache Kafka, GRU4Rec)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
