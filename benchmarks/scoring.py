"""Per-event scoring cost of every served model on a 40k-item catalogue, against the seed's way of serving.

The seed answered each click with ``predict_next``: GRU4Rec in torch eager mode,
batch 1, the whole session so far re-run through the GRU for every event, then a
full sort of the scores. Here every available model is exported to a bundle
(untrained neural weights: cost does not depend on what the weights say;
baselines trained on the synthetic sessions) and timed through ``Scorer.step``
at batch 1, 32 and 256 on real prefixes of the synthetic test sessions. For
each neural model the same "eager, recompute, batch 1" way is timed too.

Writes the table into docs/performance.md (section "## Scoring") unless --no-write.

    python benchmarks/scoring.py [--items 40000] [--models gru4rec,sasrec,markov] [--threads 1] [--int8/--no-int8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from export.exporter import export_run
from export.scorer import StepInput, load_scorer
from streamrec.runtime import configure_process
from training.models import available_models, get_model, load_run
from training.models.items import HistoryIndex
from training.synth import synthesize

from _report import environment, produced_by, table, write_section  # benchmarks/ is on sys.path

BATCH_SIZES = (1, 32, 256)
DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
SECTION = "## Scoring"


def build_run(name: str, data, data_dir: Path, run_dir: Path) -> None:
    """A run directory for ``name``: neural models untrained with default settings, baselines trained."""
    cls = get_model(name)
    config = cls.Config()
    if cls.state_kind == "items":
        model = cls.train(data, config, progress=False)
    elif cls.state_kind == "hidden":
        model = cls(data.n_items, config)
    else:
        model = cls(config, data.n_items)
    model.save(run_dir)
    (run_dir / "vocab.json").write_text((data_dir / "vocab.json").read_text())
    doc = json.loads((run_dir / "config.json").read_text())
    doc["data"] = {"path": str(data_dir)}
    (run_dir / "config.json").write_text(json.dumps(doc))


def workload(sessions, batch: int, events: int, rng: np.random.Generator, hidden_size: int) -> list[StepInput]:
    """``events`` clicks at random positions of the test sessions, cut into StepInputs of ``batch`` rows."""
    history = HistoryIndex(sessions)
    positions = rng.choice(np.flatnonzero(sessions.items > 0), size=events, replace=False)
    calls = []
    for lo in range(0, events, batch):
        p = positions[lo : lo + batch]
        hidden = (0.3 * rng.standard_normal((len(p), hidden_size))).astype(np.float32) if hidden_size else None
        calls.append(StepInput(items=sessions.items[p], hidden=hidden, history=history.at(p)))
    return calls


def time_calls(fn, calls, repeats: int = 5) -> float:
    """Best-of-``repeats`` milliseconds per event."""
    fn(calls[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for call in calls:
            fn(call)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / sum(len(c.items) for c in calls)


def seed_way(model, k: int):
    """The seed's ``predict_next`` for one click: eager torch, whole prefix recomputed, full sort."""
    if model.state_kind == "hidden":
        net = model.net.eval()

        def predict(call: StepInput) -> None:
            with torch.no_grad():
                for history in call.history:  # batch 1: one session at a time
                    h = net.init_hidden(1)
                    for item in history:
                        h, out = net.step(torch.tensor([int(item)]), h)
                    torch.argsort(net.score_all(out)[0, 1:], descending=True)[:k]

        return predict
    from export.scorer import left_padded

    module = model.export_module().eval()

    def predict(call: StepInput) -> None:
        with torch.no_grad():
            for history in call.history:
                scores = module(torch.from_numpy(left_padded([history], model.history_len)))
                torch.argsort(scores[0, 1:], descending=True)[:k]

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40_000, help="catalogue size asked of the generator")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--models", default=",".join(available_models()), help="comma-separated model names")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for ONNX Runtime and torch")
    parser.add_argument("--events", type=int, default=512, help="clicks timed per batch size (batch 1 uses a quarter)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="also time int8 bundles of ONNX models")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    configure_process(threads=args.threads, keep_freed_memory=True)  # once, at the start: torch's threads, and glibc keeps freed memory for training
    rng = np.random.default_rng(0)
    names = [n.strip() for n in args.models.split(",") if n.strip()]

    with tempfile.TemporaryDirectory(prefix="streamrec-scoring-") as tmp:
        rows, seed, n_items, prefix = measure(Path(tmp), names, args, rng)
    section = render(rows, seed, n_items, prefix, args)
    print(section)
    if not args.no_write:
        write_section(DOC, section)
        print(f"wrote {DOC} ({SECTION})", file=sys.stderr)


def measure(work: Path, names: list[str], args, rng: np.random.Generator):
    """Build, export and time every model in ``work``; returns (rows, seed ms/event, catalogue size, mean prefix)."""
    print(f"synthesizing {args.sessions:,} sessions over {args.items:,} items ...", file=sys.stderr)
    data = synthesize(args.items, args.sessions, seed=0, test_fraction=0.1)
    data.save(work / "data")
    test = data.test
    rows = []
    seed_ms: dict[int, float] = {}
    for name in tqdm(names, desc="models"):
        run_dir = work / f"run-{name}"
        build_run(name, data, work / "data", run_dir)
        variants = [("fp32", False)]
        if args.int8 and get_model(name).state_kind in ("hidden", "window"):
            variants.append(("int8", True))
        model = None
        for precision, int8 in variants:
            bundle_dir = work / f"bundle-{name}-{precision}"
            manifest = export_run(run_dir, bundle_dir, int8=int8, min_overlap=0.0, parity_sessions=30, threads=args.threads, log=lambda line: tqdm.write(line, file=sys.stderr))
            scorer = load_scorer(bundle_dir, threads=args.threads)
            ms = {}
            for b in BATCH_SIZES:
                calls = workload(test, b, args.events // 4 if b == 1 else args.events, rng, scorer.hidden_size)
                ms[b] = time_calls(scorer.step, calls)
            note = f"overlap {manifest['int8']['top_k_overlap']:.0%}" if int8 else ""
            size = (bundle_dir / manifest["model_file"]).stat().st_size
            rows.append({"model": name, "kind": scorer.kind, "way": f"bundle, {precision}", "ms": ms, "note": note, "mb": size / 1e6})
            model = model or load_run(run_dir)
        if model.state_kind != "items":
            calls = workload(test, 1, args.events // 8, rng, 0)
            eager = time_calls(seed_way(model, 20), calls, repeats=2)
            rows.append({"model": name, "kind": model.state_kind, "way": "seed: eager, recompute, batch 1", "ms": {1: eager}, "note": "", "mb": None})
            if name == "gru4rec":
                seed_ms[1] = eager
        tqdm.write(f"{name}: " + ", ".join(f"{r['way']}: " + " / ".join(f"{v:.3f}" for v in r["ms"].values()) + " ms" for r in rows if r["model"] == name), file=sys.stderr)

    prefix = float(np.mean([len(h) for h in HistoryIndex(test).at(np.flatnonzero(test.items > 0))]))
    return rows, seed_ms.get(1), data.n_items, prefix


def render(rows, seed: float | None, n_items: int, mean_prefix: float, args) -> str:
    def cell(row, b):
        return f"{row['ms'][b]:.3f}" if b in row["ms"] else ""

    def ratio(row, b):
        return f"{seed / row['ms'][b]:.0f}x" if seed and b in row["ms"] else ""

    lines = table(
        ["model", "kind", "served as", "model MB", *(f"ms/event @{b}" for b in BATCH_SIZES), *(f"vs seed @{b}" for b in BATCH_SIZES), "note"],
        [
            [r["model"], r["kind"], r["way"], f"{r['mb']:.1f}" if r["mb"] is not None else "", *(cell(r, b) for b in BATCH_SIZES), *(ratio(r, b) for b in BATCH_SIZES), r["note"]]
            for r in rows
        ],
        align="---" + "r" * (1 + 2 * len(BATCH_SIZES)) + "-",
    )
    return "\n".join(
        [
            SECTION,
            "",
            f"Per-event cost of `Scorer.step` (top-20 answers) on a synthetic catalogue of {n_items:,} items, "
            f"{args.threads} thread(s), best of 5 runs ({environment('torch', 'onnxruntime')}; the load average is taken at the end: "
            "other jobs ran alongside, so repeated runs differ by up to 2x, most at batch 1; read the ratios as orders of magnitude). "
            f"\"vs seed\" = how many times cheaper per event than the seed's serving: GRU4Rec `predict_next` in torch eager mode, "
            f"batch 1, the whole session re-run for every click (test prefixes average {mean_prefix:.1f} items here; the seed's cost grows with them). "
            "Rows \"seed: eager, recompute, batch 1\" time that same way of serving for each neural model. "
            "Neural weights are untrained (default sizes: the cost does not depend on their values); int8 rows give the top-20 overlap with fp32, "
            "which for untrained weights understates what trained models keep (see `streamrec export --int8`). "
            "\"model MB\" is the bundle's model file: at batch 1 an ONNX model reads all of it for every click (memory-bound), "
            "batching shares that read across the rows and int8 shrinks the scoring matrix to a quarter.",
            "",
            *produced_by(),
            *lines,
            "",
        ]
    )


if __name__ == "__main__":
    main()
