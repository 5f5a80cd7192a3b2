"""Run directory -> verified bundle: the work behind `streamrec export`.

Order matters: write every file into a temporary directory, seal it (manifest
with checksums), load it back through ``load_scorer`` exactly as the stream
will, check parity against the trained model on real test prefixes, optionally
quantize and measure, seal again, and only then rename it into place. Any
failure on the way leaves no bundle behind.

``retrieval="ann"`` writes the model cut at its query vector, the item vectors
and a faiss index over them (export/retrieval.py); the parity replay then also
measures top-K recall against the trained model's exact scores, and a recall
under ``min_recall`` refuses the bundle like a parity failure.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from export import defaults
from export.bundle import BundleWriter
from streamrec.contracts import KIND_CONTRACTS, ExportableModel, WindowStateModel
from streamrec.errors import UserError
from training.data import PreparedData, Vocab


def export_run(
    run_dir: Path,
    out: Path,
    *,
    data_dir: Path | None = None,
    k: int = defaults.K,
    history_len: int | None = None,
    int8: bool = False,
    min_overlap: float = defaults.MIN_OVERLAP,
    parity_sessions: int = defaults.PARITY_SESSIONS,
    threads: int = defaults.THREADS,
    force: bool = False,
    retrieval: str = defaults.RETRIEVAL,
    min_recall: float = defaults.MIN_RECALL,
    candidates: int | None = None,
    ann_index: str | None = None,
    ann_m: int | None = None,
    ann_ef_construction: int | None = None,
    ann_ef_search: int | None = None,
    ann_nlist: int | None = None,
    ann_nprobe: int | None = None,
    ann_metric: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Export the trained run in ``run_dir`` to the bundle ``out``; returns the manifest."""
    from export.parity import check_parity, sample_sessions
    from export.scorer import load_scorer
    from training.models import load_run

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists (pass --force to replace it)")
    model = load_run(run_dir)
    run_doc = json.loads((run_dir / "config.json").read_text())
    if not (run_dir / "vocab.json").is_file():
        raise UserError(f"{run_dir}: vocab.json missing (runs made by `streamrec train` carry a copy of the dataset's vocabulary)")
    vocab = Vocab.load(run_dir / "vocab.json")
    if vocab.n_items != model.n_items:
        raise UserError(f"{run_dir}: vocab.json has {vocab.n_items} items but the model was trained on {model.n_items}")
    data = _dataset(run_dir, run_doc, data_dir)
    if data.vocab.item_ids != vocab.item_ids:
        raise UserError(f"{data.path}: its vocabulary differs from the run's vocab.json (not the dataset the model was trained on)")
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    kind = model.state_kind
    _check_contract(model, kind)
    history_len = _history_len(model, kind, history_len)
    k = min(k, model.n_items)
    candidates_in_graph = min(k + history_len, model.n_items)
    if int8 and kind not in ("hidden", "window"):
        raise UserError(f"--int8 applies to ONNX models (state kinds hidden, window); '{model.name}' is served as '{kind}'")
    ann = _ann_settings(model, retrieval, k, history_len, candidates, ann_index, ann_m, ann_ef_construction, ann_ef_search, ann_nlist, ann_nprobe, ann_metric)
    if ann is not None and not 0 <= min_recall <= 1:
        raise UserError(f"--min-recall must be between 0 and 1, got {min_recall}")

    metrics_path = run_dir / "metrics.json"
    manifest = {
        "model": model.name,
        "state_kind": kind,
        "n_items": model.n_items,
        "k": k,
        "hidden_size": int(model.hidden_size) if kind == "hidden" else 0,
        "history_len": history_len,
        "window_len": history_len if kind in ("window", "graph") else 0,
        "features": {},
        "model_file": {"hidden": "model.onnx", "window": "model.onnx", "graph": "model.pt", "items": "model.npz"}[kind],
        "precision": "fp32",
        "model_config": _jsonable(dataclasses.asdict(model.config)),
        "training": {
            "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
            "dataset": {"path": str(data.path.resolve()) if data.path else None, "stats": data.stats},
            "train_seconds": run_doc.get("train_seconds"),
            "run_dir": str(run_dir.resolve()),
        },
    }
    with BundleWriter(out, overwrite=force) as writer:
        shutil.copyfile(run_dir / "vocab.json", writer.path("vocab.json"))
        np.save(writer.path("popularity.npy"), np.bincount(data.train.items, minlength=model.n_items + 1)[: model.n_items + 1].astype(np.int64))
        log(f"exporting {model.name} ({kind}, {model.n_items:,} items) from {run_dir}")
        if ann is None:
            manifest["retrieval"] = {"mode": "exact"}
            _write_model(model, kind, manifest, writer, k, candidates_in_graph)
        else:
            manifest["retrieval"] = ann
            _write_ann_model(model, kind, manifest, writer, threads, log)
        if manifest["model_file"] == "model.onnx":
            manifest["onnx"] = {"candidates": candidates_in_graph if ann is None else 0, "size_bytes": writer.path("model.onnx").stat().st_size}
        writer.seal(manifest)

        sample = sample_sessions(data.test, parity_sessions)
        scorer = load_scorer(writer.tmp, threads=threads)
        log(f"checking parity on {len(sample)} test sessions ({sample.n_events:,} events)")
        manifest["parity"] = check_parity(model, scorer, sample)
        log(f"parity ok: max score difference {manifest['parity']['max_score_diff']:.2g}, identical top-{k} lists at {manifest['parity']['exact_top_k_share']:.1%} of {manifest['parity']['positions']:,} positions")
        if ann is not None:
            manifest["parity"] = _reach_recall(model, scorer, sample, manifest, min_recall, log)
            _check_recall(manifest, min_recall, log)
        if int8:
            manifest["precision"] = "int8"
            manifest["int8"] = _int8(writer, manifest, scorer, sample, threads, min_overlap, log)
            manifest["onnx"]["size_bytes"] = writer.path("model.onnx").stat().st_size
        manifest = writer.seal(manifest)
        writer.commit()
    log(f"wrote {out} (model_version {manifest['model_version']})")
    return manifest


