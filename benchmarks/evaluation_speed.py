"""Time full-ranking evaluation of 100k test events over a 3k-item catalogue.

Sessions are synthetic (a random walk on a sparse transition graph, made with
numpy) so the figure depends only on the evaluator and the model's scoring.
Target: under 10 s per model on the project's 2-core box (wall and CPU time are
printed; the box is shared, so wall time depends on the load).

    python benchmarks/evaluation_speed.py [--events 100000] [--items 3000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from streamrec.runtime import configure_process
from training.data import PreparedData, Vocab
from training.evaluate import evaluate
from training.models import get_model
from training.models.items import item_counts
from training.sessions import Sessions


def synthetic_sessions(rng: np.random.Generator, n_events: int, n_items: int, successors: np.ndarray) -> Sessions:
    """About n_events next-item targets: sessions of 2..12 clicks walking ``successors`` (20% random jumps)."""
    lengths = rng.integers(2, 13, size=int(n_events / 5.5) + 1)
    lengths = lengths[np.cumsum(lengths - 1) <= n_events]
    n = int(lengths.sum())
    items = np.empty(n, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    items[starts] = rng.integers(1, n_items + 1, size=len(starts))
    is_start = np.zeros(n, dtype=bool)
    is_start[starts] = True
    pick = rng.integers(0, successors.shape[1], size=n)
    jump = rng.random(n) < 0.2
    random_items = rng.integers(1, n_items + 1, size=n)
    for step in range(1, int(lengths.max())):  # one vectorized step per position in a session
        at = starts[lengths > step] + step
        prev = items[at - 1]
        items[at] = np.where(jump[at], random_items[at], successors[prev, pick[at]])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Sessions(np.arange(len(lengths)).astype(str), offsets, items, np.arange(n, dtype=np.float64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--models", default="pop,markov")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure_process(threads=args.threads, keep_freed_memory=True)  # once, at the start: torch's threads, and glibc keeps freed memory for training
    rng = np.random.default_rng(0)
    successors = rng.integers(1, args.items + 1, size=(args.items + 1, 8))
    train = synthetic_sessions(rng, 4 * args.events, args.items, successors)
    test = synthetic_sessions(rng, args.events, args.items, successors)
    data = PreparedData(Vocab([str(i) for i in range(1, args.items + 1)]), train, test)
    popularity = item_counts(train, args.items)
    print(f"catalogue {args.items:,} items; train {train.n_events:,} clicks; test {len(test):,} sessions, {test.n_events - len(test):,} targets; torch threads {args.threads}")
    for name in args.models.split(","):
        cls = get_model(name)
        model = cls.train(data, cls.Config(), progress=False)
        t0, c0 = time.perf_counter(), time.process_time()
        m = evaluate(model, test, popularity=popularity, progress=True)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{name:>8}: {m['n_events']:,} events in {elapsed:.2f} s wall, {cpu:.2f} s CPU ({m['n_events'] / elapsed:,.0f} events/s)  "
              f"HR@20 {m['HR@20']:.4f}  MRR@20 {m['MRR@20']:.4f}")


if __name__ == "__main__":
    main()
