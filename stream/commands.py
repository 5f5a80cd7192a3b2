"""`streamrec serve`, `broker`, `replay`, `score-online`, `publish-model`, `retrain`, `experiment report` and `demo` (mounted by stream/cli.py)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import click

from stream.settings import settings_from, settings_options
from streamrec.errors import UserError
from streamrec.runtime import configure_process

CONNECTION = ("broker", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "broker_quirks")
TOPICS = ("clicks_topic", "recommendations_topic", "dlq_topic", "partitions", "replication_factor")


@click.command()
@click.option("--bundle", "bundle_dir", default=None, envvar="STREAMREC_BUNDLE", type=click.Path(path_type=Path), help="BUNDLE_DIR from `streamrec export` (required unless --arms names the bundles).")
@settings_options()
def serve(bundle_dir: Path | None, **options) -> None:
    """Run the stream worker: clicks in, recommendations out (Ctrl-C stops it).

    \b
    Examples:
      streamrec serve --bundle bundles/gru4rec --broker kafka://127.0.0.1:9092 --metrics-port 9108
      streamrec serve --experiment gru-vs-pop --arms champion=bundles/pop:0.5,challenger=bundles/gru4rec:0.5 --broker ...
    """
    import os

    from stream.worker import serve as run

    settings, _ = settings_from(options)
    arms = settings.experiment_arms()
    for arm in arms:
        if not Path(arm.bundle).is_dir():
            raise UserError(f"--arms: {arm.bundle} (arm {arm.name}): no such bundle directory (make one with `streamrec export`)")
    if arms and bundle_dir is not None and os.path.realpath(bundle_dir) not in {os.path.realpath(a.bundle) for a in arms}:
        raise UserError(f"--bundle {bundle_dir} is none of the --arms bundles: leave --bundle out under an experiment, or name one of them")
    if bundle_dir is None:
        if not arms:
            raise UserError("--bundle is required (or --experiment with --arms)")
        bundle_dir = Path(arms[0].bundle)  # anchors --bundle-root's default
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir}: no such bundle directory (make one with `streamrec export`)")
    run(settings, bundle_dir)


@click.command()
@click.option("--engine", type=click.Choice(["kafka", "tansu"]), default="kafka", show_default=True, envvar="STREAMREC_BROKER_ENGINE", help="kafka: Apache Kafka in KRaft mode (needs Java 17 and `make kafka`); tansu: the embedded broker, in memory, no Java (clients pass --broker-quirks tansu).")
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True, envvar="STREAMREC_BROKER_PORT", help="Loopback port to listen on (with --nodes N, node i listens on PORT+i-1).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="kafka: keep the storage here across restarts (default: a temporary folder, removed at stop).")
@click.option("--nodes", type=click.IntRange(1, 9), default=1, show_default=True, help="kafka: brokers on loopback (3: a controller quorum, replication factor 3, min.insync.replicas 2).")
def broker(engine: str, port: int, data_dir: Path | None, nodes: int) -> None:
    """Run a broker on loopback in the foreground; Ctrl-C or SIGTERM stops it.

    \b
    Examples:
      streamrec broker --port 9092                                  # Apache Kafka, one node
      streamrec broker --port 9092 --nodes 3 --data-dir kafka-data  # three nodes, kept on disk
      streamrec broker --engine tansu --port 9092                   # embedded, in memory, no Java
    """
    from stream.broker import EmbeddedBroker
    from stream.kafka import KafkaCluster

    if engine == "tansu" and (data_dir is not None or nodes != 1):
        raise UserError("--data-dir and --nodes are for --engine kafka: the embedded broker is one node in memory")
    if port + nodes - 1 > 65535:
        raise UserError(f"--port {port} with --nodes {nodes} runs past port 65535")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if engine == "tansu":
        b, what = EmbeddedBroker(port=port), "embedded broker (Tansu, memory storage)"
    else:
        b = KafkaCluster(nodes=nodes, ports=[port + i for i in range(nodes)], data_dir=data_dir)
        what = f"Apache Kafka (KRaft, {nodes} node{'s' if nodes > 1 else ''}, data in {b.data_dir}{'' if data_dir else ', removed at stop'})"
    with b:
        quirks = f" --broker-quirks {b.quirks}" if b.quirks != "none" else ""
        click.echo(f"{what} listening; bootstrap {b.bootstrap}; clients use --broker {b.url}{quirks}; Ctrl-C stops it", err=True)
        click.echo(b.bootstrap)  # stdout: the bootstrap address alone, for scripts
        processes = [n.process for n in b.nodes] if engine == "kafka" else [b.process]
        while not stop.is_set() and all(p.poll() is None for p in processes):
            stop.wait(0.5)
        dead = [p for p in processes if p.poll() is not None]
        if dead and not stop.is_set():
            raise UserError(f"the broker exited (status {dead[0].returncode})")
    click.echo("broker stopped", err=True)


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Prepared DATA_DIR.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test"]))
@click.option("--rate", type=float, default=None, help="Send at this many events per second.")
@click.option("--speedup", type=float, default=None, help="Keep the real gaps between clicks, divided by this factor.")
@click.option("--max-sessions", type=click.IntRange(min=1), default=None, help="Replay only the first N sessions of the split.")
@settings_options(CONNECTION + TOPICS)
def replay(data_dir: Path, split: str, rate, speedup, max_sessions, **options) -> None:
    """Replay a prepared split as click events (sessions interleaved by time; flat out unless --rate/--speedup).

    \b
    Example:
      streamrec replay --data data/synth --split test --broker kafka://127.0.0.1:9092 --rate 2000
    """
    import asyncio

    from stream.replay import replay as run, replay_events
    from training.data import PreparedData

    settings, _ = settings_from(options)
    events = replay_events(PreparedData.load(data_dir), split, max_sessions)
    stats = asyncio.run(run(settings, events, rate=rate, speedup=speedup))
    click.echo(f"replayed {stats['events']:,} events in {stats['seconds']:.1f}s ({stats['events_per_second']:,.0f} events/s) to '{settings.clicks_topic}'")


@click.command("score-online")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None, help="The served bundle: clicks on items it does not know are skipped, as offline (otherwise they count as misses).")
@click.option("--ks", default="5,10,20", show_default=True, help="Cut-offs, comma-separated.")
@click.option("--expect", type=click.IntRange(min=1), default=None, help="Wait until this many recommendations are on the topic.")
@click.option("--idle", type=float, default=2.0, show_default=True, help="Stop reading after this many seconds without new records.")
@settings_options(CONNECTION + TOPICS)
def score_online(bundle_dir, ks: str, expect, idle: float, **options) -> None:
    """Online HR@K/MRR@K: was each click in the list published after the session's previous click?"""
    import asyncio
    import json

    from stream.replay import read_and_score

    settings, _ = settings_from(options)
    try:
        cutoffs = tuple(sorted({int(k) for k in ks.split(",") if k.strip()}))
    except ValueError:
        raise UserError(f"--ks wants comma-separated integers, got '{ks}'") from None
    known = None
    if bundle_dir is not None:
        from export.bundle import open_bundle

        known = set(open_bundle(bundle_dir).vocab.item_ids)
    score = asyncio.run(read_and_score(settings, cutoffs, known, expect_answers=expect, idle=idle))
    metrics = score.metrics()
    click.echo(json.dumps(metrics, indent=2))


