"""`streamrec export --retrieval ann`: a faiss index proposes candidates, the scorer re-scores them exactly.

Small synthetic catalogue (training/synth.py, 400 items), models trained one short epoch. The
candidate count is set to its least (K + history_len) so the index really chooses: with the
default 200 candidates half of this catalogue would come back on every search.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from export.bundle import open_bundle
from export.exporter import export_run
from export.parity import replay, sample_sessions
from export.quantize import top_k_overlap
from export.scorer import StepInput, load_scorer
from stream.migration import model_tag
from stream.topics import consume_all
from streamrec.errors import UserError
from tests.streamkit import assert_same_answer, click_stream, offline_answers
from tests.test_bundle import make_run, run_cli
from tests.test_hot_swap import assert_swapped_mid_stream, positions, switch, version_of
from tests.test_stream_support import gru_bundle, metric, metrics_text, running_worker, send, stream_data, wait_for, worker_settings  # noqa: F401
from training.data import PreparedData
from training.models import get_model, load_run
from training.models.base import config_from_options

K = 20
ANN_MODELS = ["gru4rec", "sasrec", "bert4rec", "caser", "bst", "srgnn"]
SMALL = {"epochs": "1", "threads": "1", "patience": "0", "batch_size": "64", "layers": "[32]", "n_sample": "64", "hidden_size": "32", "embedding_size": "32", "mlp": "[64]", "history_len": "8", "blocks": "1", "heads": "2"}
QUIET = dict(parity_sessions=60, log=lambda line: None)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from training.synth import synthesize

    out = tmp_path_factory.mktemp("ann-data")
    synthesize(n_items=400, n_sessions=1500, seed=5, test_fraction=0.2).save(out)
    return out


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    """name -> run directory of a briefly trained model, built once."""
    cache: dict[str, object] = {}
    root = tmp_path_factory.mktemp("ann-runs")

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            cls = get_model(name)
            fields = {f.name for f in dataclasses.fields(cls.Config)}
            model = cls.train(PreparedData.load(synth_data), config_from_options(cls.Config, {k: v for k, v in SMALL.items() if k in fields}), progress=False)
            run_dir = root / f"run-{name}"
            model.save(run_dir)
            shutil.copyfile(synth_data / "vocab.json", run_dir / "vocab.json")
            doc = json.loads((run_dir / "config.json").read_text())
            doc["data"] = {"path": str(synth_data)}
            (run_dir / "config.json").write_text(json.dumps(doc))
            cache[name] = run_dir
        return cache[name]

    return get


def least_candidates(run_dir) -> int:
    model = load_run(run_dir)
    return K + (int(model.history_len) if model.state_kind in ("window", "graph") else 50)


@pytest.mark.parametrize("name", ANN_MODELS)
def test_an_ann_bundle_round_trips_and_answers_like_the_exact_one(name, trained, synth_data, tmp_path, monkeypatch, capsys):
    run_dir = trained(name)
    candidates = least_candidates(run_dir) + K  # the default index ranks by 4-bit codes: a margin of K over the least (200 by default)
    exact = export_run(run_dir, tmp_path / "exact", **QUIET)
    ann = export_run(run_dir, tmp_path / "ann", retrieval="ann", candidates=candidates, **QUIET)

    assert exact["retrieval"] == {"mode": "exact"}
    r = ann["retrieval"]
    assert r["mode"] == "ann" and r["library"] == "faiss-cpu" and r["index"] == "ivfpq" and r["nprobe"] == 128 and r["metric"] == "inner_product"
    assert r["depth"] == {"knob": "nprobe", "auto": True, "candidates_auto": False, "tried": [{"nprobe": 128, "candidates": candidates, "recall": r["recall"]["recall"]}]}  # 128 >= nlist here: every list
    assert r["factory"] == f"RR{r['pq_m']},IVF{r['nlist']},PQ{r['pq_m']}x4fs" and r["pq_m"] % 4 == 0 and r["pq_m"] - 4 < r["dim"] <= r["pq_m"]
    assert r["candidates"] == candidates and r["dim"] > 1 and r["build_seconds"] >= 0
    assert r["recall"]["k"] == K and r["recall"]["recall"] >= r["recall"]["min_recall"] == 0.99
    assert {"index.faiss", "item_vectors.npy"} <= set(ann["files"])  # inside the checksums
    assert ann["parity"]["max_score_diff"] <= 1e-4
    if ann["model_file"] == "model.onnx":  # the catalogue product is no longer in the graph
        assert ann["onnx"]["size_bytes"] < exact["onnx"]["size_bytes"]

    code, out, err = run_cli(monkeypatch, capsys, "bundle", "verify", str(tmp_path / "ann"))
    assert code == 0 and out.strip().endswith(f"version {ann['model_version']})") and "ann ivfpq retrieval" in out, err
    code, out, _ = run_cli(monkeypatch, capsys, "bundle", "inspect", str(tmp_path / "ann"))
    assert code == 0 and "checksums ok" in out and "mode: ann" in out and "index.faiss" in out

    sessions = sample_sessions(PreparedData.load(synth_data).test, 80, seed=2)
    exact_scorer, ann_scorer = load_scorer(tmp_path / "exact"), load_scorer(tmp_path / "ann")
    assert exact_scorer.ann is None and ann_scorer.ann is not None and ann_scorer.kind == exact_scorer.kind
    want, got = replay(exact_scorer, sessions, batch_size=7), replay(ann_scorer, sessions, batch_size=7)
    np.testing.assert_array_equal(want.positions, got.positions)
    assert top_k_overlap(want, got) >= 0.99
    same = (np.sort(want.top_items, 1) == np.sort(got.top_items, 1)).all(1)
    assert same.mean() >= 0.9
    np.testing.assert_allclose(got.top_scores[same], want.top_scores[same], atol=1e-4)  # re-scored exactly
    assert (got.top_items > 0).all() and (np.diff(got.top_scores, axis=1) <= 0).all()

    index = tmp_path / "ann" / "index.faiss"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"index\.faiss is corrupted \(sha256 does not match the manifest\)"):
        load_scorer(tmp_path / "ann")


def test_an_ivf_flat_index_round_trips_too(trained, synth_data, tmp_path, monkeypatch, capsys):
    run_dir = trained("gru4rec")
    manifest = export_run(run_dir, tmp_path / "ann", retrieval="ann", candidates=least_candidates(run_dir), ann_index="ivf", **QUIET)
    r = manifest["retrieval"]
    assert r["index"] == "ivf" and r["nprobe"] == 64 and "factory" not in r and r["recall"]["recall"] >= 0.99
    code, out, err = run_cli(monkeypatch, capsys, "bundle", "verify", str(tmp_path / "ann"))
    assert code == 0 and "ann ivf retrieval" in out, err
    scorer = load_scorer(tmp_path / "ann")
    assert type(scorer.ann.index).__name__ == "IndexIVFFlat" and scorer.ann.index.nprobe == 64


@pytest.mark.parametrize("name", ["gru4rec", "bst"])
def test_an_hnsw_index_round_trips_too(name, trained, synth_data, tmp_path, monkeypatch, capsys):
    run_dir = trained(name)
    manifest = export_run(run_dir, tmp_path / "ann", retrieval="ann", candidates=least_candidates(run_dir), ann_index="hnsw", ann_ef_search=128, **QUIET)
    r = manifest["retrieval"]
    assert r["index"] == "hnsw" and (r["hnsw_m"], r["ef_construction"], r["ef_search"]) == (32, 100, 128) and "nprobe" not in r
    assert r["recall"]["recall"] >= 0.99 and manifest["parity"]["max_score_diff"] <= 1e-4
    code, out, err = run_cli(monkeypatch, capsys, "bundle", "verify", str(tmp_path / "ann"))
    assert code == 0 and "ann hnsw retrieval" in out, err
    scorer = load_scorer(tmp_path / "ann")
    assert scorer.ann.index.hnsw.efSearch == 128
    got = replay(scorer, sample_sessions(PreparedData.load(synth_data).test, 30, seed=4), exclude_seen=True)
    assert (got.top_items > 0).all() and (np.diff(got.top_scores, axis=1) <= 0).all()


def test_the_recall_check_refuses_an_index_that_misses_the_exact_top_k(trained, tmp_path, monkeypatch, capsys):
    """An IVF index of 64 lists searched in one list sees a sixtieth of the catalogue: its recall is far under 0.99."""
    run_dir = trained("gru4rec")
    with pytest.raises(UserError, match=r"ann index recall@20 is .* under --min-recall 99\.00% \(faiss ivf \(nlist=64, nprobe=1\), 70 candidates\).*nothing written") as refused:
        export_run(run_dir, tmp_path / "bad", retrieval="ann", candidates=70, ann_index="ivf", ann_nlist=64, ann_nprobe=1, **QUIET)
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_cli(monkeypatch, capsys, "export", "--run", str(run_dir), "--out", str(tmp_path / "bad"), "--retrieval", "ann", "--candidates", "70", "--ann-index", "ivf", "--ann-nlist", "64", "--ann-nprobe", "1", "--parity-sessions", "40")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and errors == [err.strip().splitlines()[-1]] and errors[0].startswith("error: ann index recall@20 is ") and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match=r"ann index recall@20 is .* \(faiss ivfpq \(nlist=64, nprobe=1, PQ \d+x4 fast scan\), 70 candidates\).*nothing written"):
        export_run(run_dir, tmp_path / "bad", retrieval="ann", candidates=70, ann_nlist=64, ann_nprobe=1, **QUIET)
    assert list(tmp_path.iterdir()) == []
    # accepted when asked to (--min-recall 0): the slots the index leaves empty hold popular items, each once, never item 0
    export_run(run_dir, tmp_path / "poor", retrieval="ann", candidates=70, ann_index="ivf", ann_nlist=64, ann_nprobe=1, min_recall=0.0, **QUIET)
    scorer = load_scorer(tmp_path / "poor")
    out = scorer.step(StepInput(items=np.arange(1, 41), history=[np.array([i]) for i in range(1, 41)]), exclude_seen=True)
    assert (out.top_items > 0).all() and all(len(set(row)) == K for row in out.top_items)
    assert np.isfinite(out.top_scores).all() and (np.diff(out.top_scores, axis=1) <= 0).all()
    shutil.rmtree(tmp_path / "poor")
    # the same index searched in every list finds everything: the check measures, it does not always refuse
    manifest = export_run(run_dir, tmp_path / "good", retrieval="ann", candidates=70, ann_index="ivf", ann_nlist=64, ann_nprobe=64, **QUIET)
    assert manifest["retrieval"]["recall"]["recall"] == pytest.approx(1.0)


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_the_export_searches_deeper_until_the_recall_reaches_min_recall(metric, trained, synth_data, tmp_path, monkeypatch):
    """No --ann-nprobe given: the export doubles the depth from the default (made 1 here) and re-measures on
    the same test prefixes until --min-recall is met; the bundle is served at the depth that met it."""
    from export import defaults

    run_dir = trained("gru4rec")
    monkeypatch.setattr(defaults, "IVF_NPROBE", 1)
    lines: list[str] = []
    manifest = export_run(run_dir, tmp_path / "deep", retrieval="ann", candidates=70, ann_index="ivf", ann_nlist=64, ann_metric=metric, parity_sessions=60, log=lines.append)
    r = manifest["retrieval"]
    tried = [(t["nprobe"], t["recall"]) for t in r["depth"]["tried"]]
    doubling = [t for t in tried if t[0] & (t[0] - 1) == 0]  # powers of two: 1, 2, 4, ... until one passes
    assert r["depth"]["auto"] and [d for d, _ in doubling] == [2**i for i in range(len(doubling))] and len(doubling) >= 3
    assert all(recall < 0.99 for _, recall in doubling[:-1]) and doubling[-1][1] >= 0.99 == r["recall"]["min_recall"]
    halved = tried[len(doubling) :]  # then the last step bisected: between the last two powers of two
    assert len(halved) <= 2 and all(doubling[-2][0] < d < doubling[-1][0] for d, _ in halved)
    least = min(d for d, recall in tried if recall >= 0.99)
    assert all(recall < 0.99 for d, recall in tried if d < least)
    assert r["nprobe"] == least <= 64 and r["recall"]["recall"] == dict(tried)[least] == manifest["parity"]["top_k_recall"]
    assert sum("measuring nprobe" in line for line in lines) == len(tried) - 1 and {t["candidates"] for t in r["depth"]["tried"]} == {70} == {r["candidates"]}
    scorer = load_scorer(tmp_path / "deep")
    assert scorer.ann.index.nprobe == r["nprobe"]
    # the depth asked for is kept, and measured once: the same index at nprobe 1 is refused, not deepened
    with pytest.raises(UserError, match=r"under --min-recall 99\.00% .*nprobe=1[,)].*raise --ann-ef-search / --ann-nprobe"):
        export_run(run_dir, tmp_path / "fixed", retrieval="ann", candidates=70, ann_index="ivf", ann_nlist=64, ann_nprobe=1, ann_metric=metric, **QUIET)


def test_when_the_search_depth_is_given_the_export_takes_more_candidates_instead(trained, tmp_path):
    """--ann-nprobe 1 given, --candidates not: one list of 64 holds few of the top 20, so the export doubles C
    from 200 until the recall is met; at C = n_items the slots the index leaves empty hold every item it did
    not return, so the doubling must end there with every item found."""
    run_dir = trained("gru4rec")
    manifest = export_run(run_dir, tmp_path / "wide", retrieval="ann", ann_index="ivf", ann_nlist=64, ann_nprobe=1, **QUIET)
    r = manifest["retrieval"]
    tried = [(t["nprobe"], t["candidates"], t["recall"]) for t in r["depth"]["tried"]]
    assert not r["depth"]["auto"] and r["depth"]["candidates_auto"] and r["nprobe"] == 1
    n_items = manifest["n_items"]  # under 400: the catalogue's items seen in training
    assert [c for _, c, _ in tried] == [200, n_items] and tried[0][2] < 0.99 and tried[1][2] == pytest.approx(1.0) and r["candidates"] == n_items
    scorer = load_scorer(tmp_path / "wide")
    assert scorer.ann.candidates == n_items and scorer.ann.index.nprobe == 1


@pytest.mark.parametrize("index", ["ivfpq", "ivf", "hnsw"])
def test_an_index_searched_in_l2_after_the_inner_product_transform_finds_the_exact_top_k(index, trained, synth_data, tmp_path, monkeypatch, capsys):
    """--ann-metric l2: each item gets sqrt(M^2 - |x|^2) as one more coordinate and each query a 0, so the
    nearest item in L2 is the best by inner product. Searched in every list, an IVF-Flat index over the
    transformed rows is exact; a transform left out (or a query left unpadded) would not be."""
    run_dir = trained("gru4rec")
    options = {"ivfpq": {}, "ivf": {"ann_nlist": 16, "ann_nprobe": 16}, "hnsw": {"ann_ef_search": 128}}[index]
    manifest = export_run(run_dir, tmp_path / "l2", retrieval="ann", candidates=least_candidates(run_dir) + K, ann_index=index, ann_metric="l2", **options, **QUIET)
    r = manifest["retrieval"]
    assert r["metric"] == "l2" and r["recall"]["recall"] >= 0.99
    if index == "ivf":  # every list searched: the transform makes L2 order the inner-product order
        assert r["recall"]["recall"] == pytest.approx(1.0)
    if index == "ivfpq":
        assert r["pq_m"] >= r["dim"] + 1  # the extra coordinate is coded too
    scorer = load_scorer(tmp_path / "l2")
    assert scorer.ann.index.d == scorer.ann.vectors.shape[1] + 1 and scorer.ann.index.metric_type == 1  # faiss.METRIC_L2
    code, out, err = run_cli(monkeypatch, capsys, "bundle", "verify", str(tmp_path / "l2"))
    assert code == 0 and f"ann {index} retrieval" in out, err
    exact = export_run(run_dir, tmp_path / "exact", **QUIET)
    sessions = sample_sessions(PreparedData.load(synth_data).test, 60, seed=3)
    want, got = replay(load_scorer(tmp_path / "exact"), sessions), replay(scorer, sessions)
    assert top_k_overlap(want, got) >= 0.99
    assert exact["retrieval"] == {"mode": "exact"}


def test_bad_retrieval_flags_are_refused_in_one_line(trained, synth_data, tmp_path, monkeypatch, capsys):
    run_dir = trained("gru4rec")
    for args, message in [
        (["--ann-ef-search", "64"], "--ann-ef-search only apply with --retrieval ann"),
        (["--retrieval", "ann", "--candidates", "30"], "--candidates 30 is too few: exclude-seen needs K + history_len = 20 + 50"),
        (["--retrieval", "ann", "--ann-ef-search", "64"], "--ann-index ivfpq: --ann-m/--ann-ef-construction/--ann-ef-search are hnsw settings"),
        (["--retrieval", "ann", "--ann-index", "ivf", "--ann-m", "8"], "--ann-index ivf: --ann-m/--ann-ef-construction/--ann-ef-search are hnsw settings"),
        (["--retrieval", "ann", "--ann-index", "hnsw", "--ann-nprobe", "4"], "--ann-index hnsw: --ann-m/--ann-ef-construction/--ann-ef-search are hnsw settings"),
        (["--retrieval", "ann", "--ann-nprobe", "0"], "--ann-nprobe must be at least 1"),
        (["--ann-metric", "l2"], "--ann-metric only apply with --retrieval ann"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, "export", "--run", str(run_dir), "--out", str(tmp_path / "b"), *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"error: {message}") and "Traceback" not in err, (args, err)
    markov_dir = tmp_path / "markov"
    make_run("markov", synth_data, markov_dir)
    with pytest.raises(UserError, match="--retrieval ann applies to models that end with a dot product"):
        export_run(markov_dir, tmp_path / "m", retrieval="ann", **QUIET)
    assert not (tmp_path / "b").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "srgnn"])
def test_exclude_seen_with_ann_drops_the_history_and_keeps_exact_scores(name, trained, synth_data, tmp_path):
    run_dir = trained(name)
    export_run(run_dir, tmp_path / "ann", retrieval="ann", candidates=least_candidates(run_dir), ann_index="hnsw", **QUIET)  # a graph search: approximate even on 400 items
    scorer, model = load_scorer(tmp_path / "ann"), load_run(run_dir)
    sessions = sample_sessions(PreparedData.load(synth_data).test, 40, seed=3)
    plain, excluding = replay(scorer, sessions), replay(scorer, sessions, exclude_seen=True)
    np.testing.assert_array_equal(plain.positions, excluding.positions)
    assert excluding.top_items.shape[1] == scorer.k
    reference = {int(p): row for positions, scores in model.score_next(sessions) for p, row in zip(positions, scores)}
    plain_had_seen = misses = checked = 0
    for p, before, items, got in zip(excluding.positions, plain.top_items, excluding.top_items, excluding.top_scores):
        start = sessions.offsets[np.searchsorted(sessions.offsets, p, side="right") - 1]
        seen = sessions.items[start : p + 1][-scorer.history_len :]
        plain_had_seen += bool(np.isin(before, seen).any())
        assert not np.isin(items, seen).any() and (items > 0).all()
        if int(p) not in reference:  # a session's last click has no reference row
            continue
        checked += 1
        row = np.asarray(reference[int(p)], dtype=np.float32).copy()
        np.testing.assert_allclose(got, row[items], atol=1e-4)  # every served score is the exact one
        row[0] = -np.inf
        row[seen] = -np.inf
        misses += int((got < -np.sort(-row)[: scorer.k][-1] - 1e-4).sum())
    assert plain_had_seen > 0  # without exclusion some answers repeated the session's items: exclusion was exercised
    assert checked > 40 and misses <= 0.01 * checked * scorer.k


def test_int8_applies_to_the_query_model_of_an_ann_bundle(trained, tmp_path):
    run_dir = trained("sasrec")
    manifest = export_run(run_dir, tmp_path / "int8", retrieval="ann", ann_index="ivf", candidates=28, int8=True, min_overlap=0.5, **QUIET)  # IVF-Flat: all 10 lists searched, exact at the least candidates
    assert manifest["precision"] == "int8" and manifest["retrieval"]["mode"] == "ann"
    assert 0.5 <= manifest["int8"]["top_k_overlap"] <= 1.0
    bundle = open_bundle(tmp_path / "int8")
    assert bundle.manifest["onnx"]["size_bytes"] == (tmp_path / "int8" / "model.onnx").stat().st_size
    scorer = load_scorer(tmp_path / "int8")
    out = scorer.step(StepInput(items=np.array([1, 2]), history=[np.array([1]), np.array([3, 2])]), exclude_seen=True)
    assert out.top_items.shape == (2, K) and (out.top_items > 0).all() and not np.isin([3, 2], out.top_items[1]).any()


def test_a_processor_swapped_exact_to_ann_and_back_answers_every_click_as_each_bundle(stream_data, gru_bundle, tmp_path):
    """No broker: the stream's batch processor serves exact, then ann, then exact again over the same session states."""
    from stream.processor import BatchProcessor, Record
    from stream.state import SessionState

    run_dir, exact = gru_bundle
    ann = tmp_path / "ann"
    export_run(run_dir, ann, data_dir=stream_data.path, retrieval="ann", candidates=K + 50, parity_sessions=50, log=lambda _: None)
    messages, sessions = click_stream(stream_data.vocab.item_ids, n_sessions=30, clicks=12, seed=14)
    third = len(messages) // 3
    store: dict[bytes, bytes] = {}
    docs = []
    for lo, hi, bundle in ((0, third, exact), (third, 2 * third, ann), (2 * third, len(messages), exact)):
        records = [Record(k, v, "clicks", 0, lo + i, 1.7e9) for i, (k, v) in enumerate(messages[lo:hi])]
        result = BatchProcessor(load_scorer(bundle), K).process(records, lambda key: SessionState.decode(store[key]) if key in store else None)
        store.update({key: state.encode() for key, state in result.states.items()})
        docs.extend((bundle, json.loads(v)) for _, v in result.recommendations)
    expected = {exact: offline_answers(exact, sessions, K), ann: offline_answers(ann, sessions, K)}
    assert len(docs) == len(messages)
    for (bundle, doc), key in zip(docs, positions(messages)):
        assert (doc["session_id"], doc["position"]) == key and doc["model_version"] == version_of(bundle)
        assert_same_answer(doc, expected[bundle][key])
    assert sum(bundle == ann for bundle, _ in docs) == third


