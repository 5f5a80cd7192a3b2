"""Readers: every supported click-log format -> one event frame.

Each reader returns a pandas frame with columns ``session_id`` (str),
``item_id`` (str) and ``time`` (float unix seconds), plus optional side-feature
columns. Formats without timestamps get the line order as time (0, 1, 2, ...
within a user), so sorting by time keeps the file order. Frames are in file
order; the protocols (training/protocols.py) sort, filter and split them.

Side features are declared per format in ``FORMATS``: *event features* are
strings per event (city, device, OTTO event type) and become ``Sessions.features``;
*item features* are per-event copies of an item attribute (genre, price) and
become ``PreparedData.item_features``. A float item feature (price) is bucketed,
a string one is a category.

Every problem with a file raises ``UserError`` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from streamrec.errors import UserError

# trivago actions whose `reference` is an item id (the README's list).
TRIVAGO_ITEM_ACTIONS = (
    "clickout item",
    "interaction item image",
    "interaction item info",
    "interaction item rating",
    "interaction item deals",
    "search for item",
)

_PARSE_ERRORS = (
    pd.errors.ParserError,
    pd.errors.EmptyDataError,
    UnicodeDecodeError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
)


# ---------------------------------------------------------------- helpers


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    return path


def _read_csv(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """pd.read_csv with every parse failure turned into a one-line UserError."""
    try:
        return pd.read_csv(path, **kwargs)
    except ValueError as e:  # usecols/dtype mismatches, bad compression
        raise UserError(f"{path}: cannot read as {what} ({_first_line(e)})") from None
    except _PARSE_ERRORS as e:
        raise UserError(f"{path}: cannot read as {what} ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _require_columns(df: pd.DataFrame, columns, path: Path, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)} for {what} (found: {', '.join(map(str, df.columns))})"
        )


def _numeric(values: pd.Series, path: Path, column: str) -> np.ndarray:
    """A column as float64; names the first bad value and its data row."""
    out = pd.to_numeric(values, errors="coerce")
    bad = out.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{path}: column '{column}' has a non-numeric value {values.iloc[row]!r} in data row {row + 1}")
    return out.to_numpy(dtype=np.float64)


def _no_missing(df: pd.DataFrame, columns, path: Path) -> None:
    for c in columns:
        bad = df[c].isna().to_numpy() | (df[c].astype(str).str.strip() == "").to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"{path}: column '{c}' is empty in data row {row + 1}")


def line_order_time(session_ids: pd.Series) -> np.ndarray:
    """0, 1, 2, ... within each session, in file order (for formats without time)."""
    return session_ids.groupby(session_ids, sort=False).cumcount().to_numpy(dtype=np.float64)


def _frame(session_id, item_id, time, **features) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "session_id": pd.Series(session_id).astype(str).to_numpy(),
            "item_id": pd.Series(item_id).astype(str).to_numpy(),
            "time": np.asarray(time, dtype=np.float64),
        }
    )
    for name, values in features.items():
        df[name] = np.asarray(values)
    return df


def _nonempty(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    if df.empty:
        raise UserError(f"{path}: no events in file")
    return df


# ---------------------------------------------------------------- readers


def read_yoochoose(path: str | Path) -> pd.DataFrame:
    """YooChoose: the prepared TSV (`SessionId<TAB>ItemId<TAB>Time`, session-rec) or the raw
    challenge file `yoochoose-clicks.dat` (`session,ISO time,item,category`, no header;
    the category becomes the item feature `category`)."""
    path = _check_file(path)
    with _open_text(path) as f:
        first = f.readline().strip()
    if first.split("\t")[:3] == ["SessionId", "ItemId", "Time"]:
        df = _read_csv(path, "session-rec TSV", sep="\t", dtype={"SessionId": str, "ItemId": str, "Time": str})
        _no_missing(df, ["SessionId", "ItemId"], path)
        return _nonempty(_frame(df["SessionId"], df["ItemId"], _numeric(df["Time"], path, "Time")), path)
    if first.count(",") == 3:
        df = _read_csv(path, "yoochoose-clicks.dat", header=None, names=["session", "ts", "item", "category"], dtype=str)
        _no_missing(df, ["session", "item", "ts"], path)
        times = pd.to_datetime(df["ts"], errors="coerce", utc=True)
        if times.isna().any():
            row = int(np.flatnonzero(times.isna().to_numpy())[0])
            raise UserError(f"{path}: bad timestamp {df['ts'].iloc[row]!r} in line {row + 1}")
        seconds = (times - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
        category = df["category"].fillna("0").to_numpy(dtype=object)
        category[category == "0"] = None  # "0" means "no category" in the challenge data
        return _nonempty(_frame(df["session"], df["item"], seconds, category=category), path)
    raise UserError(
        f"{path}: not a YooChoose file (expected header 'SessionId<TAB>ItemId<TAB>Time' "
        f"or raw 'session,timestamp,item,category' lines; first line is {first[:80]!r})"
    )


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_diginetica(path: str | Path) -> pd.DataFrame:
    """DIGINETICA `;`-CSV (item views or purchases; snake_case or camelCase header).

    `timeframe` is ms since the session start and `eventdate` the day, so
    time = the session's first eventdate (midnight UTC) + timeframe / 1000. Taking the
    session's first date keeps the within-session order of `timeframe` even for the
    few sessions whose rows carry several dates.
    """
    path = _check_file(path)
    df = _read_csv(path, "DIGINETICA ';'-CSV", sep=";", dtype=str)
    df.columns = [c.strip().replace("_", "").lower() for c in df.columns]
    _require_columns(df, ["sessionid", "itemid", "timeframe", "eventdate"], path, "DIGINETICA")
    _no_missing(df, ["sessionid", "itemid", "eventdate"], path)
    timeframe = _numeric(df["timeframe"], path, "timeframe")
    day = pd.to_datetime(df["eventdate"], format="%Y-%m-%d", errors="coerce", utc=True)
    if day.isna().any():
        row = int(np.flatnonzero(day.isna().to_numpy())[0])
        raise UserError(f"{path}: column 'eventdate' has a bad date {df['eventdate'].iloc[row]!r} in data row {row + 1} (want YYYY-MM-DD)")
    midnight = (day - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    session_day = midnight.groupby(df["sessionid"].to_numpy(), sort=False).transform("min").to_numpy()
    return _nonempty(_frame(df["sessionid"], df["itemid"], session_day + timeframe / 1000.0), path)


def read_otto(path: str | Path) -> pd.DataFrame:
    """OTTO JSONL: one session per line, events `{aid, ts (ms), type}`; `type` is kept."""
    import orjson
    from tqdm import tqdm

    path = _check_file(path)
    sessions, aids, stamps, types, counts = [], [], [], [], []
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}", leave=False, disable=None
    ) as bar:
        try:
            for n, line in enumerate(f, 1):
                bar.update(len(line))
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                    events = obj["events"]
                    sessions.append(obj["session"])
                    aids.extend([e["aid"] for e in events])
                    stamps.extend([e["ts"] for e in events])
                    types.extend([e["type"] for e in events])
                except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{path}: line {n} is not an OTTO session ({type(e).__name__}: {_first_line(e)})") from None
                counts.append(len(events))
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: cannot read ({_first_line(e)})") from None
    try:
        ts = np.asarray(stamps, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: an event has a non-numeric 'ts'") from None
    df = _frame(np.repeat(np.asarray(sessions, dtype=str), counts), np.asarray(aids).astype(str), ts / 1000.0, type=np.asarray(types, dtype=object))
    return _nonempty(df, path)


def read_trivago(path: str | Path) -> pd.DataFrame:
    """trivago RecSys 2019 log (CSV, CSV.gz or Parquet), item-referencing actions only.

    Events are ordered by `step`; time is the `timestamp` made non-decreasing along
    the steps (a few rows have a timestamp earlier than the step before). Event
    features: city, platform, device, action_type. Item feature: price = the median
    of the item's prices in every clickout impression list of the file.
    """
    path = _check_file(path)
    columns = ["session_id", "timestamp", "step", "action_type", "reference", "platform", "city", "device", "impressions", "prices"]
    if path.name.endswith((".parquet", ".parquet.snappy", ".pq")):
        try:
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)} for trivago (found: {', '.join(names)})")
            df = pd.read_parquet(path, columns=columns)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError subclass these
            raise UserError(f"{path}: cannot read as Parquet ({_first_line(e)})") from None
        for c in columns:
            df[c] = df[c].where(df[c].isna(), df[c].astype(str))
    else:
        df = _read_csv(path, "trivago CSV", dtype=str, keep_default_na=False, na_values=[""])
        _require_columns(df, columns, path, "trivago")
    df = df[df["action_type"].isin(TRIVAGO_ITEM_ACTIONS)]
    _no_missing(df, ["session_id", "reference"], path)
    df = df.assign(_timestamp=_numeric(df["timestamp"], path, "timestamp"), _step=_numeric(df["step"], path, "step"))
    df = df.sort_values(["session_id", "_step"], kind="stable")
    time = df.groupby("session_id", sort=False)["_timestamp"].cummax().to_numpy()
    price = _trivago_item_prices(df, path)
    return _nonempty(
        _frame(
            df["session_id"],
            df["reference"],
            time,
            city=df["city"].to_numpy(dtype=object),
            platform=df["platform"].to_numpy(dtype=object),
            device=df["device"].to_numpy(dtype=object),
            action_type=df["action_type"].to_numpy(dtype=object),
            price=df["reference"].map(price).to_numpy(dtype=np.float64),
        ),
        path,
    )


def _trivago_item_prices(df: pd.DataFrame, path: Path) -> pd.Series:
    """Median price per item id over all clickout impression lists."""
    shown = df[df["impressions"].notna() & df["prices"].notna()]
    items = shown["impressions"].str.split("|")
    prices = shown["prices"].str.split("|")
    mismatch = items.str.len().to_numpy() != prices.str.len().to_numpy()
    if mismatch.any():
        sid = shown["session_id"].iloc[int(np.flatnonzero(mismatch)[0])]
        raise UserError(f"{path}: session {sid}: impressions and prices have different lengths")
    values = pd.to_numeric(pd.Series(np.concatenate(prices.to_list()) if len(prices) else []), errors="coerce")
    keys = np.concatenate(items.to_list()) if len(items) else np.array([], dtype=str)
    return values.groupby(keys).median()


def read_movielens(path: str | Path, item_file: str | Path | None = None) -> pd.DataFrame:
    """MovieLens in RecBole atomic files: `.inter` (user_id, item_id, timestamp, ...) and,
    if present next to it or given, `.item` with genres (`class` or `genre` column).
    A user's sequence is ordered by timestamp (ties keep file order). Item features:
    `genre` (first listed genre) and `genres` (the whole genre set as one token)."""
    path = _check_file(path)
    df = _read_csv(path, "RecBole .inter", sep="\t", dtype=str)
    df.columns = [c.split(":")[0] for c in df.columns]
    _require_columns(df, ["user_id", "item_id", "timestamp"], path, "a RecBole .inter file")
    _no_missing(df, ["user_id", "item_id"], path)
    out = _frame(df["user_id"], df["item_id"], _numeric(df["timestamp"], path, "timestamp"))
    item_path = Path(item_file) if item_file is not None else path.with_suffix(".item")
    if item_file is not None or item_path.is_file():
        item_path = _check_file(item_path)
        items = _read_csv(item_path, "RecBole .item", sep="\t", dtype=str, quoting=3)
        items.columns = [c.split(":")[0] for c in items.columns]
        genre_col = next((c for c in ("class", "genre", "genres") if c in items.columns), None)
        if genre_col is None or "item_id" not in items.columns:
            raise UserError(f"{item_path}: want columns item_id and class/genre (found: {', '.join(items.columns)})")
        tokens = items[genre_col].fillna("").str.split()
        first = tokens.str[0]
        whole = tokens.map(lambda t: "|".join(sorted(t)) if len(t) else None)
        by_item = pd.DataFrame({"genre": first.to_numpy(dtype=object), "genres": whole.to_numpy(dtype=object)}, index=items["item_id"].to_numpy())
        by_item = by_item[~by_item.index.duplicated()]
        out["genre"] = out["item_id"].map(by_item["genre"]).to_numpy(dtype=object)
        out["genres"] = out["item_id"].map(by_item["genres"]).to_numpy(dtype=object)
    return _nonempty(out, path)


def read_sasrec(path: str | Path) -> pd.DataFrame:
    """SASRec / BERT4Rec / Caser `user item [more columns]` lines, whitespace-separated,
    no header; a user's order is the line order (time = 0, 1, 2, ...)."""
    path = _check_file(path)
    df = _read_csv(path, "'user item' lines", sep=r"\s+", header=None, dtype=str, usecols=[0, 1])
    _no_missing(df, [0, 1], path)
    return _nonempty(_frame(df[0], df[1], line_order_time(df[0])), path)


