"""Is one row's lead over another real? A paired bootstrap over the test events both rows were ranked on.

Two rows of docs/accuracy.json on the same dataset are rebuilt as they were measured (a baseline fitted again;
a tuned or refit neural row trained again on all of train for its kept epoch count, with the row's threads; any
other neural row trained again with its early stopping), every test event is ranked by both, and the difference
of their MRR@K is resampled over events (users, on leave-one-out data) with replacement. Each rebuilt model must
give its row's MRR@K again, else the script stops: the interval would describe other models than the rows.

    python benchmarks/paired.py --dataset beauty --models "gru4rec:<the tuned row's settings>" sr
    python benchmarks/paired.py --dataset diginetica --models vsknn sknn --exclude-seen
    python benchmarks/paired.py --dataset beauty --models NEURAL BASELINE --record   # the interval into the summary
    python benchmarks/paired.py --dataset beauty --models A B --k 10 --exclude-seen --runs RUNS   # kept runs, no training
    python benchmarks/paired.py --dataset beauty --models NEURAL BASELINE --by history popularity   # where it comes from
    python benchmarks/paired.py --dataset beauty --models SPEC BASELINE --split valid --by popularity   # the same, blind to test

With ``--runs RUNS`` (the folder ``accuracy.py --runs`` kept) an early-stopped leave-one-out row is loaded from its
run's checkpoint (the kept epoch's weights) instead of trained again; the row's figure is still checked.
A row trained again on another CPU need not give its figure to the last digit (another float path: a GRU4Rec row of
2026-12-05 gives MRR@20 0.028599 on this AMD EPYC against its 0.028451); ``--tolerance`` accepts such a rebuild and
says so, for questions about the model (``--by``), never for ``--record``.

Prints MRR@K, HR@K and NDCG@K of both, each difference with its 95 % percentile interval
(``stream.experiment.bootstrap_interval``, the A/B report's) and how many events only one of the two has in its top K.
``--by history popularity`` adds tables of the MRR@K difference by how many of the user's items come before the
target and by how often the target was clicked in training (each group bootstrapped on its own): where one model
gains and where the other.

``--split valid`` asks the same on the validation targets, without reading test: each spec is trained as a
``benchmarks/tune.py`` trial is (a neural model on the early-stopping split, early-stopped on the validation
targets, the kept epoch's weights; a baseline fitted on that split), popularity counts that split's clicks, and
any spec may be given, a row or not (a search's trial, a draw that was never a row). Nothing is checked against a
row or recorded: the rows hold test figures. This is where a question about the chosen model (what to try next)
can be asked while the choice stays on validation only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream.experiment import bootstrap_interval  # noqa: E402  (the A/B report's percentile bootstrap)
from streamrec.runtime import configure_process  # noqa: E402
from training.evaluate import bucket_label, evaluate, in_bucket  # noqa: E402
from training.models import get_model  # noqa: E402
from training.models.base import config_from_options  # noqa: E402
from training.protocols import early_stopping_split  # noqa: E402

import accuracy  # noqa: E402  (benchmarks/ is on sys.path)
import tune  # noqa: E402

REPRODUCE_TOLERANCE = 1e-6  # a rebuilt row's MRR@K may differ from the stored one by float rounding only


@dataclasses.dataclass
class PairedResult:
    """Per-model figures and the bootstrap of ``a - b`` (MRR@K; HR@K and NDCG@K beside it) over the shared test events."""

    events: int
    mrr: tuple[float, float]
    hr: tuple[float, float]
    difference: float
    interval: tuple[float, float]
    only_a: int  # events with the target in a's top K and not in b's
    only_b: int
    ndcg: tuple[float, float] = (0.0, 0.0)
    hr_interval: tuple[float, float] = (0.0, 0.0)  # of hr[0] - hr[1]
    ndcg_interval: tuple[float, float] = (0.0, 0.0)  # of ndcg[0] - ndcg[1]
    splits: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # split_difference by grouping, where asked for


def reciprocal_ranks(ranks: np.ndarray, k: int) -> np.ndarray:
    """1 / rank where the rank is at most ``k``, else 0 (the per-event terms of MRR@K)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / ranks, 0.0)


