"""Accuracy of the neural models on the real click logs, full ranking, next to reference baselines.

    python benchmarks/accuracy.py                                   # every dataset found, default models
    python benchmarks/accuracy.py --datasets yoochoose --models pop,sasrec,srgnn --max-epochs 10 --no-docs
    python benchmarks/accuracy.py --datasets beauty --models "sasrec,sasrec:loss=bce,bert4rec"

Datasets (read from ../shared/data, never copied into the repo):
  yoochoose   yoochoose-rsc15-100k, session-rec's train_full / test, every position ("next");
              validation = the last train day (session-rec's train_tr / train_valid)
  diginetica  the SR-GNN sample of train-item-views, session-time protocol (7 test days,
              7 validation days, item support >= 5), every position
  beauty      Amazon Beauty (BERT4Rec's file), leave-one-out, last item only ("last"),
              validation = each user's second-to-last item

Model selection, the same for every neural model: train on the leak-free
``early_stopping_split`` with early stopping on validation MRR@20 (each model's
``patience``, at most ``--max-epochs`` epochs); for the "next" datasets the model
is then trained again on all of train for the best epoch count, so it sees the
same data as the baselines (leave-one-out keeps the early-stopped model, as
Klenitskiy & Vasilev do). A model spec ``name:key=value,...`` overrides settings.

Metrics: HR, MRR and NDCG at 10 and 20 from ``training.evaluate`` (all items
ranked, conservative ties, unknown inputs answered by popularity). Results are
kept in docs/accuracy.json (a run replaces the rows it recomputes), rendered into
the "## Neural models" section of docs/results.md and plotted in docs/img/accuracy.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.data import PreparedData
from training.evaluate import evaluate
from training.models import available_models, get_model
from training.models.base import config_from_options

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "docs" / "results.md"
STORE = REPO / "docs" / "accuracy.json"
CHART = REPO / "docs" / "img" / "accuracy.png"
SECTION = "## Neural models"
NEURAL = ["gru4rec", "caser", "sasrec", "bert4rec", "bst", "srgnn"]
BASELINES = ["pop", "markov", "vsknn"]
KS = (10, 20)

# Published figures for the same data and protocol. Klenitskiy & Vasilev (RecSys 2023,
# github.com/antklen/sasrec-bert4rec-recsys23, README "Main paper results"): BERT4Rec's
# preprocessed Beauty file, leave-one-out, every item ranked; their ranking drops items the
# user already interacted with, ours does not.
KV2023 = "Klenitskiy & Vasilev 2023"
LITERATURE = {
    ("beauty", "sasrec"): (f"{KV2023}, SASRec+ (full CE)", {"HR@10": 0.0533, "NDCG@10": 0.0327}),
    ("beauty", "sasrec:loss=bce"): (f"{KV2023}, SASRec (BCE)", {"HR@10": 0.0246, "NDCG@10": 0.0126}),
    ("beauty", "bert4rec"): (f"{KV2023}, BERT4Rec", {"HR@10": 0.0338, "NDCG@10": 0.0187}),
}


def load_yoochoose() -> PreparedData:
    from training import protocols, readers

    folder = SHARED / "yoochoose-rsc15-100k"
    train = readers.read_yoochoose(folder / "yoochoose-clicks-100k_train_full.txt")
    test = readers.read_yoochoose(folder / "yoochoose-clicks-100k_test.txt")
    return protocols.given(train, test, valid_days=1)


def load_diginetica() -> PreparedData:
    from training import protocols, readers

    df = readers.read_diginetica(SHARED / "diginetica" / "sample_train-item-views.csv")
    return protocols.session_time(df, test_days=7, valid_days=7, min_item_support=5)


def load_beauty() -> PreparedData:
    from training import protocols, readers

    df = readers.read_sasrec(SHARED / "amazon-beauty-bert4rec" / "beauty.txt")
    return protocols.leave_one_out(df, min_core=0)


DATASETS = {
    "yoochoose": ("yoochoose-rsc15-100k (given train_full/test, next item)", load_yoochoose),
    "diginetica": ("Diginetica sample (session-time, next item)", load_diginetica),
    "beauty": ("Amazon Beauty, BERT4Rec file (leave-one-out, last item)", load_beauty),
}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``name:key=value,key=value`` -> (name, options)."""
    name, _, rest = spec.partition(":")
    options = dict(part.split("=", 1) for part in rest.split(",") if part)
    return name, options