def read_iclrec(path: str | Path) -> pd.DataFrame:
    """S3-Rec / ICLRec one line per user: `user item_1 item_2 ... item_n` (time order)."""
    path = _check_file(path)
    users, items, counts = [], [], []
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise UserError(f"{path}: line {n} has a user but no items")
                users.append(parts[0])
                items.extend(parts[1:])
                counts.append(len(parts) - 1)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({_first_line(e)})") from None
    if not users:
        raise UserError(f"{path}: no users in file")
    counts = np.asarray(counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    time = np.arange(counts.sum(), dtype=np.float64) - starts
    return _frame(np.repeat(np.asarray(users), counts), np.asarray(items), time)


def read_csv(
    path: str | Path,
    session_col: str = "session_id",
    item_col: str = "item_id",
    time_col: str | None = None,
    sep: str = ",",
) -> pd.DataFrame:
    """Any delimited file with a header: session, item and (optional) time columns by name.

    Time may be numeric (unix seconds) or a date/time string (parsed as UTC); with no
    time column the line order is the time.
    """
    path = _check_file(path)
    wanted = [c for c in (session_col, item_col, time_col) if c]
    df = _read_csv(path, f"'{sep}'-separated file with a header", sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    _require_columns(df, wanted, path, "--session-col/--item-col/--time-col")
    _no_missing(df, [session_col, item_col], path)
    if not time_col:
        time = line_order_time(df[session_col])
    else:
        numeric = pd.to_numeric(df[time_col], errors="coerce")
        if numeric.notna().all():
            time = numeric.to_numpy(dtype=np.float64)
        else:
            parsed = pd.to_datetime(df[time_col], errors="coerce", utc=True, format="mixed")
            if parsed.isna().any():
                row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
                raise UserError(f"{path}: column '{time_col}' has a value {df[time_col].iloc[row]!r} in data row {row + 1} that is neither a number nor a date")
            time = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    return _nonempty(_frame(df[session_col], df[item_col], time), path)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Format:
    """A supported input format: its reader, side features and usual protocol."""

    read: Callable[..., pd.DataFrame]
    default_protocol: str
    event_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {
    "yoochoose": Format(read_yoochoose, "session-time", item_features=("category",)),
    "diginetica": Format(read_diginetica, "session-time"),
    "otto": Format(read_otto, "session-time", event_features=("type",)),
    "trivago": Format(read_trivago, "session-time", event_features=("city", "platform", "device", "action_type"), item_features=("price",)),
    "movielens": Format(read_movielens, "leave-one-out", item_features=("genre", "genres")),
    "sasrec": Format(read_sasrec, "leave-one-out"),
    "iclrec": Format(read_iclrec, "leave-one-out"),
    "csv": Format(read_csv, "session-time"),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"unknown format '{name}' (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def read_log(fmt: str, path: str | Path, **options) -> pd.DataFrame:
    """Read ``path`` in format ``fmt``; ``options`` go to readers that take them (csv, movielens)."""
    return get_format(fmt).read(path, **options)
