"""`streamrec retrain` (stream/retrain.py): the pure parts, the one-line errors, and a drift on Apache Kafka.

The drift test serves a GRU4Rec trained on one synthetic item graph while the stream switches to
another graph over the same items; one `streamrec retrain` round over the recent window must
publish a challenger that raises online HR@20, and the worker's metrics and answers must show the
promotion.
"""

from __future__ import annotations

import calendar
import json
import shutil
import time

import orjson
import pytest

from stream.events import click_value
from stream.model_updates import parse_update, update_arm, update_message
from stream.replay import score_online
from stream.retrain import dataset_from_clicks, decide, parse_duration, parse_time, window_bounds
from streamrec.errors import UserError
from tests.streamkit import streamrec
from tests.test_stream_support import gru_bundle, markov_bundle, metric, metrics_text, read, running_worker, send, stream_data, wait_for, worker_settings  # noqa: F401

# ---------------------------------------------------------------- pure parts


def test_a_window_is_read_from_seconds_or_a_unit_and_a_bad_one_is_a_one_line_error():
    assert [parse_duration(t) for t in ("3600", "90s", "30m", "1h", "1.5h", "2d")] == [3600, 90, 1800, 3600, 5400, 172800]
    for bad in ("", "h", "-1h", "0", "1w", "1 hour", "abc"):
        with pytest.raises(UserError) as e:
            parse_duration(bad)
        assert "\n" not in str(e.value) and "--window" in str(e.value)
    assert parse_time("1764880000.5", "--since") == 1764880000.5
    eight_pm = calendar.timegm((2026, 12, 4, 20, 0, 0))
    assert parse_time("2026-12-04T20:00", "--since") == eight_pm  # UTC unless it says otherwise
    assert parse_time("2026-12-04T21:00+01:00", "--since") == eight_pm
    with pytest.raises(UserError, match="--until wants unix seconds or an ISO"):
        parse_time("yesterday", "--until")


def test_window_bounds_follow_the_flags_and_refuse_bad_combinations():
    now = 1_000_000.0
    assert window_bounds("1h", None, None, None, now) == (now - 3600, now)
    assert window_bounds("10m", None, "999000", None, now) == (999000 - 600, 999000)
    assert window_bounds(None, "990000", None, None, now) == (990000, now)
    assert window_bounds("1h", None, None, "30m", now) == (now - 3600, now)
    for args, says in [
        (("1h", "5", None, None), "not both"),
        ((None, None, None, None), "give --window"),
        ((None, "5", None, "1h"), "--every slides"),
        ((None, "2000000", None, None), "the window is empty"),
    ]:
        with pytest.raises(UserError, match=says) as e:
            window_bounds(*args, now)
        assert "\n" not in str(e.value)


def test_a_dataset_from_click_records_holds_out_the_sessions_that_ended_last():
    # 10 sessions of 3 clicks; session i's clicks at i*10 + (0, 1, 2) except s3, whose last click comes last of all
    clicks = []
    for i in range(10):
        for j in range(3):
            t = 1000.0 + i * 10 + j + (500 if (i, j) == (3, 2) else 0)
            clicks.append((f"s{i}", f"item{(i + j) % 7}", t))
    data = dataset_from_clicks(clicks, holdout=0.2)
    assert set(data.test.session_ids) == {"s3", "s9"}  # ended last: s3 (t=1532), then s9 (t=1092)
    assert len(data.train) == 8 and data.train.n_events == 24 and data.valid is None
    assert data.stats["protocol"] == "given"
    train_items = {c[1] for c in clicks if c[0] not in ("s3", "s9")}
    assert set(data.vocab.item_ids) == train_items  # the vocabulary is the train items, as `data prepare` makes it
    for s, (a, b) in zip(data.train.session_ids, zip(data.train.offsets[:-1], data.train.offsets[1:])):
        expected = [c[1] for c in clicks if c[0] == s]
        assert data.vocab.decode(data.train.items[a:b]) == expected  # click order kept
    with pytest.raises(UserError, match="no clicks"):
        dataset_from_clicks([], 0.2)
    with pytest.raises(UserError, match="--holdout"):
        dataset_from_clicks(clicks, 1.0)
    with pytest.raises(UserError, match="1 session"):
        dataset_from_clicks(clicks[:3], 0.2)
    with pytest.raises(UserError, match="nothing to train on"):
        dataset_from_clicks([("a", "x", 1.0), ("b", "y", 2.0), ("b", "z", 3.0)], 0.5)


