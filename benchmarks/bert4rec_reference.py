"""Klenitskiy & Vasilev's own BERT4Rec, run on this machine on Beauty, validation and test traced per epoch.

Their code (github.com/antklen/sasrec-bert4rec-recsys23, RecSys 2023) published Beauty HR@10 0.0338 /
NDCG@10 0.0187 for BERT4Rec (best epoch 87); ours reaches 95 % / 94 % of that on average over four seeds, 98 % /
100 % from the best one (docs/results.md, issue 17).
This script imports their ``src/`` from a checkout you give it (it has no licence, so nothing of it is copied
here) and trains their model, on their data pipeline, with their settings (``src/configs/BERT4Rec.yaml``:
hidden 64, 2 blocks, 2 heads, FFN 256, mask probability 0.2, no forced last-item mask, sequence length 50,
Adam 1e-3, batch 128, early stopping on NDCG@10 of 10,000 sampled validation users with seen items removed,
patience 20) on BERT4Rec's Beauty file, so both implementations are measured on the same machine and data.

What is not theirs: the PyTorch Lightning trainer loop is replaced by a plain one (same optimiser, batches,
early stopping and checkpoint choice); the loss is computed at the masked positions only and the ranking at
the mask slot only, which is their ``SeqRec.training_step`` / ``make_prediction`` arithmetic without the
[batch, length, items] score tensor (the script checks both against their functions on the first batch
before training); test is ranked every ``--test-every`` epochs (a diagnosis: the row takes the epoch
validation chose); and it runs on the CPU with today's torch and transformers, not their pinned versions.

    pip install 'transformers<5' 'pytorch_lightning<2.6'    # their code imports both; not project dependencies
    python benchmarks/bert4rec_reference.py --reference CHECKOUT/src --seed 0 --journal runs/theirs-seed0.jsonl
    python benchmarks/bert4rec_reference.py --plot docs/img/bert4rec-reference.png --journals runs/theirs-seed0.jsonl

The journal has one JSON line per epoch (training loss, validation and, every ``--test-every`` epochs, test
HR@10 / NDCG@10 with seen items removed, wall and CPU seconds) and a final line with the chosen epoch's test
figures. ``--plot`` draws the journals beside our own trace (docs/img/bert4rec-beauty-epochs.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "amazon-beauty-bert4rec" / "beauty.txt"
OURS = REPO / "docs" / "img" / "bert4rec-beauty-epochs.json"
PUBLISHED = {"HR@10": 0.0338, "NDCG@10": 0.0187, "best_epoch": 87}
THEIR_SETTINGS = {
    "max_length": 50, "mlm_probability": 0.2, "batch_size": 128, "test_batch_size": 256, "validation_size": 10000, "lr": 1e-3,
    "bert": {"vocab_size": 2, "max_position_embeddings": 200, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256},
}


def import_reference(src: Path):
    """Their modules, imported from ``src`` (one-line exit when the folder or a package it needs is missing)."""
    if not (src / "models.py").is_file() or not (src / "datasets.py").is_file():
        sys.exit(f"error: --reference must be the src/ folder of a sasrec-bert4rec-recsys23 checkout (no models.py / datasets.py in {src})")
    sys.path.insert(0, str(src))
    try:
        import datasets
        import models
        import modules
        import preprocess
    except ImportError as error:
        sys.exit(f"error: their code needs a package that is not installed ({error}); pip install 'transformers<5' 'pytorch_lightning<2.6'")
    return datasets, models, modules, preprocess


def train_reference(args: argparse.Namespace) -> dict:
    import numpy as np
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    datasets, models, modules, preprocess = import_reference(args.reference)
    if not args.data.is_file():
        sys.exit(f"error: no data file {args.data} (BERT4Rec's Beauty file, ../shared/data/amazon-beauty-bert4rec)")
    s = THEIR_SETTINGS
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    # their run.py prepare_data and create_dataloaders, for BERT4Rec
    data = pd.read_csv(args.data, sep=" ", header=None, names=["user_id", "item_id"])
    data = preprocess.add_time_idx(data, sort=False)
    data.item_id += 1  # id 1 is the mask token, 0 padding
    train = data[data.time_idx_reversed >= 2]
    validation_full = data[data.time_idx_reversed >= 1]
    test_target = data[data.time_idx_reversed == 0].set_index("user_id").item_id
    item_count = int(data.item_id.max())
    sample = np.random.choice(validation_full.user_id.unique(), size=s["validation_size"], replace=False)
    collate = datasets.PaddingCollateFn()
    train_loader = DataLoader(datasets.MaskedLMDataset(train, max_length=s["max_length"], mlm_probability=s["mlm_probability"], force_last_item_masking_prob=0),
                              batch_size=s["batch_size"], shuffle=True, collate_fn=collate)
    valid_loader = DataLoader(datasets.MaskedLMPredictionDataset(validation_full[validation_full.user_id.isin(sample)], max_length=s["max_length"], validation_mode=True),
                              batch_size=s["test_batch_size"], collate_fn=collate)
    test_loader = DataLoader(datasets.MaskedLMPredictionDataset(validation_full, max_length=s["max_length"]), batch_size=s["test_batch_size"], collate_fn=collate)
    model = models.BERT4Rec(vocab_size=item_count + 1, add_head=True, bert_config=dict(s["bert"]))
    module = modules.SeqRec(model, lr=s["lr"], predict_top_k=10, filter_seen=True)
    optimizer = module.configure_optimizers()

    def states(batch):
        return model.transformer_model(inputs_embeds=model.embed_layer(batch["input_ids"]), attention_mask=batch["attention_mask"]).last_hidden_state

    def masked_loss(batch):
        chosen = batch["labels"] != -100
        return F.cross_entropy(model.head(states(batch)[chosen]), batch["labels"][chosen])

    def top10(batch):
        """Their make_prediction at the mask slot only: the 10 best items the user has not seen."""
        h = states(batch)
        last = (batch["input_ids"] != 0).sum(1) - 1
        scores = model.head(h[torch.arange(h.shape[0]), last])
        scores, preds = torch.topk(scores, 10 + batch["full_history"].size(1))
        return module.filter_seen_items(preds, scores, batch["full_history"])[0]

    @torch.no_grad()
    def rank(loader, targets=None) -> tuple[float, float]:
        module.eval()
        ndcg = hits = n = 0.0
        for batch in loader:
            target = batch["target"] if targets is None else torch.tensor(targets.loc[batch["user_id"].numpy()].to_numpy())
            m = module.compute_val_metrics(target, top10(batch))
            ndcg, hits, n = ndcg + m["ndcg"] * len(target), hits + m["hit_rate"] * len(target), n + len(target)
        return hits / n, ndcg / n

    with torch.no_grad():  # the shortcuts above are their arithmetic: checked on the first batches, dropout off
        module.eval()
        batch = next(iter(train_loader))
        theirs, ours = module.training_step(batch, 0).item(), masked_loss(batch).item()
        if abs(theirs - ours) > 1e-4 * abs(theirs):
            sys.exit(f"error: masked-position loss {ours:.6f} differs from their training_step {theirs:.6f}")
        batch = next(iter(valid_loader))
        their_preds = module.make_prediction(batch)[0]
        same = (their_preds == top10(batch)).float().mean().item()
        if same < 0.99:
            sys.exit(f"error: mask-slot ranking agrees with their make_prediction on only {same:.1%} of the top-10 slots")
        print(f"check: loss {ours:.6f} = theirs {theirs:.6f}; top 10 equal to their make_prediction on {same:.2%} of slots", flush=True)

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.journal:
            with open(args.journal, "a") as journal:
                journal.write(json.dumps(row) + "\n")

    best_ndcg, best_epoch, best_state = -1.0, 0, None
    for epoch in range(1, args.max_epochs + 1):
        module.train()
        wall, cpu, total, steps = time.perf_counter(), time.process_time(), 0.0, 0
        for batch in train_loader:
            loss = masked_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        row = {"epoch": epoch, "seed": args.seed, "loss": total / steps, "train_s": round(time.perf_counter() - wall, 1)}
        row["valid HR@10"], row["valid NDCG@10"] = rank(valid_loader)
        if row["valid NDCG@10"] > best_ndcg:
            best_ndcg, best_epoch, best_state = row["valid NDCG@10"], epoch, copy.deepcopy(model.state_dict())
        if epoch % args.test_every == 0 or epoch == 1:
            row["test HR@10"], row["test NDCG@10"] = rank(test_loader, test_target)
        row.update(wall_s=round(time.perf_counter() - wall, 1), cpu_s=round(time.process_time() - cpu, 1), best_epoch=best_epoch)
        record(row)
        if epoch - best_epoch >= args.patience:
            break
    model.load_state_dict(best_state)
    hr, ndcg = rank(test_loader, test_target)
    final = {"final": True, "seed": args.seed, "best_epoch": best_epoch, "last_epoch": epoch, "valid NDCG@10": best_ndcg, "test HR@10": hr, "test NDCG@10": ndcg}
    record(final)
    return final


def read_journal(path: Path) -> tuple[list[dict], dict | None]:
    """(epoch rows, final row or None) of a journal written by a run of this script."""
    if not path.is_file():
        sys.exit(f"error: no journal {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            sys.exit(f"error: {path} line {number} is not JSON")
    return [r for r in rows if not r.get("final")], next((r for r in rows if r.get("final")), None)


def plot(journals: list[Path], out: Path) -> None:
    """Validation and test NDCG@10 (seen items removed) per epoch: their runs beside ours and the published figure."""
    from _report import pyplot, save_figure  # benchmarks/ is on sys.path

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for path in journals:
        rows, final = read_journal(path)
        seed = rows[0]["seed"] if rows else "?"
        left.plot([r["epoch"] for r in rows], [r["valid NDCG@10"] for r in rows], label=f"theirs, seed {seed} (10,000 sampled users)")
        tested = [r for r in rows if "test NDCG@10" in r]
        line, = right.plot([r["epoch"] for r in tested], [r["test NDCG@10"] for r in tested], marker="o", label=f"theirs, seed {seed}")
        if final:
            right.plot([final["best_epoch"]], [final["test NDCG@10"]], marker="*", markersize=14, linestyle="", color=line.get_color(),
                       label=f"theirs, seed {seed}: the epoch validation chose ({final['best_epoch']})")
    if OURS.is_file():
        ours = json.loads(OURS.read_text())["epochs"]
        left.plot([r["epoch"] for r in ours], [r["valid NDCG@10"] for r in ours], "k--", label="ours, unmasked=skip (all users)")
        right.plot([r["epoch"] for r in ours], [r["test NDCG@10"] for r in ours], "k--", marker="s", label="ours, unmasked=skip")
    right.axhline(PUBLISHED["NDCG@10"], color="grey", linestyle=":", label=f"published {PUBLISHED['NDCG@10']} (best epoch {PUBLISHED['best_epoch']})")
    for axis, title in ((left, "validation NDCG@10, seen items removed"), (right, "test NDCG@10, seen items removed")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    save_figure(fig, out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="src/ of a github.com/antklen/sasrec-bert4rec-recsys23 checkout (trains their model)")
    parser.add_argument("--data", type=Path, default=DATA, help="BERT4Rec's Beauty file")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch and numpy (their run.py sets none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--max-epochs", type=int, default=200, help="their trainer_params.max_epochs is 200")
    parser.add_argument("--patience", type=int, default=20, help="early stopping patience (theirs: 20)")
    parser.add_argument("--test-every", type=int, default=5, help="rank the test set every N epochs (and the first)")
    parser.add_argument("--journal", type=Path, help="append one JSON line per epoch here")
    parser.add_argument("--plot", type=Path, help="draw --journals beside ours into this PNG instead of training")
    parser.add_argument("--journals", type=Path, nargs="*", default=[], help="journals to draw with --plot")
    args = parser.parse_args()
    if args.plot:
        plot(args.journals, args.plot)
    elif args.reference:
        if args.test_every < 1 or args.max_epochs < 1 or args.patience < 1:
            sys.exit("error: --test-every, --max-epochs and --patience must be at least 1")
        train_reference(args)
    else:
        sys.exit("error: give --reference (to train their model) or --plot (to draw journals)")


if __name__ == "__main__":
    main()
