"""Time the data path: the synthetic generator and every real dataset through its reader
and usual protocol. Prints a markdown table (the one in docs/data.md).

    python benchmarks/data_prepare.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from training import protocols
from training.readers import get_format
from training.synth import synthesize

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# (name, format, protocol, files, settings) — the command line each row stands for is in docs/data.md
DATASETS = [
    ("yoochoose-100k", "yoochoose", "given", ("yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt", "yoochoose-rsc15-100k/yoochoose-clicks-100k_test.txt"), {"valid_days": 1.0}),
    ("diginetica views sample", "diginetica", "session-time", ("diginetica/sample_train-item-views.csv",), {"test_days": 7.0, "valid_days": 7.0, "min_item_support": 5}),
    ("otto sample", "otto", "session-time", ("otto-sample/train.jsonl",), {"test_days": 7.0, "valid_days": 0.0, "min_item_support": 1}),
    ("trivago 100k", "trivago", "session-time", ("trivago-rsc19-100k/trivago_val_100k.parquet.snappy",), {"test_days": 0.5, "valid_days": 0.25, "min_item_support": 5}),
    ("ml-100k", "movielens", "leave-one-out", ("ml-100k/ml-100k.inter",), {"min_core": 0}),
    ("video games (SASRec)", "sasrec", "leave-one-out", ("amazon-video-games-sasrec/Video.txt",), {"min_core": 0}),
    ("beauty (BERT4Rec)", "sasrec", "leave-one-out", ("amazon-beauty-bert4rec/beauty.txt",), {"min_core": 0}),
    ("beauty (ICLRec)", "iclrec", "leave-one-out", ("iclrec-amazon-yelp/Beauty.txt",), {"min_core": 0}),
    ("yelp (ICLRec)", "iclrec", "leave-one-out", ("iclrec-amazon-yelp/Yelp.txt",), {"min_core": 0}),
]


def row(name, data, seconds) -> str:
    valid = f"{len(data.valid):,} / {data.valid.n_events:,}" if data.valid is not None else "-"
    return (
        f"| {name} | {data.stats['protocol']} | {data.n_items:,} | {len(data.train):,} / {data.train.n_events:,} | "
        f"{valid} | {len(data.test):,} / {data.test.n_events:,} | {data.stats['eval_mode']} | {seconds:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    print("| dataset | protocol | items | train sessions / events | valid | test | eval mode | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for sessions in (10_000, 100_000):
        t0 = time.perf_counter()
        data = synthesize(2000, sessions, seed=0, test_fraction=0.2)
        print(row(f"synth {sessions:,} sessions", data, time.perf_counter() - t0))
    if not args.shared.is_dir():
        print(f"(real datasets skipped: {args.shared} not found)")
        return
    for name, fmt, protocol, files, settings in DATASETS:
        spec = get_format(fmt)
        features = {"event_features": spec.event_features, "item_features": spec.item_features}
        t0 = time.perf_counter()
        frames = [spec.read(args.shared / f) for f in files]
        if protocol == "given":
            data = protocols.given(*frames, **settings, **features)
        elif protocol == "session-time":
            data = protocols.session_time(frames[0], **settings, **features)
        else:
            data = protocols.leave_one_out(frames[0], **settings, **features)
        print(row(name, data, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
