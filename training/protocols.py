"""Evaluation protocols: how an event frame becomes train / valid / test Sessions.

``given``          Train and test come as separate files (the session-rec YooChoose
                   files). Vocabulary = train items; test items unseen in train become
                   index 0; train and test are not filtered. Evaluated in "next" mode.
``session-time``   SR-GNN / session-rec: drop sessions of length 1 and items with
                   support < ``min_item_support``, repeated until nothing changes; the
                   sessions whose LAST event falls in the final ``test_days`` days are the
                   test set; test events whose item is not in train are dropped and test
                   sessions left shorter than 2 are dropped. Evaluated in "next" mode.
``leave-one-out``  SASRec / BERT4Rec / ICLRec user sequences: optional ``min_core``
                   filter (users and items with fewer events are dropped, repeated until
                   stable); per user the last item is the test target and the one before
                   it the validation target. Users with fewer than 3 events only train.
                   Evaluated in "last" mode: ``test.npz`` holds each user's FULL
                   sequence and only its last position is scored (given everything
                   before it); ``valid.npz`` holds the sequence without the test item,
                   scored at its last position the same way.

Which sessions are in which file:
- ``train.npz``: everything the final model may learn from. Time protocols: all
  sessions before the test cut (including the validation days). Leave-one-out:
  every user's sequence without its last item (the test target).
- ``valid.npz`` (optional): for early stopping and tuning. Time protocols: the train
  sessions whose last event is in the final ``valid_days`` days of train
  (``stats["valid_cut"]`` is that cut), with items unseen in the earlier train
  sessions dropped and sessions left shorter than 2 dropped (session-rec's
  train_valid). These session ids are ALSO in train.npz. Leave-one-out: the same
  sequences as train.npz for users with >= 3 events (the last event is the
  validation target).
  ``early_stopping_split(data)`` gives the leak-free pair (fit, valid): train
  sessions ending before the cut, or train without each user's validation target.
- ``test.npz``: the held-out sessions / sequences.

``stats.json`` records ``protocol``, ``eval_mode`` ("next" or "last"), the settings,
how many events each filter dropped, and ``feature_vocab`` (per side feature the list
of values; list position i is feature id i + 1, 0 = unknown).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamrec.errors import UserError
from training.data import PreparedData, Vocab, sessions_from_frame, vocab_from_train
from training.sessions import Sessions

DAY = 86400.0
PRICE_BUCKETS = 10  # quantile buckets for a numeric item feature (price)

PROTOCOLS = ("given", "session-time", "leave-one-out")
EVAL_MODES = {"given": "next", "session-time": "next", "leave-one-out": "last"}


# ---------------------------------------------------------------- building blocks


def filter_sessions(df: pd.DataFrame, min_item_support: int) -> tuple[pd.DataFrame, int]:
    """Drop sessions of length 1 and items with fewer than ``min_item_support`` events,
    repeating until neither rule removes anything. Returns (frame, rounds)."""
    rounds = 0
    while True:
        rounds += 1
        before = len(df)
        lengths = df.groupby("session_id", sort=False)["item_id"].transform("size")
        df = df[lengths.to_numpy() > 1]
        support = df.groupby("item_id", sort=False)["session_id"].transform("size")
        df = df[support.to_numpy() >= min_item_support]
        if len(df) == before:
            return df, rounds


def k_core(df: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Drop users (sessions) and items with fewer than ``k`` events until stable."""
    rounds = 0
    while k > 0:
        rounds += 1
        before = len(df)
        user_n = df.groupby("session_id", sort=False)["item_id"].transform("size")
        item_n = df.groupby("item_id", sort=False)["session_id"].transform("size")
        df = df[(user_n.to_numpy() >= k) & (item_n.to_numpy() >= k)]
        if len(df) == before:
            break
    return df, rounds