@click.command("publish-model")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--worker-path", default=None, help="The bundle's path as the workers see it (default: BUNDLE_DIR resolved here, symlinks included).")
@click.option("--arm", default=None, help="Under an A/B experiment: the arm whose bundle this replaces (workers of an experiment ignore a message without one).")
@settings_options(CONNECTION + ("model_updates_topic", "replication_factor"))
def publish_model(bundle_dir: Path, worker_path, arm, **options) -> None:
    """Tell every running worker to serve BUNDLE_DIR: one message on the model-updates topic.

    The bundle is checked here first (manifest and every file's sha256); each worker checks it
    again before swapping it in, and keeps its model if the check fails.

    \b
    Examples:
      streamrec publish-model /srv/bundles/gru4rec-20261128 --broker kafka://127.0.0.1:9092
      streamrec publish-model /srv/bundles/gru4rec-20261128 --arm challenger --broker kafka://127.0.0.1:9092
    """
    import asyncio
    import os

    from export.bundle import open_bundle
    from stream.topics import publish_model_update

    settings, _ = settings_from(options)
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir}: no such bundle directory (make one with `streamrec export`)")
    if arm is not None and not arm.strip():
        raise UserError("--arm must name an arm")
    version = str(open_bundle(bundle_dir).manifest["model_version"])
    path = worker_path or os.path.realpath(bundle_dir)
    partition, offset = asyncio.run(publish_model_update(settings, path, version, arm=arm))
    click.echo(f"published {version} ({path}){f' for arm {arm}' if arm else ''} to '{settings.model_updates_topic}' partition {partition} offset {offset}")