@pytest.mark.broker
def test_symlink_switch_from_exact_to_ann_loses_no_click(broker, stream_data, gru_bundle, tmp_path):
    """The worker serves GRU4Rec exact; mid-stream the symlink moves to the same run exported with ann retrieval."""
    run_dir, bundle_a = gru_bundle
    bundle_b = tmp_path / "ann"
    export_run(run_dir, bundle_b, data_dir=stream_data.path, retrieval="ann", candidates=K + 50, parity_sessions=50, log=lambda _: None)
    current = tmp_path / "current"
    switch(current, bundle_a)
    settings = worker_settings(broker, bundle_poll_seconds=0.3)
    messages, sessions = click_stream(stream_data.vocab.item_ids, n_sessions=40, clicks=12, seed=13)
    half = len(messages) // 2
    version_a, version_b = version_of(bundle_a), version_of(bundle_b)

    with running_worker(settings, current, tmp_path / "worker.log"):
        send(settings, messages[:half])
        asyncio.run(consume_all(settings, [settings.recommendations_topic], expect={settings.recommendations_topic: half}, timeout=60))
        switch(current, bundle_b)
        assert wait_for(lambda: metric(metrics_text(settings), "streamrec_model_swaps_total") == 1), "the ann bundle was not swapped in"
        send(settings, messages[half:])
        records = asyncio.run(consume_all(settings, [settings.recommendations_topic, settings.dlq_topic], expect={settings.recommendations_topic: len(messages)}, timeout=60))
        text = wait_for(lambda: (t := metrics_text(settings)) and metric(t, 'streamrec_events_total{outcome="answered"}') == len(messages) and t)
        assert text, "the answered counter never reached the number of clicks"

    assert_swapped_mid_stream(records, settings, messages, sessions, half, bundle_a, bundle_b)
    assert f'version="{version_b}"' in text and f'version="{version_a}"' not in text
    assert model_tag(load_scorer(bundle_a)) != model_tag(load_scorer(bundle_b))


