"""The defaults of ``export_run`` and `streamrec export`, in one place light enough for the CLI to import (no numpy, no torch)."""

K = 20  # recommendations per answer
SEEN_HISTORY = 50  # hidden / items kinds: recent items kept per session for exclude_seen
MIN_OVERLAP = 0.9  # least top-K overlap of an int8 model with fp32
PARITY_SESSIONS = 200  # test sessions replayed for the parity check
THREADS = 1  # CPU threads for the export checks
RETRIEVAL = "exact"  # exact: the whole catalogue scored inside the ONNX graph; ann: candidates from an index, re-scored exactly
MIN_RECALL = 0.99  # least top-K recall of an ann bundle against exact scoring on test prefixes
CANDIDATES = 200  # ann: candidates taken from the index per answer (re-scored exactly), well above K
MAX_CANDIDATES = 800  # ann: the most candidates the export tries when the deepest search still falls short of --min-recall
ANN_INDEXES = ("ivfpq", "ivf", "hnsw")  # faiss index kinds of --ann-index
ANN_INDEX = "ivfpq"  # faiss index kind: ivfpq (IVF over 4-bit PQ fast-scan codes: recall 0.99 on synthetic 1M-item catalogues at a third of ivf's cost, not on trained GRU4Rec: docs/performance.md), ivf (IVF-Flat), or hnsw (cost grows with log n, but lost recall with inner product as catalogues grew: docs/bundles.md)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 100
HNSW_EF_SEARCH = 256  # faiss searches with max(ef_search, candidates)
HNSW_EF_SEARCH_MAX = 4096  # the deepest ef_search the export tries when it raises the depth to reach --min-recall
ANN_METRICS = ("inner_product", "l2")  # --ann-metric: how the index searches (the re-scoring is always the exact inner product)
ANN_METRIC = "inner_product"  # --ann-metric: inner_product, or l2 (the inner-product search asked as an L2 one after Bachrach et al.'s transform: better recall on trained GRU4Rec vectors, docs/performance.md)
IVF_NPROBE = 64  # ivf lists scanned per query; nlist defaults to 4 * sqrt(n_items) (at most n_items / 39, what faiss's k-means wants), for ivfpq too
IVFPQ_NPROBE = 128  # ivfpq lists scanned per query: its codes are cheap to scan, so twice ivf's