def _dataset(run_dir: Path, run_doc: dict, data_dir: Path | None) -> PreparedData:
    """The prepared data the run was trained on: --data, else the path recorded in the run."""
    if data_dir is None:
        recorded = (run_doc.get("data") or {}).get("path")
        if not recorded:
            raise UserError(f"{run_dir}: the run does not record its dataset; pass --data DATA_DIR (needed for popularity and the parity check)")
        data_dir = Path(recorded)
        if not data_dir.is_dir():
            raise UserError(f"{run_dir} was trained on {data_dir}, which no longer exists; pass --data DATA_DIR")
    return PreparedData.load(data_dir)


def _check_contract(model, kind: str) -> None:
    """UserError unless ``model`` provides what export uses of its state kind (streamrec.contracts)."""
    contract = KIND_CONTRACTS.get(kind)
    if contract is None:
        raise UserError(f"model '{model.name}' has unknown state kind '{kind}'")
    if not isinstance(model, contract):
        missing = [name for name in sorted(_members(contract)) if not hasattr(model, name)]
        raise UserError(f"model '{model.name}' (state kind '{kind}') cannot be exported: it lacks {', '.join(missing)} ({contract.__name__}, streamrec/contracts.py)")


def _members(protocol: type) -> set[str]:
    """The attributes and methods a protocol asks for."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls.__module__ == "streamrec.contracts":
            names |= {n for n in (*vars(cls), *getattr(cls, "__annotations__", {})) if not n.startswith("_")}
    return names


def _history_len(model: ExportableModel, kind: str, requested: int | None) -> int:
    """Recent items the stream keeps per session: the model's window, or the exclude_seen horizon."""
    if kind in ("window", "graph"):
        length = int(model.history_len)
        if requested is not None and requested != length:
            raise UserError(f"--history-len {requested}: {model.name} was trained on windows of {length} items and is served with exactly that")
        return length
    length = defaults.SEEN_HISTORY if requested is None else requested
    if length < 1:
        raise UserError(f"--history-len must be at least 1, got {length}")
    return length


