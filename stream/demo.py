"""`streamrec demo`: the whole path on one machine, each step a plain function.

broker (the embedded one by default, Apache Kafka with engine="kafka") -> click log (synthetic, or the YooChoose sample) -> GRU4Rec (a short run)
-> verified bundle -> stream worker (child process) -> test sessions replayed as clicks
-> recommendations read back -> throughput, latency and online accuracy beside the offline figures.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream.broker import EmbeddedBroker, free_port
from stream.settings import Settings
from streamrec.errors import UserError
from training.data import PreparedData

# Where `--data yoochoose` reads the YooChoose 100k sample unless --yoochoose-dir / STREAMREC_DEMO_DATA says otherwise:
# the shared data folder beside the repository (the sample is not part of it).
DEFAULT_YOOCHOOSE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "yoochoose-rsc15-100k"
KS = (5, 10, 20)


@dataclass
class DemoConfig:
    data: str = "synth"  # or "yoochoose"
    items: int = 1000  # synthetic log size
    sessions: int = 6000
    epochs: int = 3
    hidden: int = 64
    batch_size: int = 64
    rate: float = 2000.0  # clicks per second offered to the worker
    seed: int = 0
    engine: str = "tansu"  # the embedded broker: nothing to install beyond pip; "kafka": Apache Kafka (Java)
    yoochoose_dir: Path = DEFAULT_YOOCHOOSE  # the YooChoose 100k sample, for data="yoochoose"


def say(message: str) -> None:
    import click

    click.echo(message, err=True)


def prepare_data(config: DemoConfig, out: Path) -> PreparedData:
    """The click log as a prepared dataset in ``out``."""
    if config.data == "synth":
        from training.synth import synthesize

        data = synthesize(config.items, config.sessions, config.seed, test_fraction=0.2)
    elif config.data == "yoochoose":
        from training.protocols import given
        from training.readers import read_yoochoose

        folder = Path(config.yoochoose_dir)
        if not folder.is_dir():
            raise UserError(f"the YooChoose sample is not at {folder} (it is not part of the repository); point --yoochoose-dir (STREAMREC_DEMO_DATA) at it, or run the demo without --data")
        train = read_yoochoose(folder / "yoochoose-clicks-100k_train_full.txt")
        test = read_yoochoose(folder / "yoochoose-clicks-100k_test.txt")
        data = given(train, test, valid_days=1.0)
    else:
        raise UserError(f"--data must be synth or yoochoose, got '{config.data}'")
    data.save(out)
    return PreparedData.load(out)


def train_model(data: PreparedData, config: DemoConfig, run_dir: Path):
    """A short GRU4Rec run, saved like `streamrec train` saves it."""
    from training.models import get_model

    cls = get_model("gru4rec")
    model = cls.train(data, cls.Config(layers=(config.hidden,), epochs=config.epochs, batch_size=config.batch_size, n_sample=256, seed=config.seed), progress=True, run_dir=run_dir)
    model.save(run_dir)
    shutil.copyfile(data.path / "vocab.json", run_dir / "vocab.json")
    return model


def offline_metrics(model, data: PreparedData) -> dict:
    from training.evaluate import evaluate

    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    return evaluate(model, data.test, ks=KS, popularity=popularity, progress=True)


def export_bundle(run_dir: Path, data: PreparedData, bundle_dir: Path) -> dict:
    from export.exporter import export_run

    return export_run(run_dir, bundle_dir, data_dir=data.path, log=say)


def stream_test_sessions(settings: Settings, bundle_dir: Path, data: PreparedData, rate: float, log_path: Path) -> dict:
    """Start a worker, replay the test split at ``rate`` clicks/s, read every answer back and score it."""
    from stream.process import start_worker, stop_worker, wait_until_serving
    from stream.replay import read_and_score, replay, replay_events

    events = replay_events(data, "test")
    worker = start_worker(settings, bundle_dir, log_path)
    try:
        wait_until_serving(settings, worker)
        started = time.time()
        sent = asyncio.run(replay(settings, events, rate=rate))
        say(f"reading {len(events):,} recommendations back ...")
        online = asyncio.run(read_and_score(settings, KS, set(data.vocab.item_ids), expect_answers=len(events) + 1, timeout=180))  # + the probe
        if worker.poll() is not None:
            raise UserError(f"the stream worker exited (status {worker.returncode}); see {log_path}")
    finally:
        stop_worker(worker)
    latencies = np.array(online.latencies_ms)
    return {
        "online": online.metrics(),
        "events": len(events),
        "offered_rate": sent["events_per_second"],
        "latency_p50_ms": float(np.percentile(latencies, 50)),
        "latency_p99_ms": float(np.percentile(latencies, 99)),
        "wall_seconds": time.time() - started,
    }


def report(result: dict, offline: dict) -> str:
    online = result["online"]
    lines = [
        "",
        f"stream: {result['events']:,} clicks at {result['offered_rate']:,.0f} events/s, all answered: {online['unanswered'] == 0}",
        f"end-to-end latency (click record -> recommendation published): p50 {result['latency_p50_ms']:.1f} ms, p99 {result['latency_p99_ms']:.1f} ms",
        "",
        f"{'':8}{'online':>10}{'offline':>10}",
    ]
    for k in KS:
        for name in (f"HR@{k}", f"MRR@{k}"):
            lines.append(f"{name:8}{online[name]:>10.4f}{offline[name]:>10.4f}")
    lines.append(f"evaluated clicks: online {online['n_events']:,}, offline {offline['n_events']:,}")
    return "\n".join(lines)


def run_demo(config: DemoConfig, workdir: Path | None = None) -> tuple[dict, dict]:
    """Every step in order; everything started is stopped, the temporary work directory removed."""
    keep = workdir is not None
    workdir = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="streamrec-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if config.engine == "kafka":
            from stream.kafka import KafkaCluster

            say("[1/6] starting Apache Kafka")
            broker = KafkaCluster(data_dir=workdir / "kafka")
        else:
            say("[1/6] starting the embedded broker")
            broker = EmbeddedBroker(log_path=workdir / "broker.log")
        with broker:
            settings = Settings(broker=broker.url, broker_quirks=broker.quirks, metrics_port=free_port(), group_session_timeout=2.0)
            say(f"      {broker.url}; worker metrics on http://127.0.0.1:{settings.metrics_port}/metrics")
            say(f"[2/6] preparing the {config.data} click log")
            data = prepare_data(config, workdir / "data")
            say(f"      {data.n_items:,} items, {len(data.train):,} train / {len(data.test):,} test sessions")
            say(f"[3/6] training GRU4Rec ({config.epochs} epochs, {config.hidden} units)")
            model = train_model(data, config, workdir / "run")
            offline = offline_metrics(model, data)
            say("[4/6] exporting the bundle (ONNX, parity-checked)")
            export_bundle(workdir / "run", data, workdir / "bundle")
            say(f"[5/6] streaming {data.test.n_events:,} test clicks through the worker at {config.rate:,.0f} events/s")
            result = stream_test_sessions(settings, workdir / "bundle", data, config.rate, workdir / "worker.log")
            say("[6/6] done")
        say(report(result, offline))
        return result, offline
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