def test_the_challenger_is_promoted_only_when_it_beats_the_champion_by_the_margin():
    champion = {"HR@20": 0.30, "MRR@20": 0.10}
    assert decide(champion, {"HR@20": 0.32, "MRR@20": 0.01}, margin=0.01)[0]  # the decision is on HR@20
    assert not decide(champion, {"HR@20": 0.305, "MRR@20": 0.5}, margin=0.01)[0]
    assert decide(champion, {"HR@20": 0.30, "MRR@20": 0.1}, margin=0.0)[0]
    assert not decide(champion, {"HR@20": 0.40}, margin=0.2)[0]
    assert decide(champion, {"HR@20": 0.25}, margin=-0.1)[0]  # a negative margin accepts a slightly worse model
    promote, why = decide(champion, {"HR@20": float("nan")}, margin=0.0)
    assert not promote and "not finite" in why


def test_an_update_for_an_arm_names_it():
    value = update_message("/srv/b", "v1", arm="challenger")
    assert parse_update(value) == ("/srv/b", "v1") and update_arm(value) == "challenger"
    assert update_arm(update_message("/srv/b", "v1")) is None


def test_bad_retrain_flags_are_one_line_errors(tmp_path, gru_bundle):
    _, bundle = gru_bundle
    base = ["retrain", "--broker", "kafka://127.0.0.1:1", "--out", str(tmp_path / "out")]
    for args, says in [
        (["--serving", str(tmp_path), "--window", "1h"], f"error: --serving {tmp_path}: no bundle there (make one with `streamrec export`)"),
        (["--serving", str(bundle), "--window", "1x"], "error: --window wants a duration like 3600, 90s, 30m, 1h or 2d, got '1x'"),
        (["--serving", str(bundle)], "error: give --window (e.g. 1h) or --since"),
        (["--serving", str(bundle), "--window", "1h", "--since", "5"], "error: give --window or --since, not both"),
        (["--serving", str(bundle), "--window", "1h", "--action", "arm"], "error: --action arm needs --arm NAME (the experiment's arm the challenger goes to)"),
        (["--serving", str(bundle), "--window", "1h", "--every", "0s"], "error: --every must be above 0, got '0s'"),
        (["--serving", str(bundle), "--window", "1h", "--margin", "nan"], "error: --margin must be a finite number, got nan"),
    ]:
        r = streamrec(*base, *args)
        assert r.returncode == 2 and r.stderr.strip() == says, (args, r.stderr)


def test_an_empty_window_is_a_one_line_error_through_the_broker(broker, tmp_path, gru_bundle):
    _, bundle = gru_bundle
    settings = worker_settings(broker)
    send(settings, [(b"s1", click_value("s1", "1000", 1.0))])  # one click, now: outside a window that ended an hour ago
    r = streamrec("retrain", "--broker", broker.url, "--broker-quirks", broker.quirks, "--clicks-topic", settings.clicks_topic, "--model-updates-topic", settings.model_updates_topic,
                  "--serving", str(bundle), "--out", str(tmp_path / "out"), "--window", "1h", "--until", str(time.time() - 3600))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no clicks on '{settings.clicks_topic}' between ") and "(0 records, 0 not clicks)" in last, r.stderr
    assert not (tmp_path / "out" / "rounds.jsonl").exists()


# ---------------------------------------------------------------- drift through the broker


def _messages(df, prefix: str) -> list[tuple[bytes, bytes]]:
    """Click messages of a synthetic log, sessions interleaved by time, session ids prefixed."""
    df = df.sort_values("time", kind="stable")
    return [((prefix + s).encode(), click_value(prefix + s, i, t)) for s, i, t in zip(df["session_id"], df["item_id"], df["time"])]


