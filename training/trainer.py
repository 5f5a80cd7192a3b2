"""The one training loop every neural model uses: optimizer, schedule, early stopping, checkpoints, logs.

How a model uses it (the whole API)::

    from training.trainer import TrainerConfig, fit, validation_figures

    @dataclass
    class Config(TrainerConfig):          # the model's Config *inherits* the common settings,
        epochs: int = 20                  # overriding their defaults where the model wants others
        hidden_size: int = 64             # ... and adds its own

    result = fit(
        module,                           # the nn.Module being trained (its parameters are optimized)
        config,                           # a TrainerConfig (usually the model's Config)
        batches=lambda epoch: ...,        # epoch -> iterable of mini-batches (anything loss_fn takes)
        loss_fn=lambda batch: ...,        # mini-batch -> scalar loss tensor (closes over the module)
        validate=lambda: validation_figures(model, data.valid),   # optional: MRR@20, NDCG@10 on held-out sessions
        run_dir=run_dir, progress=True,
    )
    result.best_epoch, result.best_score, result.history, result.stopped_early, result.out_of_time

What ``fit`` does, in order:
  - ``seed_everything(config.seed)`` before anything else. ``config.threads`` and glibc's allocator are
    process-wide: the program sets them once at its start (``streamrec.runtime.configure_process``,
    as `streamrec train` does), never ``fit``;
  - ``config.device`` (``auto`` = CUDA when ``torch.cuda.is_available()``, else the CPU; ``cpu``; ``cuda``
    or ``cuda:N``) decides where ``module`` trains: it is moved there and every mini-batch is moved there
    (tensors, also inside tuples, lists and dicts) before ``loss_fn`` sees it. ``cuda`` on a machine
    without CUDA is a one-line UserError. ``config.precision`` ``bf16`` runs ``loss_fn`` under
    ``torch.autocast`` with bfloat16 (CUDA, or the CPU, where it is usually slower unless the CPU has
    bf16 instructions); weights, optimizer state, backward's accumulation and validation stay float32;
  - each epoch: ``module.train()``, iterate ``batches(epoch)`` with a tqdm bar showing the running loss,
    for each batch ``zero_grad -> loss_fn(batch).backward() -> clip -> step``; a NaN/inf loss stops with
    a UserError (lower the learning rate). On the CPU every step's loss is checked; on a GPU the losses
    are summed on the device and checked every ``SYNC_EVERY`` steps, so the host never waits for the
    GPU step by step and builds the next batch while the GPU computes;
  - after each epoch, if ``validate`` is given: ``module.eval()`` + ``torch.no_grad()``, call it, keep the
    best epoch's weights (the models' validation ranks without the user's own items when
    ``config.valid_exclude_seen`` is set, as the test's "own items removed" figures do; on a fixed random sample
    of ``config.valid_users`` validation sessions when that is set, ``validation_sample``); stop when
    ``config.patience`` (> 0) epochs pass without improvement. The best weights are loaded back into
    ``module`` before ``fit`` returns;
  - ``config.time_budget_s`` (> 0) ends training after the epoch in which this call's wall time, validation
    included, passed it, keeping the best epoch so far (``result.out_of_time``): a run that must fit a
    fixed window (a lent GPU's minutes, a CPU budget per model) ends with a model, marked as cut short.
    A resumed run counts its budget afresh;
  - with ``run_dir``: ``train_log.jsonl`` (one JSON line per epoch: epoch, loss, val_mrr20, seconds, lr,
    device, step_ms = training wall time per optimizer step, batch_ms = of which building and moving the
    batch, and on CUDA gpu_util = mean ``torch.cuda.utilization()`` in %, null where it cannot be read),
    ``checkpoint.pt`` (weights, optimizer state, epoch, best weights, history; all tensors on the CPU,
    loadable with ``torch.load(..., weights_only=True)`` on a machine without a GPU) and
    ``learning_curve.png`` after every epoch; with ``config.keep_epochs`` also ``epochs/NNN.pt``, the
    weights after epoch NNN (counted from 1), so any metric can be traced over epochs afterwards.
    ``config.resume`` (``streamrec train --resume``) continues from ``checkpoint.pt`` when it exists
    (a finished run returns at once, on any device); without it an existing log is started afresh;
  - the module is back on the CPU when ``fit`` returns, so saving, evaluation and export need no GPU.

Contracts for the callbacks:
  - ``batches(epoch)`` must be deterministic given ``(config.seed, epoch)`` (draw from
    ``epoch_rng(config, epoch)``), so a resumed run sees the same batches as an uninterrupted one.
    If the iterable has ``__len__`` the bar shows a total and the lr schedule moves per step;
    otherwise the schedule moves per epoch.
  - Any state carried between mini-batches (GRU4Rec's hidden state) lives in the model-side closures:
    ``batches`` says what to carry, ``loss_fn`` carries it (detached).
  - ``validate()`` returns a float (MRR@20) or a dict of ``VALID_METRICS`` figures, higher is better
    (``validation_figures`` computes them from any model's ``score_next``); ``config.valid_metric`` picks
    the one early stopping and the kept epoch follow.
  - Both run while the module is on ``config.device``: tensors that ``loss_fn`` makes itself are made on
    its batch's device, and scoring moves its inputs to the network's device (``WindowModel.scores``,
    GRU4Rec's ``_score``) and returns CPU arrays.

A module whose ``sparse_parameters()`` returns parameters trains them with sparse gradients
(``make_optimizer``: SparseAdam beside Adam/AdamW; no weight decay or grad_clip for them).

Optimizers (``config.optimizer``): ``adam``, ``adamw``, ``sgd`` (with ``momentum``) and ``adagrad``
(Adagrad with optional momentum, GRU4Rec's default; ``momentum`` 0 = plain Adagrad). For ``sgd`` and
``adagrad`` the momentum is classical (heavy-ball) unless ``nesterov`` is set.
Learning-rate schedules (``config.lr_schedule``): ``constant``, ``linear`` (to 0 at the end),
``cosine`` (to 0 at the end); all after ``warmup_steps`` steps of linear warm-up.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from streamrec.errors import UserError
from training.sessions import Sessions

OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad")
LR_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
PRECISIONS = ("fp32", "bf16")
# what early stopping and the kept epoch may follow (train_log.jsonl has each as val_<name>) -> the evaluator's figure
VALID_METRICS = {"mrr20": "MRR@20", "ndcg10": "NDCG@10"}
VALID_KS = (10, 20)  # the cut-offs those figures need
SYNC_EVERY = 20  # GPU steps between two reads of the loss (divergence check, progress bar)
_END = object()


@dataclass
class TrainerConfig:
    """Settings common to every neural model (a model's Config inherits and may re-default them)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0  # sgd / adagrad momentum
    nesterov: bool = False  # Nesterov instead of classical momentum (sgd, adagrad)
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm, 0 = off
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 42
    threads: int = 2  # torch intra-op threads, set by the program at its start (streamrec.runtime.configure_process)
    patience: int = 0  # epochs without validation gain before stopping, 0 = run all epochs
    valid_exclude_seen: bool = False  # validation ranks without the user's own earlier items, as `evaluate --exclude-seen` (and Klenitskiy & Vasilev) rank
    valid_users: int = 0  # validate on a fixed random sample of this many validation sessions (0 = all); Klenitskiy & Vasilev sample 10,000
    valid_metric: str = "mrr20"  # the validation figure early stopping follows; "ndcg10": NDCG@10, as Klenitskiy & Vasilev choose
    stop_after: int = 0  # end after this many epochs (0 = all) while the lr schedule still spans ``epochs``: a refit repeats the chosen run's schedule
    time_budget_s: float = 0.0  # end after the epoch in which this fit's wall time (validation included) passed this many seconds (0 = none); FitResult.out_of_time says so
    resume: bool = False  # continue from run_dir/checkpoint.pt
    keep_epochs: bool = False  # with a run_dir, also save every epoch's weights to run_dir/epochs/NNN.pt (benchmarks/epoch_curves.py)
    device: str = "auto"  # auto = CUDA when available, else cpu; cpu; cuda; cuda:N
    precision: str = "fp32"  # bf16 = autocast to bfloat16 in the forward pass and loss

    def check(self) -> None:
        """One-line errors for impossible settings (called by fit; models may call it early)."""
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer '{self.optimizer}' unknown (known: {', '.join(OPTIMIZERS)})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"lr_schedule '{self.lr_schedule}' unknown (known: {', '.join(LR_SCHEDULES)})")
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"setting '{name}' must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "grad_clip", "warmup_steps", "patience", "stop_after", "valid_users", "time_budget_s"):
            if getattr(self, name) < 0:
                raise UserError(f"setting '{name}' must not be negative, got {getattr(self, name)}")
        if self.valid_metric not in VALID_METRICS:
            raise UserError(f"valid_metric '{self.valid_metric}' unknown (known: {', '.join(VALID_METRICS)})")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision '{self.precision}' unknown (known: {', '.join(PRECISIONS)})")
        resolve_device(self.device)