def paired_bootstrap(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 20, resamples: int = 2000, seed: int = 0) -> PairedResult:
    """95 % percentile bootstrap of MRR@K(a) - MRR@K(b), resampling events with replacement; ``ranks_*`` are aligned
    event by event, so each resample keeps both models' results on the same events (a paired comparison)."""
    if len(ranks_a) != len(ranks_b) or len(ranks_a) == 0:
        raise ValueError(f"need the same non-zero number of events for both models, got {len(ranks_a)} and {len(ranks_b)}")
    rr_a, rr_b = reciprocal_ranks(ranks_a, k), reciprocal_ranks(ranks_b, k)
    hit_a, hit_b = rr_a > 0, rr_b > 0
    gain_a, gain_b = (np.where(hit, 1.0 / np.log2(np.asarray(r, dtype=np.float64) + 1.0), 0.0) for hit, r in ((hit_a, ranks_a), (hit_b, ranks_b)))

    def interval_of(difference: np.ndarray) -> tuple[float, float]:  # the same resamples for every metric
        return bootstrap_interval(difference, np.ones_like(difference), np.random.default_rng(seed), resamples)

    difference = rr_a - rr_b
    return PairedResult(
        events=len(difference), mrr=(float(rr_a.mean()), float(rr_b.mean())), hr=(float(hit_a.mean()), float(hit_b.mean())),
        difference=float(difference.mean()), interval=interval_of(difference),
        only_a=int((hit_a & ~hit_b).sum()), only_b=int((hit_b & ~hit_a).sum()),
        ndcg=(float(gain_a.mean()), float(gain_b.mean())),
        hr_interval=interval_of(hit_a.astype(np.float64) - hit_b), ndcg_interval=interval_of(gain_a - gain_b),
    )


