"""`streamrec data ...`: prepare a dataset from a click log, make a synthetic one, describe one.

Heavy imports (pandas, matplotlib) happen inside the commands so `streamrec --help`
stays fast. Problems with files or flags raise UserError (one line, exit 2).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from streamrec.errors import UserError

# Kept equal to training.readers.FORMATS / training.protocols.PROTOCOLS (a test checks it);
# listed here so that --help works without importing pandas.
FORMAT_NAMES = ("yoochoose", "diginetica", "otto", "trivago", "movielens", "sasrec", "iclrec", "csv")
PROTOCOL_NAMES = ("given", "session-time", "leave-one-out")
# which protocols read which setting (giving a setting another protocol ignores is an error)
PROTOCOL_SETTINGS = {
    "test_days": ("session-time",),
    "valid_days": ("given", "session-time"),
    "min_item_support": ("session-time",),
    "min_core": ("leave-one-out",),
}
DATA_FILES = ("vocab.json", "train.npz", "valid.npz", "test.npz", "item_features.npz", "stats.json")


@click.group()
def data() -> None:
    """Prepare, synthesize and describe datasets (DATA_DIR)."""


class _Steps:
    """Prints each stage of a long command with the time it took."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        click.echo(f"[{time.perf_counter() - self.t0:6.1f}s] {message}", err=True)