def split_by_time(df: pd.DataFrame, days: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(before, held out): a session is held out when its last event is within ``days``
    days of the frame's last event (session-rec's rule)."""
    session_end = df.groupby("session_id", sort=False)["time"].transform("max").to_numpy()
    held = session_end >= df["time"].max() - days * DAY
    return df[~held], df[held]


def valid_cut(train_df: pd.DataFrame, valid_days: float) -> dict:
    """stats entry: train sessions whose last event is at or after ``valid_cut`` are the
    validation period (``early_stopping_split`` fits on the others)."""
    if valid_days <= 0:
        return {}
    return {"valid_cut": float(train_df["time"].max() - valid_days * DAY)}


def keep_known(df: pd.DataFrame, known_items: pd.Series) -> pd.DataFrame:
    """Drop events whose item is not in ``known_items``, then sessions shorter than 2."""
    df = df[df["item_id"].isin(pd.unique(known_items))]
    lengths = df.groupby("session_id", sort=False)["item_id"].transform("size")
    return df[lengths.to_numpy() >= 2]


def event_positions(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The frame sorted by (session, time, file order) with each event's position in its
    session and its session's length."""
    df = df.reset_index(drop=True)
    df = df.iloc[np.lexsort((np.arange(len(df)), df["time"].to_numpy(), df["session_id"].to_numpy()))]
    grouped = df.groupby("session_id", sort=False)["item_id"]
    return df, grouped.cumcount().to_numpy(), grouped.transform("size").to_numpy()


# ---------------------------------------------------------------- side features


def encode_event_features(frames: dict[str, pd.DataFrame], names: tuple[str, ...]) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]]]:
    """Replace each event feature column by int64 ids from a vocabulary of the TRAIN
    values (most frequent first); missing or train-unseen values become 0."""
    vocab: dict[str, list[str]] = {}
    out = {k: v.copy() for k, v in frames.items()}
    for name in names:
        values = frames["train"][name].dropna().astype(str)
        counts = values.value_counts(sort=False)
        order = np.argsort(-counts.to_numpy(), kind="stable")
        vocab[name] = counts.index.to_numpy()[order].tolist()
        for df in out.values():
            col = df[name].where(df[name].isna(), df[name].astype(str))
            df[name] = pd.Index(vocab[name]).get_indexer(col).astype(np.int64) + 1
    return out, vocab