# The groupings of ``--by``: what is measured per test event, its groups (lo, hi; hi None: no upper end), the table's heading.
GROUPINGS = {
    "history": (((1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (7, 9), (10, 19), (20, None)), "items before the target"),
    "popularity": (((0, 0), (1, 4), (5, 9), (10, 19), (20, 49), (50, 99), (100, 199), (200, None)), "the target's training clicks"),
}


def history_lengths(sessions, positions: np.ndarray) -> np.ndarray:
    """How many of its session's items come before each event's target (the event's input click included)."""
    owner = np.searchsorted(sessions.offsets, positions, side="right") - 1
    return positions - sessions.offsets[owner] + 1


def target_popularity(popularity: np.ndarray, sessions, positions: np.ndarray) -> np.ndarray:
    """How often each event's target occurs in the training clicks (``popularity``: their count per item)."""
    return popularity[sessions.items[positions + 1]]


def split_difference(ranks_a: np.ndarray, ranks_b: np.ndarray, values: np.ndarray, groups, k: int = 20, resamples: int = 2000,
                     seed: int = 0) -> list[dict]:
    """The MRR@K difference ``a - b`` per group of events (``values`` in [lo, hi]), each with its own paired bootstrap
    interval; ``share`` is the group's part of all events and ``weight`` its part of the overall difference (they
    sum to 1 where the overall difference is not 0)."""
    rr_a, rr_b = reciprocal_ranks(ranks_a, k), reciprocal_ranks(ranks_b, k)
    total = float((rr_a - rr_b).sum())
    rows = []
    for lo, hi in groups:
        m = in_bucket(values, lo, hi)
        if not m.any():
            continue
        difference = rr_a[m] - rr_b[m]
        low, high = bootstrap_interval(difference, np.ones_like(difference), np.random.default_rng(seed), resamples)
        rows.append({"group": bucket_label(lo, hi), "events": int(m.sum()),
                     "share": float(m.mean()), "mrr": (float(rr_a[m].mean()), float(rr_b[m].mean())),
                     "difference": float(difference.mean()), "interval": (low, high),
                     "weight": float(difference.sum()) / total if total else float("nan")})
    return rows


def split_table(rows: list[dict], heading: str, names: tuple[str, str], k: int, parts: bool = True) -> str:
    """``split_difference`` as a Markdown table; ``parts=False`` leaves out each group's part of the overall
    difference (where that difference is a tie, near 0, the parts are ratios to noise: -800 %, +900 %)."""
    part = " part of the overall difference |" if parts else ""
    lines = [f"| {heading} | events | share | MRR@{k} {names[0]} | MRR@{k} {names[1]} | difference | 95 % interval |{part}",
             "|---|---|---|---|---|---|---|" + ("---|" if parts else "")]
    for g in rows:
        lines.append(f"| {g['group']} | {g['events']:,} | {g['share']:.1%} | {g['mrr'][0]:.4f} | {g['mrr'][1]:.4f} | {g['difference']:+.4f} | "
                     f"{g['interval'][0]:+.4f} to {g['interval'][1]:+.4f} |" + (f" {g['weight']:+.0%} |" if parts else ""))
    return "\n".join(lines)


def stored_row(dataset: str, spec: str) -> dict:
    store = accuracy.STORE
    rows = [r for r in json.loads(store.read_text()) if r["dataset"] == dataset and r["model"] == spec] if store.is_file() else []
    if not rows:
        sys.exit(f"error: docs/accuracy.json has no row for model '{spec}' on '{dataset}' (the rows to compare must be measured first)")
    return rows[0]


SPLITS = ("test", "valid")


def spec_config(spec: str, tuned: bool | None = None):
    """(model class, config) of a spec as rows and tune.py write it: ``name:key=value,...`` with JSON values
    (``tuned``, tune.py: strings quoted, lists) or plain ones (accuracy.py); ``tuned=None`` reads JSON where every
    value is JSON, else plain (``init=normal`` is not JSON)."""
    if tuned is not False:
        try:
            name, settings = tune.settings_of(spec)
        except ValueError:
            if tuned:
                raise
        else:
            cls = get_model(name)
            return cls, dataclasses.replace(cls.Config(), **settings)
    name, options = accuracy.parse_spec(spec)
    cls = get_model(name)
    return cls, config_from_options(cls.Config, options)


def rebuild(row: dict, data, runs: Path | None = None):
    """The row's model, trained again the way the row was measured, or with ``runs`` an early-stopped
    leave-one-out row loaded from its kept run (``accuracy.py --runs``: the kept epoch's weights)."""
    cls, config = spec_config(row["model"], tuned="tuning" in row)
    if "tuning" in row:  # benchmarks/tune.py: settings written as JSON, the draw's own schedule, refit for its best epochs
        return accuracy.refit_on_all(cls, data, dataclasses.replace(config, threads=row.get("threads", 1)), row["best_epochs"])
    if row.get("best_epochs") is None:  # a baseline
        return cls.train(data, config, progress=False)
    config = dataclasses.replace(config, threads=row.get("threads", 1))
    if row.get("max_epochs") is not None:  # benchmarks/accuracy.py caps the schedule at --max-epochs
        config = dataclasses.replace(config, epochs=min(config.epochs, row["max_epochs"]))
    if row.get("refit") or data.stats.get("eval_mode", "next") == "next":  # what train_and_select kept: the refit model
        return accuracy.refit_on_all(cls, data, config, row["best_epochs"])
    run_dir = None
    if runs is not None:
        run_dir = accuracy.run_folder(runs, row["dataset"], row["model"])
        if not (run_dir / "checkpoint.pt").is_file():
            sys.exit(f"error: no kept run for '{row['model']}' under {runs} (looked for {run_dir}/checkpoint.pt)")
        import torch

        kept = torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")
        if not (kept["stopped_early"] or kept["epoch"] + 1 >= config.epochs):  # resuming would train it on here
            sys.exit(f"error: the kept run for '{row['model']}' is not finished (epoch {kept['epoch'] + 1} of {config.epochs}): finish it with accuracy.py --runs first")
        if kept["best_epoch"] + 1 != row["best_epochs"]:
            sys.exit(f"error: the kept run for '{row['model']}' kept epoch {kept['best_epoch'] + 1}, its row {row['best_epochs']}: not the row's run")
    model, *_ = accuracy.train_and_select(cls, data, config, run_dir=run_dir)  # a finished kept run returns at once
    return model


def validation_ranks(spec: str, data, fit, valid, popularity: np.ndarray, k: int, exclude_seen: bool, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(positions, ranks) of ``spec`` on every validation target (``valid``), trained as a tune.py trial is: a neural
    model on the early-stopping split (``fit``) and early-stopped on validation (the kept epoch's weights), a baseline
    fitted on ``fit``; ties among unscored items in ``popularity`` order (``fit``'s clicks per item)."""
    started = time.perf_counter()
    cls, config = spec_config(spec)
    if cls.name in accuracy.BASELINES:
        model = cls.train(dataclasses.replace(data, train=fit, valid=None), config, progress=False)
    else:
        model = cls.train(data, dataclasses.replace(config, threads=threads), progress=False)
    m = evaluate(model, valid, ks=(k,), mode=data.stats.get("eval_mode", "next"), popularity=popularity, exclude_seen=exclude_seen,
                 progress=False, event_ranks=True)
    print(f"  {spec}: validation MRR@{k} {m[f'MRR@{k}']:.6f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return m["event_positions"], m["event_ranks"]


def event_ranks(row: dict, data, popularity: np.ndarray, k: int, exclude_seen: bool, key: str, runs: Path | None = None,
                tolerance: float = REPRODUCE_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """(positions, ranks) of the row's rebuilt model on every test event, ties among unscored items in ``popularity``
    order (train's clicks per item); stops unless it gives the row's ``key`` again, within ``tolerance``."""
    if key not in row:  # before the rebuild, which can take minutes
        sys.exit(f"error: the row for '{row['model']}' has no {key}")
    started = time.perf_counter()
    model = rebuild(row, data, runs)
    mode = data.stats.get("eval_mode", "next")
    m = evaluate(model, data.test, ks=(k,), mode=mode, popularity=popularity, exclude_seen=exclude_seen, progress=False, event_ranks=True)
    if abs(m[f"MRR@{k}"] - row[key]) > tolerance:
        sys.exit(f"error: '{row['model']}' rebuilt gives {key} {m[f'MRR@{k}']:.6f}, its row {row[key]:.6f}: not the row's model"
                 + ("" if tolerance > REPRODUCE_TOLERANCE else " (trained again on another CPU? see --tolerance)"))
    same = "as in its row" if abs(m[f"MRR@{k}"] - row[key]) <= REPRODUCE_TOLERANCE else f"its row {row[key]:.6f}, within --tolerance"
    print(f"  {row['model']}: {key} {m[f'MRR@{k}']:.6f}, {same} ({time.perf_counter() - started:.0f} s)", flush=True)
    return m["event_positions"], m["event_ranks"]


def compare(dataset: str, spec_a: str, spec_b: str, k: int = 20, resamples: int = 2000, exclude_seen: bool = False, record: bool = False,
            runs: Path | None = None, by: tuple[str, ...] = (), tolerance: float = REPRODUCE_TOLERANCE, split: str = "test",
            threads: int = 1) -> PairedResult:
    """Both rows rebuilt, ranked on the same test events and bootstrapped; with ``record`` the result is stored in the
    first row (``paired``, by metric) of docs/accuracy.json and the docs are rendered again (the summary's interval);
    ``by`` splits the difference by those ``GROUPINGS`` too (``split_difference``). With ``split="valid"`` both specs
    are trained as tune.py's trials (``validation_ranks``, on ``threads`` torch threads) and ranked on the validation
    targets instead: no row is needed or checked, and test is not read."""
    if dataset not in accuracy.DATASETS:
        sys.exit(f"error: unknown dataset '{dataset}' (one of {', '.join(accuracy.DATASETS)})")
    if split not in SPLITS:
        sys.exit(f"error: unknown split '{split}' (one of {', '.join(SPLITS)})")
    if split == "valid" and (record or runs is not None):
        sys.exit("error: --split valid ranks models trained on the early-stopping split, not the rows: no --record, no --runs")
    if record and tolerance > REPRODUCE_TOLERANCE:
        sys.exit("error: --record stores the interval of the rows themselves: leave --tolerance at its default")
    metric = f"MRR@{k}" + (" seen removed" if exclude_seen else "")  # the rows' name for the figure ranked here
    if split == "valid":
        data = accuracy.DATASETS[dataset][1]()
        if data.valid is None:
            sys.exit(f"error: {dataset} has no validation split")
        train, events = early_stopping_split(data)
        popularity = np.bincount(train.items, minlength=data.n_items + 1)
        positions_a, ranks_a = validation_ranks(spec_a, data, train, events, popularity, k, exclude_seen, threads)
        positions_b, ranks_b = validation_ranks(spec_b, data, train, events, popularity, k, exclude_seen, threads)
    else:
        row_a, row_b = stored_row(dataset, spec_a), stored_row(dataset, spec_b)
        data = accuracy.DATASETS[dataset][1]()
        train, events = data.train, data.test
        popularity = np.bincount(train.items, minlength=data.n_items + 1)
        positions_a, ranks_a = event_ranks(row_a, data, popularity, k, exclude_seen, metric, runs, tolerance)
        positions_b, ranks_b = event_ranks(row_b, data, popularity, k, exclude_seen, metric, runs, tolerance)
    if not np.array_equal(positions_a, positions_b):
        sys.exit(f"error: the two models were ranked on different {split} events")
    result = paired_bootstrap(ranks_a, ranks_b, k, resamples)
    for grouping in by:
        values = history_lengths(events, positions_a) if grouping == "history" else target_popularity(popularity, events, positions_a)
        result.splits[grouping] = split_difference(ranks_a, ranks_b, values, GROUPINGS[grouping][0], k, resamples)
    if record:
        entry = {"against": spec_b, "mrr": [row_a[metric], row_b[metric]], "difference": result.difference,
                 "interval": list(result.interval), "events": result.events, "resamples": resamples, "measured": time.strftime("%Y-%m-%d")}
        current = stored_row(dataset, spec_a)  # read again: another paired.py may have recorded since this one started
        accuracy.publish({**current, "paired": {**current.get("paired", {}), metric: entry}})
    return result


def report(result: PairedResult, names: tuple[str, str], k: int) -> str:
    lead = not result.interval[0] <= 0 <= result.interval[1]  # the groups' parts of a tie would be ratios to noise
    def line(metric: str, pair: tuple[float, float], interval: tuple[float, float]) -> str:
        low, high = interval
        verdict = "a tie: the interval holds 0" if low <= 0 <= high else ("a lead" if low > 0 else "a loss") + " of the first model beyond noise"
        return f"difference {metric}@{k}: {pair[0] - pair[1]:+.4f}, 95 % interval {low:+.4f} to {high:+.4f} ({verdict})"

    return "\n".join([
        f"events: {result.events:,}",
        f"  {names[0]}: MRR@{k} {result.mrr[0]:.4f}  HR@{k} {result.hr[0]:.4f}  NDCG@{k} {result.ndcg[0]:.4f}",
        f"  {names[1]}: MRR@{k} {result.mrr[1]:.4f}  HR@{k} {result.hr[1]:.4f}  NDCG@{k} {result.ndcg[1]:.4f}",
        line("MRR", result.mrr, result.interval), line("HR", result.hr, result.hr_interval), line("NDCG", result.ndcg, result.ndcg_interval),
        f"events with the target in only one top {k}: first {result.only_a:,}, second {result.only_b:,}",
    ] + [line for grouping, rows in result.splits.items()
         for line in ("", f"MRR@{k} by {GROUPINGS[grouping][1]} (first minus second"
                      + ("" if lead else "; no part of the overall difference: it is a tie") + "):",
                      split_table(rows, GROUPINGS[grouping][1], names, k, parts=lead))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(accuracy.DATASETS)}")
    parser.add_argument("--models", nargs=2, required=True, metavar=("A", "B"), help="two model specs, as in their rows")
    parser.add_argument("--k", type=int, default=20, help="the cut-off of MRR@K and HR@K")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--exclude-seen", action="store_true", help="rank without the user's own earlier items (the rows' 'seen removed' figures)")
    parser.add_argument("--runs", type=Path, help="load early-stopped leave-one-out rows from the runs accuracy.py --runs kept there, not train them again")
    parser.add_argument("--tolerance", type=float, default=REPRODUCE_TOLERANCE,
                        help="how far a rebuilt row's MRR@K may lie from its row's (retrained on another CPU, the float path and so the model differ a little); not with --record")
    parser.add_argument("--by", nargs="+", default=[], choices=sorted(GROUPINGS),
                        help="also split the MRR@K difference by how many items come before the target (history) or how often the target was clicked in training (popularity)")
    parser.add_argument("--record", action="store_true", help="store the interval in the first row of docs/accuracy.json and render the docs again")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="valid: train both specs as tune.py's trials (any spec, a row or not) and rank the validation targets; test is not read")
    parser.add_argument("--threads", type=int, default=1, help="with --split valid: torch threads of each neural training (a row's own: the test split)")
    args = parser.parse_args()
    if args.k < 1 or args.resamples < 1 or args.tolerance < 0 or args.threads < 1:
        sys.exit("error: --k, --resamples and --threads must be at least 1, --tolerance at least 0")
    configure_process(threads=args.threads)
    if args.record and args.k != 20:
        sys.exit("error: --record stores MRR@20 intervals (the summary's metric): leave --k at 20")
    result = compare(args.dataset, args.models[0], args.models[1], args.k, args.resamples, args.exclude_seen, args.record, args.runs, tuple(args.by), args.tolerance,
                     args.split, args.threads)
    print(report(result, tuple(args.models), args.k))


if __name__ == "__main__":
    main()
