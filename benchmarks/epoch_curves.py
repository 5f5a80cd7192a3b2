"""Validation and test accuracy of a kept run at every kept epoch: do validation and test agree on when to stop?

    python benchmarks/accuracy.py --datasets beauty --models SPEC --runs RUNS --keep-epochs
    python benchmarks/epoch_curves.py --dataset beauty --model SPEC --run RUNS/beauty/<run> --every 5 \\
        --exclude-seen --out docs/img/bert4rec-beauty-epochs.png

Loads the weights of every ``--every``-th epoch the run kept (``epochs/NNN.pt``, trainer setting ``keep_epochs``),
plus its best and last epochs, and ranks the leave-one-out validation targets (all users) and the test targets with
them. The run's own validation figure per epoch (``train_log.jsonl``; on a sample of users where the run set
``valid_users``) is drawn beside them. This is a diagnosis only: rows keep the epoch validation chose, never one
chosen on test. Writes the PNG and, beside it, a JSON of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from _report import pyplot, save_figure, table  # benchmarks/ is on sys.path


def kept_epochs(run: Path, every: int, best: int, also: tuple[int, ...] = ()) -> list[int]:
    """The epochs (from 1) to evaluate: every ``every``-th kept one, the first, the best, the last and ``also``."""
    kept = sorted(int(p.stem) for p in (run / "epochs").glob("[0-9][0-9][0-9].pt"))
    if not kept:
        return []
    chosen = {e for e in kept if e % every == 0} | {kept[0], kept[-1]} | ({best} & set(kept)) | (set(also) & set(kept))
    return sorted(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a leave-one-out dataset of benchmarks/accuracy.py (beauty, diginetica)")
    parser.add_argument("--model", required=True, help="the spec the run was trained with")
    parser.add_argument("--run", type=Path, required=True, help="the run folder (with checkpoint.pt, train_log.jsonl and epochs/)")
    parser.add_argument("--every", type=int, default=5, help="evaluate every N-th epoch (and the first, best and last)")
    parser.add_argument("--also", default="", help="more epochs to evaluate, comma-separated (e.g. the one another validation figure would keep)")
    parser.add_argument("--exclude-seen", action="store_true", help="rank without the user's own earlier items (Klenitskiy & Vasilev)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write (the JSON goes beside it)")
    args = parser.parse_args()

    import accuracy
    from training.evaluate import evaluate
    from training.models import get_model
    from training.protocols import early_stopping_split

    if args.dataset not in accuracy.LEAVE_ONE_OUT:
        sys.exit(f"error: --dataset must be a leave-one-out dataset ({', '.join(accuracy.LEAVE_ONE_OUT)}), got '{args.dataset}'")
    if args.every < 1:
        sys.exit("error: --every must be at least 1")
    checkpoint = args.run / "checkpoint.pt"
    if not checkpoint.is_file():
        sys.exit(f"error: no checkpoint.pt in {args.run}")
    torch.set_num_threads(args.threads)
    ckpt = torch.load(checkpoint, weights_only=True, map_location="cpu")
    best = ckpt["best_epoch"] + 1
    try:
        also = tuple(int(e) for e in args.also.split(",") if e.strip())
    except ValueError:
        sys.exit(f"error: --also takes epoch numbers separated by commas, got '{args.also}'")
    epochs = kept_epochs(args.run, args.every, best, also)
    if not epochs:
        sys.exit(f"error: {args.run}/epochs holds no kept weights (train with accuracy.py --keep-epochs, trainer setting keep_epochs)")
    log = [json.loads(line) for line in (args.run / "train_log.jsonl").read_text().splitlines() if line.strip()]

    data = accuracy.DATASETS[args.dataset][1]()
    name, options = accuracy.parse_spec(args.model)
    cls = get_model(name)
    config = accuracy.config_from_options(cls.Config, options)
    model = cls(config, data.n_items)
    _, valid = early_stopping_split(data)
    rows, figures = [], []
    for epoch in epochs:
        model.net.load_state_dict(torch.load(args.run / "epochs" / f"{epoch:03d}.pt", weights_only=True, map_location="cpu"))
        model.net.eval()
        line = {"epoch": epoch, "logged_val_mrr20": log[epoch - 1]["val_mrr20"] if epoch <= len(log) else None}
        for split, sessions in (("valid", valid), ("test", data.test)):
            m = evaluate(model, sessions, ks=(10, 20), mode="last", exclude_seen=args.exclude_seen, progress=False)
            line.update({f"{split} {k}": m[k] for k in ("HR@10", "NDCG@10", "MRR@20")})
        figures.append(line)
        rows.append([epoch, *(f"{line[k]:.4f}" for k in ("valid NDCG@10", "valid MRR@20", "test HR@10", "test NDCG@10", "test MRR@20"))])
        print(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in line.items() if k != "epoch" and v is not None), flush=True)

    published = accuracy.published(args.dataset, args.model)
    seen = "own items removed" if args.exclude_seen else "own items ranked"
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [f["epoch"] for f in figures]
    left.plot([h["epoch"] + 1 for h in log], [h["val_mrr20"] for h in log], linewidth=0.8, color="0.6",
              label=f"validation, as the run logged it ({config.valid_users:,} users)" if getattr(config, "valid_users", 0) else "validation, as the run logged it")
    left.plot(x, [f["valid MRR@20"] for f in figures], "o-", label="validation, all users")
    left.plot(x, [f["test MRR@20"] for f in figures], "s-", label="test")
    left.set_ylabel(f"MRR@20 ({seen})")
    right.plot(x, [f["valid NDCG@10"] for f in figures], "o-", label="validation, all users")
    right.plot(x, [f["test NDCG@10"] for f in figures], "s-", label="test")
    if published:
        right.axhline(published[1]["NDCG@10"], linestyle="--", color="k", linewidth=1, label=f"published test ({published[1]['NDCG@10']})")
    right.set_ylabel(f"NDCG@10 ({seen})")
    for ax in (left, right):
        ax.axvline(best, color="0.4", linestyle=":", linewidth=1)
        ax.set_xlabel(f"epoch (dotted: the epoch the run kept, {best})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.dataset}: {args.model}", fontsize=8)
    save_figure(fig, args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"dataset": args.dataset, "model": args.model, "best_epoch": best,
                                                         "exclude_seen": args.exclude_seen, "epochs": figures}, indent=1) + "\n")
    print("\n".join(table(["epoch", "valid NDCG@10", "valid MRR@20", "test HR@10", "test NDCG@10", "test MRR@20"], rows)))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