def test_top_k_helpers_of_the_parity_check_equal_full_sorts_ties_included():
    from export.parity import _stable_top, top_k_values

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=(40, 300)).astype(np.float32)  # many ties
    scores[:, 0] = -np.inf
    for k in (1, 5, 20, 299):
        assert np.array_equal(top_k_values(scores, k), -np.sort(-scores, axis=1)[:, :k])
        assert np.array_equal(_stable_top(scores, k), np.argsort(-scores, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("name", ["gru4rec", "sasrec"])
def test_the_parity_check_in_small_chunks_reports_what_it_reports_in_one(name, trained, synth_data, tmp_path):
    from export.parity import check_parity

    run_dir = trained(name)
    export_run(run_dir, tmp_path / "ann", retrieval="ann", candidates=least_candidates(run_dir), ann_index="hnsw", min_recall=0.0, **QUIET)
    model, sessions = load_run(run_dir), sample_sessions(PreparedData.load(synth_data).test, 60)
    scorer = load_scorer(tmp_path / "ann", threads=1)
    whole = check_parity(model, scorer, sessions, score_cells=10**9)
    chunked = check_parity(model, scorer, sessions, score_cells=3 * (model.n_items + 1))  # 3 reference rows at a time
    assert whole["positions"] == chunked["positions"] > 0
    assert whole["top_k_recall"] == pytest.approx(chunked["top_k_recall"], abs=1e-12) and whole["exact_top_k_share"] == pytest.approx(chunked["exact_top_k_share"], abs=1e-12)
    assert whole["max_score_diff"] == pytest.approx(chunked["max_score_diff"], abs=1e-5)