def train_and_select(cls, data: PreparedData, config, threads: int):
    """(model, best epoch + 1, epochs run, seconds): early-stopped, then refit on all of train in "next" mode."""
    started = time.perf_counter()
    model = cls.train(data, config, progress=True)
    result = getattr(model, "fit_result", None)
    if result is None:  # a baseline: nothing to select
        return model, None, None, time.perf_counter() - started
    best, run = result.best_epoch + 1, len(result.history)
    validated = any(h.get("val_mrr20") is not None for h in result.history)
    if validated and data.stats.get("eval_mode", "next") == "next":
        print(f"    refit on all of train for {best} epoch(s)", flush=True)
        full = dataclasses.replace(data, valid=None)
        model = cls.train(full, dataclasses.replace(config, epochs=best), progress=True)
    return model, best, run, time.perf_counter() - started


def run_dataset(key: str, specs: list[str], max_epochs: int, threads: int) -> list[dict]:
    title, load = DATASETS[key]
    data = load()
    mode = data.stats.get("eval_mode", "next")
    valid = f"valid {len(data.valid):,}" if data.valid is not None else "no valid"
    print(f"\n== {title}: {data.n_items:,} items, train {len(data.train):,} sessions / {data.train.n_events:,} clicks, "
          f"{valid}, test {len(data.test):,} sessions, mode {mode}", flush=True)
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    rows = []
    for spec in specs:
        name, options = parse_spec(spec)
        cls = get_model(name)
        config = config_from_options(cls.Config, options)
        if hasattr(config, "threads"):
            config.threads = threads
        if hasattr(config, "epochs"):
            config.epochs = min(config.epochs, max_epochs)
        print(f"  {spec}", flush=True)
        model, best, run, train_s = train_and_select(cls, data, config, threads)
        t0 = time.perf_counter()
        m = evaluate(model, data.test, ks=KS, mode=mode, popularity=popularity, progress=True)
        row = {
            "dataset": key, "model": spec, "events": m["n_events"], "best_epochs": best, "epochs_run": run,
            "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t0, 1), "threads": threads,
            "measured": time.strftime("%Y-%m-%d"),
        }
        row.update({f"{metric}@{k}": m[f"{metric}@{k}"] for metric in ("HR", "MRR", "NDCG") for k in KS})
        rows.append(row)
        print(f"    HR@10 {row['HR@10']:.4f}  HR@20 {row['HR@20']:.4f}  MRR@20 {row['MRR@20']:.4f}  NDCG@20 {row['NDCG@20']:.4f}  "
              f"epochs {best}/{run}  train {train_s:.0f}s  eval {row['eval_s']:.0f}s", flush=True)
    return rows


def merge(rows: list[dict]) -> list[dict]:
    """Stored rows with this run's rows replacing those of the same (dataset, model)."""
    stored = json.loads(STORE.read_text()) if STORE.exists() else []
    fresh = {(r["dataset"], r["model"]) for r in rows}
    kept = [r for r in stored if (r["dataset"], r["model"]) not in fresh]
    order = {k: i for i, k in enumerate(DATASETS)}
    return sorted(kept + rows, key=lambda r: order.get(r["dataset"], len(order)))


