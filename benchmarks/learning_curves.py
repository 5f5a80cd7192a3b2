"""Validation curves of kept training runs, one line per run, for comparing how settings train.

    python benchmarks/learning_curves.py --runs RUNS/beauty --out docs/img/bert4rec-beauty-curves.png

Reads every ``<run>/train_log.jsonl`` under ``--runs`` (the folders ``benchmarks/accuracy.py --runs`` keeps),
plots validation MRR@20 (``--metric ndcg10``: NDCG@10, logged since 2026-12-06) per epoch with each run's best
epoch marked, and prints the table of bests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _report import pyplot, save_figure, table  # benchmarks/ is on sys.path
from training.trainer import VALID_METRICS


def read_logs(folder: Path, metric: str = "mrr20") -> dict[str, list[dict]]:
    """run name -> its epoch lines, for every run folder under ``folder`` whose train log has ``metric`` on every line."""
    logs = {}
    for log in sorted(folder.glob("*/train_log.jsonl")):
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if lines and all(line.get(f"val_{metric}") is not None for line in lines):
            logs[log.parent.name] = lines
    return logs


def best(lines: list[dict], metric: str = "mrr20") -> dict:
    """The epoch line with the highest validation figure (the first of equals, as the trainer keeps it)."""
    return max(lines, key=lambda line: (line[f"val_{metric}"], -line["epoch"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder holding run folders (each with train_log.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument("--metric", choices=sorted(VALID_METRICS), default="mrr20", help="validation figure to plot and take the best of")
    args = parser.parse_args()
    key, label = f"val_{args.metric}", VALID_METRICS[args.metric]
    logs = read_logs(args.runs, args.metric)
    if not logs:
        sys.exit(f"error: no train_log.jsonl with validation {label} on every epoch under {args.runs}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4 + 0.2 * len(logs)))
    rows = []
    for name, lines in logs.items():
        epochs = [line["epoch"] + 1 for line in lines]
        ax.plot(epochs, [line[key] for line in lines], label=name, linewidth=1.2)
        top = best(lines, args.metric)
        ax.plot([top["epoch"] + 1], [top[key]], "o", color=ax.lines[-1].get_color())
        rows.append([name, top["epoch"] + 1, len(lines), f"{top[key]:.4f}", f"{lines[-1]['loss']:.3f}"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {label}")
    ax.set_title(args.title or args.runs.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below the axes: run names are long
    save_figure(fig, args.out)
    print("\n".join(table(["run", "best epoch", "epochs run", f"best validation {label}", "last training loss"], rows)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