def validation_sample(valid: Sessions, config: TrainerConfig) -> Sessions:
    """The validation sessions early stopping ranks: all of them, or ``config.valid_users`` of them drawn once
    (from ``config.seed``, so a resumed run validates on the same users). A sample is cheaper per epoch and,
    being noisier, picks a different epoch on a plateau: Klenitskiy & Vasilev select on 10,000 users."""
    if not config.valid_users or config.valid_users >= len(valid):
        return valid
    chosen = np.random.default_rng([config.seed, 0x5A11]).choice(len(valid), size=config.valid_users, replace=False)
    keep = np.zeros(len(valid), dtype=bool)
    keep[chosen] = True
    return valid.select(keep)


def resolve_device(name: str) -> torch.device:
    """The torch device a ``device`` setting names; one-line errors for unknown or absent devices."""
    if name not in DEVICES and not re.fullmatch(r"cuda:\d+", name):
        raise UserError(f"device '{name}' unknown (known: auto, cpu, cuda, cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' asked for, but this machine has no CUDA device (torch.cuda.is_available() is false); use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (also inside tuples, named tuples, lists and dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (checkpoints load on machines without a GPU)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def autocast(device: torch.device, precision: str):
    """The context ``loss_fn`` runs in: bfloat16 autocast for ``precision="bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gpu_utilization(device: torch.device) -> float | None:
    """GPU utilisation in % (``torch.cuda.utilization``, which needs NVML), or None where it cannot be read."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing or NVML unavailable: report nothing rather than fail training
        return None


@dataclass
class FitResult:
    """What training did: per-epoch log lines, the epoch whose weights were kept and its score."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    stopped_early: bool = False
    out_of_time: bool = False  # config.time_budget_s ended it before its epochs, early stopping or stop_after did
    device: str = "cpu"  # where it trained


class AdagradMomentum(torch.optim.Optimizer):
    """Adagrad whose step goes through a momentum term (GRU4Rec's optimizer).

    acc += g^2;  u = lr * g / sqrt(acc + eps);  v' = momentum * v - u;  then p += v' (classical, as
    the official GRU4Rec implementation does) or, with ``nesterov``, p += momentum * v' - u.
    With momentum 0 it is plain Adagrad. Sparse gradients (embeddings looked up with
    ``sparse=True``) update only the rows they touch: accumulator, velocity and weights of other rows
    stay as they are, which makes a step's cost independent of the catalogue size.
    """

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.0, eps: float = 1e-6, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, nesterov=nesterov))

    def _state(self, p: torch.Tensor, momentum: float) -> dict:
        state = self.state[p]
        if not state:
            state["acc"] = torch.zeros_like(p)
        if momentum and "velocity" not in state:
            state["velocity"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, eps, wd, nesterov = group["lr"], group["momentum"], group["eps"], group["weight_decay"], group["nesterov"]
            dense_p, dense_g = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._sparse_step(p, self._state(p, momentum), lr, momentum, eps, wd, nesterov)
                else:
                    dense_p.append(p)
                    dense_g.append(p.grad)
            if not dense_p:
                continue
            states = [self._state(p, momentum) for p in dense_p]
            if wd:
                dense_g = torch._foreach_add(dense_g, dense_p, alpha=wd)
            accs = [st["acc"] for st in states]
            torch._foreach_addcmul_(accs, dense_g, dense_g)
            denom = torch._foreach_add(accs, eps)
            torch._foreach_sqrt_(denom)
            if not momentum:
                torch._foreach_addcdiv_(dense_p, dense_g, denom, value=-lr)
                continue
            update = torch._foreach_div(dense_g, denom)
            torch._foreach_mul_(update, lr)
            velocity = [st["velocity"] for st in states]
            torch._foreach_mul_(velocity, momentum)
            torch._foreach_sub_(velocity, update)
            if nesterov:
                torch._foreach_add_(dense_p, velocity, alpha=momentum)
                torch._foreach_sub_(dense_p, update)
            else:
                torch._foreach_add_(dense_p, velocity)

    @staticmethod
    def _sparse_step(p, state, lr, momentum, eps, wd, nesterov) -> None:
        grad = p.grad.coalesce()
        rows, g = grad.indices()[0], grad.values()
        if wd:
            g = g + wd * p[rows]
        acc = state["acc"][rows] + g * g
        state["acc"][rows] = acc
        update = lr * g / (acc + eps).sqrt_()
        if momentum:
            v = momentum * state["velocity"][rows] - update
            state["velocity"][rows] = v
            update = update - momentum * v if nesterov else -v
        p.index_add_(0, rows, -update)


class Optimizers:
    """Several optimizers stepped as one (the parts of the trainer's optimizer API ``fit`` uses)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for o in self.optimizers for group in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def make_optimizer(params, config: TrainerConfig, sparse_params=()) -> torch.optim.Optimizer | Optimizers:
    """The optimizer named by ``config.optimizer``.

    ``sparse_params`` get sparse gradients (item tables looked up with ``sparse=True``). Adam and
    AdamW cannot take those, so they go to ``torch.optim.SparseAdam`` (lazy Adam: the moments of the
    rows a step does not touch stay as they are), the rest to Adam/AdamW: a dense Adam step over a
    1M-row table costs a second per step on the CPU, the sparse one a few ms. SGD and Adagrad take
    them as they are.
    """
    name = config.optimizer
    sparse_params = list(sparse_params)
    if sparse_params and name in ("adam", "adamw"):
        if config.weight_decay:
            raise UserError(f"optimizer '{name}' with sparse item tables has no weight decay: set weight_decay 0")
        sparse_ids = {id(p) for p in sparse_params}
        dense = [p for p in params if id(p) not in sparse_ids]
        return Optimizers(make_optimizer(dense, config), torch.optim.SparseAdam(sparse_params, lr=config.lr))
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0)
    if name == "adagrad":
        return AdagradMomentum(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov)
    raise UserError(f"optimizer '{name}' unknown (known: {', '.join(OPTIMIZERS)})")


def lr_factor(config: TrainerConfig, step: int, progress: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps, ``progress`` in [0, 1] of training done."""
    factor = 1.0
    if config.lr_schedule == "linear":
        factor = max(0.0, 1.0 - progress)
    elif config.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if config.warmup_steps:
        factor *= min(1.0, (step + 1) / config.warmup_steps)
    return factor


def seed_everything(seed: int) -> None:
    """Fix Python, numpy's global and torch's RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_rng(config: TrainerConfig, epoch: int) -> np.random.Generator:
    """The numpy generator a batches(epoch) function should draw from (same seed + epoch -> same batches)."""
    return np.random.default_rng([config.seed, epoch])


def validation_figures(model, sessions: Sessions, batch_size: int = 512, mode: str = "next", exclude_seen: bool = False) -> dict[str, float]:
    """Every ``VALID_METRICS`` figure of ``model`` (anything with ``score_next``) over the positions ``mode``
    evaluates: every next-item position ("next") or each sequence's last target ("last", leave-one-out).

    One full ranking with conservative ties, by ``training.evaluate.evaluate``; ``exclude_seen`` removes the
    session's own items up to each position from the ranking first.
    """
    from training.evaluate import evaluate

    return validation_subset(evaluate(model, sessions, ks=VALID_KS, mode=mode, batch_size=batch_size, progress=False, exclude_seen=exclude_seen))


def validation_subset(figures: dict[str, float]) -> dict[str, float]:
    """The ``VALID_METRICS`` figures, by setting name, of the evaluator's figures (``evaluate``, ``rank_metrics``)."""
    return {name: figures[label] for name, label in VALID_METRICS.items()}


def _save_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("train loss", color="tab:blue")
    vals = [h["val_mrr20"] for h in history]
    if any(v is not None for v in vals):
        ax2 = ax.twinx()
        ax2.plot(epochs, [np.nan if v is None else v for v in vals], "s-", color="tab:orange", label="val MRR@20")
        ax2.set_ylabel("validation MRR@20", color="tab:orange")
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit(
    module: nn.Module,
    config: TrainerConfig,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[Any], torch.Tensor],
    *,
    validate: Callable[[], float] | None = None,
    run_dir: Path | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``module`` for ``config.epochs`` epochs (see the module docstring for the contract)."""
    from tqdm.auto import tqdm

    config.check()
    fit_started = time.perf_counter()
    device = resolve_device(config.device)
    on_cpu = device.type == "cpu"
    seed_everything(config.seed)
    module.to(device)
    sparse_params = list(getattr(module, "sparse_parameters", list)())
    if sparse_params and config.grad_clip:
        raise UserError("grad_clip does not apply to a model trained with sparse item tables: set grad_clip 0")
    optimizer = make_optimizer(module.parameters(), config, sparse_params)
    result = FitResult()
    best_state: dict | None = None
    start_epoch, step, since_best = 0, 0, 0
    ckpt_path = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    log_path = Path(run_dir) / "train_log.jsonl" if run_dir is not None else None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)

    if config.resume and ckpt_path is not None and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the state to the parameters' device
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start_epoch, step, since_best = ckpt["epoch"] + 1, ckpt["step"], ckpt["since_best"]
        result = FitResult(ckpt["history"], ckpt["best_epoch"], ckpt["best_score"], ckpt["stopped_early"])
        best_state = ckpt["best_model"]
        if result.stopped_early:
            start_epoch = config.epochs
    elif log_path is not None and log_path.exists():
        log_path.unlink()

    last_epoch = min(config.epochs, config.stop_after) if config.stop_after else config.epochs
    for epoch in range(start_epoch, last_epoch):
        module.train()
        epoch_batches = batches(epoch)
        n_steps = len(epoch_batches) if hasattr(epoch_batches, "__len__") else None
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False, mininterval=0.5)
        started = time.perf_counter()
        loss_sum, n_batches, lr, batch_seconds = 0.0, 0, config.lr, 0.0
        pending = None if on_cpu else torch.zeros((), device=device)  # GPU: losses since the last read
        utilization: list[float] = []
        iterator = iter(epoch_batches)
        for i in itertools.count():
            waited = time.perf_counter()
            batch = next(iterator, _END)
            if batch is _END:
                break
            if not on_cpu:
                batch = to_device(batch, device)
            batch_seconds += time.perf_counter() - waited
            frac = (epoch + (i / n_steps if n_steps else 0.0)) / config.epochs
            lr = config.lr * lr_factor(config, step, frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, config.precision):
                loss = loss_fn(batch)
            if on_cpu:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise UserError(f"training diverged at epoch {epoch + 1}, step {i + 1} (loss {value}); lower 'lr'")
                loss_sum += value
            else:
                pending += loss.detach().float()
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            n_batches += 1
            bar.update(1)
            if not on_cpu and (n_batches % SYNC_EVERY == 0 or (n_steps is not None and n_batches == n_steps)):
                value = float(pending)
                if not math.isfinite(value):
                    raise UserError(f"training diverged at epoch {epoch + 1}, at or before step {i + 1} (loss {value}); lower 'lr'")
                loss_sum += value
                pending.zero_()
                util = gpu_utilization(device)
                if util is not None:
                    utilization.append(util)
            if progress and n_batches % SYNC_EVERY == 0:
                bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", ms_step=f"{1000 * (time.perf_counter() - started) / n_batches:.1f}", refresh=False)
        if pending is not None:
            value = float(pending)  # waits for the GPU: the epoch's time below is its real time
            if not math.isfinite(value):
                raise UserError(f"training diverged at epoch {epoch + 1} (loss {value}); lower 'lr'")
            loss_sum += value
        bar.close()
        seconds = time.perf_counter() - started

        score, figures = None, {}
        if validate is not None:
            module.eval()
            with torch.no_grad():
                answer = validate()
            figures = {name: float(value) for name, value in answer.items()} if isinstance(answer, dict) else {"mrr20": float(answer)}
            if config.valid_metric not in figures:
                raise UserError(f"valid_metric '{config.valid_metric}': this model's validation gives {', '.join(figures)} only")
            score = figures[config.valid_metric]
            if best_state is None or score > result.best_score:
                result.best_epoch, result.best_score, since_best = epoch, score, 0
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                since_best += 1
        else:
            result.best_epoch = epoch
        line = {"epoch": epoch, "loss": loss_sum / max(n_batches, 1), "val_mrr20": figures.get("mrr20"), "seconds": round(seconds, 3), "lr": lr,
                "device": str(device), "step_ms": round(1000 * seconds / max(n_batches, 1), 3), "batch_ms": round(1000 * batch_seconds / max(n_batches, 1), 3)}
        if "ndcg10" in figures:
            line["val_ndcg10"] = figures["ndcg10"]
        if device.type == "cuda":
            line["gpu_util"] = round(sum(utilization) / len(utilization), 1) if utilization else None
        result.history.append(line)
        if progress:
            val = "".join(f", val {label} {figures[name]:.4f}" for name, label in VALID_METRICS.items() if name in figures)
            gpu = f", GPU {line['gpu_util']:.0f}%" if line.get("gpu_util") is not None else ""
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {line['loss']:.4f}{val} ({seconds:.1f} s, {line['step_ms']:.1f} ms/step on {device}{gpu})")
        stop = validate is not None and config.patience > 0 and since_best >= config.patience
        result.stopped_early = stop and epoch + 1 < config.epochs

        if run_dir is not None:
            with log_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
            ckpt = {
                "model": to_cpu(module.state_dict()),
                "optimizer": to_cpu(optimizer.state_dict()),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "epoch": epoch,
                "step": step,
                "since_best": since_best,
                "history": result.history,
                "best_epoch": result.best_epoch,
                "best_score": result.best_score,
                "stopped_early": result.stopped_early,
                "best_model": to_cpu(best_state),
                "config": asdict(config),
            }
            torch.save(ckpt, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)
            if config.keep_epochs:
                kept = Path(run_dir) / "epochs" / f"{epoch + 1:03d}.pt"
                kept.parent.mkdir(exist_ok=True)
                torch.save(ckpt["model"], kept)
            _save_curve(result.history, Path(run_dir) / "learning_curve.png")
        if stop:
            break
        if config.time_budget_s and epoch + 1 < last_epoch and time.perf_counter() - fit_started >= config.time_budget_s:
            result.out_of_time = True  # not in the checkpoint: a resumed run goes on with a budget of its own
            if progress:
                tqdm.write(f"time budget of {config.time_budget_s:g} s spent after epoch {epoch + 1}/{config.epochs}; kept epoch {result.best_epoch + 1}")
            break

    if best_state is not None:
        module.load_state_dict(best_state)
    module.to("cpu")
    module.eval()
    result.device = str(device)
    return result
