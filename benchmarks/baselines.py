"""Every non-neural baseline on the real click logs, full ranking, plus serving cost at scale.

    python benchmarks/baselines.py                       # all datasets found, all baselines
    python benchmarks/baselines.py --datasets yoochoose --models pop,markov,vsknn --no-docs

Datasets (read from ../shared/data, never copied into the repo):
  yoochoose   yoochoose-rsc15-100k, session-rec's train_full / test files, every position ("next")
  diginetica  the SR-GNN sample of train-item-views, session-time protocol (7 test days, support >= 5)
  trivago     trivago-rsc19-100k item interactions, session-time protocol (1 test day, support >= 5)
  beauty      Amazon Beauty (BERT4Rec file), leave-one-out, last item only ("last")

For each (dataset, model): HR@20, MRR@20, NDCG@20, coverage@20 (conservative
ties, all items ranked), training time, scoring time per event in the
evaluator's batches of 512, and per event one at a time (what the stream does
for a lone click). A last part times one-at-a-time scoring on a synthetic
catalogue of 10k items with 100k training sessions. Times are process CPU
time: the box is shared, and wall-clock figures swing with other people's jobs. The table goes into the
"## Baselines" section of docs/results.md and a chart into docs/img/baselines.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from streamrec.runtime import configure_process
from training.data import PreparedData
from training.evaluate import evaluate, evaluation_positions
from training.models import get_model
from training.models.items import HistoryIndex, item_counts

from _report import command_line, grouped, load_average, pyplot, save_figure, table, write_section  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BASELINES = ["pop", "spop", "markov", "sr", "iknn", "sknn", "vsknn", "stan", "vstan"]
RESULTS = REPO / "docs" / "results.md"
CHART = REPO / "docs" / "img" / "baselines.png"
SECTION = "## Baselines"
SINGLE_EVENTS = 300  # histories timed one at a time per model


def load_yoochoose() -> PreparedData:
    from training import protocols, readers

    folder = SHARED / "yoochoose-rsc15-100k"
    train = readers.read_yoochoose(folder / "yoochoose-clicks-100k_train_full.txt")
    test = readers.read_yoochoose(folder / "yoochoose-clicks-100k_test.txt")
    return protocols.given(train, test, valid_days=0)


def load_diginetica() -> PreparedData:
    from training import protocols, readers

    df = readers.read_diginetica(SHARED / "diginetica" / "sample_train-item-views.csv")
    return protocols.session_time(df, test_days=7, valid_days=0, min_item_support=5)


def load_trivago() -> PreparedData:
    from training import protocols, readers

    df = readers.read_trivago(SHARED / "trivago-rsc19-100k" / "trivago_val_100k.parquet.snappy")
    return protocols.session_time(df, test_days=1, valid_days=0, min_item_support=5)


def load_beauty() -> PreparedData:
    from training import protocols, readers

    df = readers.read_sasrec(SHARED / "amazon-beauty-bert4rec" / "beauty.txt")
    return protocols.leave_one_out(df, min_core=0)


DATASETS = {
    "yoochoose": ("yoochoose-rsc15-100k (given train_full/test, next item)", load_yoochoose),
    "diginetica": ("Diginetica sample (session-time, next item)", load_diginetica),
    "trivago": ("trivago-rsc19-100k (session-time, next item)", load_trivago),
    "beauty": ("Amazon Beauty (leave-one-out, last item)", load_beauty),
}


def single_event_ms(model, sessions, positions: np.ndarray, rng: np.random.Generator) -> float:
    """Mean CPU milliseconds to score one history on its own (batch of 1)."""
    chosen = rng.choice(positions, size=min(SINGLE_EVENTS, len(positions)), replace=False)
    histories = HistoryIndex(sessions).at(np.sort(chosen))
    model.score_histories(histories[:5])  # warm-up
    started = time.process_time()
    for h in histories:
        model.score_histories([h])
    return (time.process_time() - started) / len(histories) * 1e3


def run_dataset(key: str, models: list[str]) -> list[dict]:
    title, load = DATASETS[key]
    started = time.perf_counter()
    data = load()
    mode = data.stats.get("eval_mode", "next")
    print(f"\n== {title}: {data.n_items:,} items, train {len(data.train):,} sessions / {data.train.n_events:,} clicks, "
          f"test {len(data.test):,} sessions, mode {mode} (loaded in {time.perf_counter() - started:.1f}s)", flush=True)
    popularity = item_counts(data.train, data.n_items)
    positions = evaluation_positions(data.test, mode)
    rng = np.random.default_rng(0)
    rows = []
    for name in models:
        cls = get_model(name)
        t0 = time.process_time()
        model = cls.train(data, cls.Config(), progress=False)
        train_s = time.process_time() - t0
        t0 = time.process_time()
        m = evaluate(model, data.test, mode=mode, popularity=popularity, progress=True)
        eval_s = time.process_time() - t0
        single = single_event_ms(model, data.test, positions, rng)
        row = {
            "dataset": key, "model": name, "events": m["n_events"],
            "HR@20": m["HR@20"], "MRR@20": m["MRR@20"], "NDCG@20": m["NDCG@20"], "coverage@20": m["coverage@20"],
            "HR@20_opt": m["HR@20_optimistic"], "MRR@20_opt": m["MRR@20_optimistic"],
            "train_s": train_s, "batch_ms": eval_s / max(m["n_events"], 1) * 1e3, "single_ms": single,
        }
        rows.append(row)
        print(f"  {name:>6}  HR@20 {row['HR@20']:.4f}  MRR@20 {row['MRR@20']:.4f}  NDCG@20 {row['NDCG@20']:.4f}  cov@20 {row['coverage@20']:.4f}  "
              f"train {train_s:6.2f} CPU s  {row['batch_ms']:.3f} CPU ms/event batched  {single:.3f} CPU ms/event single", flush=True)
    return rows


def run_scale(models: list[str]) -> tuple[str, list[dict]]:
    """One-at-a-time latency on a synthetic catalogue of 10k items and 100k training sessions."""
    from training.synth import synthesize

    data = synthesize(n_items=10_000, n_sessions=125_000, seed=0, test_fraction=0.2)
    what = f"{data.n_items:,} items, {len(data.train):,} training sessions ({data.train.n_events:,} clicks)"
    print(f"\n== synthetic scale check: {what}", flush=True)
    positions = evaluation_positions(data.test, "next")
    rng = np.random.default_rng(0)
    rows = []
    for name in models:
        cls = get_model(name)
        model = cls.train(data, cls.Config(), progress=False)
        ms = single_event_ms(model, data.test, positions, rng)
        rows.append({"model": name, "single_ms": ms})
        print(f"  {name:>6}  {ms:.3f} CPU ms/event single", flush=True)
    return what, rows


def markdown(rows: list[dict], scale: tuple[str, list[dict]] | None, command: str, n_threads: int, load: float) -> str:
    lines = [
        SECTION,
        "",
        "Non-neural baselines (`training/models/{pop,spop,markov,sr,iknn,sknn,vsknn,stan,vstan}.py`, literature defaults),",
        "full ranking over every item, conservative ties (the target ranks after every item with an equal score),",
        "targets unseen in training skipped. Items a baseline gives no score follow in popularity order; the session's",
        "own items are not excluded (as in session-rec), which helps where users return to items (trivago, Diginetica)",
        "and costs where the target is always new (Amazon leave-one-out).",
        "",
        f"Times are process CPU time (torch threads = {n_threads}), i.e. the cost on one idle core: the project's 2-core box",
        f"is shared (load average {load:.1f} during this run), so wall-clock times were higher and noisy.",
        "`train` = fitting; `batched` = full evaluation CPU time / events (batches of 512, ranking included);",
        "`single` = one history scored alone, as the stream does for a lone click.",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    for key, part in grouped(rows, "dataset").items():
        lines += [f"**{DATASETS[key][0]}**, {part[0]['events']:,} evaluated events", ""]
        lines += table(
            ["model", "HR@20", "MRR@20", "NDCG@20", "coverage@20", "HR@20 (optimistic ties)", "train CPU s", "CPU ms/event batched", "CPU ms/event single"],
            [[r["model"], f"{r['HR@20']:.4f}", f"{r['MRR@20']:.4f}", f"{r['NDCG@20']:.4f}", f"{r['coverage@20']:.4f}", f"{r['HR@20_opt']:.4f}",
              f"{r['train_s']:.2f}", f"{r['batch_ms']:.3f}", f"{r['single_ms']:.3f}"] for r in part],
        )
        lines.append("")
    if any(r["dataset"] == "yoochoose" for r in rows):
        lines += [
            "Reference figures for yoochoose-rsc15-100k (measured by the project owners, same protocol): most popular 0.089 / 0.026,",
            "first-order Markov 0.591 / 0.343, SKNN 0.636 / 0.319, V-SKNN 0.667 / 0.364 (HR@20 / MRR@20).",
            "",
        ]
    if scale:
        what, scale_rows = scale
        lines += [f"**Serving cost at scale** (synthetic log from `training.synth`: {what}; one history scored alone):", ""]
        lines += table(["model", "CPU ms/event"], [[r["model"], f"{r['single_ms']:.3f}"] for r in scale_rows])
        lines.append("")
    if CHART.exists():
        lines += [f"![baselines](img/{CHART.name})", ""]
    return "\n".join(lines)


def chart(rows: list[dict]) -> None:
    groups = grouped(rows, "dataset")
    fig, axes = pyplot().subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (key, part) in zip(axes[0], groups.items()):
        x = np.arange(len(part))
        ax.bar(x - 0.2, [r["HR@20"] for r in part], 0.4, label="HR@20")
        ax.bar(x + 0.2, [r["MRR@20"] for r in part], 0.4, label="MRR@20")
        ax.set_xticks(x, [r["model"] for r in part], rotation=45, ha="right")
        ax.set_title(key)
        ax.set_ylim(0, max(r["HR@20"] for r in part) * 1.15 or 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="upper left")
    fig.suptitle("Non-neural baselines, full ranking, conservative ties")
    save_figure(fig, CHART)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {', '.join(DATASETS)}")
    parser.add_argument("--models", default=",".join(BASELINES))
    parser.add_argument("--no-scale", action="store_true", help="skip the synthetic 10k-item latency check")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    args = parser.parse_args()
    configure_process(threads=args.threads, keep_freed_memory=True)  # once, at the start: torch's threads, and glibc keeps freed memory for training
    if not SHARED.is_dir():
        sys.exit(f"real click logs not found at {SHARED}")
    models = args.models.split(",")
    for name in models:
        get_model(name)
    rows = []
    for key in args.datasets.split(","):
        if key not in DATASETS:
            sys.exit(f"unknown dataset '{key}' (known: {', '.join(DATASETS)})")
        rows += run_dataset(key, models)
    scale = None if args.no_scale else run_scale([m for m in models if m in ("markov", "sr", "sknn", "vsknn", "stan", "vstan")])
    if not args.no_docs:
        chart(rows)
        write_section(RESULTS, markdown(rows, scale, command_line(), args.threads, load_average()))
        print(f"\nwrote {RESULTS.relative_to(REPO)} ({SECTION}) and {CHART.relative_to(REPO)}")


if __name__ == "__main__":
    main()
