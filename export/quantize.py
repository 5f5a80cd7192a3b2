"""int8 dynamic quantization of an exported ONNX model, judged against fp32 on real prefixes.

``quant_pre_process`` (shape inference + graph optimisation) runs first: without
it the scoring MatMul against the transposed item matrix was left in fp32 and
the "int8" model ran 6x slower than fp32. Then ``quantize_dynamic`` stores the
weights of MatMul/Gather nodes as int8 (activations are quantized on the fly).

Quality is measured, not assumed: both models replay the same test prefixes
through the scorer and the mean overlap of their top-K lists is reported with
the speed-up; ``streamrec export --int8`` refuses a model under ``--min-overlap``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from export.parity import Replay


def quantize_int8(fp32_path: Path, out_path: Path) -> None:
    """Write the dynamically int8-quantized version of ``fp32_path`` to ``out_path``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception:  # onnxruntime's symbolic shape inference gives up on some graphs (Caser's Concat)
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8)


def top_k_overlap(a: Replay, b: Replay) -> float:
    """Mean share of ``a``'s top-K items also in ``b``'s top-K, over positions both answered."""
    common, ia, ib = np.intersect1d(a.positions, b.positions, return_indices=True)
    if len(common) == 0:
        return 0.0
    x, y = a.top_items[ia], b.top_items[ib]
    hits = (x[:, :, None] == y[:, None, :]).any(2).sum(1)
    return float(hits.mean() / x.shape[1])
