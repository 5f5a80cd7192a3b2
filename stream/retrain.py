"""Continuous training from the clicks topic: `streamrec retrain` (issue 18, item 3).

One round: read a time window of the clicks topic with a consumer of its own (no group id,
partitions assigned, start found with offsets_for_times: the workers' group and offsets are never
touched); make a dataset of it with the protocol of `data prepare` ("given": vocabulary = the train
items, test items unseen in train are unknown), holding out the sessions that ended last; train the
challenger, warm-started from the serving bundle's run when the model allows (GRU4Rec with the same
architecture, rows of shared items copied), else from scratch; export a verified bundle
(``export_run``); score both bundles on the held-out clicks the way a worker would answer them; and
publish the challenger on the model-updates topic (or into an A/B arm) only if its HR@20 beats the
champion's by ``margin``. Every round appends one JSON line to OUT/rounds.jsonl.

The comparison goes through the two bundles' scorers, not the runs, so any bundle can be the
champion (its run may be on another machine) and both models are ranked exactly as they would be
served: the bundle's top-K over its whole catalogue, clicks after an unknown item answered by
popularity, a click ranked by ``stream.events.online_rank`` (the conservative ranks of `evaluate`,
except that a tie across the K-th score counts as a miss). Only clicks whose item both bundles know
are counted, so both are scored on the same clicks.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from streamrec.errors import UserError

METRIC = "HR@20"  # the decision metric: what the workers' online gauge and the Grafana panel show
K = 20
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str = "--window") -> float:
    """Seconds of ``90``, ``90s``, ``30m``, ``1h``, ``2d``, ``1.5h``; UserError unless positive."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise UserError(f"{flag} wants a duration like 3600, 90s, 30m, 1h or 2d, got '{text}'")
    seconds = float(m.group(1)) * UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise UserError(f"{flag} must be above 0, got '{text}'")
    return seconds


def parse_time(text: str, flag: str) -> float:
    """Unix seconds of ``1764880000``, ``1764880000.5`` or an ISO date/time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{flag} wants unix seconds or an ISO date/time such as 2026-12-04T20:00, got '{text}'") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def window_bounds(window: str | None, since: str | None, until: str | None, every: str | None, now: float) -> tuple[float, float]:
    """(since, until) in unix seconds from the flags; one-line UserErrors for a bad combination."""
    if window is not None and since is not None:
        raise UserError("give --window or --since, not both")
    if window is None and since is None:
        raise UserError("give --window (e.g. 1h) or --since")
    if every is not None and (since is not None or until is not None):
        raise UserError("--every slides a --window ending now: --since/--until do not go with it")
    end = parse_time(until, "--until") if until is not None else now
    start = end - parse_duration(window) if window is not None else parse_time(since, "--since")
    if start >= end:
        raise UserError(f"the window is empty: --since {_iso(start)} is not before --until {_iso(end)}")
    return start, end


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class WindowClicks:
    """The clicks of one window: (session id, item id, record time in seconds) in topic order, and what was left out."""

    clicks: list[tuple[str, str, float]]
    records: int = 0
    bad: int = 0


async def read_window(settings, since: float, until: float, progress: Callable[[str], None] = lambda _: None) -> WindowClicks:
    """Every click on the clicks topic with a record timestamp in [since, until), read without a consumer group."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream.events import PROBE_SESSION, BadEvent, parse_click
    from stream.topics import topic_partitions

    topic = settings.clicks_topic
    partitions = (await topic_partitions(settings, [topic]))[topic]
    if not partitions:
        raise UserError(f"topic '{topic}' (--clicks-topic) does not exist on {settings.broker}")
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=200)
    await consumer.start()
    out = WindowClicks([])
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        starts = await consumer.offsets_for_times({tp: int(since * 1000) for tp in tps})
        ends = await consumer.end_offsets(tps)
        todo = {}
        for tp in tps:
            found = starts.get(tp)
            if found is None:  # nothing at or after ``since`` in this partition
                continue
            consumer.seek(tp, found.offset)
            if found.offset < ends[tp]:
                todo[tp] = ends[tp]
        last_note = time.monotonic()
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=1000, max_records=20000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= todo.get(tp, -1):
                        continue
                    if r.timestamp >= until * 1000:
                        todo.pop(tp, None)  # record times rise within a partition (CreateTime by producers that send in order)
                        continue
                    out.records += 1
                    c = parse_click(r.key, r.value)
                    if isinstance(c, BadEvent) or c.session_id == PROBE_SESSION:
                        out.bad += 1
                        continue
                    out.clicks.append((c.session_id, c.item_id, r.timestamp / 1000.0))
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    todo.pop(tp)
            if time.monotonic() - last_note > 5:
                progress(f"read {out.records:,} records so far")
                last_note = time.monotonic()
    finally:
        await consumer.stop()
    return out