def _online(records_clicks, records_recs, prefix: str) -> dict:
    clicks = [(r.key, r.value) for r in records_clicks if r.key.decode().startswith(prefix)]
    recs = [r.value for r in records_recs if orjson.loads(r.value)["session_id"].startswith(prefix)]
    return score_online(clicks, recs, (20,)).metrics()


def test_a_retrain_round_after_a_drift_raises_online_hr_and_the_promotion_shows(broker, tmp_path, gru_bundle):
    """Phase a: clicks from the graph the serving GRU4Rec learned; phase b: another graph over the same
    items (the drift); `streamrec retrain` over phase b's window publishes a challenger; phase c: new
    sessions of the new graph, answered by the challenger."""
    from training.synth import generate_log

    run_dir, stale = gru_bundle
    root = tmp_path / "bundles"
    shutil.copytree(stale, root / "stale")  # the workers obey updates for bundles under --bundle-root (here: root)
    stale_version = json.loads((stale / "manifest.json").read_text())["model_version"]
    old = generate_log(300, 1500, seed=3)  # the log stream_data was made of: the graph the stale model knows
    new = generate_log(300, 1200, seed=11)  # same items (ids 1000..1299), another graph and popularity
    assert set(new["item_id"]) <= {str(i) for i in range(1000, 1300)} >= set(old["item_id"])
    ids = sorted(new["session_id"].unique(), key=int)
    phase_a = _messages(old[old["session_id"].isin(set(sorted(old["session_id"].unique(), key=int)[-150:]))], "a")
    phase_b = _messages(new[new["session_id"].isin(set(ids[:900]))], "b")
    phase_c = _messages(new[new["session_id"].isin(set(ids[900:]))], "c")
    settings = worker_settings(broker)
    with running_worker(settings, root / "stale", tmp_path / "worker.log"):
        send(settings, phase_a)
        time.sleep(0.05)
        since = time.time()  # record timestamps of phase b start here
        time.sleep(0.05)
        send(settings, phase_b)
        read(settings, {settings.recommendations_topic: len(phase_a) + len(phase_b)}, timeout=90)
        until = time.time()
        started = time.perf_counter()
        r = streamrec("retrain", "--broker", broker.url, "--broker-quirks", broker.quirks, "--clicks-topic", settings.clicks_topic, "--model-updates-topic", settings.model_updates_topic,
                      "--serving", str(root / "stale"), "--out", str(root / "retrain"), "--since", str(since), "--until", str(until), "--epochs", "4", "--margin", "0.02", timeout=180)
        retrain_seconds = time.perf_counter() - started
        assert r.returncode == 0, r.stderr[-3000:]
        record = json.loads((root / "retrain" / "rounds.jsonl").read_text().splitlines()[-1])
        assert record["decision"] == "publish", record
        assert record["clicks"] == len(phase_b)  # the window holds phase b, nothing of phase a
        assert record["challenger"]["start"] == f"warm start from {run_dir.resolve()}"
        champ, chall = record["champion"]["metrics"], record["challenger"]["metrics"]
        assert chall["HR@20"] >= champ["HR@20"] + 0.02 and champ["n_events"] == chall["n_events"] > 300
        new_version = record["challenger"]["model_version"]
        assert wait_for(lambda: metric(metrics_text(settings), "streamrec_model_swaps_total") == 1.0, timeout=30), (tmp_path / "worker.log").read_text()[-2000:]
        text = metrics_text(settings)
        info = [line for line in text.splitlines() if line.startswith("streamrec_model_info{")]
        assert len(info) == 1 and f'version="{new_version}"' in info[0], info
        assert metric(text, 'streamrec_model_updates_total{outcome="swapped"}') == 1.0
        send(settings, phase_c)
        total = len(phase_a) + len(phase_b) + len(phase_c)
        topics = read(settings, {settings.recommendations_topic: total, settings.clicks_topic: total}, timeout=90)
    clicks, recs = topics[settings.clicks_topic], topics[settings.recommendations_topic]
    versions = {p: {orjson.loads(r.value)["model_version"] for r in recs if orjson.loads(r.value)["session_id"].startswith(p)} for p in "abc"}
    assert versions == {"a": {stale_version}, "b": {stale_version}, "c": {new_version}}
    a, b, c = (_online(clicks, recs, p) for p in "abc")
    print(f"online HR@20: before the drift {a['HR@20']:.4f}, after it {b['HR@20']:.4f}, after the promotion {c['HR@20']:.4f}; retrain round {retrain_seconds:.1f}s; offline {champ['HR@20']:.4f} -> {chall['HR@20']:.4f}")
    assert a["HR@20"] > b["HR@20"] + 0.1  # the drift hurt the stale model
    assert c["HR@20"] > b["HR@20"] + 0.1  # the promoted challenger wins it back
    assert min(x["n_events"] for x in (a, b, c)) > 300


