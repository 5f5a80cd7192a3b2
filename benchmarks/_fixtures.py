"""What several benchmarks build before they measure, in one place."""

from __future__ import annotations

import json
from pathlib import Path


def untrained_gru4rec_run(work: Path, data, hidden: int) -> Path:
    """A run directory (``work/run``) of an untrained GRU4Rec over ``data``, saved in ``work/data``:
    serving cost, state size and takeover do not depend on the weights, so the benchmarks that
    measure those skip training."""
    import torch

    from training.models import get_model

    data.save(work / "data")
    cls = get_model("gru4rec")
    torch.manual_seed(0)
    model = cls(data.n_items, cls.Config(layers=(hidden,)))
    run_dir = work / "run"
    model.save(run_dir)
    (run_dir / "vocab.json").write_text((work / "data" / "vocab.json").read_text())
    doc = json.loads((run_dir / "config.json").read_text())
    doc["data"] = {"path": str(work / "data")}
    (run_dir / "config.json").write_text(json.dumps(doc))
    return run_dir