def dataset_from_clicks(clicks: list[tuple[str, str, float]], holdout: float):
    """A PreparedData of the window's clicks by the protocol "given" of `data prepare`.

    The ``holdout`` share of the sessions that ended last is the test set (at least one), the rest
    train; no validation split (a window is short: training runs its epochs, no early stopping).
    Sessions are ordered by click time, equal times keep topic order.
    """
    from training.protocols import given

    if not 0.0 < holdout < 1.0:
        raise UserError(f"--holdout must be between 0 and 1, got {holdout}")
    if not clicks:
        raise UserError("no clicks in the window")
    df = pd.DataFrame(clicks, columns=["session_id", "item_id", "time"])
    ends = df.groupby("session_id", sort=False)["time"].max().sort_values(kind="stable")
    if len(ends) < 2:
        raise UserError(f"the window holds {len(ends)} session: too few to train on and hold out")
    n_test = max(1, int(round(len(ends) * holdout)))
    test_ids = set(ends.index[len(ends) - n_test :])
    is_test = df["session_id"].isin(test_ids).to_numpy()
    train_df, test_df = df[~is_test], df[is_test]
    lengths = train_df.groupby("session_id", sort=False).size()
    if not (lengths >= 2).any():
        raise UserError(f"no session of 2 or more clicks among the {len(lengths):,} train sessions of the window: nothing to train on")
    return given(train_df, test_df, valid_days=0.0)


def decide(champion: dict, challenger: dict, margin: float, metric: str = METRIC) -> tuple[bool, str]:
    """(promote?, why): promote only when the challenger's ``metric`` beats the champion's by at least ``margin``."""
    a, b = float(champion[metric]), float(challenger[metric])
    if not (math.isfinite(a) and math.isfinite(b)):
        return False, f"{metric} not finite (champion {a}, challenger {b})"
    if b >= a + margin:
        return True, f"challenger {metric} {b:.4f} >= champion {a:.4f} + margin {margin:g}"
    return False, f"challenger {metric} {b:.4f} < champion {a:.4f} + margin {margin:g}"


def score_bundle(scorer, sessions: list[list[str]], counted) -> dict:
    """HR@K/MRR@K (K = 5, 10, 20) of a bundle answering ``sessions`` (item ids) click by click as a worker does.

    ``counted(item id)`` says whether a click is counted (a click on an item both bundles know);
    every click after a session's first is a target. Unknown clicks leave the state alone and get
    the popularity list, as in ``stream.processor``.
    """
    from export.scorer import StepInput
    from stream.events import online_rank

    ids = np.array([""] + list(scorer.vocab.item_ids), dtype=object)
    enc = [scorer.vocab.encode(s) for s in sessions]
    lengths = np.array([len(s) for s in sessions])
    hidden = np.zeros((len(sessions), scorer.hidden_size), dtype=np.float32) if scorer.kind == "hidden" else None
    histories = [np.zeros(0, np.int64) for _ in sessions]
    pop_items, pop_scores = scorer.popular()
    keep = int(scorer.history_len)
    ks = (5, 10, 20)
    hits, rr, n = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0.0), 0
    for j in range(int(lengths.max(initial=1)) - 1):  # the list after click j is scored against click j + 1
        rows = np.flatnonzero(lengths > j + 1)
        known = rows[[enc[r][j] > 0 for r in rows]]
        lists = {r: (pop_items, pop_scores) for r in rows}
        if len(known):
            history = [np.append(histories[r], enc[r][j]) for r in known]  # the kept items plus the click, as the processor steps
            result = scorer.step(StepInput(items=np.array([enc[r][j] for r in known]), hidden=hidden[known] if hidden is not None else None, history=history))
            if hidden is not None:
                hidden[known] = result.hidden
            for i, r in enumerate(known):
                histories[r] = history[i][-keep:] if keep else history[i][:0]
                lists[r] = (result.top_items[i], result.top_scores[i])
        for r in rows:
            target = sessions[r][j + 1]
            if not counted(target):
                continue
            items, scores = lists[r]
            rank = online_rank(ids[np.asarray(items, dtype=np.int64)], np.asarray(scores, dtype=np.float32), target)
            n += 1
            for k in ks:
                if 0 < rank <= k:
                    hits[k] += 1
                    rr[k] += 1.0 / rank
    out = {"n_events": n}
    for k in ks:
        out[f"HR@{k}"] = hits[k] / n if n else 0.0
        out[f"MRR@{k}"] = rr[k] / n if n else 0.0
    return out