def _clear_out(out: Path) -> None:
    """Remove the files a previous dataset left in ``out`` (only the known names)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    for name in DATA_FILES:
        (out / name).unlink(missing_ok=True)


def _summary(data) -> str:
    lines = [f"items: {data.n_items:,}"]
    for name in ("train", "valid", "test"):
        s = getattr(data, name)
        if s is not None:
            unknown = int((s.items == 0).sum())
            extra = f", {unknown:,} unknown items" if unknown else ""
            lines.append(f"{name}: {len(s):,} sessions, {s.n_events:,} events{extra}")
    return "\n".join(lines)


@data.command()
@click.option("--format", "fmt", required=True, type=click.Choice(FORMAT_NAMES), help="Input format (see docs/data.md).")
@click.option("--input", "input_path", help="The whole click log (protocols session-time, leave-one-out).")
@click.option("--train", "train_path", help="Training file (protocol given).")
@click.option("--test", "test_path", help="Test file (protocol given).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="DATA_DIR to write.")
@click.option("--protocol", type=click.Choice(PROTOCOL_NAMES), help="Default: given with --train/--test, else the format's usual one.")
@click.option("--test-days", type=float, default=1.0, show_default=True, help="session-time: days held out as test.")
@click.option("--valid-days", type=float, default=1.0, show_default=True, help="given/session-time: last days of train used as valid.npz (0 = none).")
@click.option("--min-item-support", type=int, default=5, show_default=True, help="session-time: drop items with fewer events.")
@click.option("--min-core", type=int, default=0, show_default=True, help="leave-one-out: drop users/items with fewer events, until stable (0 = off).")
@click.option("--session-col", help="csv: session (or user) column. [default: session_id]")
@click.option("--item-col", help="csv: item column. [default: item_id]")
@click.option("--time-col", help="csv: time column, unix seconds or date/time (default: line order).")
@click.option("--sep", help="csv: field separator. [default: ,]")
@click.option("--item-file", help="movielens: the .item file with genres (default: next to the .inter file).")
def prepare(fmt, input_path, train_path, test_path, out, protocol, test_days, valid_days, min_item_support, min_core, session_col, item_col, time_col, sep, item_file) -> None:
    """Read a click log, apply an evaluation protocol and write DATA_DIR.

    \b
    Examples:
      streamrec data prepare --format yoochoose --train clicks_train_full.txt --test clicks_test.txt --out data/rsc15
      streamrec data prepare --format diginetica --input train-item-views.csv --test-days 7 --out data/digi
      streamrec data prepare --format sasrec --input Video.txt --out data/video
    """
    from training import protocols
    from training.readers import get_format

    fmt_info = get_format(fmt)
    csv_options = {"session_col": session_col, "item_col": item_col, "time_col": time_col, "sep": sep}
    options = {k: v for k, v in csv_options.items() if v is not None}
    if options and fmt != "csv":
        raise UserError(f"--{next(iter(options)).replace('_', '-')} only applies to --format csv")
    if item_file is not None:
        if fmt != "movielens":
            raise UserError("--item-file only applies to --format movielens")
        options["item_file"] = item_file
    if input_path and (train_path or test_path):
        raise UserError("give either --input or --train/--test, not both")
    if bool(train_path) != bool(test_path):
        raise UserError("--train and --test go together")
    if not input_path and not train_path:
        raise UserError("give --input (one log) or --train and --test")
    protocol = protocol or ("given" if train_path else fmt_info.default_protocol)
    if protocol == "given" and not train_path:
        raise UserError("protocol 'given' needs --train and --test")
    if protocol != "given" and not input_path:
        raise UserError(f"protocol '{protocol}' splits one log: give --input instead of --train/--test")
    ctx = click.get_current_context()
    for name, protocols_using in PROTOCOL_SETTINGS.items():
        if protocol not in protocols_using and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            raise UserError(f"--{name.replace('_', '-')} does not apply to protocol '{protocol}'")
    for flag, value in (("--test-days", test_days), ("--valid-days", valid_days), ("--min-item-support", min_item_support), ("--min-core", min_core)):
        if value < 0:
            raise UserError(f"{flag} must be >= 0")

    step = _Steps()
    features = {"event_features": fmt_info.event_features, "item_features": fmt_info.item_features}
    if protocol == "given":
        step(f"reading {train_path}")
        train_df = fmt_info.read(train_path, **options)
        step(f"reading {test_path}")
        test_df = fmt_info.read(test_path, **options)
        step(f"protocol given: {len(train_df):,} train / {len(test_df):,} test events")
        prepared = protocols.given(train_df, test_df, valid_days=valid_days, **features)
        sources = {"train": str(train_path), "test": str(test_path)}
    else:
        step(f"reading {input_path}")
        df = fmt_info.read(input_path, **options)
        step(f"protocol {protocol}: {len(df):,} events, {df['session_id'].nunique():,} sessions")
        if protocol == "session-time":
            prepared = protocols.session_time(df, test_days=test_days, valid_days=valid_days, min_item_support=min_item_support, **features)
        else:
            prepared = protocols.leave_one_out(df, min_core=min_core, **features)
        sources = {"input": str(input_path)}
    prepared.stats["source"] = {"format": fmt, **sources, **options}
    step(f"writing {out}")
    _clear_out(out)
    prepared.save(out)
    step("done")
    click.echo(_summary(prepared))


@data.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="DATA_DIR to write.")
@click.option("--items", "n_items", type=int, default=2000, show_default=True, help="Number of items.")
@click.option("--sessions", "n_sessions", type=int, default=20000, show_default=True, help="Number of sessions.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--test-fraction", type=float, default=0.2, show_default=True, help="Share of sessions (the latest) held out as test.")
@click.option("--valid-days", type=float, default=1.0, show_default=True, help="Last days of train also written as valid.npz (0 = none).")
@click.option("--raw", type=click.Path(dir_okay=False, path_type=Path), help="Also write the whole log as a YooChoose-format TSV.")
def synth(out, n_items, n_sessions, seed, test_fraction, valid_days, raw) -> None:
    """Generate a synthetic click log with learnable structure and write DATA_DIR.

    \b
    Example:
      streamrec data synth --out data/synth --items 2000 --sessions 20000 --seed 0
    """
    from training.synth import synthesize

    step = _Steps()
    step(f"generating {n_sessions:,} sessions over {n_items:,} items (seed {seed})")
    prepared = synthesize(n_items, n_sessions, seed, test_fraction, raw=raw, valid_days=valid_days)
    step(f"writing {out}")
    _clear_out(out)
    prepared.save(out)
    if raw is not None:
        step(f"raw log written to {raw}")
    step("done")
    click.echo(_summary(prepared))


@data.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write session-length and item-popularity plots to this PNG.")
def stats(data_dir, plot) -> None:
    """Counts, session-length distribution and item-popularity curve of DATA_DIR."""
    from training.data import PreparedData

    prepared = PreparedData.load(data_dir)
    click.echo(describe_dataset(prepared))
    if plot is not None:
        plot_dataset(prepared, plot)
        click.echo(f"plot written to {plot}")


LENGTH_BINS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 9), (10, 19), (20, None))


def describe_dataset(prepared) -> str:
    """A plain-text report: counts per split, session lengths, item popularity."""
    import numpy as np

    stats = prepared.stats
    lines = [
        f"dataset: {prepared.path}",
        f"protocol: {stats.get('protocol', '?')}, eval mode: {stats.get('eval_mode', '?')}",
        f"items: {prepared.n_items:,}",
    ]
    if stats.get("item_features") or stats.get("event_features"):
        lines.append(f"features: item {', '.join(stats.get('item_features', [])) or '-'}; event {', '.join(stats.get('event_features', [])) or '-'}")
    lines.append(f"{'split':6} {'sessions':>10} {'events':>11} {'unknown':>9} {'mean len':>9} {'median':>7} {'p90':>5} {'max':>6}")
    for name in ("train", "valid", "test"):
        s = getattr(prepared, name)
        if s is None or len(s) == 0:
            continue
        n = s.lengths
        lines.append(
            f"{name:6} {len(s):>10,} {s.n_events:>11,} {int((s.items == 0).sum()):>9,} {n.mean():>9.2f} "
            f"{np.median(n):>7g} {np.quantile(n, 0.9):>5g} {n.max():>6,}"
        )
    n = prepared.train.lengths
    bins = []
    for lo, hi in LENGTH_BINS:
        share = ((n >= lo) & (n <= (hi if hi is not None else n.max()))).mean() if len(n) else 0.0
        label = f"{lo}" if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")
        bins.append(f"{label}: {100 * share:.1f}%")
    lines.append("train session lengths: " + ", ".join(bins))
    counts = np.sort(np.bincount(prepared.train.items, minlength=prepared.n_items + 1)[1:])[::-1]
    total = max(int(counts.sum()), 1)
    tops = []
    for share in (0.01, 0.1, 0.2, 0.5):
        k = max(1, int(round(share * len(counts))))
        tops.append(f"top {share:.0%} {100 * counts[:k].sum() / total:.1f}%")
    lines.append("share of train events held by the most popular items: " + ", ".join(tops))
    lines.append(f"items with < 5 train events: {int((counts < 5).sum()):,} ({100 * (counts < 5).mean():.1f}%), never in train: {int((counts == 0).sum()):,}")
    return "\n".join(lines)


def plot_dataset(prepared, path: Path) -> None:
    """Two panels: train session-length histogram, item popularity by rank (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = prepared.train.lengths
    counts = np.sort(np.bincount(prepared.train.items, minlength=prepared.n_items + 1)[1:])[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.hist(np.minimum(lengths, 50), bins=np.arange(1, min(int(lengths.max()), 50) + 2) - 0.5, color="tab:blue")
    left.set_yscale("log")
    left.set_xlabel("session length (train; 50 = 50 or more)")
    left.set_ylabel("sessions")
    positive = counts[counts > 0]
    right.loglog(np.arange(1, len(positive) + 1), positive, color="tab:orange")
    right.set_xlabel("item rank")
    right.set_ylabel("train events")
    right.set_title("item popularity")
    fig.suptitle(f"{prepared.path}: {prepared.n_items:,} items, {len(prepared.train):,} train sessions")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"{path}: cannot write plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
