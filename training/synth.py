"""Synthetic click logs with structure a sequence model can learn.

Each item has a few likely successors (a sparse random transition graph; most
successors are in the item's own category). A session starts at a popular item
(Zipf) and walks the graph; with a small probability a click jumps to a random
popular item instead. Lengths are 1 + geometric, sessions start uniformly over
``DAYS`` (30) days and clicks are seconds to minutes apart. A first-order Markov model
recovers the graph (high HR@20); most-popular cannot (low HR@20).

Everything is vectorized over sessions (one numpy step per click position), so
100k sessions (600k clicks) are generated and prepared in 1-4 s on the dev box
(`benchmarks/data_prepare.py`), and the output depends only on the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.errors import UserError
from training.data import PreparedData

START = 1_704_067_200.0  # 2024-01-01 00:00:00 UTC
SUCCESSOR_WEIGHTS = np.array([0.45, 0.25, 0.15, 0.1, 0.05])  # chance of each successor slot
JUMP = 0.1  # chance a click ignores the graph and jumps to a popular item
SAME_CATEGORY = 0.9  # chance a successor is drawn from the item's own category
ITEMS_PER_CATEGORY = 50
ZIPF = 0.9  # popularity exponent of start items and jumps
MEAN_LENGTH = 6.0  # session length = 1 + geometric, mean MEAN_LENGTH
MAX_LENGTH = 60
DAYS = 30.0
MEAN_GAP_SECONDS = 45.0


def generate_log(n_items: int, n_sessions: int, seed: int) -> pd.DataFrame:
    """The raw event frame: session_id, item_id (original ids), time, category."""
    if n_items < 10:
        raise UserError("--items must be at least 10")
    if n_sessions < 10:
        raise UserError("--sessions must be at least 10")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** ZIPF
    popularity /= popularity.sum()

    # categories and the transition graph
    n_categories = max(1, n_items // ITEMS_PER_CATEGORY)
    category = rng.integers(n_categories, size=n_items)
    by_category = np.argsort(category, kind="stable")
    cat_start = np.searchsorted(category[by_category], np.arange(n_categories))
    cat_size = np.bincount(category, minlength=n_categories)
    k = len(SUCCESSOR_WEIGHTS)
    own = category[:, None]
    within = by_category[cat_start[own] + (rng.random((n_items, k)) * cat_size[own]).astype(np.int64)]
    anywhere = rng.choice(n_items, size=(n_items, k), p=popularity)
    successors = np.where(rng.random((n_items, k)) < SAME_CATEGORY, within, anywhere)
    self_loop = successors == np.arange(n_items)[:, None]
    successors[self_loop] = anywhere[self_loop]

    # walks, one vectorized step per position
    lengths = np.minimum(1 + rng.geometric(1.0 / (MEAN_LENGTH - 1.0), size=n_sessions), MAX_LENGTH)
    walk = np.zeros((n_sessions, lengths.max()), dtype=np.int64)
    walk[:, 0] = rng.choice(n_items, size=n_sessions, p=popularity)
    for t in range(1, lengths.max()):
        active = np.flatnonzero(lengths > t)
        slot = rng.choice(k, size=len(active), p=SUCCESSOR_WEIGHTS)
        step = successors[walk[active, t - 1], slot]
        jump = rng.random(len(active)) < JUMP
        step[jump] = rng.choice(n_items, size=int(jump.sum()), p=popularity)
        walk[active, t] = step
    items = walk[np.arange(walk.shape[1])[None, :] < lengths[:, None]]

    # times: sessions spread over DAYS, clicks seconds apart
    starts = START + np.sort(rng.uniform(0, DAYS * 86400.0, size=n_sessions))
    session = np.repeat(np.arange(n_sessions), lengths)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    gaps = 1.0 + rng.exponential(MEAN_GAP_SECONDS, size=len(items))
    gaps[first] = 0.0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first], lengths)
    times = np.round(starts[session] + elapsed, 3)

    item_ids = 1000 + rng.permutation(n_items)  # original ids differ from model indices
    return pd.DataFrame(
        {
            "session_id": (session + 1).astype(str),
            "item_id": item_ids[items].astype(str),
            "time": times,
            "category": category[items].astype(str),
        }
    )


def split_log(df: pd.DataFrame, test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): the last ``test_fraction`` of sessions by start time are the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError("--test-fraction must be between 0 and 1")
    start = df.groupby("session_id", sort=False)["time"].min().sort_values(kind="stable")
    n_test = max(1, int(round(len(start) * test_fraction)))
    test_ids = start.index[len(start) - n_test :]
    is_test = df["session_id"].isin(test_ids).to_numpy()
    return df[~is_test], df[is_test]


def synthesize(n_items: int, n_sessions: int, seed: int, test_fraction: float, raw: Path | None = None, valid_days: float = 1.0) -> PreparedData:
    """A prepared dataset (protocol "given", the last ``valid_days`` of train also as validation,
    0 = none: at 1M items a validation pass costs minutes); ``raw`` also gets the whole log as a
    YooChoose-format TSV."""
    from training.protocols import given

    if valid_days < 0:
        raise UserError("--valid-days must be >= 0")
    df = generate_log(n_items, n_sessions, seed)
    if raw is not None:
        write_yoochoose_tsv(df, raw)
    train, test = split_log(df, test_fraction)
    data = given(train, test, valid_days=valid_days, item_features=("category",))
    data.stats["source"] = {
        "synthetic": {"items": n_items, "sessions": n_sessions, "seed": seed, "test_fraction": test_fraction, "valid_days": valid_days}
    }
    return data


def write_yoochoose_tsv(df: pd.DataFrame, path: Path) -> None:
    """`SessionId<TAB>ItemId<TAB>Time`, the session-rec prepared format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = df[["session_id", "item_id", "time"]].rename(columns={"session_id": "SessionId", "item_id": "ItemId", "time": "Time"})
    out.to_csv(path, sep="\t", index=False, float_format="%.3f")
