"""Every available model exports, loads through the one Scorer interface and ranks like the trained model.

Runs on real YooChoose prefixes (``shared_data``). Models are trained for one
short epoch on a slice of the training sessions with small sizes: parity is
about the export, not about quality, but trained weights give realistic scores.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from export.exporter import export_run
from export.parity import replay, sample_sessions
from export.scorer import StepInput, load_scorer
from streamrec.errors import UserError
from training.models import available_models, get_model, load_run
from training.models.base import config_from_options

# Small, fast settings; only those a model's Config has are applied.
SMALL = {
    "epochs": "1",
    "threads": "1",
    "patience": "0",
    "batch_size": "64",
    "layers": "[32]",
    "n_sample": "64",
    "hidden_size": "32",
    "embedding_size": "32",
    "mlp": "[64]",
    "history_len": "8",
    "blocks": "1",
    "heads": "2",
}
TRAIN_SESSIONS = 1500
PARITY_SESSIONS = 60


@pytest.fixture(scope="module")
def yoochoose(shared_data, tmp_path_factory):
    """The session-rec YooChoose 100k files as a prepared dataset, train cut to a slice for speed."""
    from training.protocols import given
    from training.readers import read_yoochoose

    folder = shared_data / "yoochoose-rsc15-100k"
    data = given(read_yoochoose(folder / "yoochoose-clicks-100k_train_full.txt"), read_yoochoose(folder / "yoochoose-clicks-100k_test.txt"), valid_days=0)
    keep = np.zeros(len(data.train), dtype=bool)
    keep[-TRAIN_SESSIONS:] = True
    data.train = data.train.select(keep)
    data.valid = None
    out = tmp_path_factory.mktemp("yoochoose")
    data.save(out)
    return out


def train_small(name: str, data_dir, run_dir, **settings: str):
    """Train ``name`` briefly (``settings`` on top of the small ones) and write a run directory like `streamrec train` does."""
    from training.data import PreparedData

    torch.manual_seed(0)
    cls = get_model(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    config = config_from_options(cls.Config, {**{k: v for k, v in SMALL.items() if k in fields}, **settings})
    data = PreparedData.load(data_dir)
    model = cls.train(data, config, progress=False)
    model.save(run_dir)
    (run_dir / "vocab.json").write_text((data_dir / "vocab.json").read_text())
    doc = json.loads((run_dir / "config.json").read_text())
    doc["data"] = {"path": str(data_dir), "stats": data.stats}
    (run_dir / "config.json").write_text(json.dumps(doc))
    return model


@pytest.fixture(scope="module")
def exported(yoochoose, tmp_path_factory):
    """name -> (run_dir, bundle_dir), built lazily once per model."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("export")

    def get(name: str):
        if name not in cache:
            run_dir, bundle_dir = root / f"run-{name}", root / f"bundle-{name}"
            train_small(name, yoochoose, run_dir)
            export_run(run_dir, bundle_dir, parity_sessions=PARITY_SESSIONS, log=lambda line: None)
            cache[name] = (run_dir, bundle_dir)
        return cache[name]

    return get


@pytest.mark.shared_data
def test_bert4rec_in_klenitskiy_and_vasilev_configuration_exports_with_parity(yoochoose, tmp_path):
    """Their block, output layer, softmax and input layer change the network: the bundle still scores like it."""
    settings = {"init": "normal", "block": "postnorm", "head": "tied", "softmax": "vocab", "embeddings": "bert"}
    train_small("bert4rec", yoochoose, tmp_path / "run", **settings)
    export_run(tmp_path / "run", tmp_path / "bundle", parity_sessions=PARITY_SESSIONS, log=lambda line: None)
    manifest = load_scorer(tmp_path / "bundle").manifest
    assert manifest["parity"]["max_score_diff"] <= 1e-4 and manifest["parity"]["positions"] > 100
    assert load_run(tmp_path / "run").config.embeddings == "bert"


@pytest.mark.shared_data
@pytest.mark.parametrize("name", available_models())
def test_every_model_exports_and_matches_the_trained_model(name, exported, yoochoose):
    from training.data import PreparedData

    run_dir, bundle_dir = exported(name)
    scorer = load_scorer(bundle_dir)
    model = load_run(run_dir)
    assert scorer.kind == model.state_kind
    assert scorer.manifest["parity"]["max_score_diff"] <= 1e-4
    assert scorer.manifest["parity"]["positions"] > 100
    # served answers on other real prefixes than the export checked, compared with the model itself
    data = PreparedData.load(yoochoose)
    sessions = sample_sessions(data.test, 20, seed=7)
    served = replay(scorer, sessions)
    assert (served.top_items > 0).all()
    reference = {int(p): row for positions, scores in model.score_next(sessions) for p, row in zip(positions, scores)}
    checked = 0
    for p, items, got in zip(served.positions, served.top_items, served.top_scores):
        if int(p) not in reference:
            continue  # last click of a session: no next item to score against
        row = np.asarray(reference[int(p)], dtype=np.float32).copy()
        row[0] = -np.inf
        np.testing.assert_allclose(got, -np.sort(-row)[: scorer.k], atol=1e-4)
        np.testing.assert_allclose(row[items], got, atol=1e-4)
        checked += 1
    assert checked > 20