def raw_held_out(clicks: list[tuple[str, str, float]], data) -> list[list[str]]:
    """The held-out sessions with their original item ids (also items the challenger never saw), in click order."""
    wanted = set(map(str, data.test.session_ids))
    by_session: dict[str, list[str]] = {}
    for sid, item, _ in clicks:
        if sid in wanted:
            by_session.setdefault(sid, []).append(item)
    return [by_session[s] for s in map(str, data.test.session_ids) if s in by_session]


# ---------------------------------------------------------------- training with a warm start


ARCHITECTURE = ("layers", "constrained_embedding", "embedding")  # GRU4Rec settings the copied weights depend on


def serving_run(bundle_dir: Path) -> tuple[dict, Path | None]:
    """(manifest, the run dir the serving bundle was exported from, or None when it is not on this machine)."""
    from export.bundle import open_bundle

    manifest = open_bundle(bundle_dir).manifest
    run = (manifest.get("training") or {}).get("run_dir")
    run_dir = Path(run) if run else None
    ok = run_dir is not None and (run_dir / "config.json").is_file() and (run_dir / "vocab.json").is_file()
    return manifest, run_dir if ok else None


def train_challenger(data, model_name: str, config, run_dir: Path, serving_run_dir: Path | None, progress: bool) -> tuple[object, str]:
    """Train ``model_name`` on ``data``; (model, how it started: "warm start from RUN" or "scratch: why")."""
    from training.models import get_model

    cls = get_model(model_name)
    how = "scratch: only GRU4Rec warm-starts" if model_name != "gru4rec" else "scratch: the serving bundle's run dir is not on this machine"
    if model_name == "gru4rec" and serving_run_dir is not None:
        old_doc = json.loads((serving_run_dir / "config.json").read_text())
        if old_doc.get("model") != "gru4rec":
            how = f"scratch: the serving model is {old_doc.get('model')}"
        else:
            old = cls.Config(**old_doc["config"])
            differ = [f for f in ARCHITECTURE if getattr(old, f) != getattr(config, f)]
            if differ:
                how = f"scratch: the serving run differs in {', '.join(differ)}"
            else:
                return _train_gru_warm(cls, data, config, run_dir, serving_run_dir, progress), f"warm start from {serving_run_dir}"
    return cls.train(data, config, progress=progress, run_dir=run_dir), how


def _train_gru_warm(cls, data, config, run_dir: Path, old_dir: Path, progress: bool):
    """GRU4Rec.train with the recurrent weights and the shared items' rows taken from the serving run."""
    import torch

    from training.data import Vocab

    def from_serving_run(model) -> None:
        old = cls.load(old_dir)
        old_vocab = Vocab.load(old_dir / "vocab.json")
        rows = old_vocab.encode(data.vocab.item_ids)  # new index i + 1 -> old index (0: new item)
        shared = np.flatnonzero(rows > 0)
        new_state, old_state = model.net.state_dict(), old.net.state_dict()
        with torch.no_grad():
            for name, value in old_state.items():
                if name in ("item_out", "item_bias", "item_in"):
                    new_state[name][torch.from_numpy(shared + 1)] = value[torch.from_numpy(rows[shared])]
                else:
                    new_state[name].copy_(value)
        model.net.load_state_dict(new_state)

    return cls.train(data, config, progress=progress, run_dir=run_dir, warm_start=from_serving_run)


def model_config(model_name: str, serving_model: str, serving_run_dir: Path | None, sets: dict[str, str], epochs: int | None):
    """The challenger's config: the serving run's settings when it is the same model, then --set and --epochs on top."""
    import dataclasses

    from training.models import get_model
    from training.models.base import config_from_options

    cls = get_model(model_name)
    base = {}
    if serving_run_dir is not None and model_name == serving_model:
        doc = json.loads((serving_run_dir / "config.json").read_text())
        base = {k: v for k, v in (doc.get("config") or {}).items() if k not in ("resume", "device")}
    options = dict(sets)
    if epochs is not None:
        options["epochs"] = str(epochs)
    config = config_from_options(cls.Config, options)
    given = {k for k in options}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for k, v in base.items():
        if k in fields and k not in given:
            setattr(config, k, tuple(v) if isinstance(getattr(config, k), tuple) else v)
    if hasattr(config, "__post_init__"):
        config.__post_init__()
    if hasattr(config, "check"):
        config.check()
    return config


# ---------------------------------------------------------------- one round


@dataclass
class RoundOptions:
    out: Path
    model: str | None
    sets: dict
    epochs: int | None
    margin: float
    holdout: float
    action: str  # publish | arm | none
    arm: str | None
    worker_root: str | None  # replace OUT's resolved path by this in the published path (workers that mount it elsewhere)


