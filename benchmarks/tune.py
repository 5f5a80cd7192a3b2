"""Settings chosen on the validation split only: a small random search per model, the best refit and tested once.

    python benchmarks/tune.py --dataset diginetica --model gru4rec --trials 24
    python benchmarks/tune.py --dataset diginetica --model sasrec --trials 16 --no-docs

Each trial trains on the leak-free ``early_stopping_split`` (train without the validation targets) and is
scored by its best validation MRR@20 (early stopping where the model has patience, else the best epoch
of the run). Only the trial with the best validation figure is then trained again on all of train (the
data the baselines are fitted on) for its best epoch count (``stop_after``: the same learning-rate schedule,
ended there) and evaluated on test, with and without the
user's own items in the ranking. Test figures of the other trials are never computed, so nothing is
chosen on test. The row goes to docs/accuracy.json beside the other accuracy rows, with the search
space, the number of trials and the seed (the tuning budget), and docs/results.md is re-rendered.

The search space of each (dataset, model) is ``SPACES`` below: every trial draws each setting uniformly
from its list (seeded, so a run is reproducible); the first trial is always the model's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time

import numpy as np

from streamrec.errors import UserError
from streamrec.runtime import configure_process
from training.models import get_model

import accuracy  # benchmarks/ is on sys.path

# Settings tried per model (validation only). Small catalogues (Diginetica: 2,005 items, 5,376 training
# clicks) overfit fast, so the spaces reach towards smaller models, more dropout and fewer negatives.
SPACES: dict[str, dict[str, list]] = {
    "gru4rec": {
        "layers": [[64], [100], [200]],
        "dropout_p_hidden": [0.0, 0.2, 0.4, 0.6],
        "dropout_p_embed": [0.0, 0.2, 0.4],
        "lr": [0.05, 0.1, 0.2, 0.4],
        "momentum": [0.0, 0.2, 0.5],
        "batch_size": [16, 32, 64],
        "n_sample": [0, 512, 2048],
        "loss": ["cross-entropy", "bpr-max"],
        "epochs": [15, 30],
    },
    "sasrec": {
        "hidden_size": [32, 64, 128],
        "dropout": [0.1, 0.3, 0.5],
        "init": ["default", "normal"],
        "lr": [1e-3, 3e-3],
        "history_len": [20, 50],
        "blocks": [1, 2],
        "batch_size": [64, 128],
    },
    "srgnn": {
        "hidden_size": [50, 100],
        "lr": [1e-3, 3e-3],
        "batch_size": [50, 100],
    },
}
# bpr-max with the official BPR-max files' companions: ELU 0.5 on the scores and no logQ correction
COMPANIONS = {("gru4rec", "loss", "bpr-max"): {"elu_param": 0.5, "logq": 0.0, "bpreg": 1.0}}


def draw(space: dict[str, list], trials: int, seed: int) -> list[dict]:
    """``trials`` distinct settings (the first empty: the model's defaults), each value uniform from its list."""
    rng, seen, out = random.Random(seed), set(), [{}]
    for _ in range(trials * 50):
        if len(out) >= trials:
            break
        pick = {key: rng.choice(values) for key, values in space.items()}
        key = json.dumps(pick, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(pick)
    return out


def with_companions(model: str, settings: dict) -> dict:
    extra = {}
    for (name, key, value), more in COMPANIONS.items():
        if name == model and settings.get(key) == value:
            extra.update(more)
    return {**settings, **extra}


def spec_of(model: str, settings: dict) -> str:
    """The accuracy table's model cell: ``name:key=value,...`` (lists and strings written as JSON)."""
    if not settings:
        return model
    return model + ":" + ",".join(f"{k}={json.dumps(v) if not isinstance(v, (int, float)) else v}" for k, v in settings.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(accuracy.DATASETS))
    parser.add_argument("--model", required=True, choices=sorted(SPACES))
    parser.add_argument("--trials", type=int, default=16, help="settings tried on validation, the defaults included")
    parser.add_argument("--seed", type=int, default=1, help="seed of the draws (training seeds stay the models' own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    args = parser.parse_args()
    configure_process(threads=args.threads, keep_freed_memory=True)
    if not accuracy.SHARED.is_dir():
        sys.exit(f"real click logs not found at {accuracy.SHARED}")
    title, load = accuracy.DATASETS[args.dataset]
    data = load()
    if data.valid is None:
        sys.exit(f"{args.dataset} has no validation split to tune on")
    cls = get_model(args.model)
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    print(f"== {title}: {args.model}, {args.trials} trials on validation (seed {args.seed})", flush=True)
    scored = []
    for i, settings in enumerate(draw(SPACES[args.model], args.trials, args.seed), 1):
        settings = with_companions(args.model, settings)
        config = dataclasses.replace(cls.Config(), **settings, threads=args.threads)
        t0 = time.perf_counter()
        try:
            result = cls.train(data, config, progress=False).fit_result
        except UserError as e:  # a diverged trial is a failed draw, not the end of the search
            scored.append((float("-inf"), 0, settings))
            print(f"  trial {i:2d}/{args.trials}: failed ({e})  {spec_of(args.model, settings)}", flush=True)
            continue
        scored.append((result.best_score, result.best_epoch + 1, settings))
        print(f"  trial {i:2d}/{args.trials}: val MRR@20 {result.best_score:.4f} at epoch {result.best_epoch + 1}/{len(result.history)}"
              f" ({time.perf_counter() - t0:.0f} s)  {spec_of(args.model, settings)}", flush=True)
    best_score, best_epochs, best = max(scored, key=lambda s: s[0])
    spec = spec_of(args.model, best)
    print(f"best on validation: {best_score:.4f} ({spec}); refit on all of train for {best_epochs} epoch(s), then test", flush=True)
    model = accuracy.refit_on_all(cls, data, dataclasses.replace(cls.Config(), **best, threads=args.threads), best_epochs)
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    t0 = time.perf_counter()
    figures = accuracy.test_figures(model, data, popularity)
    row = {
        "dataset": args.dataset, "model": spec, "n_items": data.n_items, "best_epochs": best_epochs,
        "epochs_run": best_epochs, "stopped_early": True, "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1),
        "eval_s": 0.0, "threads": args.threads, "max_epochs": best_epochs, "refit": True,
        "load_avg": round((load_before + os.getloadavg()[0]) / 2, 1), "measured": time.strftime("%Y-%m-%d"),
        "tuning": {"trials": len(scored), "seed": args.seed, "space": SPACES[args.model], "val_mrr20": round(best_score, 4),
                   "val_mrr20_default": round(scored[0][0], 4), "script": "benchmarks/tune.py"},
    }
    row.update(figures, eval_s=round(time.perf_counter() - t0, 1))
    print(f"test: HR@10 {row['HR@10']:.4f}  HR@20 {row['HR@20']:.4f}  MRR@20 {row['MRR@20']:.4f}  NDCG@20 {row['NDCG@20']:.4f}"
          f"  (tuning and refit {train_s / 60:.1f} min)", flush=True)
    if not args.no_docs:
        accuracy.publish(row)


if __name__ == "__main__":
    main()
