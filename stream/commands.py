"""`streamrec serve`, `broker`, `replay`, `score-online`, `publish-model`, `experiment report` and `demo` (mounted by stream/cli.py)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from stream.settings import settings_from, settings_options
from training.errors import UserError

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
@settings_options(CONNECTION + ("model_updates_topic", "replication_factor"))
def publish_model(bundle_dir: Path, worker_path, **options) -> None:
    """Tell every running worker to serve BUNDLE_DIR: one message on the model-updates topic.

    The bundle is checked here first (manifest and every file's sha256); each worker checks it
    again before swapping it in, and keeps its model if the check fails.

    \b
    Example:
      streamrec publish-model /srv/bundles/gru4rec-20261128 --broker kafka://127.0.0.1:9092
    """
    import asyncio
    import os

    from export.bundle import open_bundle
    from stream.topics import publish_model_update

    settings, _ = settings_from(options)
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir}: no such bundle directory (make one with `streamrec export`)")
    version = str(open_bundle(bundle_dir).manifest["model_version"])
    path = worker_path or os.path.realpath(bundle_dir)
    partition, offset = asyncio.run(publish_model_update(settings, path, version))
    click.echo(f"published {version} ({path}) to '{settings.model_updates_topic}' partition {partition} offset {offset}")


@click.command()
@click.option("--data", "data_kind", type=click.Choice(["synth", "yoochoose"]), default="synth", show_default=True, help="Synthetic click log, or the YooChoose 100k sample from ../shared/data.")
@click.option("--rate", type=float, default=2000.0, show_default=True, help="Clicks per second replayed to the worker.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="GRU4Rec training epochs.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Keep data, run, bundle and logs here (default: a temporary directory, removed).")
@click.option("--engine", type=click.Choice(["tansu", "kafka"]), default="tansu", show_default=True, help="tansu: the embedded broker (nothing beyond pip); kafka: Apache Kafka (Java 17, `make kafka`).")
def demo(data_kind: str, rate: float, epochs: int, workdir, engine: str) -> None:
    """The whole path on this machine: broker, data, GRU4Rec, bundle, worker, replay, online vs offline accuracy."""
    from stream.demo import DemoConfig, run_demo

    if rate <= 0:
        raise UserError("--rate must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that the broker and worker are stopped
    run_demo(DemoConfig(data=data_kind, rate=rate, epochs=epochs, engine=engine), workdir)


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
