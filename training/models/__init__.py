"""Model registry: ``streamrec train --model NAME`` looks NAME up here.

Modules are imported lazily so that `streamrec --help` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from streamrec.errors import UserError

MODELS: dict[str, str] = {
    # non-neural baselines (state kind "items")
    "pop": "training.models.pop:MostPopular",
    "spop": "training.models.spop:SessionPopular",
    "markov": "training.models.markov:MarkovChain",
    "sr": "training.models.sr:SequentialRules",
    "iknn": "training.models.iknn:ItemKNN",
    "sknn": "training.models.sknn:SKNN",
    "vsknn": "training.models.vsknn:VSKNN",
    "stan": "training.models.stan:STAN",
    "vstan": "training.models.vstan:VSTAN",
    # neural sequence models
    "gru4rec": "training.models.gru4rec:GRU4Rec",
    "caser": "training.models.caser:Caser",
    "sasrec": "training.models.sasrec:SASRec",
    "bert4rec": "training.models.bert4rec:BERT4Rec",
    "bst": "training.models.bst:BST",
    "srgnn": "training.models.srgnn:SRGNN",
}


def get_model(name: str):
    """The model class for a registry name."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    module, cls = MODELS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise UserError(f"model '{name}' is not available in this build") from None
        raise


def available_models() -> list[str]:
    """Names whose module exists."""
    out = []
    for name, target in MODELS.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            out.append(name)
    return out


def load_run(run_dir: str | Path):
    """Load the trained model in RUN_DIR (config.json says which class)."""
    run_dir = Path(run_dir)
    cfg = run_dir / "config.json"
    if not cfg.is_file():
        raise UserError(f"{run_dir}: not a training run (config.json missing; make one with `streamrec train`)")
    try:
        name = json.loads(cfg.read_text())["model"]
    except (ValueError, KeyError):
        raise UserError(f"{cfg}: unreadable run config") from None
    return get_model(name).load(run_dir)