def _write_model(model, kind: str, manifest: dict, writer: BundleWriter, k: int, candidates: int) -> None:
    from export.onnx_export import export_step_model, export_window_model

    if kind == "hidden":
        export_step_model(model.export_module(), manifest["hidden_size"], k, candidates, writer.path("model.onnx"))
    elif kind == "window":
        features = _event_features(model, manifest)
        export_window_model(model.export_module(), manifest["history_len"], list(features), k, candidates, writer.path("model.onnx"))
    elif kind == "graph":
        model.save(writer.tmp)  # config.json + model.pt, reloaded with weights_only=True by the scorer
        for extra in set(p.name for p in writer.tmp.iterdir()) - {"config.json", "model.pt", "vocab.json", "popularity.npy"}:
            (writer.tmp / extra).unlink()
    else:  # items (the kind was checked against KIND_CONTRACTS before anything was written)
        np.savez(writer.path("model.npz"), **model.arrays())


def _event_features(model: WindowStateModel, manifest: dict) -> dict:
    """The window model's event features (name -> cardinality), recorded in the manifest with their labels."""
    features = dict(model.net_args.get("event_features") or {})
    manifest["features"] = features
    labels = manifest["training"]["dataset"]["stats"].get("feature_vocab", {})
    manifest["feature_vocab"] = {name: labels[name] for name in features if name in labels}
    return features


def _ann_settings(model, retrieval: str, k: int, history_len: int, candidates: int | None, index: str | None, m, ef_construction, ef_search, nlist, nprobe, metric: str | None = None) -> dict | None:
    """The ``retrieval`` block for ``--retrieval ann`` (None for exact); index flags without ann are refused."""
    from export.retrieval import ann_settings, check_model, depth_knob

    given = {"--candidates": candidates, "--ann-index": index, "--ann-m": m, "--ann-ef-construction": ef_construction, "--ann-ef-search": ef_search, "--ann-nlist": nlist, "--ann-nprobe": nprobe, "--ann-metric": metric}
    if retrieval == "exact":
        if any(v is not None for v in given.values()):
            raise UserError(f"{', '.join(f for f, v in given.items() if v is not None)} only apply with --retrieval ann")
        return None
    if retrieval != "ann":
        raise UserError(f"--retrieval must be exact or ann, got {retrieval!r}")
    check_model(model.name)
    index = index or defaults.ANN_INDEX
    if index not in defaults.ANN_INDEXES:
        raise UserError(f"--ann-index must be {', '.join(defaults.ANN_INDEXES[:-1])} or {defaults.ANN_INDEXES[-1]}, got {index!r}")
    if index == "hnsw" and (nlist is not None or nprobe is not None) or index != "hnsw" and any(v is not None for v in (m, ef_construction, ef_search)):
        raise UserError(f"--ann-index {index}: --ann-m/--ann-ef-construction/--ann-ef-search are hnsw settings, --ann-nlist/--ann-nprobe ivf and ivfpq ones")
    for flag, value in given.items():
        if flag not in ("--ann-index", "--ann-metric") and value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    metric = metric or defaults.ANN_METRIC
    if metric not in defaults.ANN_METRICS:
        raise UserError(f"--ann-metric must be {' or '.join(defaults.ANN_METRICS)}, got {metric!r}")
    needed = min(k + history_len, model.n_items)
    candidates = min(defaults.CANDIDATES if candidates is None else candidates, model.n_items)
    if candidates < needed:
        raise UserError(f"--candidates {candidates} is too few: exclude-seen needs K + history_len = {k} + {history_len} candidates so that K remain")
    settings = ann_settings(index, model.n_items, candidates, m or defaults.HNSW_M, ef_construction or defaults.HNSW_EF_CONSTRUCTION, ef_search or defaults.HNSW_EF_SEARCH, nlist, nprobe or (defaults.IVFPQ_NPROBE if index == "ivfpq" else defaults.IVF_NPROBE), metric)
    knob = depth_knob(settings)
    settings["depth"] = {"knob": knob, "auto": (ef_search if knob == "ef_search" else nprobe) is None, "candidates_auto": given["--candidates"] is None, "tried": []}
    return settings


def _write_ann_model(model, kind: str, manifest: dict, writer: BundleWriter, threads: int, log) -> None:
    """The model cut before its catalogue product, the item vectors and the faiss index over them."""
    from export.onnx_export import export_step_query_model, export_window_query_model
    from export.retrieval import build_index, describe, index_dim, item_vectors, ivfpq_settings, query_module, write_index

    settings = manifest["retrieval"]
    net = model.net.eval()  # not a copy: at 1M items each copy of GRU4Rec's item matrix is 400 MB
    if kind == "hidden":
        export_step_query_model(query_module(model.name, net), manifest["hidden_size"], writer.path("model.onnx"))
    elif kind == "window":
        features = _event_features(model, manifest)
        export_window_query_model(query_module(model.name, net), manifest["history_len"], list(features), writer.path("model.onnx"))
    else:
        _write_model(model, kind, manifest, writer, 0, 0)  # SR-GNN: the torch model; the scorer cuts it at the query
    vectors = item_vectors(model.name, net)
    np.save(writer.path(settings["vectors_file"]), vectors)
    if settings["index"] == "ivfpq":
        settings.update(ivfpq_settings(index_dim(vectors.shape[1], settings["metric"]), settings["nlist"]))
    log(f"building {describe(settings)} over {model.n_items:,} items of {vectors.shape[1]} dims")
    index, seconds = build_index(vectors, settings, threads)
    write_index(index, writer.path(settings["index_file"]))
    settings["dim"] = int(vectors.shape[1])
    settings["build_seconds"] = round(seconds, 3)
    settings["index_size_bytes"] = writer.path(settings["index_file"]).stat().st_size
    log(f"index built in {seconds:.1f} s, {settings['index_size_bytes'] / 1e6:.1f} MB")


BISECT_STEPS = 2  # after the doubling passes min_recall: halvings of its last step tried, each one more parity replay


def _reach_recall(model, scorer, sample, manifest: dict, min_recall: float, log) -> dict:
    """The parity report at the least search depth (and candidate count) found to reach ``min_recall``.

    Recall against exact scoring depends on the queries, which the synthetic benchmarks do not know: trained
    GRU4Rec vectors at 812k items needed 10x the lists that synthetic ones did for the same recall
    (docs/performance.md). Unless the depth was given (``--ann-nprobe``, ``--ann-ef-search``), the export
    doubles it from the default, re-measuring on the same test prefixes, until the recall reaches
    ``min_recall`` or the index is searched whole, then halves the last step twice (bisection) to pay less
    for it. Searched whole, an index of 4-bit codes can still miss items its codes rank under C others: then,
    unless ``--candidates`` was given, C doubles (up to MAX_CANDIDATES) and the depth is searched again.
    Every setting tried is kept in the manifest; the bundle is served at the first that reached it.
    """
    from export.parity import check_parity
    from export.retrieval import depth_limit

    settings = manifest["retrieval"]
    search = settings["depth"]
    knob, limit, start = search["knob"], depth_limit(settings), int(settings[search["knob"]])

    def measure(at: int, report: dict | None = None) -> dict:
        if report is None:
            log(f"ann recall@{manifest['k']} under --min-recall {min_recall:.2%}: measuring {knob} {at}, {scorer.ann.candidates} candidates")
            scorer.ann.set_depth(at)
            report = check_parity(model, scorer, sample)
        search["tried"].append({knob: at, "candidates": scorer.ann.candidates, "recall": report["top_k_recall"]})
        return report

    def least_depth(report: dict) -> tuple[int, dict]:
        at, low = start, None
        while report["top_k_recall"] < min_recall and search["auto"] and at < limit:
            low, at = at, min(2 * at, limit)
            report = measure(at)
        if report["top_k_recall"] < min_recall or low is None:
            return at, report
        high, best = at, report
        for _ in range(BISECT_STEPS):
            if high - low <= 1:
                break
            middle = (low + high) // 2
            tried = measure(middle)
            if tried["top_k_recall"] >= min_recall:
                high, best = middle, tried
            else:
                low = middle
        return high, best

    at, report = least_depth(measure(start, manifest["parity"]))
    while report["top_k_recall"] < min_recall and search["candidates_auto"] and scorer.ann.candidates < min(defaults.MAX_CANDIDATES, model.n_items):
        scorer.ann.set_candidates(min(2 * scorer.ann.candidates, defaults.MAX_CANDIDATES))
        scorer.ann.set_depth(start)
        at, report = least_depth(measure(start))
    scorer.ann.set_depth(at)
    settings[knob], settings["candidates"] = at, scorer.ann.candidates
    return report


def _check_recall(manifest: dict, min_recall: float, log) -> None:
    """Refuse an ann bundle whose top-K recall against exact scoring (measured by the parity replay) is too low."""
    from export.retrieval import describe

    settings, parity, k = manifest["retrieval"], manifest["parity"], manifest["k"]
    recall = parity["top_k_recall"]
    settings["recall"] = {"k": k, "recall": recall, "positions": parity["positions"], "min_recall": min_recall}
    log(f"ann recall@{k} against exact scoring: {recall:.2%} at {parity['positions']:,} test prefixes")
    if recall < min_recall:
        depth = settings.get("depth") or {}
        hint = f"even searched as deep as it goes ({depth['knob']} {settings[depth['knob']]}, {settings['candidates']} candidates); raise --candidates or try another --ann-index / --ann-metric" if depth.get("auto") else "raise --ann-ef-search / --ann-nprobe or --candidates"
        raise UserError(f"ann index recall@{k} is {recall:.2%} against exact scoring on {parity['positions']:,} test prefixes, under --min-recall {min_recall:.2%} ({describe(settings)}); {hint}; nothing written")


def _int8(writer: BundleWriter, manifest: dict, fp32_scorer, sample, threads: int, min_overlap: float, log) -> dict:
    """Swap the bundle's model.onnx for its int8 version; measure overlap and speed against fp32 (kept in memory)."""
    from export.parity import replay, time_steps
    from export.quantize import quantize_int8, top_k_overlap
    from export.scorer import load_scorer

    model_path = writer.path("model.onnx")
    int8_path = writer.path("model.int8.onnx")
    fp32_size = model_path.stat().st_size
    quantize_int8(model_path, int8_path)
    calls: list = []
    fp32_replay = replay(fp32_scorer, sample, record=calls)
    int8_path.replace(model_path)  # the fp32 session stays loaded in memory
    writer.seal(manifest)
    int8_scorer = load_scorer(writer.tmp, threads=threads)
    int8_replay = replay(int8_scorer, sample)
    overlap = top_k_overlap(fp32_replay, int8_replay)
    fp32_seconds, int8_seconds = time_steps(fp32_scorer, calls), time_steps(int8_scorer, calls)
    events = int(sum(len(c.items) for c in calls))
    report = {
        "top_k_overlap": overlap,
        "min_overlap": min_overlap,
        "positions": len(int8_replay.positions),
        "fp32_ms_per_event": 1000 * fp32_seconds / events,
        "int8_ms_per_event": 1000 * int8_seconds / events,
        "speedup": fp32_seconds / int8_seconds,
        "fp32_size_bytes": fp32_size,
        "int8_size_bytes": model_path.stat().st_size,
    }
    k = fp32_scorer.k
    log(f"int8: top-{k} overlap with fp32 {overlap:.1%}, {report['speedup']:.2f}x the fp32 speed, {report['int8_size_bytes'] / 1e6:.1f} MB (fp32 {fp32_size / 1e6:.1f} MB)")
    if overlap < min_overlap:
        raise UserError(f"int8 model keeps only {overlap:.1%} of the fp32 top-{k} (--min-overlap {min_overlap:.0%}); nothing written")
    return report


def _jsonable(value):
    """Config values as JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=list))
