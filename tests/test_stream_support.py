"""Fixtures and helpers shared by the stream tests: a small synthetic dataset, real trained
bundles (markov arrays, a tiny GRU4Rec in ONNX), a worker process and topic readers.

Nothing here is mocked: the models are trained and exported by the project's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream.settings import Settings
from stream.topics import consume_all, producer
from training.data import PreparedData


@pytest.fixture(scope="session")
def stream_data(tmp_path_factory) -> PreparedData:
    from training.synth import synthesize

    out = tmp_path_factory.mktemp("stream-data")
    data = synthesize(n_items=300, n_sessions=1500, seed=3, test_fraction=0.2)
    data.save(out)
    return PreparedData.load(out)


def _train_and_export(data: PreparedData, name: str, out: Path, **config) -> tuple[Path, Path]:
    import shutil

    from export.exporter import export_run
    from training.models import get_model

    cls = get_model(name)
    run_dir, bundle_dir = out / f"run-{name}", out / f"bundle-{name}"
    model = cls.train(data, cls.Config(**config), progress=False, run_dir=run_dir)
    model.save(run_dir)
    shutil.copyfile(data.path / "vocab.json", run_dir / "vocab.json")
    export_run(run_dir, bundle_dir, data_dir=data.path, parity_sessions=50, log=lambda _: None)
    return run_dir, bundle_dir


@pytest.fixture(scope="session")
def markov_bundle(stream_data, tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, bundle dir) of a trained first-order Markov chain."""
    return _train_and_export(stream_data, "markov", tmp_path_factory.mktemp("markov"))


@pytest.fixture(scope="session")
def gru_bundle(stream_data, tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, bundle dir) of a tiny GRU4Rec (32 units, 2 epochs), exported to ONNX."""
    import torch

    torch.set_num_threads(1)
    return _train_and_export(stream_data, "gru4rec", tmp_path_factory.mktemp("gru"), layers=(32,), epochs=2, n_sample=128, batch_size=32, threads=1)


def worker_settings(broker, **changes) -> Settings:
    """Worker settings for a test's broker (conftest.BrokerSpace): its address, quirks and names, a short
    group timeout, a free metrics port."""
    from stream.broker import free_port

    base = dict(**broker.settings(), group_session_timeout=2.0, metrics_port=free_port(), partitions=3)
    base.update(changes)
    return Settings(**base)



@contextlib.contextmanager
def running_worker(settings: Settings, bundle: Path, log_path: Path):
    from stream.process import start_worker, stop_worker

    process = start_worker(settings, bundle, log_path)
    try:
        yield process
    finally:
        status = stop_worker(process)
        assert status == 0, f"worker exited with status {status}:\n{log_path.read_text()[-3000:]}"


def send(settings: Settings, messages: list[tuple[bytes | None, bytes]]) -> None:
    """Produce (key, value) messages to the clicks topic, in order."""

    async def run():
        from stream.topics import ensure_topics

        await ensure_topics(settings)
        p = producer(settings)
        await p.start()
        try:
            for key, value in messages:
                await p.send(settings.clicks_topic, value, key=key)
            await p.flush()
        finally:
            await p.stop()

    asyncio.run(run())


def read(settings: Settings, expect: dict[str, int], timeout: float = 60.0) -> dict[str, list]:
    return asyncio.run(consume_all(settings, list(expect), expect=expect, timeout=timeout))


def metrics_text(settings: Settings) -> str:
    with urllib.request.urlopen(f"http://{settings.metrics_host}:{settings.metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    """Value of one sample line ``name`` (with labels, exactly as exposed) in a /metrics text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def offline_rows(model, sessions, popularity: np.ndarray) -> dict[int, np.ndarray]:
    """Flat event index -> the offline model's score row for the next item (popularity after an unknown item)."""
    rows = {}
    for positions, scores in model.score_next(sessions):
        scores = np.asarray(scores, dtype=np.float32)
        for p, row in zip(positions, scores):
            row = popularity.astype(np.float32) if sessions.items[p] == 0 else row.copy()
            row[0] = -np.inf
            rows[int(p)] = row
    return rows


def assert_answer_matches(doc: dict, row: np.ndarray, vocab, k: int) -> None:
    """The published list is a best-k list of the offline row (ties may come in any order)."""
    items = vocab.encode(doc["items"])
    scores = np.asarray(doc["scores"], dtype=np.float32)
    assert len(items) == k and (items > 0).all()
    np.testing.assert_allclose(row[items], scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(-np.sort(-row)[:k], scores, rtol=1e-4, atol=1e-5)


def answers_by_position(records) -> dict[tuple[str, int], dict]:
    out = {}
    for r in records:
        doc = orjson.loads(r.value)
        out.setdefault((doc["session_id"], doc["position"]), doc)
    return out
