"""Bundle format and verification, the CLI's one-line errors, and the scorer helpers (small synthetic data)."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from export.bundle import format_manifest, open_bundle
from export.exporter import export_run
from export.parity import Replay
from export.quantize import top_k_overlap
from export.scorer import StepInput, drop_seen, left_padded, load_scorer
from streamrec.errors import UserError
from training.data import PreparedData, Vocab
from training.models import get_model
from training.models.base import config_from_options
from training.sessions import Sessions

N_ITEMS = 60


def synthetic_sessions(rng: np.random.Generator, n: int, with_device: bool) -> Sessions:
    """Sessions that walk mostly forward through the catalogue (so models learn something), plus a device feature."""
    lengths = rng.integers(2, 9, size=n)
    starts = rng.integers(1, N_ITEMS + 1, size=n)
    steps = rng.choice([1, 1, 1, 2, -3], size=lengths.sum())
    owner = np.repeat(np.arange(n), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    walk = np.cumsum(steps) - np.repeat(np.cumsum(steps)[first] - steps[first], lengths)
    items = (starts[owner] + walk - 1) % N_ITEMS + 1
    sessions = Sessions.from_lists(np.split(items, np.cumsum(lengths)[:-1]))
    if with_device:
        sessions.features = {"device": rng.integers(0, 3, size=sessions.n_events)}
    return sessions


def make_data(path, with_device: bool = False) -> PreparedData:
    rng = np.random.default_rng(0)
    data = PreparedData(Vocab([f"item{i}" for i in range(N_ITEMS)]), synthetic_sessions(rng, 400, with_device), synthetic_sessions(rng, 80, with_device))
    data.save(path)
    return data


def make_run(name: str, data_dir, run_dir, **settings) -> None:
    cls = get_model(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    config = config_from_options(cls.Config, {k: str(v) for k, v in settings.items() if k in fields})
    torch.manual_seed(0)
    model = cls.train(PreparedData.load(data_dir), config, progress=False)
    model.save(run_dir)
    (run_dir / "vocab.json").write_text((data_dir / "vocab.json").read_text())
    doc = json.loads((run_dir / "config.json").read_text())
    doc["data"] = {"path": str(data_dir)}
    (run_dir / "config.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def markov_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_data(root / "data")
    make_run("markov", root / "data", root / "run")
    return root / "run"


@pytest.fixture()
def bundle_dir(markov_run, tmp_path):
    out = tmp_path / "bundle"
    export_run(markov_run, out, parity_sessions=40, log=lambda line: None)
    return out


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real `streamrec` entry point, in-process: (exit code, stdout, stderr)."""
    from stream.cli import main

    monkeypatch.setattr(sys, "argv", ["streamrec", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_bundle_layout_and_manifest(bundle_dir):
    names = {p.name for p in bundle_dir.iterdir()}
    assert names == {"manifest.json", "vocab.json", "popularity.npy", "model.npz"}
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["model"] == "markov" and m["state_kind"] == "items"
    assert m["n_items"] == N_ITEMS and m["k"] == 20 and m["hidden_size"] == 0
    assert set(m["files"]) == names - {"manifest.json"}
    assert m["model_version"].startswith("markov-") and m["parity"]["max_score_diff"] == 0
    assert set(m["versions"]) == {"streamrec", "torch", "onnx", "onnxruntime", "numpy"}
    assert "schema_version: 1" in format_manifest(m)


def test_model_version_is_unique_per_export(markov_run, tmp_path):
    a = export_run(markov_run, tmp_path / "a", parity_sessions=10, log=lambda line: None)
    b = export_run(markov_run, tmp_path / "b", parity_sessions=10, log=lambda line: None)
    assert a["model_version"] != b["model_version"]
    assert a["files"]["model.npz"] == b["files"]["model.npz"]


def test_existing_bundle_needs_force(markov_run, bundle_dir):
    with pytest.raises(UserError, match="already exists"):
        export_run(markov_run, bundle_dir, log=lambda line: None)
    export_run(markov_run, bundle_dir, parity_sessions=10, force=True, log=lambda line: None)
    open_bundle(bundle_dir)


def test_corrupted_file_is_refused(bundle_dir):
    path = bundle_dir / "model.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.npz is corrupted \(sha256 does not match the manifest\)"):
        load_scorer(bundle_dir)


def test_wrong_schema_version_is_refused(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    m["schema_version"] = 2
    (bundle_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="schema_version 2 is not supported"):
        load_scorer(bundle_dir)


def test_missing_vocabulary_is_refused(bundle_dir):
    (bundle_dir / "vocab.json").unlink()
    with pytest.raises(UserError, match="vocab.json missing"):
        load_scorer(bundle_dir)


@pytest.mark.parametrize("damage", ["corrupt", "version", "vocab"])
def test_cli_reports_bad_bundles_in_one_line_with_exit_2(bundle_dir, damage, monkeypatch, capsys):
    if damage == "corrupt":
        (bundle_dir / "popularity.npy").write_bytes(b"not numpy")
    elif damage == "version":
        m = json.loads((bundle_dir / "manifest.json").read_text())
        m["schema_version"] = "0.9"
        (bundle_dir / "manifest.json").write_text(json.dumps(m))
    else:
        (bundle_dir / "vocab.json").unlink()
    code, out, err = run_cli(monkeypatch, capsys, "bundle", "inspect", str(bundle_dir))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and str(bundle_dir) in err


def test_cli_inspect_prints_the_manifest(bundle_dir, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "bundle", "inspect", str(bundle_dir))
    assert code == 0 and "checksums ok" in out and "state_kind: items" in out and "model_version: markov-" in out


def test_cli_export_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert code == 2 and "Traceback" not in err and "config.json missing" in err
    assert not (tmp_path / "b").exists()


def test_run_without_recorded_data_needs_data_flag(markov_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.npz", "vocab.json"):
        (run / name).write_bytes((markov_run / name).read_bytes())
    doc = json.loads((markov_run / "config.json").read_text())
    doc.pop("data")
    (run / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="pass --data"):
        export_run(run, tmp_path / "b", log=lambda line: None)
    export_run(run, tmp_path / "b", data_dir=markov_run.parent / "data", parity_sessions=10, log=lambda line: None)


def test_items_scorer_answers_popular_and_excludes_seen(bundle_dir):
    scorer = load_scorer(bundle_dir)
    pop = np.load(bundle_dir / "popularity.npy")
    items, scores = scorer.popular()
    assert len(items) == scorer.k and 0 not in items
    np.testing.assert_array_equal(scores, pop[items].astype(np.float32))
    assert scores[0] == pop[1:].max() and (np.diff(scores) <= 0).all()
    history = [np.array([5, 6, 7]), np.array([40])]
    plain = scorer.step(StepInput(items=np.array([7, 40]), history=history))
    excluding = scorer.step(StepInput(items=np.array([7, 40]), history=history), exclude_seen=True)
    assert np.isin(8, plain.top_items[0]) and not np.isin(history[0], excluding.top_items[0]).any()
    assert not np.isin(history[1], excluding.top_items[1]).any()
    assert (excluding.top_items > 0).all() and excluding.top_items.shape == (2, scorer.k)


def test_window_model_with_event_features_exports_and_scores(tmp_path):
    make_data(tmp_path / "data", with_device=True)
    make_run("bst", tmp_path / "data", tmp_path / "run", epochs=1, threads=1, history_len=6, embedding_size=16, heads=2, mlp="[32]", batch_size=64)
    manifest = export_run(tmp_path / "run", tmp_path / "bundle", parity_sessions=40, log=lambda line: None)
    assert manifest["features"] == {"device": 3} and manifest["parity"]["positions"] > 100
    scorer = load_scorer(tmp_path / "bundle")
    history = [np.array([3, 4, 5]), np.array([9])]
    batch = StepInput(items=np.array([5, 9]), history=history, features={"device": [np.array([0, 1, 2]), np.array([1])]})
    assert scorer.step(batch).top_items.shape == (2, scorer.k)
    with pytest.raises(ValueError, match="needs StepInput.features"):
        scorer.step(StepInput(items=np.array([5, 9]), history=history))


def test_left_padded_keeps_the_last_items_right_aligned():
    window = left_padded([np.array([1, 2, 3, 4]), np.array([7]), np.array([], dtype=np.int64)], 3)
    np.testing.assert_array_equal(window, [[2, 3, 4], [0, 0, 7], [0, 0, 0]])


def test_drop_seen_keeps_rank_order():
    items = np.array([[5, 3, 9, 1, 2], [4, 6, 8, 10, 11]])
    scores = -np.arange(10, dtype=np.float32).reshape(2, 5)
    top, top_scores = drop_seen(items, scores, [np.array([3, 1]), np.array([99])], history_len=2, k=3)
    np.testing.assert_array_equal(top, [[5, 9, 2], [4, 6, 8]])
    np.testing.assert_array_equal(top_scores, [[0, -2, -4], [-5, -6, -7]])


def test_top_k_overlap():
    a = Replay(np.array([0, 1]), np.array([[1, 2], [3, 4]]), np.zeros((2, 2), np.float32), 0.0, 1)
    b = Replay(np.array([0, 1]), np.array([[2, 5], [4, 3]]), np.zeros((2, 2), np.float32), 0.0, 1)
    assert top_k_overlap(a, b) == 0.75