def markdown(rows: list[dict]) -> str:
    lines = [
        SECTION,
        "",
        "Neural sequence models (`training/models/{gru4rec,caser,sasrec,bert4rec,bst,srgnn}.py`, defaults unless the row says",
        "otherwise) next to three baselines, written by `benchmarks/accuracy.py`. Every item is ranked (no sampled",
        "negatives), ties count against the target, targets unseen in training are skipped, and a position whose",
        "input item is unknown is answered by popularity (as the stream does).",
        "",
        "Model selection is the same for every neural model: it is trained on `early_stopping_split` (train without",
        "the validation sessions/targets) with early stopping on validation MRR@20 (the model's `patience`, at most",
        "the epoch cap of the run); on the next-item datasets it is then trained again on all of train for the best",
        "epoch count, so it sees the same data as the baselines. `epochs` = best epoch count / epochs run before",
        "stopping; `train s` covers both passes. One torch thread on the project's shared 2-core box, so times are",
        "indicative only.",
        "",
    ]
    for key in dict.fromkeys(r["dataset"] for r in rows):
        part = [r for r in rows if r["dataset"] == key]
        lines += [f"**{DATASETS[key][0]}**, {part[0]['events']:,} evaluated events", ""]
        lines += [
            "| model | HR@10 | HR@20 | MRR@10 | MRR@20 | NDCG@10 | NDCG@20 | epochs | train s | published, same data and protocol |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in part:
            epochs = f"{r['best_epochs']}/{r['epochs_run']}" if r["best_epochs"] is not None else "–"
            ref = LITERATURE.get((key, r["model"]))
            cite = f"{ref[0]}: " + ", ".join(f"{k} {v:.4f}" for k, v in ref[1].items()) if ref else ""
            lines.append(
                f"| {r['model']} | {r['HR@10']:.4f} | {r['HR@20']:.4f} | {r['MRR@10']:.4f} | {r['MRR@20']:.4f} | "
                f"{r['NDCG@10']:.4f} | {r['NDCG@20']:.4f} | {epochs} | {r['train_s']:.0f} | {cite} |"
            )
        lines.append("")
    lines += [
        "Published figures are cited only where the data file and protocol are the same: Klenitskiy & Vasilev",
        "(RecSys 2023, table \"Amazon Beauty\" in github.com/antklen/sasrec-bert4rec-recsys23) use BERT4Rec's Beauty",
        "file, leave-one-out and full ranking like us, but remove items the user already interacted with from the",
        "ranking (we do not) and train on a GPU until early stopping. The SR-GNN, Caser and BST papers report on other",
        "data or with sampled negatives, and nobody publishes on the 100k YooChoose sample or the Diginetica sample, so",
        "those cells stay empty.",
        "",
    ]
    if CHART.exists():
        lines += [f"![accuracy](img/{CHART.name})", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or add) the "## Neural models" section of docs/results.md, leaving other sections alone."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = RESULTS.read_text() if RESULTS.exists() else "# Results\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text.rstrip() + "\n\n", doc, count=1)
    else:
        doc = doc.rstrip() + "\n\n" + text.rstrip() + "\n"
    RESULTS.write_text(doc.rstrip() + "\n")


def chart(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        part = [r for r in rows if r["dataset"] == key]
        x = np.arange(len(part))
        colors = ["tab:gray" if parse_spec(r["model"])[0] in BASELINES else "tab:blue" for r in part]
        ax.bar(x - 0.2, [r["HR@20"] for r in part], 0.4, color=colors, label="HR@20")
        ax.bar(x + 0.2, [r["MRR@20"] for r in part], 0.4, color=colors, alpha=0.5, label="MRR@20")
        ax.set_xticks(x, [r["model"] for r in part], rotation=45, ha="right")
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="upper left")
    fig.suptitle("Full ranking, conservative ties (grey: baselines; solid HR@20, light MRR@20)")
    fig.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(CHART, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {', '.join(DATASETS)}")
    parser.add_argument("--models", default=None, help="comma-separated model specs (name or name:key=value,...); default: baselines + neural models")
    parser.add_argument("--max-epochs", type=int, default=30, help="cap on every model's epochs (early stopping may end sooner)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        sys.exit(f"real click logs not found at {SHARED}")
    have = set(available_models())
    specs = re.split(r",(?=[a-z0-9]+(?::|,|$))", args.models) if args.models else [m for m in BASELINES + NEURAL if m in have]
    for spec in specs:
        get_model(parse_spec(spec)[0])
    started = time.perf_counter()
    rows = []
    for key in args.datasets.split(","):
        if key not in DATASETS:
            sys.exit(f"unknown dataset '{key}' (known: {', '.join(DATASETS)})")
        rows += run_dataset(key, specs, args.max_epochs, args.threads)
    print(f"\nall done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if not args.no_docs:
        rows = merge(rows)
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps(rows, indent=1))
        chart(rows)
        write_section(markdown(rows))
        print(f"wrote {RESULTS.relative_to(REPO)} ({SECTION}), {STORE.relative_to(REPO)} and {CHART.relative_to(REPO)}")


if __name__ == "__main__":
    main()