def run_round(settings, champion: Path, since: float, until: float, opts: RoundOptions, number: int, say: Callable[[str], None]) -> dict:
    """One retraining round (module docstring); its record (also appended to OUT/rounds.jsonl)."""
    from export.exporter import export_run
    from export.scorer import load_scorer
    from stream.topics import publish_model_update

    started = time.time()
    record: dict = {"round": number, "started_at": _iso(started), "window": {"since": _iso(since), "until": _iso(until), "since_unix": since, "until_unix": until}}
    say(f"round {number}: reading '{settings.clicks_topic}' from {_iso(since)} to {_iso(until)}")
    window = asyncio.run(read_window(settings, since, until, say))
    record["clicks"], record["bad_records"] = len(window.clicks), window.bad
    if not window.clicks:
        raise UserError(f"no clicks on '{settings.clicks_topic}' between {_iso(since)} and {_iso(until)} ({window.records} records, {window.bad} not clicks)")
    data = dataset_from_clicks(window.clicks, opts.holdout)
    record["sessions"] = len(data.train) + len(data.test)
    record["train"] = {"sessions": len(data.train), "clicks": int(data.train.n_events)}
    record["held_out"] = {"sessions": len(data.test), "clicks": int(data.test.n_events)}
    say(f"{len(window.clicks):,} clicks, {record['sessions']:,} sessions: training on {len(data.train):,}, holding out the last {len(data.test):,}")
    round_dir = opts.out / f"round-{number:04d}"
    if round_dir.exists():
        shutil.rmtree(round_dir)
    data.save(round_dir / "data")

    manifest, old_run = serving_run(champion)
    model_name = opts.model or manifest["model"]
    config = model_config(model_name, manifest["model"], old_run, opts.sets, opts.epochs)
    run_dir, bundle_dir = round_dir / "run", round_dir / "bundle"
    t = time.perf_counter()
    model, how = train_challenger(data, model_name, config, run_dir, old_run, progress=True)
    model.save(run_dir)
    shutil.copyfile(round_dir / "data" / "vocab.json", run_dir / "vocab.json")
    doc = json.loads((run_dir / "config.json").read_text())
    doc["data"] = {"path": str((round_dir / "data").resolve()), "stats": data.stats}
    doc["train_seconds"] = round(time.perf_counter() - t, 2)
    (run_dir / "config.json").write_text(json.dumps(doc, indent=2))
    record["challenger"] = {"model": model_name, "start": how, "train_seconds": doc["train_seconds"]}
    say(f"trained {model_name} ({how}) in {doc['train_seconds']:.1f}s; exporting")
    new_manifest = export_run(run_dir, bundle_dir, data_dir=round_dir / "data", parity_sessions=min(200, max(1, len(data.test))), log=say)

    champion_scorer, challenger_scorer = load_scorer(champion), load_scorer(bundle_dir)
    both = set(champion_scorer.vocab.item_ids) & set(challenger_scorer.vocab.item_ids)
    sessions = raw_held_out(window.clicks, data)
    say(f"scoring both bundles on {len(sessions):,} held-out sessions")
    champ = score_bundle(champion_scorer, sessions, both.__contains__)
    chall = score_bundle(challenger_scorer, sessions, both.__contains__)
    if champ["n_events"] == 0:
        raise UserError(f"no held-out click on an item both bundles know ({len(sessions)} held-out sessions): nothing to compare; widen the window")
    record["champion"] = {"bundle": str(Path(os.path.realpath(champion))), "model": manifest["model"], "model_version": manifest["model_version"], "metrics": champ}
    record["challenger"].update(bundle=str(bundle_dir.resolve()), model_version=new_manifest["model_version"], metrics=chall)
    promote, why = decide(champ, chall, opts.margin)
    record.update(metric=METRIC, margin=opts.margin, reason=why)
    say(f"champion {METRIC} {champ[METRIC]:.4f}, challenger {chall[METRIC]:.4f} on {champ['n_events']:,} held-out clicks: {why}")
    if promote and opts.action != "none":
        path = str(bundle_dir.resolve())
        if opts.worker_root:
            path = os.path.join(opts.worker_root, os.path.relpath(path, os.path.realpath(opts.out)))
        arm = opts.arm if opts.action == "arm" else None
        partition, offset = asyncio.run(publish_model_update(settings, path, new_manifest["model_version"], arm=arm))
        record["decision"] = "arm" if arm else "publish"
        record["published"] = {"topic": settings.model_updates_topic, "partition": partition, "offset": offset, "path": path, **({"arm": arm} if arm else {})}
        say(f"published {new_manifest['model_version']} ({path}){f' to arm {arm}' if arm else ''} on '{settings.model_updates_topic}'")
    else:
        record["decision"] = "promote (not published: --action none)" if promote else "keep"
    record["seconds"] = round(time.time() - started, 2)
    append_record(opts.out, record)
    return record


def append_record(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rounds.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