# ---------------------------------------------------------------- publish-model --arm through the broker


def test_publish_model_with_an_arm_swaps_that_arm_of_a_running_experiment_only(broker, tmp_path, gru_bundle, markov_bundle):
    root = tmp_path / "bundles"
    for name, (_, bundle) in (("markov", markov_bundle), ("gru", gru_bundle)):
        shutil.copytree(bundle, root / name)
    version = {name: json.loads((root / name / "manifest.json").read_text())["model_version"] for name in ("markov", "gru")}
    settings = worker_settings(broker, experiment="fresh", arms=f"left={root / 'markov'}:0.5,right={root / 'markov'}:0.5")
    r = streamrec("publish-model", str(root / "gru"), "--arm", " ", "--broker", broker.url, "--broker-quirks", broker.quirks, "--model-updates-topic", settings.model_updates_topic)
    assert r.returncode == 2 and r.stderr.strip() == "error: --arm must name an arm"
    with running_worker(settings, root / "markov", tmp_path / "worker.log"):
        send(settings, [(b"s1", click_value("s1", "1000", 1.0))])
        read(settings, {settings.recommendations_topic: 1})  # serving
        r = streamrec("publish-model", str(root / "gru"), "--arm", "right", "--broker", broker.url, "--broker-quirks", broker.quirks, "--model-updates-topic", settings.model_updates_topic)
        assert r.returncode == 0 and f"published {version['gru']} ({(root / 'gru').resolve()}) for arm right to '{settings.model_updates_topic}'" in r.stdout, r.stderr
        assert wait_for(lambda: metric(metrics_text(settings), "streamrec_model_swaps_total") == 1.0, timeout=30), (tmp_path / "worker.log").read_text()[-2000:]
        info = sorted(line for line in metrics_text(settings).splitlines() if line.startswith("streamrec_model_info{"))
    assert len(info) == 2, info
    left, right = (next(line for line in info if f'arm="{a}"' in line) for a in ("left", "right"))
    assert f'version="{version["markov"]}"' in left and f'version="{version["gru"]}"' in right
    records = read(settings, {settings.model_updates_topic: 1})[settings.model_updates_topic]
    assert update_arm(records[-1].value) == "right" and parse_update(records[-1].value) == (str((root / "gru").resolve()), version["gru"])


def test_every_records_each_round_and_stops_cleanly_on_sigterm(broker, tmp_path, gru_bundle):
    """Rounds over a quiet window fail with a one-line reason that is recorded; the schedule goes on until SIGTERM, then exits 0."""
    import signal
    import subprocess
    import sys

    from tests.streamkit import REPO

    _, bundle = gru_bundle
    settings = worker_settings(broker)
    send(settings, [(b"s1", click_value("s1", "1000", 1.0))])  # the topic exists; the click is older than the 1 s window
    time.sleep(1.5)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "stream.cli", "retrain", "--broker", broker.url, "--broker-quirks", broker.quirks, "--clicks-topic", settings.clicks_topic,
                                "--model-updates-topic", settings.model_updates_topic, "--serving", str(bundle), "--out", str(out), "--window", "1s", "--every", "1s"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (out / "rounds.jsonl").is_file() and len((out / "rounds.jsonl").read_text().splitlines()) >= 2, timeout=60)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    assert all(r["decision"] == "error" and r["reason"].startswith(f"no clicks on '{settings.clicks_topic}' between ") for r in rounds), rounds
    assert all(r["window"]["until_unix"] - r["window"]["since_unix"] == pytest.approx(1.0) for r in rounds)
    assert stderr.strip().splitlines()[-1].endswith("stopped")
