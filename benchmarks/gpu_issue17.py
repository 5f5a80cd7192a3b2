"""Issue 17 on a lent GPU machine: one prepared run that fits its 15 minutes of device time.

Here, once (a link, nothing copied; `.gpu-data` is ignored by .git/info/exclude):

    ln -sfn ../shared/data .gpu-data && echo /.gpu-data >> .git/info/exclude

Then the device tool's `run`, with carry [".gpu-data/amazon-beauty-bert4rec/beauty.txt"] and timeout_s 540:

    PYTHONUNBUFFERED=1 STREAMREC_SHARED_DATA=.gpu-data python3 benchmarks/gpu_issue17.py --out $OUT

The machine's own python3 holds torch (no pip there); everything this imports is in its image. In order:

1. **Smoke**, a few seconds: SASRec, BERT4Rec and GRU4Rec on synthetic data, one epoch each with
   ``device=cuda`` in fp32 and bf16, saved, loaded back with ``load_run`` (CPU tensors) and evaluated on the
   CPU; the CPU's figures for the same run must match the GPU-trained model's own. Prints step time, batch
   time (the host's share: near step time means the GPU is starved) and GPU utilisation per epoch.
2. **Amazon Beauty rows**: the two rows of docs/results.md that issue 17 holds against Klenitskiy & Vasilev,
   trained with ``device=cuda`` until early stopping: SASRec with their settings and initialisation, and
   BERT4Rec in their configuration (initialisation, batch 128, patience 20 on MRR@20 of their 10,000-user
   validation sample without the user's own items, post-norm block, bare tied output layer, each user's last
   window, no target where the mask draw hid nothing, softmax over the whole vocabulary), the closest BERT4Rec
   rows on the CPU over four seeds (150, 83, 83 and 71 epochs there; with BERT's input layer and their NDCG@10 choice of
   epoch too it stopped sooner and lower, docs/results.md).
   Each row trains within a wall-time budget (``BUDGETS``, ``--budgets``: SASRec 90 s, BERT4Rec the rest of
   ``--seconds`` 480 less 45 s for its test rankings), so that the whole run, smoke and rankings included, ends
   inside the call's 540 s however fast the GPU turns out to be; a row its budget cut short keeps the best epoch
   so far, is marked ``out_of_time`` (``(budget N s)`` in the table: a lower bound) and keeps ``,device=cuda`` in
   its name, so it sits beside the CPU row instead of replacing it. Each row goes to ``$OUT/accuracy-gpu.json`` as it is measured (``device`` names the GPU);
   merge them into docs/accuracy.json here and re-render with ``python benchmarks/accuracy.py --render-only``.
   The run ends with a table: per row its device, epochs, median step and batch time, mean GPU utilisation
   and HR@10 / NDCG@10 with the user's own items removed.

``--device cpu --max-epochs 1 --dataset diginetica`` runs the same steps here on the CPU in a minute (a dry run
of the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy  # noqa: E402  (benchmarks/ on sys.path)
from training.evaluate import evaluate  # noqa: E402
from training.models import get_model, load_run  # noqa: E402
from training.synth import synthesize  # noqa: E402

SMOKE = {
    "sasrec": dict(epochs=1, history_len=10, hidden_size=32, batch_size=64),
    "bert4rec": dict(epochs=1, history_len=10, hidden_size=32, batch_size=64),
    "gru4rec": dict(epochs=1, layers=(32,), batch_size=32, n_sample=32),
}
BEAUTY = [
    "sasrec:hidden_size=64,dropout=0.1,init=normal",
    "bert4rec:init=normal,batch_size=128,patience=20,valid_exclude_seen=true,unmasked=skip,train_windows=last,block=postnorm,head=tied,valid_users=10000,softmax=vocab",
]
# wall-time budget per Beauty row's training, seconds (TrainerConfig.time_budget_s), or None: what is left of the
# run's --seconds when the row starts, less RESERVE_S for its test rankings. With the smoke and loading the file,
# the run ends inside the device call's 540 s whatever the GPU's speed; BERT4Rec, the open row, gets the most.
BUDGETS: tuple[float | None, ...] = (90.0, None)
SECONDS = 480.0
RESERVE_S = 45.0


def smoke(device: str, out: Path) -> list[dict]:
    """Train, save, load on the CPU and evaluate each model kind once per precision; the figures must agree."""
    data = synthesize(n_items=300, n_sessions=800, seed=3, test_fraction=0.2)
    lines = []
    for name, settings in SMOKE.items():
        cls = get_model(name)
        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory() as tmp:
                run = Path(tmp) / "run"
                started = time.perf_counter()
                model = cls.train(data, cls.Config(device=device, precision=precision, **settings), progress=False, run_dir=run)
                model.save(run)
                trained = evaluate(model, data.test, ks=(20,), progress=False)["MRR@20"]
                loaded = evaluate(load_run(run), data.test, ks=(20,), progress=False)["MRR@20"]
                epoch = model.fit_result.history[-1]
                line = {"model": name, "precision": precision, "device": epoch["device"], "step_ms": epoch["step_ms"],
                        "batch_ms": epoch["batch_ms"], "gpu_util": epoch.get("gpu_util"), "mrr20": trained,
                        "mrr20_loaded_on_cpu": loaded, "seconds": round(time.perf_counter() - started, 1)}
                print(json.dumps(line), flush=True)
                if abs(trained - loaded) > 1e-6:
                    raise SystemExit(f"{name} {precision}: MRR@20 {trained} trained, {loaded} loaded on the CPU")
                lines.append(line)
    (out / "smoke.json").write_text(json.dumps(lines, indent=1))
    return lines


def beauty(device: str, max_epochs: int, threads: int, out: Path, dataset: str = "beauty",
           budgets: tuple[float | None, ...] = BUDGETS, deadline: float | None = None) -> list[dict]:
    """The Beauty rows (or these specs on another dataset), each written to out/accuracy-gpu.json as soon as it is
    measured, each training within its budget (seconds; 0 = none; None = until ``deadline``, a ``perf_counter``
    time, less ``RESERVE_S``, and at least 1 s)."""
    rows: list[dict] = []

    def record(row: dict) -> None:
        # a finished row is named without the device, so that it replaces the CPU row of that spec; one its budget
        # cut short (a lower bound) keeps the device in its name and sits beside it
        name = row["model"] if row.get("out_of_time") else row["model"].removesuffix(f",device={device}")
        rows.append({**row, "model": name})
        (out / "accuracy-gpu.json").write_text(json.dumps(rows, indent=1))

    for spec, budget in zip(BEAUTY, budgets, strict=True):
        if budget is None:
            if deadline is None:
                raise ValueError("a budget of the rest needs a deadline")
            budget = max(1.0, deadline - time.perf_counter() - RESERVE_S)
            print(f"  {budget:.0f} s left for this row's training", flush=True)
        accuracy.run_dataset(dataset, [f"{spec},device={device}"], max_epochs, threads, record, time_budget_s=budget)
    print("\n| model | device | epochs | train s | step ms | batch ms | GPU % | HR@10 / NDCG@10, own items removed |", flush=True)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model'].split(':')[0]} | {r.get('device', 'cpu')} | {accuracy.epochs_cell(r)} | {r['train_s']:.0f} | {r.get('step_ms', '')} "
              f"| {r.get('batch_ms', '')} | {r.get('gpu_util', '')} | {r['HR@10 seen removed']:.4f} / {r['NDCG@10 seen removed']:.4f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for smoke.json and accuracy-gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu for a dry run here")
    parser.add_argument("--max-epochs", type=int, default=200, help="cap per Beauty row (early stopping ends sooner)")
    parser.add_argument("--threads", type=int, default=8, help="torch CPU threads (batch building, test ranking)")
    parser.add_argument("--budgets", default=",".join("rest" if b is None else f"{b:g}" for b in BUDGETS),
                        help="wall-time budget of each Beauty row's training, seconds, in BEAUTY's order (0 = none; "
                        "rest = what is left of --seconds, less a reserve for its test rankings)")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="the whole run's wall time that 'rest' budgets fill")
    parser.add_argument("--smoke-only", action="store_true")
    parser.add_argument("--dataset", default="beauty", choices=sorted(accuracy.DATASETS), help="beauty (the issue's); another for a quick dry run")
    args = parser.parse_args()
    wrong = f"error: --budgets takes {len(BEAUTY)} values, seconds (0 or more) or 'rest', comma-separated, got '{args.budgets}'"
    try:
        budgets = tuple(None if b.strip() == "rest" else float(b) for b in args.budgets.split(","))
    except ValueError:
        raise SystemExit(wrong) from None
    if len(budgets) != len(BEAUTY) or any(b is not None and b < 0 for b in budgets):
        raise SystemExit(wrong)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (torch.cuda.is_available() is false); use --device cpu for a dry run")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    smoke(args.device, args.out)
    print(f"smoke done in {time.perf_counter() - started:.0f} s", flush=True)
    if not args.smoke_only:
        beauty(args.device, args.max_epochs, args.threads, args.out, args.dataset, budgets, deadline=started + args.seconds)
    print(f"all done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
