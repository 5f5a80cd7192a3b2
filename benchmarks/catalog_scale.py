"""Scoring cost against catalogue size: exact fp32, exact int8 and ann retrieval (faiss + exact re-ranking), GRU4Rec or SASRec.

For every catalogue size a GRU4Rec with 100 units, or a SASRec with the paper's sizes
(untrained apart from the item vectors: serving cost does not depend on the weights), is exported three ways, and each bundle is timed through
``Scorer.step`` in a fresh process of its own (so its RSS is its own) at batch 1, 32 and 256
on random clicks with random hidden states. Item vectors are synthetic: by default 1,000
random topic centres plus noise ("clustered"), because trained item embeddings cluster and a
catalogue of uniformly random vectors (``--embeddings uniform``) is the worst case for any
index. Recall@20 of the ann bundle is measured against the exact fp32 bundle on the same
timed calls (an ann item counts when its exact score reaches the exact 20th best), and at
export on the parity prefixes. With ``--stream`` (the default) each way of serving is also run
end to end: `streamrec serve` with the bundle on a fresh Apache Kafka node, through
``benchmarks/stream.py --bundle`` (max events/s of one worker, p90 at 1,000 clicks/s, its RSS).
``--trained RUN_DIR...`` measures trained runs instead (recall on their own test prefixes;
section "## Catalogue scale: trained embeddings").

Writes a section "## Catalogue scale" into docs/performance.md and docs/img/catalog_scale.png
unless --no-write. Run it niced on a shared box:

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/catalog_scale.py [--sizes 40000,200000,1000000] [--model gru4rec|sasrec] [--ann-index ivfpq|ivf|hnsw] [--search 512,1024]
    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/catalog_scale.py --trained RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.defaults import ANN_INDEX, ANN_INDEXES, ANN_METRIC, ANN_METRICS, MIN_RECALL
from streamrec.errors import UserError
from streamrec.runtime import configure_process

from _report import environment, produced_by, pyplot, save_figure, table, write_section  # benchmarks/ is on sys.path

BATCH_SIZES = (1, 32, 256)
K = 20
DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
PLOT = DOC.parent / "img" / "catalog_scale.png"
SECTION = "## Catalogue scale"  # a run with another index than the default, e.g. --ann-index ivf, writes "## Catalogue scale: IVF" and its own plot
MODES = ("exact fp32", "exact int8", "ann")  # "ann" is searched with the export's ef_search; --ef-search adds "ann, ef N" rows


def synthetic_data(n_items: int, out: Path, rng: np.random.Generator):
    """A prepared dataset over ``n_items`` items: random train sessions (popularity) and test sessions (parity)."""
    from training.data import PreparedData, Vocab
    from training.sessions import Sessions

    def sessions(n: int) -> Sessions:
        lengths = rng.integers(2, 10, size=n)
        items = rng.integers(1, n_items + 1, size=int(lengths.sum()))
        return Sessions.from_lists([list(s) for s in np.split(items, np.cumsum(lengths)[:-1])])

    data = PreparedData(Vocab([f"i{i}" for i in range(n_items)]), sessions(5000), sessions(300))
    data.save(out)
    return PreparedData.load(out)


def model_run(name: str, data, data_dir: Path, run_dir: Path, embeddings: str, rng: np.random.Generator) -> None:
    """An untrained GRU4Rec (100 units) or SASRec (paper defaults) run whose item vectors (and biases) are synthetic."""
    import torch

    from training.models import get_model

    cls = get_model(name)
    if name == "gru4rec":
        model = cls(data.n_items, cls.Config())
        table, bias = model.net.item_out, model.net.item_bias
    else:
        model = cls(cls.Config(), data.n_items)
        table, bias = model.net.item_embedding.weight, None
    n, h = table.shape
    if embeddings == "clustered":
        centres = rng.standard_normal((1000, h)).astype(np.float32)
        vectors = centres[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, h), dtype=np.float32)
    else:
        vectors = rng.standard_normal((n, h), dtype=np.float32)
    vectors[0] = 0  # padding
    with torch.no_grad():
        table.copy_(torch.from_numpy(0.1 * vectors))
        if bias is not None:
            bias.copy_(torch.from_numpy(0.01 * rng.standard_normal((n, 1), dtype=np.float32)))
    model.save(run_dir)
    (run_dir / "vocab.json").write_text((data_dir / "vocab.json").read_text())
    doc = json.loads((run_dir / "config.json").read_text())
    doc["data"] = {"path": str(data_dir)}
    (run_dir / "config.json").write_text(json.dumps(doc))


def model_label(name: str) -> str:
    if name == "gru4rec":
        return "GRU4Rec with 100 units"
    from training.models import get_model

    c = get_model(name).Config()
    return f"SASRec (paper defaults: hidden {c.hidden_size}, {c.blocks} blocks, window {c.history_len})"


def same_index(ann: dict, width: int) -> dict:
    """A copy of the ann bundle whose manifest asks for another search width (HNSW ``ef_search`` or IVF ``nprobe``;
    search-time settings: same index file)."""
    from export.retrieval import depth_knob

    out = ann["bundle"].with_name(f"{ann['bundle'].name}-{width}")
    shutil.copytree(ann["bundle"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["retrieval"][depth_knob(manifest["retrieval"])] = width
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"bundle": out, "manifest": manifest, "seconds": ann["seconds"]}


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir())


def export_all(run_dir: Path, data_dir: Path, work: Path, n_items: int, threads: int, ann: dict, int8: bool) -> dict[str, dict]:
    """mode -> {bundle, manifest, seconds} for the ways of serving."""
    from export.exporter import export_run

    log = lambda line: print(f"  [{n_items:,}] {line}", file=sys.stderr, flush=True)  # noqa: E731
    out = {}
    ways = [("exact fp32", {}), ("exact int8", {"int8": True, "min_overlap": 0.0}), ("ann", ann)]
    for mode, options in ways if int8 else [ways[0], ways[2]]:
        bundle = work / f"bundle-{n_items}-{mode.replace(' ', '-')}"
        started = time.perf_counter()
        try:
            manifest = export_run(run_dir, bundle, data_dir=data_dir, parity_sessions=30, threads=threads, log=log, **options)
        except UserError as refused:  # timed anyway, at the default depth: its recall columns say how far short
            log(f"{mode}: refused ({refused}); exported again with --min-recall 0 to be timed")
            manifest = export_run(run_dir, bundle, data_dir=data_dir, parity_sessions=30, threads=threads, log=log, **{**options, "min_recall": 0.0})
        out[mode] = {"bundle": bundle, "manifest": manifest, "seconds": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        log(f"{mode}: exported; this process's peak RSS so far {out[mode]['peak_rss_mb']:,.0f} MB")
    return out


def measure_bundle(bundle: Path, threads: int, events: int, exact: Path | None) -> dict:
    """In this process: load the scorer, time it at every batch size, RSS; with ``exact``, recall against it."""
    from export.scorer import StepInput, load_scorer

    rng = np.random.default_rng(1)
    rss_before = rss_mb()
    started = time.perf_counter()
    scorer = load_scorer(bundle, threads=threads)
    load_seconds = time.perf_counter() - started
    result = {"load_seconds": load_seconds, "ms": {}, "cpu_ms": {}}
    calls_by_batch = {}
    for b in BATCH_SIZES:
        n = max(events // 4, b) if b == 1 else events
        calls = []
        for lo in range(0, n, b):
            items = rng.integers(1, scorer.n_items + 1, size=min(b, n - lo))
            hidden = (0.3 * rng.standard_normal((len(items), scorer.hidden_size))).astype(np.float32) if scorer.kind == "hidden" else None
            if scorer.kind == "hidden":
                history = [np.array([i]) for i in items]
            else:  # window models: 8 clicks so far, the last one this click
                history = [np.append(rng.integers(1, scorer.n_items + 1, size=7), i) for i in items]
            calls.append(StepInput(items=items, hidden=hidden, history=history))
        calls_by_batch[b] = calls
        scorer.step(calls[0])  # warm-up (ONNX Runtime's arena, faiss's buffers)
        best, best_cpu = float("inf"), float("inf")
        for _ in range(3):
            wall, cpu = time.perf_counter(), time.process_time()
            for call in calls:
                scorer.step(call)
            best, best_cpu = min(best, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
        result["ms"][b] = 1000 * best / n
        result["cpu_ms"][b] = 1000 * best_cpu / n
    result["rss_mb"] = rss_mb()
    result["rss_scorer_mb"] = result["rss_mb"] - rss_before
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if exact is not None:
        reference = load_scorer(exact, threads=threads)
        hits = total = 0
        for call in calls_by_batch[256]:
            want, got = reference.step(call), scorer.step(call)
            hits += int((got.top_scores >= want.top_scores[:, -1:] - 1e-5).sum())
            total += got.top_scores.size
        result["recall"] = hits / total
    return result


def stream_in_child(bundle: Path, threads: int, events: int) -> dict:
    """One worker serving ``bundle`` on Apache Kafka (benchmarks/stream.py --bundle): events/s, latency, RSS."""
    command = [sys.executable, str(Path(__file__).with_name("stream.py")), "--bundle", str(bundle), "--scorer-threads", str(threads), "--events", str(events), "--seconds", "15", "--timeout", "240"]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), check=False)
    if done.returncode != 0:
        raise SystemExit(f"the stream run of {bundle} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_in_child(bundle: Path, threads: int, events: int, exact: Path | None) -> dict:
    """``measure_bundle`` in a fresh Python process, so that RSS and caches are the bundle's own."""
    command = [sys.executable, __file__, "--measure", str(bundle), "--threads", str(threads), "--events", str(events)]
    if exact is not None:
        command += ["--exact", str(exact)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {bundle} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ms"] = {int(b): v for b, v in result["ms"].items()}
    result["cpu_ms"] = {int(b): v for b, v in result["cpu_ms"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="40000,200000,1000000", help="comma-separated catalogue sizes")
    parser.add_argument("--embeddings", choices=["clustered", "uniform"], default="clustered", help="synthetic item vectors")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--events", type=int, default=1024, help="clicks timed per batch size (batch 1 uses a quarter)")
    parser.add_argument("--model", choices=["gru4rec", "sasrec"], default="gru4rec", help="the model served (untrained, synthetic item vectors)")
    parser.add_argument("--ann-index", choices=list(ANN_INDEXES), default=ANN_INDEX, help="faiss index of the ann bundles (default: the export's)")
    parser.add_argument("--ann-metric", choices=list(ANN_METRICS), default=ANN_METRIC, help="how the ann index searches (default: the export's)")
    parser.add_argument("--min-recall", type=float, default=MIN_RECALL, help="the export's --min-recall: it searches deeper until reached (default: the export's); an export refused under it is reported")
    parser.add_argument("--search", "--ef-search", default="", help="extra search widths to time on the same index, comma-separated (hnsw: ef_search, ivf: nprobe)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="also export and time exact int8")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="also run each way of serving end to end through a worker on Apache Kafka")
    parser.add_argument("--stream-events", type=int, default=20_000, help="clicks of each stream saturation run")
    parser.add_argument("--trained", type=Path, nargs="+", help="trained run directories instead of synthetic catalogues: recall on their test prefixes, cost ann against exact")
    parser.add_argument("--parity-sessions", type=int, default=1000, help="--trained: test sessions whose prefixes measure recall at export")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: time one bundle in this process
    parser.add_argument("--exact", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_bundle(args.measure, args.threads, args.events, args.exact)))
        return

    configure_process(threads=args.threads, keep_freed_memory=True)  # once, at the start: torch's threads, and glibc keeps freed memory for training
    if args.trained:
        section = render_trained(trained_rows(args), args)
        print(section)
        if not args.no_write:
            write_section(DOC, section)
            print(f"wrote {DOC} ({TRAINED_SECTION})", file=sys.stderr)
        return
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamrec-catalog-") as tmp:
        work = Path(tmp)
        for n_items in (int(s) for s in args.sizes.split(",")):
            print(f"catalogue of {n_items:,} items ({args.embeddings} item vectors) ...", file=sys.stderr, flush=True)
            data_dir, run_dir = work / f"data-{n_items}", work / f"run-{n_items}"
            data = synthetic_data(n_items, data_dir, rng)
            model_run(args.model, data, data_dir, run_dir, args.embeddings, rng)
            bundles = export_all(run_dir, data_dir, work, n_items, args.threads, ann_options(args), args.int8)
            knob = {"hnsw": "ef", "ivf": "nprobe", "ivfpq": "nprobe"}[args.ann_index]
            for width in (int(e) for e in args.search.split(",") if e.strip()):
                bundles[f"ann, {knob} {width}"] = same_index(bundles["ann"], width)
            for mode in bundles:
                b = bundles[mode]
                m = measure_in_child(b["bundle"], args.threads, args.events, bundles["exact fp32"]["bundle"] if mode.startswith("ann") else None)
                row = {"model": {"gru4rec": "GRU4Rec H=100,", "sasrec": "SASRec,"}[args.model], "n_items": n_items, "mode": mode, **m, "bundle_mb": bundle_bytes(b["bundle"]) / 1e6, "export_seconds": b["seconds"], "manifest": b["manifest"]}
                rows.append(row)
                print(f"  [{n_items:,}] {mode}: " + " / ".join(f"{m['ms'][s]:.3f}" for s in BATCH_SIZES) + f" ms/event @{'/'.join(map(str, BATCH_SIZES))}, RSS {m['rss_mb']:.0f} MB", file=sys.stderr, flush=True)
                if args.stream and mode in MODES:  # the search-width copies are scorer-only rows
                    row["stream"] = stream_in_child(b["bundle"], args.threads, args.stream_events)
                    st = row["stream"]
                    print(f"  [{n_items:,}] {mode}, stream: {st['throughput']:,.0f} events/s ({st['cpu_ms'][0]:.3f} worker CPU ms/event), p90 {st['p90_ms']:.0f} ms at 1,000/s, worker RSS {st['worker_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            for path in (data_dir, run_dir, *(b["bundle"] for b in bundles.values())):  # keep the disk small at 1M items
                shutil.rmtree(path, ignore_errors=True)
    section = render(rows, args)
    print(section)
    if not args.no_write:
        heading, path = outputs(args)
        plot(rows, path)
        write_section(DOC, section)
        print(f"wrote {DOC} ({heading}) and {path}", file=sys.stderr)


TRAINED_SECTION = f"{SECTION}: trained embeddings"


def trained_rows(args) -> list[dict]:
    """Every trained run exported exact and ann (the default index, or --ann-index), recall on its test prefixes, both timed."""
    from export.exporter import export_run

    rows = []
    with tempfile.TemporaryDirectory(prefix="streamrec-trained-") as tmp:
        for run_dir in args.trained:
            log = lambda line, run=run_dir.name: print(f"  [{run}] {line}", file=sys.stderr, flush=True)  # noqa: E731
            bundles = {}
            for mode, options in (("exact fp32", {}), ("ann", ann_options(args))):
                bundle = Path(tmp) / f"{run_dir.name}-{mode.replace(' ', '-')}"
                started = time.perf_counter()
                try:
                    manifest = export_run(run_dir, bundle, parity_sessions=args.parity_sessions, threads=args.threads, log=log, **options)
                except UserError as refused:  # under --min-recall even searched whole: reported, not timed
                    log(f"{mode}: refused: {refused}")
                    bundles[mode] = str(refused)
                    continue
                bundles[mode] = (bundle, manifest, time.perf_counter() - started)
            for mode, exported in bundles.items():
                if isinstance(exported, str):
                    rows.append({"run": run_dir.name, "mode": mode, "refused": exported})
                    continue
                bundle, manifest, seconds = exported
                m = measure_in_child(bundle, args.threads, args.events, bundles["exact fp32"][0] if mode == "ann" else None)
                rows.append({"run": run_dir.name, "model": manifest["model"], "n_items": manifest["n_items"], "mode": mode, **m, "export_seconds": seconds, "manifest": manifest})
                print(f"  [{run_dir.name}] {mode}: " + " / ".join(f"{m['cpu_ms'][b]:.3f}" for b in BATCH_SIZES) + " CPU ms/event", file=sys.stderr, flush=True)
                if args.stream:
                    rows[-1]["stream"] = st = stream_in_child(bundle, args.threads, args.stream_events)
                    print(f"  [{run_dir.name}] {mode}, stream: {st['throughput']:,.0f} events/s ({st['cpu_ms'][0]:.3f} worker CPU ms/event), p90 {st['p90_ms']:.0f} ms at 1,000/s", file=sys.stderr, flush=True)
    return rows


def ann_options(args) -> dict:
    """export_run's options for the ann bundle: the index, metric and least recall asked for."""
    return {"retrieval": "ann", "ann_index": args.ann_index, "ann_metric": args.ann_metric, "min_recall": args.min_recall}


def depth_cell(retrieval: dict) -> str:
    """The search settings the export tried and their recall, e.g. ``C 200, nprobe 128: 0.9580, 256: 0.9910``."""
    depth = retrieval.get("depth")
    if not depth:
        return ""
    groups: dict[int, list[str]] = {}  # candidates -> "depth: recall" in the order tried
    for t in depth["tried"]:
        groups.setdefault(t["candidates"], []).append(f"{t[depth['knob']]}: {t['recall']:.4f}")
    return "; ".join(f"C {c}, {depth['knob']} " + ", ".join(cells) for c, cells in groups.items()) + ("" if depth["auto"] else f" ({depth['knob']} fixed)")


def render_trained(rows: list[dict], args) -> str:
    """The section of --trained runs: recall@20 of the ann bundle against exact on test prefixes, and the cost of both."""
    from export.retrieval import describe

    body = []
    for r in rows:
        if "refused" in r:
            body.append([r["run"], "", "", f"{r['mode']}: refused", *([""] * len(BATCH_SIZES)), "", r["refused"].split("; ")[0], ""])
            continue
        recall = r["manifest"]["retrieval"].get("recall")
        body.append([f"{r['run']}" + (f" ({describe(r['manifest']['retrieval']).removeprefix('faiss ')})" if r["mode"] == "ann" else ""), r["model"], f"{r['n_items']:,}", r["mode"], *(f"{r['ms'][b]:.3f} ({r['cpu_ms'][b]:.3f})" for b in BATCH_SIZES), f"{r['rss_mb']:.0f}",
                     f"{recall['recall']:.4f} ({recall['positions']:,} prefixes; {depth_cell(r['manifest']['retrieval'])})" if recall else "", f"{r['recall']:.4f}" if "recall" in r else ""])
    ann = next((r["manifest"]["retrieval"] for r in rows if r["mode"] == "ann" and "manifest" in r), None)
    return "\n".join(
        [
            TRAINED_SECTION + ("" if args.ann_metric == ANN_METRIC else f", --ann-metric {args.ann_metric}"),
            "",
            f"Trained models (run directories below), each exported exact in fp32 and with `--retrieval ann` (faiss {ann['index'] if ann else ''}, its settings in the first column; the candidates re-scored exactly; "
            f"`--ann-metric {args.ann_metric}`, `--min-recall {args.min_recall:g}`: the export searches deeper from the default depth, then with more candidates, until the recall reaches it, the settings tried in brackets; an export refused with everything tried is reported). Recall@20 on test prefixes: the export's own measurement on the prefixes of {args.parity_sessions:,} "
            "test sessions (share of the ann answer's items whose exact score reaches the exact 20th best, every known position of each session). "
            f"Cost: `Scorer.step` on random clicks (random hidden states, 8-click histories), {args.threads} thread(s), best of 3, each bundle in a fresh process, "
            "with recall against the exact bundle on those timed calls too. "
            f"({environment('torch', 'onnxruntime', 'faiss-cpu')}; the box is shared: CPU time in brackets.)",
            "",
            *produced_by(),
            *table(["run", "model", "items", "served as", *(f"ms/event @{b} (CPU)" for b in BATCH_SIZES), "RSS MB", "recall@20, test prefixes", "recall@20, timed calls"], body, align="---" + "r" * (len(BATCH_SIZES) + 4)),
            *stream_table(rows),
            "",
        ]
    )


def targets(rows: list[dict]) -> list[list[str]]:
    """The issue's targets for every ann way of searching: cost growth from the smallest to the largest catalogue, recall."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows if r["mode"].startswith("ann")):
        ann = {r["n_items"]: r for r in rows if r["mode"] == mode}
        small, big = ann[min(ann)], ann[max(ann)]
        ratio = big["ms"][256] / small["ms"][256]
        out.append([f"{mode}: ms/event @256 at {big['n_items']:,} items <= 2x at {small['n_items']:,}", f"{ratio:.2f}x ({big['ms'][256]:.3f} vs {small['ms'][256]:.3f} ms)", "yes" if ratio <= 2 else "**no**"])
        worst = min(r["recall"] for r in ann.values())
        out.append([f"{mode}: recall@20 >= 0.99 against exact at every size", f"{worst:.4f} (lowest)", "yes" if worst >= 0.99 else "**no**"])
        if "stream" in big:
            rate = big["stream"]["throughput"]
            out.append([f"{mode}: one worker sustains >= 2,000 events/s at {big['n_items']:,} items", f"{rate:,.0f} events/s", "yes" if rate >= 2000 else "**no**"])
    return out


def stream_table(rows: list[dict]) -> list[str]:
    """The end-to-end rows (one worker on Apache Kafka), or nothing when the run had --no-stream."""
    measured = [r for r in rows if "stream" in r]
    if not measured:
        return []
    body = []
    for r in measured:
        st = r["stream"]
        lat = " / ".join(f"{st[f'p{q}_ms']:.0f}" if st[f"p{q}_ms"] is not None else "-" for q in (50, 90, 99))
        body.append([f"{r['n_items']:,}" + (f" ({r['run']})" if "run" in r else ""), r["mode"], f"{st['throughput']:,.0f}", " / ".join(f"{c:.3f}" for c in st["cpu_ms"]), st["answered_saturation"], lat, st["answered_latency"], f"{st['worker_rss_mb']:.0f}" if st["worker_rss_mb"] else ""])
    return [
        "",
        "End to end: `streamrec serve` with each bundle (1 scorer thread) on a fresh Apache Kafka node (4 partitions), measured as in "
        "\"Stream\" (`benchmarks/stream.py --bundle`): the worker, the broker and the load generator share the 2 cores, so the "
        "worker's events/s is bounded by all three (CPU ms per event of each given); at 1,000 clicks/s a worker slower than that falls behind and its latency is its backlog.",
        "",
        *table(["items", "served as", "max events/s", "CPU ms/event: worker / broker / load generator", "answered (saturation)", "p50 / p90 / p99 ms @1,000/s", "answered @1,000/s", "worker RSS MB"], body, align="--rrrrrr"),
    ]


def render(rows: list[dict], args) -> str:
    def index_cell(r):
        if r["mode"] != "ann":  # the ef rows reuse its index
            return ""
        s = r["manifest"]["retrieval"]
        return f"{s['build_seconds']:.1f}"

    def recall_cell(r):
        if not r["mode"].startswith("ann"):
            return ""
        return f"{r['recall']:.4f}" + (f" / {r['manifest']['retrieval']['recall']['recall']:.4f}" if r["mode"] == "ann" else "")

    body = [
        [f"{r['n_items']:,}", r["mode"], *(f"{r['ms'][b]:.3f} ({r['cpu_ms'][b]:.3f})" for b in BATCH_SIZES), f"{r['rss_mb']:.0f}", f"{r['bundle_mb']:.0f}", index_cell(r), f"{r['export_seconds']:.0f}" if r["mode"] == "ann" or not r["mode"].startswith("ann") else "", recall_cell(r),
         depth_cell(r["manifest"]["retrieval"]) if r["mode"] == "ann" else ""]
        for r in rows
    ]
    lines = table(
        ["items", "served as", *(f"ms/event @{b} (CPU)" for b in BATCH_SIZES), "RSS MB", "bundle MB", "index build s", "export s", "recall@20: timed calls / export prefixes", "search settings the export tried: recall"],
        body,
        align="--" + "r" * (len(BATCH_SIZES) + 5) + "-",
    )
    ann_settings = next((r["manifest"]["retrieval"] for r in rows if r["mode"] == "ann"), None)
    from export.retrieval import describe

    how = describe(ann_settings) if ann_settings else "ann"
    return "\n".join(
        [
            outputs(args)[0],
            "",
            f"`Scorer.step` cost (top-20 answers) of {model_label(args.model)} against catalogue size, served exact in fp32, "
            + ("exact in int8 (`--int8`) " if args.int8 else "")
            + f"and with `--retrieval ann` ({how} at the smallest size; the candidates re-scored exactly; `--ann-metric {args.ann_metric}`, `--min-recall {args.min_recall:g}`: "
            "each size served at the least search depth (and candidate count) the export found to reach it on its test prefixes, what it tried in the last column), "
            f"{args.threads} thread(s), best of 3 runs on random "
            f"clicks with random hidden states, each bundle in a fresh process (rows \"ann, ef N\" / \"ann, nprobe N\": the same bundle and index searched with "
            f"`ef_search` / `nprobe` N, a search-time setting of the manifest) ({environment('torch', 'onnxruntime', 'faiss-cpu')}; the load "
            "average is taken at the end; the box is shared, so wall time swings with other jobs: CPU time in brackets). "
            f"Item vectors are synthetic, {args.embeddings}: "
            + ("1,000 random topic centres plus noise, as trained embeddings cluster (uniformly random vectors are the worst case for an index: "
               "`--embeddings uniform`)" if args.embeddings == "clustered" else "uniformly random, the worst case for an index")
            + "; the other weights are untrained (serving cost does not depend on them); window models see 8-click histories. RSS: the measuring process after loading the scorer and "
            "timing it (Python, numpy, torch and ONNX Runtime included). Recall@20: share of the ann answer's items whose exact score reaches the "
            "exact 20th best, on the timed batch-256 calls and on the export's parity prefixes.",
            "",
            *produced_by(),
            *lines,
            *stream_table(rows),
            "",
            *table(["target", "this run", "met"], targets(rows)),
            "",
            f"![scorer cost against catalogue size](img/{outputs(args)[1].name})",
            "",
        ]
    )


def outputs(args) -> tuple[str, Path]:
    """(section heading, plot path): a run with the export's default index owns "## Catalogue scale", other indexes a section each."""
    parts = ([] if args.model == "gru4rec" else [args.model]) + ([] if args.ann_index == ANN_INDEX else [args.ann_index]) + ([] if args.ann_metric == ANN_METRIC else [args.ann_metric])
    if not parts:
        return SECTION, PLOT
    heading = f"{SECTION}: " + ", ".join(p.upper() if p in ANN_INDEXES else {"sasrec": "SASRec", args.ann_metric: f"--ann-metric {args.ann_metric}"}.get(p, p) for p in parts)
    return heading, PLOT.with_name("catalog_scale_" + "_".join(parts) + ".png")


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, batch in zip(axes, (1, 256)):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = sorted((r["n_items"], r["ms"][batch]) for r in rows if r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalogue size (items)")
        ax.set_ylabel("ms per event")
        ax.set_title(f"{rows[0]['model'] if rows else ''} Scorer.step at batch {batch} (wall)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