def item_feature_arrays(df: pd.DataFrame, vocab: Vocab, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Per-item int64 arrays [n_items + 1] (0 = unknown) from per-event item attributes.

    A string attribute takes the item's most frequent value; its ids are ordered by
    how many vocabulary items have the value. A numeric one (price) takes the item's
    median and is cut into ``PRICE_BUCKETS`` quantile buckets over the vocabulary items.
    """
    arrays: dict[str, np.ndarray] = {}
    labels: dict[str, list[str]] = {}
    index = pd.Series(np.arange(1, vocab.n_items + 1), index=vocab.item_ids)
    for name in names:
        known = df[["item_id", name]].dropna()
        known = known[known["item_id"].isin(index.index)]
        out = np.zeros(vocab.n_items + 1, dtype=np.int64)
        if pd.api.types.is_numeric_dtype(known[name]):
            per_item = known.groupby("item_id")[name].median()
            if len(per_item):
                edges = np.unique(np.quantile(per_item.to_numpy(), np.linspace(0, 1, PRICE_BUCKETS + 1)[1:-1]))
                out[index[per_item.index].to_numpy()] = np.searchsorted(edges, per_item.to_numpy(), side="right") + 1
                bounds = np.r_[-np.inf, edges, np.inf]
                labels[name] = [f"[{lo:g}, {hi:g})" for lo, hi in zip(bounds[:-1], bounds[1:])]
            else:
                labels[name] = []
        else:
            counts = known.groupby(["item_id", name], sort=False).size().reset_index(name="n")
            counts = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates("item_id")
            values = counts[name].astype(str)
            freq = values.value_counts(sort=False)
            order = np.argsort(-freq.to_numpy(), kind="stable")
            labels[name] = freq.index.to_numpy()[order].tolist()
            ids = pd.Series(np.arange(1, len(order) + 1), index=labels[name])
            out[index[counts["item_id"]].to_numpy()] = ids[values].to_numpy()
        arrays[name] = out
    return arrays, labels


def _present(df: pd.DataFrame, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in names if n in df.columns and df[n].notna().any())


def build(
    frames: dict[str, pd.DataFrame],
    vocab: Vocab,
    *,
    protocol: str,
    event_features: tuple[str, ...],
    item_features: tuple[str, ...],
    stats: dict,
) -> PreparedData:
    """Encode the split frames ("train", "test", optional "valid") into PreparedData.
    An empty validation split is left out (no valid.npz)."""
    if "valid" in frames and frames["valid"].empty:
        frames = {k: v for k, v in frames.items() if k != "valid"}
        stats = {**stats, "valid_note": "validation split came out empty and was left out"}
    full = pd.concat(list(frames.values()), ignore_index=True)
    event_features = _present(frames["train"], event_features)
    item_features = _present(full, item_features)
    frames, feature_vocab = encode_event_features(frames, event_features)
    item_arrays, item_vocab = item_feature_arrays(full, vocab, item_features)
    sessions = {k: sessions_from_frame(v[list(("session_id", "item_id", "time") + event_features)], vocab, event_features) for k, v in frames.items()}
    stats = {
        "protocol": protocol,
        "eval_mode": EVAL_MODES[protocol],
        **stats,
        "event_features": list(event_features),
        "item_features": list(item_features),
        "feature_vocab": {**feature_vocab, **item_vocab},
    }
    return PreparedData(vocab, sessions["train"], sessions["test"], sessions.get("valid"), item_arrays, stats)


def _check_frame(df: pd.DataFrame, what: str) -> None:
    if df.empty:
        raise UserError(f"{what}: no events")


# ---------------------------------------------------------------- protocols


def given(
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    *,
    valid_days: float,
    event_features: tuple[str, ...] = (),
    item_features: tuple[str, ...] = (),
) -> PreparedData:
    """Train and test as given, nothing filtered. Valid (``valid_days`` > 0) = the train
    sessions ending in the last ``valid_days`` days of train, with items unseen in the
    rest of train dropped and sessions left shorter than 2 dropped: on the session-rec
    YooChoose files this reproduces their train_tr / train_valid split exactly."""
    _check_frame(train_df, "train file")
    _check_frame(test_df, "test file")
    vocab = vocab_from_train(train_df)
    frames = {"train": train_df, "test": test_df}
    if valid_days > 0:
        fit, valid = split_by_time(train_df, valid_days)
        if fit.empty:
            raise UserError(f"--valid-days {valid_days:g} holds out all of train (it spans {(train_df.time.max() - train_df.time.min()) / DAY:.2f} days)")
        frames["valid"] = keep_known(valid, fit["item_id"])
    return build(
        frames,
        vocab,
        protocol="given",
        event_features=event_features,
        item_features=item_features,
        stats={"settings": {"valid_days": valid_days}, **valid_cut(train_df, valid_days)},
    )


def session_time(
    df: pd.DataFrame,
    *,
    test_days: float,
    valid_days: float,
    min_item_support: int,
    event_features: tuple[str, ...] = (),
    item_features: tuple[str, ...] = (),
) -> PreparedData:
    """SR-GNN / session-rec preparation of one session log (see module docstring)."""
    _check_frame(df, "input")
    if test_days <= 0:
        raise UserError("--test-days must be > 0")
    raw_events, raw_sessions = len(df), df["session_id"].nunique()
    df, rounds = filter_sessions(df, min_item_support)
    if df.empty:
        raise UserError(f"no events left after dropping length-1 sessions and items with support < {min_item_support}")
    train_df, test_df = split_by_time(df, test_days)
    if train_df.empty:
        raise UserError(f"--test-days {test_days:g} holds out every session (the log spans {(df.time.max() - df.time.min()) / DAY:.2f} days)")
    test_before = len(test_df)
    test_df = keep_known(test_df, train_df["item_id"])
    if test_df.empty:
        raise UserError(f"the last {test_days:g} day(s) have no session of >= 2 items seen in train: no test set")
    frames = {"train": train_df, "test": test_df}
    valid_info = {}
    if valid_days > 0:
        fit_df, valid_df = split_by_time(train_df, valid_days)
        if fit_df.empty:
            raise UserError(f"--valid-days {valid_days:g} holds out all of train")
        valid_df = keep_known(valid_df, fit_df["item_id"])
        frames["valid"] = valid_df
        valid_info = {"valid_events_in_train": int(len(valid_df))}
    stats = {
        **valid_cut(train_df, valid_days),
        "settings": {"test_days": test_days, "valid_days": valid_days, "min_item_support": min_item_support},
        "filter": {
            "raw_events": raw_events,
            "raw_sessions": raw_sessions,
            "events_after_filter": int(len(df)),
            "sessions_after_filter": int(df["session_id"].nunique()),
            "filter_rounds": rounds,
            "test_events_dropped_unknown_or_short": int(test_before - len(test_df)),
            **valid_info,
        },
    }
    return build(
        frames,
        vocab_from_train(train_df),
        protocol="session-time",
        event_features=event_features,
        item_features=item_features,
        stats=stats,
    )


def leave_one_out(
    df: pd.DataFrame,
    *,
    min_core: int,
    event_features: tuple[str, ...] = (),
    item_features: tuple[str, ...] = (),
) -> PreparedData:
    """Per user: last item = test target, second-to-last = validation target.

    The vocabulary is the train items (most popular first) followed by items that
    occur only as test targets, so ``n_items`` is the dataset's item count as in the
    papers; those extra items were never trained on.
    """
    _check_frame(df, "input")
    raw_events, raw_users = len(df), df["session_id"].nunique()
    df, rounds = k_core(df, min_core)
    if df.empty:
        raise UserError(f"no events left after the {min_core}-core filter")
    df, pos, length = event_positions(df)
    evaluable = length >= 3
    train_df = df[~evaluable | (pos < length - 1)]
    valid_df = df[evaluable & (pos < length - 1)]
    test_df = df[evaluable]
    if test_df.empty:
        raise UserError("no user has 3 or more events: nothing to evaluate")
    vocab = vocab_from_train(train_df)
    extra = pd.unique(test_df["item_id"][~test_df["item_id"].isin(vocab.item_ids)].astype(str))
    vocab = Vocab(vocab.item_ids + list(extra))
    stats = {
        "settings": {"min_core": min_core},
        "filter": {
            "raw_events": raw_events,
            "raw_users": raw_users,
            "events_after_filter": int(len(df)),
            "users_after_filter": int(df["session_id"].nunique()),
            "filter_rounds": rounds,
            "users_train_only": int(df.loc[~evaluable, "session_id"].nunique()),
            "items_only_in_test": int(len(extra)),
        },
    }
    return build(
        {"train": train_df, "valid": valid_df, "test": test_df},
        vocab,
        protocol="leave-one-out",
        event_features=event_features,
        item_features=item_features,
        stats=stats,
    )


def early_stopping_split(data: PreparedData) -> tuple[Sessions, Sessions]:
    """(fit, valid) without leakage: what to train on while early-stopping on valid.

    "next" mode: the train sessions that end before the validation period
    (``stats["valid_cut"]``), i.e. train minus every session held out for validation,
    including those the validation filter then dropped. "last" mode: train with the
    last event (the validation target) of every validation user removed.
    """
    if data.valid is None:
        raise UserError("dataset has no validation split (prepare it with --valid-days > 0 or leave-one-out)")
    train = data.train
    in_valid = np.isin(train.session_ids, data.valid.session_ids)
    if data.stats.get("eval_mode", "next") == "next":
        if "valid_cut" not in data.stats:  # a dataset built by hand: just leave the validation sessions out
            return train.select(~in_valid), data.valid
        session_end = np.maximum.reduceat(train.times, train.offsets[:-1]) if train.n_events else np.zeros(0)
        return train.select((session_end < data.stats["valid_cut"]) & ~in_valid), data.valid
    last = np.zeros(train.n_events, dtype=bool)
    nonempty = train.lengths > 0
    last[train.offsets[1:][nonempty & in_valid] - 1] = True
    keep = ~last
    lengths = np.bincount(train.session_index()[keep], minlength=len(train))
    fit = Sessions(
        train.session_ids,
        np.concatenate([[0], np.cumsum(lengths)]),
        train.items[keep],
        train.times[keep],
        {k: v[keep] for k, v in train.features.items()},
    )
    return fit.select(fit.lengths > 0), data.valid
