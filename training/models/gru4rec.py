"""GRU4Rec: a GRU over the clicks of a session, trained with session-parallel mini-batches.

Written from the papers (the official implementation was read only to locate behaviour that differs;
no code was taken from it):
  [1] Hidasi, Karatzoglou, Baltrunas, Tikk. Session-based Recommendations with Recurrent Neural
      Networks. ICLR 2016 (GRU, session-parallel mini-batches, mini-batch-based negatives).
  [2] Hidasi, Karatzoglou. Recurrent Neural Networks with Top-k Gains for Session-based
      Recommendations. CIKM 2018 (extra negatives sampled by popularity^alpha shared across the
      mini-batch, BPR-max loss with score regularization, cross-entropy, constrained embedding).
  [3] Hidasi, Czapp. The Effect of Third Party Implementations on Reproducibility. RecSys 2023
      (the features an implementation must have; the tuned parameter files used as defaults here).

Training (``GRU4Rec.train``): sessions sorted by start time are laid out in ``batch_size`` parallel
slots; each step feeds every slot's current item and predicts its next item. When a slot's session
ends the next unused session takes the slot and the slot's hidden state is reset to zero; when no
sessions are left the slot closes and the mini-batch shrinks, so every (input, target) pair of the
training data is visited exactly once per epoch. The hidden state is carried from step to step
(detached: one-step back-propagation, as in [1]). The candidates scored at a step are the targets of
the mini-batch plus ``n_sample`` items drawn with probability proportional to support^sample_alpha,
one draw shared by the whole mini-batch [2]; draws are made in large chunks.

Losses (``loss``):
  - ``cross-entropy``: softmax over the candidates, the row's own target is the positive. With
    ``logq`` > 0 each candidate's score is lowered by ``logq * log q`` before the softmax, where q
    is the unnormalised weight of the process that put the candidate there: the item's support
    (training events) for the mini-batch targets, which are drawn as the data is, and
    support^sample_alpha for the extra samples (logQ correction: popular items are
    over-represented among the negatives). The two groups are deliberately not normalised to one
    scale: this is the official implementation's correction, and on RSC15 it beat both the
    normalised probabilities and the expected counts.
  - ``bpr-max`` [2]: -log sum_j softmax_j(s_neg) * sigmoid(s_pos - s_j) + bpreg * sum_j softmax_j(s_neg) s_j^2,
    where the softmax runs over the negatives of the row (all candidates but its own target).
  The output scores go through ``final_act`` first: ``elu`` uses ELU with alpha = ``elu_param`` and,
  as in the official parameter files, ``elu_param`` 0 means the identity; ``linear``, ``tanh`` and
  ``relu`` are also accepted. Ranking (``score_next``, the exported module) uses the raw scores,
  which orders items as every monotone ``final_act`` does.

Input representation:
  - ``constrained_embedding=True``: the input vector of an item is its row of the output item matrix
    (dimension ``layers[-1]``), shared between input and output [2];
  - ``embedding`` > 0: a separate input embedding of that size;
  - ``embedding=0`` (and not constrained): one-hot input [1]. A one-hot vector times the first
    layer's input weights selects one row of them, so it is implemented as an item -> 3*H table
    feeding the GRU gates directly (the same function with no dense one-hot matrix).
Dropout ``dropout_p_embed`` applies to the input vector, ``dropout_p_hidden`` to each layer's
output. The GRU follows [1]: z = sig(Wz x + Uz h), r = sig(Wr x + Ur h),
h~ = tanh(W x + r * (U h)), h' = (1 - z) h + z h~ (the reset gate after the recurrent product,
as in ``torch.nn.GRUCell``). Weights are drawn uniformly from +-sqrt(6 / (fan_in + fan_out)) per
gate matrix; biases start at 0. In training the dropped-out output of a layer is also the hidden
state carried to the session's next click.
The loss is the mean over the mini-batch's rows. The optimizer is Adagrad with momentum
(``training.trainer.AdagradMomentum``); the item tables get sparse gradients (only the rows a step
touches are updated), so ``optimizer`` must be ``adagrad`` (or ``sgd``) and ``grad_clip`` 0. The
momentum is classical (heavy-ball), as in the official implementation; ``nesterov=true`` gives the
Nesterov form, which lost 0.007 MRR@20 on RSC15 with these defaults (docs/results.md).

Defaults are the official RSC15 cross-entropy parameter file of [3] for this sample size
(``paramfiles/rsc15_xe_shared_100_best.py`` of the official PyTorch repository, values checked
against the published file): loss=cross-entropy, constrained_embedding=True, embedding=0,
elu_param=0, layers=[100], n_epochs=10 (``epochs``), batch_size=32, dropout_p_embed=0.0,
dropout_p_hidden=0.4, learning_rate=0.2 (``lr``), momentum=0.2, n_sample=2048, sample_alpha=0.5,
bpreg=0.0, logq=1.0; plus two settings of ours: ``lr_schedule="cosine"`` (the learning rate decays to 0
over the epochs; the official code keeps it constant), which added 0.019 MRR@20 on RSC15, and 15 epochs
instead of 10, which added 0.001-0.002 Recall@20 with the decay (docs/results.md); an epoch is faster
than the official code's, so the whole run still takes less time.
The repository's other yoochoose file (``yoochoose_xe_shared_best.py``:
layers=[480], batch_size=48, dropout_p_hidden=0.2, lr=0.07, momentum=0, sample_alpha=0.2) is
tuned for the full 30M-click log; on the 100k sample it overfits after two epochs (docs/results.md).
For other datasets, pass the matching file's values with ``--set`` (e.g. their BPR-max files use
loss=bpr-max, elu_param=0.5, bpreg>0, logq=0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.base import SessionModel, write_run_config
from training.protocols import early_stopping_split
from training.sessions import Sessions
from training.trainer import TrainerConfig, epoch_rng, fit, validation_figures, validation_sample

LOSSES = ("cross-entropy", "bpr-max")
FINAL_ACTS = ("elu", "linear", "tanh", "relu")
LOW_SCORE = -1e30  # score of column 0 (padding/unknown), below any real item
SAMPLE_CHUNK = 10_000_000  # negative samples drawn at once (rounded to whole steps)


@dataclass
class Config(TrainerConfig):
    """GRU4Rec settings; defaults = the RSC15 cross-entropy parameter file of [3] (see module doc)."""

    loss: str = "cross-entropy"
    constrained_embedding: bool = True
    embedding: int = 0
    final_act: str = "elu"
    elu_param: float = 0.0
    layers: tuple[int, ...] = (100,)
    epochs: int = 15
    batch_size: int = 32
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.4
    lr: float = 0.2
    optimizer: str = "adagrad"
    momentum: float = 0.2
    lr_schedule: str = "cosine"
    threads: int = 1  # a step is a few small products: a second thread costs more than it gains, 8x more under load
    n_sample: int = 2048
    sample_alpha: float = 0.5
    bpreg: float = 0.0
    logq: float = 1.0

    def __post_init__(self) -> None:
        self.layers = tuple(int(h) for h in ([self.layers] if isinstance(self.layers, int) else self.layers))

    def check(self) -> None:
        super().check()
        if self.loss not in LOSSES:
            raise UserError(f"loss '{self.loss}' unknown (known: {', '.join(LOSSES)})")
        if self.final_act not in FINAL_ACTS:
            raise UserError(f"final_act '{self.final_act}' unknown (known: {', '.join(FINAL_ACTS)})")
        if not self.layers or min(self.layers) < 1:
            raise UserError(f"layers must be a non-empty list of positive sizes, got {list(self.layers)}")
        for name in ("embedding", "n_sample", "sample_alpha", "bpreg", "logq", "elu_param"):
            if getattr(self, name) < 0:
                raise UserError(f"setting '{name}' must not be negative, got {getattr(self, name)}")
        if self.optimizer not in ("adagrad", "sgd") or self.grad_clip:
            raise UserError("GRU4Rec trains its item tables with sparse gradients: use optimizer adagrad or sgd, and grad_clip 0")
        for name in ("dropout_p_embed", "dropout_p_hidden"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"setting '{name}' must be in [0, 1), got {getattr(self, name)}")


def _init_uniform(t: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(t, -bound, bound)


class GRULayer(nn.Module):
    """One GRU layer; the input projection may be done by the caller (one-hot input).

    The reset gate multiplies the recurrent product (r * (h U_n + b_hn)), the form of cuDNN and
    ``torch.nn.GRUCell`` that current GRU4Rec implementations use: one [H, 3H] product per step.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        h = hidden_size
        self.hidden_size = h
        self.w_x = nn.Parameter(torch.empty(input_size, 3 * h)) if input_size else None
        self.b_x = nn.Parameter(torch.zeros(3 * h))
        self.u_h = nn.Parameter(torch.empty(h, 3 * h))
        self.b_h = nn.Parameter(torch.zeros(3 * h))
        for g in range(3):
            if self.w_x is not None:
                _init_uniform(self.w_x.data[:, g * h : (g + 1) * h], input_size, h)
            _init_uniform(self.u_h.data[:, g * h : (g + 1) * h], h, h)

    def forward(self, gates_x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``gates_x`` [B, 3H] (x @ W, without bias) and ``h`` [B, H] -> new h."""
        gx = gates_x + self.b_x
        gh = h @ self.u_h + self.b_h
        H = self.hidden_size
        rz = torch.sigmoid(gx[:, : 2 * H] + gh[:, : 2 * H])
        r, z = rz[:, :H], rz[:, H:]
        candidate = torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
        return h + z * (candidate - h)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w_x


class GRU4RecNet(nn.Module):
    """Item input -> stacked GRU layers -> scores against item output vectors (+ bias)."""

    def __init__(self, n_items: int, config: Config):
        super().__init__()
        rows = n_items + 1
        self.layers = tuple(config.layers)
        self.constrained = config.constrained_embedding
        self.one_hot = not config.constrained_embedding and config.embedding == 0
        h_out = self.layers[-1]
        self.item_out = nn.Parameter(torch.empty(rows, h_out))
        _init_uniform(self.item_out.data, rows, h_out)
        self.item_bias = nn.Parameter(torch.zeros(rows, 1))
        if self.one_hot:
            self.item_in = nn.Parameter(torch.empty(rows, 3 * self.layers[0]))
            for g in range(3):
                _init_uniform(self.item_in.data[:, g * self.layers[0] : (g + 1) * self.layers[0]], rows, self.layers[0])
            in_size = 0
        elif self.constrained:
            self.item_in = None
            in_size = h_out
        else:
            self.item_in = nn.Parameter(torch.empty(rows, config.embedding))
            _init_uniform(self.item_in.data, rows, config.embedding)
            in_size = config.embedding
        sizes = [in_size] + list(self.layers[:-1])
        self.grus = nn.ModuleList(GRULayer(i, h) for i, h in zip(sizes, self.layers))
        self.drop_embed = nn.Dropout(config.dropout_p_embed)
        self.drop_hidden = nn.Dropout(config.dropout_p_hidden)

    def init_hidden(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, h, device=self.item_out.device) for h in self.layers]

    def step(self, items: torch.Tensor, hidden: list[torch.Tensor], x: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One click per row: (items [B], hidden per layer) -> (new hidden per layer, output [B, H_last]).

        Rows whose item is 0 (unknown) keep their hidden state. In training, dropout applies to each
        layer's output and the dropped-out output is also the state carried to the next click (as in
        the official implementation; it regularises the recurrence). ``x``: the items' input vectors
        when the caller has already looked them up (constrained embedding in training).
        """
        if self.one_hot:
            gates_x = self.drop_embed(F.embedding(items, self.item_in, sparse=True))
        else:
            if x is None:
                x = F.embedding(items, self.item_out if self.constrained else self.item_in, sparse=True)
            gates_x = self.grus[0].project(self.drop_embed(x))
        known = (items > 0).unsqueeze(1)
        new_hidden = []
        out = None
        for i, (gru, h) in enumerate(zip(self.grus, hidden)):
            if i > 0:
                gates_x = gru.project(out)
            out = torch.where(known, self.drop_hidden(gru(gates_x, h)), h)
            new_hidden.append(out)
        return new_hidden, out

    def score_all(self, out: torch.Tensor) -> torch.Tensor:
        """Scores of every item [B, n_items + 1]; column 0 set to LOW_SCORE."""
        scores = out @ self.item_out.t() + self.item_bias.t()
        scores[:, 0] = LOW_SCORE
        return scores

    def step_and_score(self, items: torch.Tensor, hidden: list[torch.Tensor], candidates: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Training step: ``step`` plus the scores [B, C] of ``candidates``.

        Each needed row of the output item table is looked up once (unique rows), so its sparse
        gradient has no duplicate rows to merge and the score product has fewer columns.
        """
        n_in = len(items) if self.constrained else 0
        wanted = torch.cat([items, candidates]) if self.constrained else candidates
        rows, inverse = torch.unique(wanted, return_inverse=True)
        weights = F.embedding(rows, self.item_out, sparse=True)
        bias = F.embedding(rows, self.item_bias, sparse=True)
        x = weights[inverse[:n_in]] if self.constrained else None
        new_hidden, out = self.step(items, hidden, x)
        scores = (out @ weights.t() + bias.t())[:, inverse[n_in:]]
        return new_hidden, scores


def final_activation(scores: torch.Tensor, config: Config) -> torch.Tensor:
    act = config.final_act
    if act == "elu":
        return F.elu(scores, alpha=config.elu_param) if config.elu_param > 0 else scores
    if act == "tanh":
        return torch.tanh(scores)
    if act == "relu":
        return F.relu(scores)
    return scores


def sampled_loss(scores: torch.Tensor, config: Config, log_q: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """Loss over candidate scores [B, B + n_sample]; row i's positive is column i.

    ``log_q`` [B + n_sample] (log sampling weight of each candidate column) drives the logQ
    correction; ``weight`` [B] is 1 for rows that count (0 for unknown targets). Returns the mean
    over the mini-batch.
    """
    scores = final_activation(scores, config)
    batch = scores.shape[0]
    diag = torch.arange(batch, device=scores.device)
    if config.loss == "cross-entropy":
        if log_q is not None and config.logq > 0:
            scores = scores - config.logq * log_q
        losses = F.cross_entropy(scores, diag, reduction="none")
    else:
        positive = scores[diag, diag].unsqueeze(1)
        is_neg = torch.ones_like(scores, dtype=torch.bool)
        is_neg[diag, diag] = False
        neg_weights = torch.softmax(scores.masked_fill(~is_neg, -math.inf), dim=1)
        ranking = (neg_weights * torch.sigmoid(positive - scores)).sum(1)
        losses = -torch.log(ranking + 1e-24)
        if config.bpreg:
            losses = losses + config.bpreg * (neg_weights * scores.pow(2)).sum(1)
    return (losses * weight).sum() / len(weight)


@dataclass
class SessionParallelBatches:
    """The session-parallel schedule of one epoch (the same every epoch: sessions in start-time order).

    Step t feeds ``inputs[t]`` [B_t], predicts ``targets[t]`` [B_t]; ``carry[t]`` [B_t] says for each
    row which row of step t-1 holds its session's hidden state, or -1 when the row starts a new
    session (hidden reset to zero).
    """

    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    carry: list[np.ndarray]

    @classmethod
    def build(cls, sessions: Sessions, batch_size: int) -> "SessionParallelBatches":
        lengths = sessions.lengths
        starts = sessions.offsets[:-1]
        usable = np.flatnonzero(lengths >= 2)
        first_time = sessions.times[starts[usable]]
        order = usable[np.argsort(first_time, kind="stable")]
        ses_start, ses_end = starts[order], starts[order] + lengths[order]  # end = one past last event
        n = len(order)
        width = min(batch_size, n)
        pos = ses_start[:width].copy()  # current input event of each slot
        end = ses_end[:width].copy()
        carry = np.full(width, -1, dtype=np.int64)
        next_session = width
        inputs, targets, carries = [], [], []
        items = sessions.items
        while len(pos):
            inputs.append(items[pos])
            targets.append(items[pos + 1])
            carries.append(carry)
            pos = pos + 1
            done = pos + 1 >= end  # the slot's session has no more (input, target) pairs
            carry = np.arange(len(pos), dtype=np.int64)
            if done.any():
                slots = np.flatnonzero(done)
                take = min(len(slots), n - next_session)
                refill, close = slots[:take], slots[take:]
                pos[refill] = ses_start[next_session : next_session + take]
                end[refill] = ses_end[next_session : next_session + take]
                carry[refill] = -1
                next_session += take
                if len(close):
                    keep = np.ones(len(pos), dtype=bool)
                    keep[close] = False
                    pos, end, carry = pos[keep], end[keep], carry[keep]
        return cls(inputs, targets, carries)

    def __len__(self) -> int:
        return len(self.inputs)


def carry_hidden(prev: list[torch.Tensor] | None, carry: torch.Tensor, net: GRU4RecNet) -> list[torch.Tensor]:
    """Hidden state for a step's rows: row i takes row ``carry[i]`` of the previous step, or zeros if -1."""
    if prev is None or bool((carry < 0).all()):
        return net.init_hidden(len(carry))
    keep = (carry >= 0).unsqueeze(1).float()
    rows = carry.clamp(min=0)
    return [h[rows] * keep for h in prev]


class Sampler:
    """Negative items drawn with probability ~ support^alpha, ``n_sample`` per step.

    Draws are made for up to ``steps`` steps at once (at most SAMPLE_CHUNK items), not one step at a time.
    """

    def __init__(self, support: np.ndarray, alpha: float, n_sample: int, rng: np.random.Generator, steps: int):
        weights = support.astype(np.float64) ** alpha
        weights[0] = 0.0
        self.cdf = np.cumsum(weights) / weights.sum()
        self.n_sample = n_sample
        self.rng = rng
        self.chunk_steps = max(1, min(steps, SAMPLE_CHUNK // max(n_sample, 1)))
        self.chunk = np.zeros((0, n_sample), dtype=np.int64)
        self.next = 0

    def draw(self) -> np.ndarray:
        if self.next >= len(self.chunk):
            u = self.rng.random(self.chunk_steps * self.n_sample)
            drawn = np.searchsorted(self.cdf, u, side="right")
            self.chunk = np.minimum(drawn, len(self.cdf) - 1).reshape(self.chunk_steps, self.n_sample)
            self.next = 0
        row = self.chunk[self.next]
        self.next += 1
        return row


class GRU4Rec(SessionModel):
    """Session-based GRU (see the module docstring)."""

    name = "gru4rec"
    state_kind = "hidden"
    Config = Config

    def __init__(self, n_items: int, config: Config):
        self.n_items = n_items
        self.config = config
        self.net = GRU4RecNet(n_items, config)

    @property
    def hidden_size(self) -> int:
        return sum(self.net.layers)

    @classmethod
    def train(cls, data: PreparedData, config: Config | None = None, *, progress: bool = True, run_dir: Path | None = None, warm_start: Callable[["GRU4Rec"], None] | None = None) -> "GRU4Rec":
        """``warm_start(model)`` sets the starting weights of the new model (`streamrec retrain`: the serving run's)."""
        config = config or Config()
        config.check()
        torch.manual_seed(config.seed)
        model = cls(data.n_items, config)
        if warm_start is not None:
            warm_start(model)
        train, valid, mode = cls.training_split(data)
        if train.n_events == 0 or (train.lengths >= 2).sum() == 0:
            raise UserError("training data has no session with two or more events")
        schedule = SessionParallelBatches.build(train, config.batch_size)
        support = np.bincount(train.items, minlength=data.n_items + 1).astype(np.float64)
        batches, loss_fn = model.training_closures(schedule, support)
        valid = validation_sample(valid, config) if valid is not None else None
        validate = (lambda: validation_figures(model, valid, mode=mode, exclude_seen=config.valid_exclude_seen)) if valid is not None else None
        model.fit_result = fit(model.net, config, batches, loss_fn, validate=validate, run_dir=run_dir, progress=progress)
        return model

    @staticmethod
    def training_split(data: PreparedData) -> tuple[Sessions, Sessions | None, str]:
        """(sessions to train on, validation sessions or None, validation mode).

        Leave-one-out ("last"): train without each validation user's last item, which is the
        validation target, and validate on those targets only, as the window models do; the other
        positions of a validation sequence are training data and would flatter the model.
        "next" datasets keep all of train and every position of the validation sessions.
        """
        if data.valid is None or len(data.valid) == 0:
            return data.train, None, "next"
        if data.stats.get("eval_mode", "next") == "last":
            fit_sessions, valid = early_stopping_split(data)
            return fit_sessions, valid, "last"
        return data.train, data.valid, "next"

    def training_closures(self, schedule: SessionParallelBatches, support: np.ndarray):
        """``batches(epoch)`` and ``loss_fn(batch)`` for ``training.trainer.fit``.

        A batch is (inputs, targets, carry, samples) as tensors; ``loss_fn`` keeps the hidden state
        between calls and resets it where ``carry`` is -1.
        """
        config, net = self.config, self.net
        log_supports = {torch.device("cpu"): torch.from_numpy(np.log(np.maximum(support, 1.0))).float()}  # per device
        use_logq = config.loss == "cross-entropy" and config.logq > 0

        def batches(epoch: int):
            sampler = Sampler(support, config.sample_alpha, config.n_sample, epoch_rng(config, epoch), len(schedule)) if config.n_sample else None

            class Epoch:
                def __len__(self):
                    return len(schedule)

                def __iter__(self):
                    for inputs, targets, carry in zip(schedule.inputs, schedule.targets, schedule.carry):
                        samples = torch.from_numpy(sampler.draw()) if sampler else None
                        yield torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(carry), samples

            return Epoch()

        state: dict[str, list[torch.Tensor] | None] = {"hidden": None}

        def loss_fn(batch) -> torch.Tensor:
            inputs, targets, carry, samples = batch
            hidden = carry_hidden(state["hidden"], carry, net)
            candidates = targets if samples is None else torch.cat([targets, samples])
            new_hidden, scores = net.step_and_score(inputs, hidden, candidates)
            state["hidden"] = [h.detach() for h in new_hidden]
            weight = (targets > 0).float()
            log_q = None
            if use_logq and targets.device not in log_supports:
                log_supports[targets.device] = log_supports[torch.device("cpu")].to(targets.device)
            log_support = log_supports.get(targets.device)
            if use_logq:  # each column's own proposal: targets ~ support, extra samples ~ support^alpha
                log_q = log_support[targets] if samples is None else torch.cat([log_support[targets], config.sample_alpha * log_support[samples]])
            return sampled_loss(scores, config, log_q, weight)

        return batches, loss_fn

    def score_next(self, sessions: Sessions, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Run each session through the GRU once; sessions are batched and stepped in parallel."""
        return self._score(sessions, None, batch_size)

    def score_positions(self, sessions: Sessions, positions: np.ndarray, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``score_next`` restricted to some positions: each session runs up to its last wanted position and only
        wanted positions are ranked against the catalogue (leave-one-out: one per sequence, not every click)."""
        return self._score(sessions, np.asarray(positions, dtype=np.int64), batch_size)

    @torch.no_grad()
    def _score(self, sessions: Sessions, positions: np.ndarray | None, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.net.eval()
        device = self.net.item_out.device
        lengths = sessions.lengths
        if positions is None:
            wanted = None
            steps_all = np.maximum(lengths - 1, 0)  # positions with a next event
        else:
            wanted = np.zeros(sessions.n_events, dtype=bool)
            wanted[positions] = True
            owner = np.searchsorted(sessions.offsets, positions, side="right") - 1
            steps_all = np.zeros(len(lengths), dtype=np.int64)
            np.maximum.at(steps_all, owner, positions - sessions.offsets[owner] + 1)
        usable = np.flatnonzero(steps_all >= 1)
        order = usable[np.argsort(-steps_all[usable], kind="stable")]  # longest first: active rows form a prefix
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            starts = sessions.offsets[chunk]
            steps = steps_all[chunk]
            hidden = self.net.init_hidden(len(chunk))
            for t in range(int(steps[0])):
                active = int((steps > t).sum())
                hidden = [h[:active] for h in hidden]
                items = torch.from_numpy(sessions.items[starts[:active] + t]).to(device)
                hidden, out = self.net.step(items, hidden)
                at = starts[:active] + t
                if wanted is not None and not wanted[at].all():
                    keep = wanted[at]
                    if not keep.any():
                        continue
                    at, out = at[keep], out[torch.from_numpy(keep).to(device)]
                yield at, self.net.score_all(out).float().cpu().numpy()

    def export_module(self) -> nn.Module:
        """The one-click serving step (state kind "hidden"), in eval mode, for ONNX export."""
        self.net.eval()
        return GRU4RecStep(self.net).eval()

    def save(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        write_run_config(run_dir, self, {"hidden_size": self.hidden_size})
        torch.save(self.net.state_dict(), run_dir / "model.pt")

    @classmethod
    def load(cls, run_dir: Path) -> "GRU4Rec":
        run_dir = Path(run_dir)
        try:
            doc = json.loads((run_dir / "config.json").read_text())
            config = Config(**doc["config"])
            model = cls(int(doc["n_items"]), config)
            model.net.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True, map_location="cpu"))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"{run_dir}: cannot load GRU4Rec run ({e})") from None
        model.net.eval()
        return model


class GRU4RecStep(nn.Module):
    """Serving step for ONNX: (item_idx [B] int64, hidden [B, sum(layers)]) -> (hidden, scores [B, n_items + 1]).

    Item 0 leaves the row's hidden state unchanged (its scores are meaningless).
    """

    def __init__(self, net: GRU4RecNet):
        super().__init__()
        self.net = net
        self.sizes = list(net.layers)

    def forward(self, item_idx: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = list(torch.split(hidden, self.sizes, dim=1))
        new_parts, out = self.net.step(item_idx, parts)
        # Column 0 is masked in the [1, n_items + 1] bias row, which ONNX Runtime folds into a constant,
        # not in the [B, n_items + 1] scores: a Where over the scores took 40% of a batch-256 step.
        bias = self.net.item_bias.t()
        bias = torch.where(torch.arange(bias.shape[1]) == 0, LOW_SCORE, bias)
        return torch.cat(new_parts, dim=1), out @ self.net.item_out.t() + bias
