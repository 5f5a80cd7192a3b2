"""`streamrec train` and `streamrec evaluate`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

from streamrec.errors import UserError
from streamrec.runtime import configure_process


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise UserError(f"--set wants key=value, got '{value}'")
        options[key.strip()] = raw.strip()
    return options


@click.command()
@click.option("--model", "model_name", required=True, help="Model name, e.g. pop, markov, vsknn, gru4rec, sasrec.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Prepared DATA_DIR.")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (neural models).")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for training.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other model setting; repeatable.")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/checkpoint.pt (neural models).")
@click.option("--device", default=None, help="auto (CUDA when present, the default), cpu, cuda or cuda:N (neural models).")
@click.option("--precision", default=None, help="fp32 (default) or bf16: bfloat16 autocast in the forward pass (neural models).")
def train(model_name: str, data_dir: Path, run_dir: Path, epochs, seed, threads, sets, resume, device, precision) -> None:
    """Train a model on a prepared dataset and save it to RUN_DIR."""
    import dataclasses

    from training.data import PreparedData
    from training.models import get_model
    from training.models.base import config_from_options

    cls = get_model(model_name)
    options = _parse_sets(sets)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for name, value in (("epochs", epochs), ("seed", seed), ("threads", threads), ("resume", resume or None), ("device", device), ("precision", precision)):
        if value is None:
            continue
        if name not in fields:
            click.echo(f"note: model '{model_name}' has no '{name}' setting; ignoring --{name}", err=True)
            continue
        options[name] = str(value)
    config = config_from_options(cls.Config, options)
    if hasattr(config, "check"):
        config.check()  # a bad setting (e.g. --device cuda without CUDA) fails before the data is read
    if "threads" in fields:  # a model trained by training.trainer.fit: its threads and allocator, for the whole process
        configure_process(threads=config.threads, keep_freed_memory=True)
    data = PreparedData.load(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"training {model_name} on {data_dir} ({data.n_items:,} items, {len(data.train):,} sessions, {data.train.n_events:,} events)", err=True)
    started = time.perf_counter()
    model = cls.train(data, config, progress=True, run_dir=run_dir)
    seconds = time.perf_counter() - started
    model.save(run_dir)
    shutil.copyfile(Path(data_dir) / "vocab.json", run_dir / "vocab.json")
    doc = json.loads((run_dir / "config.json").read_text())
    doc["data"] = {"path": str(Path(data_dir).resolve()), "stats": data.stats}
    doc["train_seconds"] = round(seconds, 2)
    fit_result = getattr(model, "fit_result", None)
    if fit_result is not None:
        doc["trained_on"] = fit_result.device
        doc["best_epoch"], doc["epochs_run"] = fit_result.best_epoch + 1, len(fit_result.history)
        if fit_result.out_of_time:  # the time budget, not its epochs or early stopping, ended it: say so where the run is
            doc["out_of_time"] = True
            click.echo(f"time budget of {config.time_budget_s:g} s spent: kept epoch {doc['best_epoch']} of {doc['epochs_run']} run", err=True)
    (run_dir / "config.json").write_text(json.dumps(doc, indent=2))
    click.echo(f"trained {model_name} in {seconds:.1f}s -> {run_dir}", err=True)


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory from `streamrec train`.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Prepared DATA_DIR.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "valid"]))
@click.option("--mode", type=click.Choice(["next", "last"]), default=None, help="Every position, or the last item only (default: the dataset's protocol).")
@click.option("--exclude-seen", is_flag=True, help="Remove the session's own earlier items from the ranking (as Klenitskiy & Vasilev do on leave-one-out data).")
def evaluate(run_dir: Path, data_dir: Path, split: str, mode: str | None, exclude_seen: bool) -> None:
    """Full-ranking evaluation of a trained run; writes RUN_DIR/metrics.json."""
    import numpy as np

    from training.data import PreparedData
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import format_table
    from training.models import load_run

    data = PreparedData.load(data_dir)
    model = load_run(run_dir)
    if model.n_items != data.n_items:
        raise UserError(f"{run_dir} was trained on {model.n_items} items but {data_dir} has {data.n_items}: not the same dataset")
    mode = mode or data.stats.get("eval_mode", "next")
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    started = time.perf_counter()
    metrics = run_evaluation(model, data.split(split), mode=mode, popularity=popularity, item_features=data.item_features or None, exclude_seen=exclude_seen)
    metrics["split"] = split
    metrics["mode"] = mode
    metrics["data"] = str(Path(data_dir).resolve())
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    click.echo(format_table(metrics))
    (Path(run_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
