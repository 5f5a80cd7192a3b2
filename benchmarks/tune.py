"""Settings chosen on the validation split only: a small random search per model, the best refit and tested once.

    python benchmarks/tune.py --dataset diginetica --model gru4rec --trials 24
    python benchmarks/tune.py --dataset diginetica --model sasrec --trials 16 --no-docs

Each trial trains on the leak-free ``early_stopping_split`` (train without the validation targets) and is
scored by its best validation MRR@20 (early stopping where the model has patience, else the best epoch
of the run); ``--valid-metric ndcg10`` makes every trial follow validation NDCG@10 instead (the trainer's
``valid_metric``, which then names the row), and the choice between trials uses the same figure. Only the
trial with the best validation figure is then trained again on all of train (the data the baselines are
fitted on) for its best epoch count (``stop_after``: the same learning-rate schedule, ended there) and
evaluated on test, with and without the user's own items in the ranking. Test figures of the other trials are never computed, so nothing is
chosen on test. The row goes to docs/accuracy.json beside the other accuracy rows, with the search
space, the number of trials and the seed (the tuning budget), and docs/results.md is re-rendered.

The search space of each (dataset, model) is ``SPACES`` below, or ``DATASET_SPACES`` where a dataset has its
own: every trial draws each setting uniformly from its list (seeded, so a run is reproducible); the first
trial is always the model's defaults.

``--around SPEC --vary NAME=V1,V2,...`` is a second, narrower stage: the settings of SPEC (a tuned row's model
cell) once as they are and once with each other value of NAME, chosen on validation as a search is; the row then
states every stage's budget, and SPEC may itself be a later stage's row. Varying ``loss`` swaps the loss's companions
too (``COMPANIONS``: bpr-max's ELU, bpreg and no logQ correction; cross-entropy's are the model's defaults). (Beauty, 2026-12-06: the tuned GRU4Rec lost to sr on the most clicked targets,
``benchmarks/paired.py --by popularity``, which ``sample_alpha``, the popularity exponent of its negative samples,
governs.)

``--jobs N`` trains N trials at once, each in its own process with ``--threads`` threads (every trial is
seeded on its own, so the figures are those of a run one at a time). ``--journal FILE`` appends each
finished trial to FILE (JSON lines) and, started again, takes the trials it already holds from it, so a
search that was stopped goes on where it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import random
import re
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from streamrec.errors import UserError
from streamrec.runtime import configure_process
from training.models import get_model
from training.trainer import VALID_METRICS

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
# Where a dataset's catalogue makes the general space too dear for the CPU budget. Amazon Beauty: 54,542 items
# and 273,510 training clicks make a GRU4Rec epoch 0.3 to 1.5 min on one thread (batch 128 to 32) and each
# validation 16 s, so batch 16 and 30 epochs are left out; the other ranges stay as in SPACES.
DATASET_SPACES: dict[tuple[str, str], dict[str, list]] = {
    ("beauty", "gru4rec"): {
        "layers": [[100], [200]],
        "dropout_p_hidden": [0.0, 0.2, 0.4],
        "dropout_p_embed": [0.0, 0.2, 0.4],
        "lr": [0.05, 0.1, 0.2],
        "momentum": [0.0, 0.2, 0.5],
        "batch_size": [32, 64, 128],
        "n_sample": [512, 2048],
        "loss": ["cross-entropy", "bpr-max"],
        "epochs": [10, 15],
    },
}


def space_for(dataset: str, model: str) -> dict[str, list]:
    return DATASET_SPACES.get((dataset, model), SPACES[model])


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


def settings_of(spec: str) -> tuple[str, dict]:
    """(model, settings) of a ``spec_of`` string: its inverse, every value read back as the JSON it was written as."""
    model, _, rest = spec.partition(":")
    settings = {}
    for part in filter(None, re.split(r",(?=\w+=)", rest)):  # a comma inside a JSON list is not followed by key=
        key, _, raw = part.partition("=")
        settings[key] = raw == "True" if raw in ("True", "False") else json.loads(raw)  # spec_of writes bools as Python does
    return model, settings


def trial_key(dataset: str, model: str, settings: dict) -> str:
    """What makes two trials the same run (the journal's key): the training seed is the model's default."""
    return json.dumps([dataset, model, settings], sort_keys=True)


def read_journal(path: Path | None) -> dict[str, dict]:
    """Finished trials by ``trial_key``; a missing file is an empty journal, a bad line a one-line error."""
    if path is None or not path.exists():
        return {}
    done = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            done[trial_key(entry["dataset"], entry["model"], entry["settings"])] = entry
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: not a tune.py journal line ({e})") from None
    return done


_worker: dict = {}  # the trial process's dataset, loaded once per process


def _start_worker(dataset: str, threads: int) -> None:
    configure_process(threads=threads, keep_freed_memory=True)
    _worker["data"] = accuracy.DATASETS[dataset][1]()


def run_trial(dataset: str, model: str, settings: dict, threads: int, data=None) -> dict:
    """Train one setting on the early-stopping split; a journal entry: the validation figure early stopping
    followed (``valid_metric``, MRR@20 unless the settings say otherwise) at the kept epoch, as ``val_score``,
    beside every figure that epoch logged (``val_mrr20``, ``val_ndcg10``)."""
    data = data if data is not None else _worker["data"]
    cls = get_model(model)
    config = dataclasses.replace(cls.Config(), **settings, threads=threads)
    metric = getattr(config, "valid_metric", "mrr20")
    t0 = time.perf_counter()
    try:
        result = cls.train(data, config, progress=False).fit_result
        kept = result.history[result.best_epoch] if 0 <= result.best_epoch < len(result.history) else {}
        figures = {"val_score": result.best_score, **{f"val_{name}": kept.get(f"val_{name}") for name in VALID_METRICS},
                   "best_epochs": result.best_epoch + 1, "epochs_run": len(result.history), "error": None}
    except UserError as e:  # a diverged trial is a failed draw, not the end of the search
        figures = {"val_score": None, **{f"val_{name}": None for name in VALID_METRICS}, "best_epochs": 0, "epochs_run": 0, "error": str(e)}
    return {"dataset": dataset, "model": model, "settings": settings, "valid_metric": metric, **figures,
            "seconds": round(time.perf_counter() - t0, 1)}


def metric_of(entry: dict) -> str:
    """The validation figure a trial followed (journals from before ``valid_metric`` followed MRR@20)."""
    return entry.get("valid_metric", "mrr20")


def run_trials(dataset: str, model: str, draws: list[dict], threads: int, jobs: int, data, journal: Path | None) -> list[dict]:
    """Every draw's journal entry, in draw order: from the journal where it holds the trial, else trained
    (``jobs`` at a time, each in its own process, when ``jobs`` > 1) and appended to the journal."""
    done = read_journal(journal)
    entries: list[dict | None] = [done.get(trial_key(dataset, model, s)) for s in draws]
    for entry in entries:
        if entry is not None:
            entry["from_journal"] = True

    def report(i: int, entry: dict, source: str) -> None:
        settings, n = entry["settings"], len(draws)
        if entry["error"]:
            print(f"  trial {i + 1:2d}/{n}: failed ({entry['error']})  {spec_of(model, settings)}", flush=True)
        else:
            print(f"  trial {i + 1:2d}/{n}: val {VALID_METRICS[metric_of(entry)]} {validation_score(entry):.4f} at epoch {entry['best_epochs']}/{entry['epochs_run']}"
                  f" ({entry['seconds']:.0f} s{source})  {spec_of(model, settings)}", flush=True)

    def finished(i: int, entry: dict) -> None:
        entries[i] = entry
        if journal is not None:
            with journal.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        report(i, entry, "")

    for i, entry in enumerate(entries):
        if entry is not None:
            report(i, entry, ", from the journal")
    todo = [i for i, entry in enumerate(entries) if entry is None]
    if jobs <= 1:
        for i in todo:
            finished(i, run_trial(dataset, model, draws[i], threads, data))
    elif todo:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state forked from this one
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context, initializer=_start_worker,
                                 initargs=(dataset, threads)) as pool:
            futures = {pool.submit(run_trial, dataset, model, draws[i], threads): i for i in todo}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    return entries


def validation_score(entry: dict) -> float:
    """A trial's figure for the choice (the one its early stopping followed): a failed or diverged (NaN) trial
    ranks last."""
    score = entry["val_score"] if "val_score" in entry else entry["val_mrr20"]
    return float("-inf") if score is None or score != score else score


def choose(entries: list[dict]) -> tuple[str, dict]:
    """(the validation figure the trials followed, the trial with the best of it; the first of equals, in draw
    order). Trials that followed different figures are a ``UserError``: their best would be no choice at all."""
    metrics = sorted({metric_of(entry) for entry in entries})
    if len(metrics) != 1:
        raise UserError(f"the trials follow different validation figures ({', '.join(metrics)}); give every draw one valid_metric")
    return metrics[0], max(entries, key=validation_score)


def varied(model: str, settings: dict, key: str, value) -> dict:
    """``settings`` with ``key`` set to ``value``; where the old value brought companions (bpr-max's ELU, bpreg and no
    logQ) they go back to the model's defaults, and the new value's companions come in, as a search would draw them."""
    out = {**settings, key: value}
    linked = {before: more for (name, setting, before), more in COMPANIONS.items() if name == model and setting == key}
    if not linked:
        return out
    for companion in linked.get(settings.get(key), {}):
        out.pop(companion, None)
    return with_companions(model, out)


def refine(dataset: str, model: str, around: str, vary: str) -> tuple[list[dict], dict | None]:
    """The draws of ``--around SPEC --vary NAME=V1,...`` (SPEC's settings first, then each other value of NAME), and the
    tuning record of SPEC's row in docs/accuracy.json where it has one (the first stage)."""
    name, settings = settings_of(around)
    if name != model:
        raise UserError(f"--around {around}: a {name} spec, not {model}")
    key, sep, values = vary.partition("=")
    if not sep or not key or not values:
        raise UserError(f"--vary {vary}: give NAME=V1,V2,...")
    if key not in {f.name for f in dataclasses.fields(get_model(model).Config)}:
        raise UserError(f"--vary {vary}: {model} has no setting '{key}'")
    try:
        tried = [json.loads(v) for v in values.split(",")]
    except json.JSONDecodeError:
        raise UserError(f"--vary {vary}: the values must be JSON (numbers, true/false, quoted strings)") from None
    draws = [settings] + [varied(model, settings, key, v) for v in tried if v != settings.get(key)]
    rows = json.loads(accuracy.STORE.read_text()) if accuracy.STORE.is_file() else []
    stage = next((r["tuning"] for r in rows if r["dataset"] == dataset and r["model"] == around and "tuning" in r), None)
    return draws, stage


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(accuracy.DATASETS))
    parser.add_argument("--model", required=True, choices=sorted(SPACES))
    parser.add_argument("--trials", type=int, default=16, help="settings tried on validation, the defaults included (not with --around: its draws are SPEC and --vary's values)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the draws (training seeds stay the models' own)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each trial")
    parser.add_argument("--jobs", type=int, default=1, help="trials trained at once, each in its own process")
    parser.add_argument("--journal", type=Path, help="JSON-lines file of finished trials: appended to, and read back when started again")
    parser.add_argument("--valid-metric", choices=sorted(VALID_METRICS), default="mrr20",
                        help="the validation figure each trial's early stopping follows and the choice between trials uses")
    parser.add_argument("--around", metavar="SPEC", help="a second stage: the settings of SPEC (a tuned row's model cell), and --vary's values")
    parser.add_argument("--vary", metavar="NAME=V1,V2,...", help="with --around: the setting tried at each of these values (JSON), the others as in SPEC")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/")
    args = parser.parse_args()
    if args.trials < 1 or args.jobs < 1 or args.threads < 1:
        sys.exit("error: --trials, --jobs and --threads must be at least 1")
    if bool(args.around) != bool(args.vary):
        sys.exit("error: --around and --vary go together")
    configure_process(threads=args.threads, keep_freed_memory=True)
    if not accuracy.SHARED.is_dir():
        sys.exit(f"real click logs not found at {accuracy.SHARED}")
    title, load = accuracy.DATASETS[args.dataset]
    data = load()
    if data.valid is None:
        sys.exit(f"{args.dataset} has no validation split to tune on")
    cls = get_model(args.model)
    space = space_for(args.dataset, args.model)
    started, cpu_started, load_before = time.perf_counter(), time.process_time() + children_cpu_s(), os.getloadavg()[0]
    first_stage = None
    if args.around:
        try:
            draws, first_stage = refine(args.dataset, args.model, args.around, args.vary)
        except UserError as e:
            sys.exit(f"error: {e}")
    else:
        draws = [with_companions(args.model, settings) for settings in draw(space, args.trials, args.seed)]
    print(f"== {title}: {args.model}, {len(draws)} trials on validation {VALID_METRICS[args.valid_metric]} (seed {args.seed}, {args.jobs} at a time)", flush=True)
    if args.valid_metric != "mrr20":  # a setting of every draw, so the journal and the row's name say it
        draws = [{**settings, "valid_metric": args.valid_metric} for settings in draws]
    try:
        entries = run_trials(args.dataset, args.model, draws, args.threads, args.jobs, data, args.journal)
        metric, chosen = choose(entries)
    except UserError as e:
        sys.exit(f"error: {e}")
    best_score, best_epochs, best = validation_score(chosen), chosen["best_epochs"], chosen["settings"]
    spec = spec_of(args.model, best)
    print(f"best on validation {VALID_METRICS[metric]}: {best_score:.4f} ({spec}); refit on all of train for {best_epochs} epoch(s), then test", flush=True)
    model = accuracy.refit_on_all(cls, data, dataclasses.replace(cls.Config(), **best, threads=args.threads), best_epochs)
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() + children_cpu_s() - cpu_started
    t0 = time.perf_counter()
    figures = accuracy.test_figures(model, data, popularity)
    row = {
        "dataset": args.dataset, "model": spec, "n_items": data.n_items, "best_epochs": best_epochs,
        "epochs_run": best_epochs, "stopped_early": True, "train_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1),
        "eval_s": 0.0, "threads": args.threads, "max_epochs": best_epochs, "refit": True,
        "load_avg": round((load_before + os.getloadavg()[0]) / 2, 1), "measured": time.strftime("%Y-%m-%d"),
        "tuning": {"trials": len(entries), "seed": args.seed, "space": space, "valid_metric": metric, "val_score": round(best_score, 4),
                   "val_score_default": round(validation_score(entries[0]), 4), "script": "benchmarks/tune.py", "jobs": args.jobs,
                   "trial_s": round(sum(e["seconds"] for e in entries), 1),
                   "from_journal": sum(bool(e.get("from_journal")) for e in entries)},
    }
    if args.around:  # the second stage: what it varied around, and the first stage's own record
        row["tuning"].update(around=args.around, vary=args.vary, first_stage=first_stage)
        row["tuning"].pop("space")
    row.update(figures, eval_s=round(time.perf_counter() - t0, 1))
    print(f"test: HR@10 {row['HR@10']:.4f}  HR@20 {row['HR@20']:.4f}  MRR@20 {row['MRR@20']:.4f}  NDCG@20 {row['NDCG@20']:.4f}"
          f"  (tuning and refit {train_s / 60:.1f} min)", flush=True)
    if not args.no_docs:
        accuracy.publish(row)


if __name__ == "__main__":
    main()