@click.command()
@click.option("--serving", "serving", required=True, type=click.Path(path_type=Path), help="The bundle the workers serve now (the champion; its run dir, if on this machine, seeds the challenger).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Rounds go to OUT/round-NNNN/ (data, run, bundle) and OUT/rounds.jsonl; put it under the workers' --bundle-root.")
@click.option("--window", default=None, help="Read the clicks of the last WINDOW: 3600, 90s, 30m, 1h, 2d.")
@click.option("--since", default=None, help="Start of the window instead (unix seconds or ISO date/time, UTC).")
@click.option("--until", default=None, help="End of the window (default: now).")
@click.option("--model", "model_name", default=None, help="Model to train (default: the serving bundle's model).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: the serving run's, else the model's).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other model setting; repeatable (on top of the serving run's settings).")
@click.option("--margin", type=float, default=0.01, show_default=True, help="Promote only when the challenger's HR@20 beats the champion's by at least this much.")
@click.option("--holdout", type=float, default=0.2, show_default=True, help="Share of the window's sessions, those that ended last, held out for the comparison.")
@click.option("--action", type=click.Choice(["publish", "arm", "none"]), default="publish", show_default=True, help="publish: the challenger replaces the model on the model-updates topic; arm: it replaces the bundle of --arm in a running experiment; none: only record.")
@click.option("--arm", "arm", default=None, help="With --action arm: the experiment's arm to put the challenger in.")
@click.option("--every", default=None, help="Run a round every EVERY (e.g. 1h) over the --window ending then, until Ctrl-C or SIGTERM.")
@click.option("--worker-root", default=None, help="OUT as the workers see it, when they mount it elsewhere (default: OUT resolved here).")
@settings_options(CONNECTION + ("clicks_topic", "model_updates_topic", "replication_factor"))
def retrain(serving: Path, out: Path, window, since, until, model_name, epochs, sets, margin: float, holdout: float, action: str, arm, every, worker_root, **options) -> None:
    """Retrain from a window of the clicks topic, and promote the challenger if it beats the serving model.

    Reads the window with a consumer of its own (no group), prepares it like `data prepare`, trains
    (warm start from the serving run where the model allows), exports a verified bundle, scores both
    bundles on the held-out sessions that ended last and publishes the challenger only if its HR@20
    is better by --margin. Each round is a JSON line in OUT/rounds.jsonl (docs/experiments.md).

    \b
    Examples:
      streamrec retrain --broker kafka://127.0.0.1:9092 --window 1h --serving bundles/current --out bundles/retrain
      streamrec retrain --broker ... --window 6h --every 1h --serving bundles/current --out bundles/retrain --margin 0.005
      streamrec retrain --broker ... --window 1h --serving bundles/gru --out bundles/retrain --action arm --arm challenger
    """
    import math

    from stream.retrain import RoundOptions, parse_duration, run_round, window_bounds
    from training.cli import _parse_sets

    settings, _ = settings_from(options)
    if not (serving / "manifest.json").is_file():
        raise UserError(f"--serving {serving}: no bundle there (make one with `streamrec export`)")
    if not math.isfinite(margin):
        raise UserError(f"--margin must be a finite number, got {margin}")
    if action == "arm" and not arm:
        raise UserError("--action arm needs --arm NAME (the experiment's arm the challenger goes to)")
    if arm and action != "arm":
        raise UserError("--arm goes with --action arm")
    if action != "none" and not settings.model_updates_topic:
        raise UserError("--model-updates-topic is empty: there is no topic to publish to (or pass --action none)")
    period = parse_duration(every, "--every") if every is not None else None
    window_bounds(window, since, until, every, time.time())  # the flags are checked before anything is read
    from training.trainer import TrainerConfig

    configure_process(threads=TrainerConfig.threads, keep_freed_memory=True)  # each round trains (training.trainer.fit): the trainer's default threads
    opts = RoundOptions(out=out, model=model_name, sets=_parse_sets(sets), epochs=epochs, margin=margin, holdout=holdout, action=action, arm=arm, worker_root=worker_root)
    say = lambda message: click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)  # noqa: E731
    if period is None:
        start, end = window_bounds(window, since, until, every, time.time())
        record = run_round(settings, serving, start, end, opts, _next_round(out), say)
        click.echo(json.dumps({k: record[k] for k in ("round", "decision", "reason")}))
        return
    stop = threading.Event()

    def on_signal(sig, _frame):
        if stop.is_set() and sig == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        say("stopping after this round (Ctrl-C again to abort it)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    champion = serving
    while not stop.is_set():
        due = time.time() + period
        start, end = window_bounds(window, None, None, every, time.time())
        try:
            record = run_round(settings, champion, start, end, opts, _next_round(out), say)
            if record["decision"] == "publish":
                champion = Path(record["challenger"]["bundle"])  # the next round's champion, and the run it warm-starts from
        except UserError as e:  # a quiet window or a failed round is recorded; the schedule goes on
            from stream.retrain import append_record

            say(f"round failed: {e}")
            append_record(out, {"round": _next_round(out), "window": {"since_unix": start, "until_unix": end}, "decision": "error", "reason": str(e)})
        stop.wait(max(0.0, due - time.time()))
    say("stopped")


def _next_round(out: Path) -> int:
    """1 + the rounds recorded in OUT/rounds.jsonl."""
    path = out / "rounds.jsonl"
    return 1 + (sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0)


@click.command()
@click.option("--data", "data_kind", type=click.Choice(["synth", "yoochoose"]), default="synth", show_default=True, help="Synthetic click log, or the YooChoose 100k sample (--yoochoose-dir).")
@click.option("--yoochoose-dir", type=click.Path(file_okay=False, path_type=Path), default=None, envvar="STREAMREC_DEMO_DATA", help="The YooChoose 100k sample for --data yoochoose (default: ../shared/data/yoochoose-rsc15-100k beside the repository).")
@click.option("--rate", type=float, default=2000.0, show_default=True, help="Clicks per second replayed to the worker.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="GRU4Rec training epochs.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Keep data, run, bundle and logs here (default: a temporary directory, removed).")
@click.option("--engine", type=click.Choice(["tansu", "kafka"]), default="tansu", show_default=True, help="tansu: the embedded broker (nothing beyond pip); kafka: Apache Kafka (Java 17, `make kafka`).")
def demo(data_kind: str, yoochoose_dir: Path | None, rate: float, epochs: int, workdir, engine: str) -> None:
    """The whole path on this machine: broker, data, GRU4Rec, bundle, worker, replay, online vs offline accuracy."""
    from stream.demo import DEFAULT_YOOCHOOSE, DemoConfig, run_demo

    if rate <= 0:
        raise UserError("--rate must be positive")
    configure_process(threads=2, keep_freed_memory=True)  # the demo's GRU4Rec trains on 2 threads
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that the broker and worker are stopped
    run_demo(DemoConfig(data=data_kind, rate=rate, epochs=epochs, engine=engine, yoochoose_dir=yoochoose_dir or DEFAULT_YOOCHOOSE), workdir)


@click.group()
def experiment() -> None:
    """A/B experiments served with `streamrec serve --experiment NAME --arms ...` (docs/experiments.md)."""


@experiment.command("report")
@click.option("--experiment", "name", required=True, help="The experiment's name (as given to `streamrec serve --experiment`).")
@click.option("--k", "k", type=click.IntRange(min=1), default=20, show_default=True, help="Cut-off of HR@K and MRR@K.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None, help="A served bundle: clicks on items its vocabulary does not hold are skipped, as offline (give one when the arms share a vocabulary).")
@click.option("--baseline", default=None, help="The arm the others are tested against (default: the arm with the most sessions).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the report as JSON to this file.")
@click.option("--expect", type=click.IntRange(min=1), default=None, help="Wait until this many recommendations are on the topic.")
@click.option("--idle", type=float, default=2.0, show_default=True, help="Stop reading after this many seconds without new records.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and the permutations.")
@settings_options(CONNECTION + TOPICS)
def experiment_report(name: str, k: int, bundle_dir, baseline, json_path, expect, idle: float, seed: int, **options) -> None:
    """Per arm: sessions, evaluated clicks, online HR@K and MRR@K with 95% intervals, and whether the arms differ.

    Reads the clicks and recommendations topics from the start. Intervals: percentile bootstrap over
    sessions; test: two-sided permutation test over sessions, each arm against the baseline.

    \b
    Example:
      streamrec experiment report --broker kafka://127.0.0.1:9092 --experiment gru-vs-pop --json report.json
    """
    import asyncio
    import json

    from stream.experiment import report_from_topics
    from stream.topics import consume_all

    settings, _ = settings_from(options)
    known = None
    if bundle_dir is not None:
        from export.bundle import open_bundle

        known = set(open_bundle(bundle_dir).vocab.item_ids)
    topics = asyncio.run(consume_all(settings, [settings.clicks_topic, settings.recommendations_topic], expect={settings.recommendations_topic: expect} if expect else None, idle=idle))
    report = report_from_topics([(r.key, r.value) for r in topics[settings.clicks_topic]], [r.value for r in topics[settings.recommendations_topic]], name, k, known, baseline=baseline, seed=seed)
    if not report.arms:
        raise UserError(f"no answer on '{settings.recommendations_topic}' names experiment '{name}'")
    click.echo(report.text())
    if json_path is not None:
        json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
