"""Readers against the counts in each ../shared/data README, and one-line errors for bad files."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pandas as pd
import pytest

from streamrec.errors import UserError
from training.readers import FORMATS, line_order_time, read_log


def utc(text: str) -> float:
    return pd.Timestamp(text, tz="UTC").timestamp()


# (format, file under shared/data, rows, sessions, items) as stated in the READMEs
README_COUNTS = [
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt", 70_278, 17_794, 2_933),
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_test.txt", 13_568, 3_416, 1_771),
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_tr.txt", 53_254, 13_629, 2_873),
    ("yoochoose", "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_valid.txt", 16_539, 4_084, 2_029),
    ("diginetica", "diginetica/sample_train-item-views.csv", 12_391, 2_986, 7_139),
    ("diginetica", "diginetica/train-purchases.csv", 18_025, 12_630, 11_244),
    ("otto", "otto-sample/train.jsonl", 862, 20, 510),
    ("movielens", "ml-100k/ml-100k.inter", 100_000, 943, 1_682),
    ("sasrec", "amazon-video-games-sasrec/Video.txt", 287_107, 31_013, 23_715),
    ("sasrec", "amazon-beauty-bert4rec/beauty.txt", 353_962, 40_226, 54_542),
    ("sasrec", "ml-1m-caser-partial/test/test.txt", 197_526, 6_040, 3_401),
    ("sasrec", "ml-1m-caser-partial/validation/test.txt", 99_683, 6_040, 3_267),
    ("iclrec", "iclrec-amazon-yelp/Beauty.txt", 198_502, 22_363, 12_101),
    ("iclrec", "iclrec-amazon-yelp/Sports_and_Outdoors.txt", 296_337, 35_598, 18_357),
    ("iclrec", "iclrec-amazon-yelp/Toys_and_Games.txt", 167_597, 19_412, 11_924),
    ("iclrec", "iclrec-amazon-yelp/Yelp.txt", 316_354, 30_431, 20_033),
]


def check_frame(df: pd.DataFrame) -> None:
    assert list(df.columns[:3]) == ["session_id", "item_id", "time"]
    assert df["time"].dtype == np.float64
    assert df["session_id"].map(type).eq(str).all() and df["item_id"].map(type).eq(str).all()


@pytest.mark.shared_data
@pytest.mark.parametrize("fmt,relpath,rows,sessions,items", README_COUNTS, ids=[c[1] for c in README_COUNTS])
def test_reader_counts_match_readme(shared_data, fmt, relpath, rows, sessions, items):
    df = read_log(fmt, shared_data / relpath)
    check_frame(df)
    assert (len(df), df["session_id"].nunique(), df["item_id"].nunique()) == (rows, sessions, items)


@pytest.mark.shared_data
def test_yoochoose_times_are_unix_seconds(shared_data):
    df = read_log("yoochoose", shared_data / "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt")
    assert df["time"].min() == pytest.approx(utc("2014-04-01 01:02:21"), abs=1)
    assert df["time"].max() == pytest.approx(utc("2014-04-07 00:43:12"), abs=1)
    assert df.loc[0, "time"] == pytest.approx(1396314141.0, abs=86400 * 7)


@pytest.mark.shared_data
def test_diginetica_time_is_eventdate_plus_timeframe(shared_data):
    path = shared_data / "diginetica/sample_train-item-views.csv"
    df = read_log("diginetica", path)
    raw = pd.read_csv(path, sep=";")
    day = pd.to_datetime(raw["eventdate"], utc=True).map(pd.Timestamp.timestamp)
    single_day = raw.groupby("session_id")["eventdate"].transform("nunique").to_numpy() == 1
    expected = day.to_numpy() + raw["timeframe"].to_numpy() / 1000.0
    np.testing.assert_allclose(df["time"].to_numpy()[single_day], expected[single_day])
    # every session orders like its timeframe column, including the two that span two dates
    order = df.assign(tf=raw["timeframe"].to_numpy()).sort_values(["session_id", "time"], kind="stable")
    assert (order.groupby("session_id")["tf"].diff().dropna() >= 0).all()
    assert df["time"].min() >= utc("2016-01-03") and df["time"].max() < utc("2016-06-02")


@pytest.mark.shared_data
def test_otto_types_and_ms_time(shared_data):
    df = read_log("otto", shared_data / "otto-sample/train.jsonl")
    assert df["type"].value_counts().to_dict() == {"clicks": 800, "carts": 52, "orders": 10}
    assert df["time"].min() == pytest.approx(utc("2022-07-31 22:00:00"), abs=1)
    assert df["time"].max() == pytest.approx(utc("2022-08-28 21:59:57"), abs=1)
    # (the README says ids 0-19; the file has 0-9 and 12899769-12899778)
    lines = (shared_data / "otto-sample/train.jsonl").read_text().splitlines()
    assert df["session_id"].unique().tolist() == [str(json.loads(line)["session"]) for line in lines]


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["trivago_val_100k.csv.gz", "trivago_val_100k.parquet.snappy"])
def test_trivago_item_actions_and_features(shared_data, name):
    df = read_log("trivago", shared_data / "trivago-rsc19-100k" / name)
    check_frame(df)
    assert len(df) == 87_612 and df["item_id"].nunique() == 13_950
    assert (df["action_type"] == "clickout item").sum() == 13_597
    assert df["session_id"].nunique() <= 7_612
    assert df[["city", "platform", "device"]].notna().all().all()
    assert df["time"].min() >= utc("2018-11-07 00:02:19") and df["time"].max() <= utc("2018-11-08 23:59:42")
    # within a session, time never decreases along the file's step order
    assert (df.groupby("session_id", sort=False)["time"].diff().dropna() >= 0).all()
    # an item's price is the median of the prices shown next to it in the clickout impression lists
    raw = pd.read_parquet(shared_data / "trivago-rsc19-100k/trivago_val_100k.parquet.snappy", columns=["impressions", "prices"]).dropna()
    wanted = set(df["item_id"].iloc[[0, 1000, 50000]])
    shown = {item: [] for item in wanted}
    for imps, prices in zip(raw["impressions"].iloc[::-1], raw["prices"].iloc[::-1]):
        for item, price in zip(imps.split("|"), prices.split("|")):
            if item in wanted:
                shown[item].append(float(price))
    for item, prices in shown.items():
        expected = np.median(prices) if prices else np.nan
        np.testing.assert_equal(df.loc[df["item_id"] == item, "price"].unique(), [expected])
    assert df["price"].notna().mean() > 0.8


@pytest.mark.shared_data
def test_movielens_genres_and_order(shared_data):
    df = read_log("movielens", shared_data / "ml-100k/ml-100k.inter")
    assert df["genre"].notna().all()
    toy_story = df.loc[df["item_id"] == "1"].iloc[0]
    assert toy_story["genre"] == "Animation" and toy_story["genres"] == "Animation|Children's|Comedy"
    assert df["time"].min() == utc("1997-09-20 03:05:10") and df["time"].max() == utc("1998-04-22 23:10:38")


@pytest.mark.shared_data
def test_user_sequence_formats_use_line_order(shared_data):
    df = read_log("iclrec", shared_data / "iclrec-amazon-yelp/Beauty.txt")
    first = (shared_data / "iclrec-amazon-yelp/Beauty.txt").read_text().splitlines()[1].split()
    user = df[df["session_id"] == first[0]]
    assert user["item_id"].tolist() == first[1:]
    assert user["time"].tolist() == list(map(float, range(len(first) - 1)))
    video = read_log("sasrec", shared_data / "amazon-video-games-sasrec/Video.txt")
    assert video.groupby("session_id")["time"].min().eq(0).all()
    assert (video.groupby("session_id")["time"].diff().dropna() == 1).all()


def test_line_order_time_counts_per_session():
    assert line_order_time(pd.Series(["a", "b", "a", "a", "b"])).tolist() == [0, 0, 1, 2, 1]


# ------------------------------------------------------------------ small hand-made files


def test_csv_reader_named_columns_and_dates(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("user\tproduct\twhen\tx\nu1\tA\t2024-01-01T00:00:10Z\t1\nu1\tB\t2024-01-01T00:00:05Z\t2\nu2\tA\t2024-01-02\t3\n")
    df = read_log("csv", path, session_col="user", item_col="product", time_col="when", sep="\t")
    check_frame(df)
    assert df["item_id"].tolist() == ["A", "B", "A"]
    assert df["time"].tolist() == [utc("2024-01-01 00:00:10"), utc("2024-01-01 00:00:05"), utc("2024-01-02")]
    no_time = read_log("csv", path, session_col="user", item_col="product", sep="\t")
    assert no_time["time"].tolist() == [0.0, 1.0, 0.0]


def test_raw_yoochoose_clicks_dat(tmp_path):
    path = tmp_path / "yoochoose-clicks.dat"
    path.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,S\n")
    df = read_log("yoochoose", path)
    assert df["time"].tolist() == pytest.approx([1396867869.277, 1396868049.868])
    assert df["category"].isna().tolist() == [True, False] and df["category"].iloc[1] == "S"


def expect_error(fmt, path, *fragments, **options):
    with pytest.raises(UserError) as info:
        read_log(fmt, path, **options)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_missing_and_empty_files(tmp_path, fmt):
    expect_error(fmt, tmp_path / "nope.txt", "no such file")
    (tmp_path / "empty.txt").write_text("")
    expect_error(fmt, tmp_path / "empty.txt", "empty")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_garbage_file_is_one_line_error(tmp_path, fmt):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00\xff\xfe garbage ;;, \n\x01")
    expect_error(fmt, path)


def test_bad_columns_and_values(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("sid,item\n1,2\n")
    expect_error("csv", p, "missing column(s) session_id", "found: sid, item")
    p.write_text("s,i,t\n1,2,yesterday-ish\n")
    expect_error("csv", p, "column 't'", "data row 1", session_col="s", item_col="i", time_col="t")
    p = tmp_path / "y.txt"
    p.write_text("SessionId\tItemId\tTime\n1\t2\tnoon\n")
    expect_error("yoochoose", p, "column 'Time'", "'noon'")
    p.write_text("SessionId\tItemId\tTime\n1\t\t1.0\n")
    expect_error("yoochoose", p, "column 'ItemId' is empty")
    p = tmp_path / "d.csv"
    p.write_text("session_id;user_id;item_id;timeframe;eventdate\n1;NA;5;100;09/05/2016\n")
    expect_error("diginetica", p, "eventdate", "YYYY-MM-DD")
    p = tmp_path / "o.jsonl"
    p.write_text('{"session": 1, "events": [{"aid": 1, "ts": 1000, "type": "clicks"}]}\n{"session": 2, "events": [{"ts": 5}]}\n')
    expect_error("otto", p, "line 2")
    p = tmp_path / "i.txt"
    p.write_text("1 2 3\n2\n")
    expect_error("iclrec", p, "line 2", "no items")
    p = tmp_path / "m.inter"
    p.write_text("user_id:token\titem_id:token\trating:float\n1\t2\t3\n")
    expect_error("movielens", p, "timestamp")


def test_trivago_price_list_mismatch(tmp_path):
    header = "user_id,session_id,timestamp,step,action_type,reference,platform,city,device,current_filters,impressions,prices\n"
    p = tmp_path / "t.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write(header + 'u,s1,100,1,clickout item,7,DE,"Berlin, Germany",mobile,,7|8,10\n')
    expect_error("trivago", p, "session s1", "impressions and prices")
    p.write_bytes(b"not gzip at all")
    expect_error("trivago", p, "cannot read")
    p = tmp_path / "t.parquet"
    p.write_bytes(b"PAR1 not really")
    expect_error("trivago", p, "cannot read as Parquet")
    pd.DataFrame({"session_id": ["s"]}).to_parquet(p)
    expect_error("trivago", p, "missing column(s) timestamp")


def test_unknown_format_name():
    with pytest.raises(UserError, match="unknown format 'parquet'"):
        read_log("parquet", "x")


# ------------------------------------------------------------------ the CLI's error path


def run_main(monkeypatch, capsys, *args):
    """Run the real `streamrec` entry point in-process; (exit code, stdout, stderr)."""
    from stream.cli import main

    monkeypatch.setattr(sys, "argv", ["streamrec", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def one_error_line(stderr: str) -> str:
    """The error is exactly one line, the last one (progress lines may come before it)."""
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], stderr
    return lines[-1]


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.txt"
    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--format", "yoochoose", "--input", missing, "--out", tmp_path / "out")
    assert code == 2 and one_error_line(err).endswith(f"{missing}: no such file")

    log = tmp_path / "log.csv"
    log.write_text("sid,item,ts\n1,a,1\n1,b,2\n")
    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--format", "csv", "--input", log, "--session-col", "session", "--out", tmp_path / "o")
    assert code == 2 and "missing column(s) session" in one_error_line(err)

    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--format", "otto", "--input", log, "--out", tmp_path / "o")
    assert code == 2 and "not an OTTO session" in one_error_line(err)

    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--format", "sasrec", "--input", log, "--time-col", "ts", "--out", tmp_path / "o")
    assert code == 2 and "--time-col only applies to --format csv" in err

    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--format", "sasrec", "--input", log, "--test-days", "3", "--out", tmp_path / "o")
    assert code == 2 and "--test-days does not apply to protocol 'leave-one-out'" in err

    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--format", "yoochoose", "--train", log, "--out", tmp_path / "o")
    assert code == 2 and "--train and --test go together" in err

    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--format", "nosuch", "--input", log, "--out", tmp_path / "o")
    assert code == 2 and "nosuch" in err


def test_cli_format_names_match_readers():
    from training import protocols
    from training.cli_data import FORMAT_NAMES, PROTOCOL_NAMES

    assert FORMAT_NAMES == tuple(FORMATS)
    assert PROTOCOL_NAMES == protocols.PROTOCOLS
    assert {f.default_protocol for f in FORMATS.values()} <= set(PROTOCOL_NAMES)
