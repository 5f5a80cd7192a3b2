"""Training at catalogue scale: a synthetic log over 1M items, one epoch of GRU4Rec and of SASRec, full-ranking evaluation.

Steps, each in a child process of its own (``os.wait4`` gives each its own peak RSS and CPU time):
``streamrec data synth`` (no validation split: a validation pass over the whole catalogue would
cost minutes per epoch), ``streamrec train`` of each model for ``--epochs`` (1) epochs, and an
evaluation of each trained run on a seeded sample of ``--eval-sessions`` test sessions, every
target ranked against every item of the catalogue (``training.evaluate.evaluate``, which keeps each
score batch within its ``score_budget``). Both models train with a sampled softmax: GRU4Rec's own
(its defaults: 2,048 popularity-sampled negatives shared by the mini-batch, logQ correction) and
SASRec's ``loss=sampled`` (uniform negatives shared by the mini-batch); a full softmax over 1M items
at every position would take hours per epoch on this box.

The data and run directories are kept under ``--work`` (data-1m, gru4rec-1m, sasrec-1m for the
default 1M items), so the trained runs can be exported afterwards. Writes a section
"## Training at catalogue scale" into docs/performance.md unless --no-write. Run it niced:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/training_scale.py --work /work/scale-runs [--items 1000000] [--sessions 1000000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _report import environment, produced_by, table, write_section  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
SECTION = "## Training at catalogue scale"
K = 20
# settings beyond each model's defaults: SASRec's full softmax is infeasible at this size, and
# GRU4Rec's default mini-batch of 32 makes 150,000 steps of an epoch (about 30 min here)
MODELS = {"gru4rec": ("batch_size=256",), "sasrec": ("loss=sampled", "batch_size=256")}


def size_label(n: int) -> str:
    """1000000 -> "1m", 200000 -> "200k": the suffix of the data and run directories."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def run_child(command: list[str], threads: int) -> dict:
    """Run ``command`` to completion; its wall and CPU seconds, peak RSS (MB) and stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    print("$ " + " ".join(command[2:] if command[1] == "-m" else command[1:]), file=sys.stderr, flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"{command[2:5]} failed with exit status {child.returncode}")
    return {"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out}


def streamrec(*args: str) -> list[str]:
    return [sys.executable, "-m", "stream.cli", *map(str, args)]


def evaluate_run(run_dir: Path, data_dir: Path, n_sessions: int, seed: int, threads: int) -> dict:
    """(child) Full-ranking metrics of a trained run on a seeded sample of test sessions, as JSON-able numbers."""
    import numpy as np

    from streamrec.runtime import configure_process
    from training.data import PreparedData
    from training.evaluate import evaluate
    from training.models import load_run

    configure_process(threads=threads)
    data = PreparedData.load(data_dir)
    model = load_run(run_dir)
    test = data.test
    if 0 < n_sessions < len(test):
        chosen = np.zeros(len(test), dtype=bool)
        chosen[np.random.default_rng(seed).choice(len(test), size=n_sessions, replace=False)] = True
        test = test.select(chosen)
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    started, cpu = time.perf_counter(), time.process_time()
    metrics = evaluate(model, test, ks=(K,), popularity=popularity, progress=False)
    return {
        "sessions": len(test),
        "events": metrics["n_events"],
        "recall": metrics[f"HR@{K}"],
        "mrr": metrics[f"MRR@{K}"],
        "seconds": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the data and run directories (kept; required)")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=1_000_000, help="sessions synthesised (20 %% of them are the test split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--eval-sessions", type=int, default=1000, help="test sessions evaluated (seeded sample; 0 = all)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--evaluate", type=Path, help=argparse.SUPPRESS)  # internal: evaluate one run in this process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evaluate:
        print(json.dumps(evaluate_run(args.evaluate, args.data, args.eval_sessions, args.seed, args.threads)))
        return
    if args.work is None:
        parser.error("--work is required")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)} (known: {', '.join(MODELS)})")

    label = size_label(args.items)
    data_dir = args.work / f"data-{label}"
    synth = run_child(streamrec("data", "synth", "--out", data_dir, "--items", args.items, "--sessions", args.sessions, "--seed", args.seed, "--valid-days", 0), args.threads)
    stats = json.loads((data_dir / "stats.json").read_text())
    counts = {split: stats[split] for split in ("train", "test") if isinstance(stats.get(split), dict)}
    print(synth["stdout"], file=sys.stderr)
    rows = []
    for name in models:
        run_dir = args.work / f"{name}-{label}"
        sets = [x for s in MODELS[name] for x in ("--set", s)]
        trained = run_child(streamrec("train", "--model", name, "--data", data_dir, "--out", run_dir, "--epochs", args.epochs, "--threads", args.threads, "--seed", args.seed, *sets), args.threads)
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        config = json.loads((run_dir / "config.json").read_text())
        evaluated = run_child([sys.executable, __file__, "--evaluate", str(run_dir), "--data", str(data_dir), "--eval-sessions", str(args.eval_sessions), "--seed", str(args.seed), "--threads", str(args.threads)], args.threads)
        metrics = json.loads(evaluated["stdout"].strip().splitlines()[-1])
        rows.append({"model": name, "config": config["config"], "n_items": config["n_items"], "log": log, "train": trained, "eval": evaluated, "metrics": metrics})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("config", "train", "eval")}), file=sys.stderr, flush=True)
    text = render(args, synth, counts, rows)
    print(text)
    if not args.no_write:
        write_section(DOC, text)
        print(f"written to {DOC}", file=sys.stderr)


def loss_label(model: str, config: dict) -> str:
    if model == "gru4rec":
        return f"{config['loss']}, {config['n_sample']:,} negatives ~ support^{config['sample_alpha']:g}, logQ {config['logq']:g}"
    if config["loss"] == "sampled":
        return f"sampled softmax, {config['n_sample']:,} uniform negatives"
    return config["loss"]


def render(args, synth: dict, counts: dict, rows: list[dict]) -> str:
    def events(split: str) -> str:
        c = counts.get(split, {})
        return f"{c.get('sessions', 0):,} sessions, {c.get('events', 0):,} events"

    from training.evaluate import score_rows

    n_items = rows[0]["n_items"] if rows else args.items
    lines = [
        SECTION,
        "",
        f"Measured {environment('torch', 'numpy')}, {args.threads} training thread(s), niced; every step in a child process of its own "
        "(peak RSS and CPU time from `os.wait4`). Full ranking: each evaluated target is ranked against every item of the catalogue, "
        "conservative ties, unknown inputs answered with the popularity ranking; the evaluator keeps each score batch within "
        f"`training.evaluate.SCORE_BUDGET` cells ({score_rows(n_items, 512):,} rows of {n_items:,} items), so its memory does not grow with the batch size.",
        "",
        f"`streamrec data synth --items {args.items:,} --sessions {args.sessions:,} --valid-days 0`: {synth['wall_s']:.0f} s wall "
        f"({synth['cpu_s']:.0f} s CPU), peak RSS {synth['peak_rss_mb']:,.0f} MB. The catalogue is the items seen in train: "
        f"{n_items:,} of the {args.items:,} generated (the Zipf tail is never clicked). "
        f"Train {events('train')}; test {events('test')}.",
        "",
    ]
    header = ["model", "loss", "batch", "epoch s", "train process s wall (CPU)", "train peak RSS MB", "eval events", "eval s wall (CPU)", "eval peak RSS MB", f"Recall@{K}", f"MRR@{K}"]
    body = []
    for r in rows:
        epoch_s = " / ".join(f"{h['seconds']:.0f}" for h in r["log"])
        m = r["metrics"]
        body.append([
            r["model"], loss_label(r["model"], r["config"]), r["config"]["batch_size"], epoch_s,
            f"{r['train']['wall_s']:.0f} ({r['train']['cpu_s']:.0f})", f"{r['train']['peak_rss_mb']:,.0f}",
            f"{m['events']:,} ({m['sessions']:,} sessions)", f"{m['seconds']:.0f} ({m['cpu_s']:.0f})", f"{r['eval']['peak_rss_mb']:,.0f}",
            f"{m['recall']:.4f}", f"{m['mrr']:.4f}",
        ])
    lines += table(header, body, "ll" + "r" * (len(header) - 2))
    lines += [
        "",
        f"`epoch s` is the trainer's time per epoch ({args.epochs} epoch(s), no validation); the train process adds loading the "
        "data, building the batches and saving. Metrics after the epoch(s) shown, not a tuned result. "
        f"Data and runs are kept in `{args.work}` for export.",
        "",
        *produced_by(),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