@pytest.mark.shared_data
def test_hidden_step_over_a_session_equals_the_torch_model_over_the_prefix(exported, yoochoose):
    from training.data import PreparedData

    run_dir, bundle_dir = exported("gru4rec")
    scorer = load_scorer(bundle_dir)
    net = load_run(run_dir).net
    test = PreparedData.load(yoochoose).test
    s = int(np.argmax(test.lengths))
    session = test.session(s)
    hidden = np.zeros((1, scorer.hidden_size), dtype=np.float32)
    for t, item in enumerate(session):
        out = scorer.step(StepInput(items=np.array([item]), hidden=hidden, history=[session[: t + 1]]))
        hidden = out.hidden
    with torch.no_grad():
        h = net.init_hidden(1)
        for item in session:  # the whole prefix again, from scratch, in torch
            h, last = net.step(torch.tensor([int(item)]), h)
        scores = net.score_all(last).numpy()[0]
    np.testing.assert_allclose(hidden[0], torch.cat(h, 1).numpy()[0], atol=1e-5)
    scores[0] = -np.inf
    np.testing.assert_allclose(out.top_scores[0], -np.sort(-scores)[: scorer.k], atol=1e-4)
    np.testing.assert_allclose(scores[out.top_items[0]], out.top_scores[0], atol=1e-4)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "markov"])
def test_exclude_seen_drops_history_and_keeps_the_ranking(name, exported, yoochoose):
    from training.data import PreparedData

    if name not in available_models():
        pytest.skip(f"{name} not in this build")
    run_dir, bundle_dir = exported(name)
    scorer = load_scorer(bundle_dir)
    model = load_run(run_dir)
    sessions = sample_sessions(PreparedData.load(yoochoose).test, 30, seed=3)
    plain, excluding = replay(scorer, sessions), replay(scorer, sessions, exclude_seen=True)
    np.testing.assert_array_equal(plain.positions, excluding.positions)
    assert excluding.top_items.shape[1] == scorer.k
    reference = {int(p): row for positions, scores in model.score_next(sessions) for p, row in zip(positions, scores)}
    plain_had_seen = 0
    for p, before, items, got in zip(excluding.positions, plain.top_items, excluding.top_items, excluding.top_scores):
        start = sessions.offsets[np.searchsorted(sessions.offsets, p, side="right") - 1]
        seen = sessions.items[start : p + 1][-scorer.history_len :]
        plain_had_seen += bool(np.isin(before, seen).any())
        assert not np.isin(items, seen).any()
        if int(p) in reference:
            row = np.asarray(reference[int(p)], dtype=np.float32).copy()
            row[0] = -np.inf
            row[seen] = -np.inf
            np.testing.assert_allclose(got, -np.sort(-row)[: scorer.k], atol=1e-4)
    assert plain_had_seen > 0  # without exclusion some answers repeated the session's items: exclusion was exercised


@pytest.mark.shared_data
def test_int8_export_reports_overlap_and_speed(exported, tmp_path):
    run_dir, _ = exported("gru4rec")
    manifest = export_run(run_dir, tmp_path / "int8", int8=True, min_overlap=0.5, parity_sessions=30, log=lambda line: None)
    assert manifest["precision"] == "int8"
    report = manifest["int8"]
    assert 0.5 <= report["top_k_overlap"] <= 1.0 and report["speedup"] > 0
    scorer = load_scorer(tmp_path / "int8")
    out = scorer.step(StepInput(items=np.array([1, 2]), history=[np.array([1]), np.array([2])]))
    assert out.top_items.shape == (2, scorer.k) and (out.top_items > 0).all()


@pytest.mark.shared_data
def test_failed_parity_writes_nothing(exported, tmp_path, monkeypatch):
    run_dir, _ = exported("gru4rec")
    from training.models.gru4rec import GRU4Rec

    real = GRU4Rec.export_module

    def perturbed(self):
        module = copy.deepcopy(real(self))  # the step module shares the model's net
        with torch.no_grad():
            module.net.item_bias.add_(torch.randn_like(module.net.item_bias))
        return module

    monkeypatch.setattr(GRU4Rec, "export_module", perturbed)
    with pytest.raises(UserError, match="parity check failed"):
        export_run(run_dir, tmp_path / "bad", parity_sessions=30, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []
