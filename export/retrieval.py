"""Approximate retrieval for big catalogues: a faiss index proposes candidates, the scorer re-scores them exactly.

Every neural model here ends with ``query @ items.T + bias`` over the whole
catalogue, a cost that grows with the catalogue (9 ms per event at 1M items for
GRU4Rec). An ``ann`` bundle splits that last step off:

- the served model (ONNX, or torch for SR-GNN) stops at the query vector ``q [B, D]``;
- ``item_vectors.npy`` holds ``[w_i, b_i]`` for every item (row 0 = padding, never returned),
  so a score is the inner product of ``[q, 1]`` with a row, bias included;
- ``index.faiss`` (faiss's own binary format, no pickle) is an inner-product index over
  rows 1..n_items, searched for C candidates (``retrieval.candidates``, well above K): ``ivfpq``
  (the default: IVF over 4-bit PQ fast-scan codes, the faiss factory string in ``retrieval.factory``),
  ``ivf`` (IVF-Flat) or ``hnsw``;
- the candidates are re-scored exactly from ``item_vectors.npy`` and sorted, then
  exclude-seen drops the session's recent items (C >= K + history_len, so K remain).

Which part of each model is the query and which the item table is written down
here, per model, because the models compute both inside one forward; the export's
parity check compares every re-scored answer with the trained model's own scores,
so a model whose forward changes without this file following is caught at export.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.defaults import ANN_INDEXES, ANN_METRICS, HNSW_EF_SEARCH_MAX
from streamrec import runtime
from streamrec.errors import UserError

INDEX_FILE = "index.faiss"
VECTORS_FILE = "item_vectors.npy"
ANN_MODELS = ("gru4rec", "sasrec", "bert4rec", "caser", "bst", "srgnn")


class GRU4RecQuery(nn.Module):
    """hidden kind: (item_idx [B], hidden [B, sum(layers)]) -> (next_hidden, query [B, H_last])."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.sizes = list(net.layers)

    def forward(self, item_idx: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_parts, out = self.net.step(item_idx, list(torch.split(hidden, self.sizes, dim=1)))
        return torch.cat(new_parts, dim=1), out


class SASRecQuery(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.net.hidden(window)[:, -1]


class BERT4RecQuery(SASRecQuery):
    def forward(self, window: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(window[:, :1], self.net.mask_token)
        return self.net.head(self.net.hidden(torch.cat([window[:, 1:], mask], 1))[:, -1])


class CaserQuery(SASRecQuery):
    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.net.features(window)


class BSTQuery(SASRecQuery):
    def forward(self, window: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        return self.net.features(window, *features)


class SRGNNQuery(SASRecQuery):
    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.net.session_vectors(window)


def _zeros(weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(weight), dtype=weight.dtype)


QUERIES = {"gru4rec": GRU4RecQuery, "sasrec": SASRecQuery, "bert4rec": BERT4RecQuery, "caser": CaserQuery, "bst": BSTQuery, "srgnn": SRGNNQuery}
# net -> (item table [n_items + 1, D], bias [n_items + 1]): what the query is scored against
TABLES = {
    "gru4rec": lambda net: (net.item_out, net.item_bias[:, 0]),
    "sasrec": lambda net: (net.item_embedding.weight, _zeros(net.item_embedding.weight)),
    "bert4rec": lambda net: (net.item_embedding.weight[: net.n_items + 1], net.output_bias if net.output_bias is not None else _zeros(net.item_embedding.weight[: net.n_items + 1])),
    "caser": lambda net: (net.output_embedding.weight, net.output_bias),
    "bst": lambda net: (net.item_side(torch.arange(net.item_embedding.num_embeddings)), torch.zeros(net.item_embedding.num_embeddings)),
    "srgnn": lambda net: (net.item_embedding.weight, _zeros(net.item_embedding.weight)),
}


def check_model(name: str) -> None:
    if name not in QUERIES:
        raise UserError(f"--retrieval ann applies to models that end with a dot product with item embeddings ({', '.join(ANN_MODELS)}); '{name}' ranks items another way")


def query_module(name: str, net: nn.Module) -> nn.Module:
    """The model's network cut before its catalogue product, in eval mode."""
    check_model(name)
    return QUERIES[name](net).eval()


def item_vectors(name: str, net: nn.Module) -> np.ndarray:
    """``[n_items + 1, D + 1]`` float32: every item's output vector with its bias appended (row 0 = padding)."""
    check_model(name)
    with torch.no_grad():
        net.eval()
        weight, bias = TABLES[name](net)
        return np.ascontiguousarray(torch.cat([weight.float(), bias.float()[:, None]], 1).numpy())


def faiss_version() -> str:
    import faiss

    return faiss.__version__


def build_index(vectors: np.ndarray, settings: dict, threads: int = 1):
    """A faiss inner-product index over rows 1.. of ``vectors`` (faiss id i = item i + 1); returns (index, seconds)."""
    faiss = runtime.faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)  # the build's own count (its graph depends on it), and the process's again after
    try:
        return _build_index(faiss, vectors, settings)
    finally:
        faiss.omp_set_num_threads(before)


def index_dim(width: int, metric: str) -> int:
    """Dimensions of the indexed rows: the item vectors' ``width`` (D + 1), one more after the L2 transform."""
    return width + (metric == "l2")


def index_rows(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Rows 1.. of ``vectors`` as the index stores them.

    ``l2``: the inner-product search is asked as a nearest-neighbour search (Bachrach et al., RecSys 2014):
    each item gets one more coordinate, sqrt(M^2 - |x|^2) with M the largest norm, and each query a 0 there,
    so |q - x|^2 = |q|^2 + M^2 - 2 q.x and the nearest item is the one of largest inner product. IVF's
    k-means lists are then built on a metric they suit: on trained GRU4Rec vectors (812k items, ivfpq,
    nprobe 128) recall@20 rose from 0.78 to 0.91 at the same cost (docs/performance.md).
    """
    rows = np.ascontiguousarray(vectors[1:], dtype=np.float32)
    if metric != "l2":
        return rows
    norms = np.einsum("ij,ij->i", rows, rows)
    extra = np.sqrt(np.maximum(norms.max(initial=0.0) - norms, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([rows, extra[:, None]], 1))


def _build_index(faiss, vectors: np.ndarray, settings: dict):
    metric = settings.get("metric", "inner_product")
    rows = index_rows(vectors, metric)
    dim = rows.shape[1]
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    started = time.perf_counter()
    if settings["index"] == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(settings["hnsw_m"]), faiss_metric)
        index.hnsw.efConstruction = int(settings["ef_construction"])
    elif settings["index"] == "ivf":
        quantizer = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, int(settings["nlist"]), faiss_metric)
        index.cp.seed = 0
        index.train(rows)  # faiss's Python wrapper keeps the quantizer alive with the index
    elif settings["index"] == "ivfpq":
        index = faiss.index_factory(dim, settings.get("factory") or ivfpq_settings(dim, int(settings["nlist"]))["factory"], faiss_metric)
        faiss.extract_index_ivf(index).cp.seed = 0
        index.train(rows)
    else:
        raise UserError(f"unknown ann index {settings['index']!r} (known: {', '.join(ANN_INDEXES)})")
    index.add(rows)
    return index, time.perf_counter() - started


def ann_settings(index: str, n_items: int, candidates: int, hnsw_m: int, ef_construction: int, ef_search: int, nlist: int | None, nprobe: int, metric: str = "inner_product") -> dict:
    """The manifest's ``retrieval`` block for an ann bundle (before the build time and recall are known)."""
    settings = {"mode": "ann", "library": "faiss-cpu", "library_version": faiss_version(), "index": index, "metric": metric, "candidates": candidates, "index_file": INDEX_FILE, "vectors_file": VECTORS_FILE}
    if index == "hnsw":
        settings.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
        return settings
    settings.update(nlist=min(nlist or max(1, min(int(4 * math.sqrt(n_items)), n_items // 39)), n_items), nprobe=nprobe)
    return settings  # ivfpq: its code layout (ivfpq_settings) is added once the vectors' width is known


def ivfpq_settings(dim: int, nlist: int) -> dict:
    """IVF over 4-bit PQ fast-scan codes, one code per dimension after a random rotation padded to a multiple of 4.

    Fast scan reads 4-bit codes with SIMD look-ups, several times cheaper per item than IVF-Flat's floats; one
    code per dimension keeps the ranking close enough that the exact re-scoring of the candidates recovers
    the top K (two dimensions per code lost a quarter of the top 20 at 1M items: docs/performance.md).
    """
    padded = -(-dim // 4) * 4
    return {"factory": f"RR{padded},IVF{nlist},PQ{padded}x4fs", "pq_m": padded, "pq_bits": 4, "rotation": f"random {dim} -> {padded}"}


def depth_knob(settings: dict) -> str:
    """The manifest key of the index's search depth: what trades cost for recall at search time."""
    return "ef_search" if settings["index"] == "hnsw" else "nprobe"


def depth_limit(settings: dict) -> int:
    """The deepest search the export tries: every IVF list, or HNSW_EF_SEARCH_MAX."""
    return int(settings["nlist"]) if settings["index"] != "hnsw" else max(int(settings["ef_search"]), HNSW_EF_SEARCH_MAX)


def describe(settings: dict) -> str:
    """One phrase naming the index and its search knobs, for logs and errors."""
    if settings["index"] == "hnsw":
        knobs = f"M={settings['hnsw_m']}, ef_construction={settings['ef_construction']}, ef_search={settings['ef_search']}"
    else:
        knobs = f"nlist={settings['nlist']}, nprobe={settings['nprobe']}" + (f", PQ {settings['pq_m']}x{settings['pq_bits']} fast scan" if settings["index"] == "ivfpq" else "")
    space = ", L2 after the inner-product transform" if settings.get("metric") == "l2" else ""
    return f"faiss {settings['index']} ({knobs}{space}), {settings['candidates']} candidates"


def write_index(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


class AnnIndex:
    """A bundle's index and item vectors: query rows in, exactly scored candidates out (best first)."""

    def __init__(self, bundle):
        faiss = runtime.faiss()  # with the process's threads (streamrec.runtime): set at its start, not here

        settings = bundle.manifest["retrieval"]
        self.settings = settings
        n_items = int(bundle.manifest["n_items"])
        try:
            self.index = faiss.read_index(str(bundle.file(settings["index_file"])))
        except (RuntimeError, KeyError) as e:
            raise UserError(f"{bundle.path}: cannot read the ann index ({str(e).splitlines()[0] if str(e) else e!r})") from None
        try:
            self.vectors = np.load(bundle.file(settings["vectors_file"]), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, KeyError) as e:
            raise UserError(f"{bundle.path}: cannot read the ann item vectors ({e})") from None
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n_items + 1 or self.vectors.dtype != np.float32:
            raise UserError(f"{bundle.path}: {settings['vectors_file']} has shape {self.vectors.shape} {self.vectors.dtype}, expected ({n_items + 1}, D) float32")
        metric = settings.get("metric", "inner_product")  # bundles from before --ann-metric have inner_product
        if metric not in ANN_METRICS:
            raise UserError(f"{bundle.path}: unknown ann metric {metric!r} (known: {', '.join(ANN_METRICS)})")
        self.l2 = metric == "l2"
        want = index_dim(self.vectors.shape[1], metric)
        if self.index.ntotal != n_items or self.index.d != want:
            raise UserError(f"{bundle.path}: the ann index holds {self.index.ntotal} vectors of {self.index.d} dims, expected {n_items} of {want}")
        self.set_depth(int(settings[depth_knob(settings)]))
        self.by_popularity = np.argsort(-bundle.popularity[1:], kind="stable").astype(np.int64)  # fills slots the index leaves empty
        self.set_candidates(int(settings["candidates"]))

    def set_depth(self, depth: int) -> None:
        """Search this deep from now on: HNSW's ``ef_search`` or IVF's ``nprobe`` (the export raises it to reach --min-recall)."""
        if self.settings["index"] == "hnsw":
            self.index.hnsw.efSearch = depth
        else:
            runtime.faiss().extract_index_ivf(self.index).nprobe = depth  # ivfpq: the IVF inside the rotation

    def set_candidates(self, candidates: int) -> None:
        """Take this many candidates per query from now on (the export raises it when depth alone falls short)."""
        self.candidates = min(candidates, len(self.by_popularity))

    def search(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items [B, C] int64, exact scores [B, C] float32), best first, never item 0."""
        b, width = len(query), self.vectors.shape[1]
        q = np.zeros((b, width + self.l2), dtype=np.float32)  # [query, 1] (and the L2 transform's 0)
        q[:, : width - 1] = query
        q[:, width - 1] = 1.0
        _, ids = self.index.search(q, self.candidates)
        q = q[:, :width]
        missing = ids < 0
        for row in np.flatnonzero(missing.any(1)):  # an IVF index with few lists probed can return fewer than C
            found = ids[row][~missing[row]]  # filled with the most popular items it did not return, each once
            fill = self.by_popularity[: self.candidates]
            ids[row][missing[row]] = fill[~np.isin(fill, found)][: int(missing[row].sum())]
        items = ids + 1
        scores = np.matmul(self.vectors[items], q[:, :, None])[:, :, 0]
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32)
