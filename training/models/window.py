"""What the window models (Caser, SASRec, BERT4Rec, BST, SR-GNN) share.

Their serving state is the last ``history_len`` known items of a session,
left-padded with 0. Each model file supplies a network whose
``forward(window [B, L] int64, *features [B, L] int64) -> scores [B, n_items + 1]``
(column 0 very low) is used unchanged for offline scoring, for the exported
module and for ONNX, so all three rank identically. This module holds the
plumbing around it: scoring every prefix of a ``Sessions``, saving and loading
(``model.pt`` state dict + ``config.json``), mini-batching and the validation
hook for the shared trainer. Offline scoring and training skip window columns
that are padding in every row of a batch when that is exact for the network
(``padding_columns_needed``): session windows are mostly padding.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamrec.errors import UserError
from training.data import PreparedData
from training.evaluate import evaluation_positions, rank_metrics, ranks, score_rows, seen_items
from training.models.base import SessionModel, next_positions, write_run_config
from training.protocols import early_stopping_split
from training.sessions import Sessions
from training.trainer import VALID_KS, epoch_rng, validation_sample, validation_subset
from training.windows import KnownEvents, prefix_windows

LOW_SCORE = -1e9  # column 0 (padding / unknown) of every score row
VALIDATION_BATCH = 512


def mask_padding_column(logits: torch.Tensor) -> torch.Tensor:
    """Scores with column 0 set very low (built with arange so it exports to any ONNX runtime)."""
    column = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(column == 0, LOW_SCORE)


CATALOGUE_BLOCK_BYTES = 8 * 2**20  # logits block of ``catalogue_cross_entropy``, well below glibc's largest mmap threshold (32 MiB)


class _CatalogueCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over the catalogue, a block of rows at a time (see ``catalogue_cross_entropy``).

    When gradients are wanted they are computed in the forward pass, from the same softmax block
    (training always calls backward right after), and only scaled in ``backward``.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets, block):
        want_grads = any(ctx.needs_input_grad[:3])
        device = states.device.type
        if torch.is_autocast_enabled(device):  # bf16 products, float32 softmax and gradient sums
            low = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return _CatalogueCrossEntropy._low_precision(ctx, states, weight, bias, targets, block, want_grads, low)
        n = max(len(states), 1)
        total = states.new_zeros(())
        grad_states, grad_weight, grad_bias = torch.empty_like(states), torch.zeros_like(weight), torch.zeros_like(bias)
        for start in range(0, len(states), block):
            rows = slice(start, start + block)
            logits = torch.addmm(bias, states[rows], weight.T)
            lse = torch.logsumexp(logits, 1)
            picked = torch.arange(len(logits), device=logits.device)
            total += (lse - logits[picked, targets[rows]]).sum()
            if want_grads:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[picked, targets[rows]] -= 1.0
                probs.div_(n)
                grad_states[rows] = probs @ weight
                grad_weight.addmm_(probs.T, states[rows])
                grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        return total / n

    @staticmethod
    def _low_precision(ctx, states, weight, bias, targets, block, want_grads, low):
        """``forward`` under autocast: the three products in ``low`` (bf16), logits, softmax and sums in float32."""
        n = max(len(states), 1)
        bias = bias.float()
        states_low, weight_low = states.to(low), weight.to(low)
        total = torch.zeros((), device=states.device)
        grad_states = torch.empty_like(states)
        grad_weight, grad_bias = torch.zeros_like(weight, dtype=torch.float32), torch.zeros_like(bias)
        for start in range(0, len(states), block):
            rows = slice(start, start + block)
            logits = (states_low[rows] @ weight_low.T).float().add_(bias)
            lse = torch.logsumexp(logits, 1)
            picked = torch.arange(len(logits), device=logits.device)
            total += (lse - logits[picked, targets[rows]]).sum()
            if want_grads:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[picked, targets[rows]] -= 1.0
                probs.div_(n)
                probs_low = probs.to(low)
                grad_states[rows] = (probs_low @ weight_low).to(states.dtype)
                grad_weight += (probs_low.T @ states_low[rows]).float()
                grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_states, grad_weight.to(weight.dtype), grad_bias)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        grad_states, grad_weight, grad_bias = ctx.saved_tensors
        return grad_states * grad, grad_weight * grad, grad_bias * grad, None, None


def catalogue_cross_entropy(states: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None, padding_class: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``states @ embeddings.T + bias`` (column 0 excluded) against ``targets`` (1..n_items).

    ``padding_class`` keeps column 0 as a class too (every row of ``embeddings`` is one; BERT4Rec's
    ``softmax=vocab``).

    The same value and gradients as ``F.cross_entropy(mask_padding_column(logits), targets)``, but the
    [N, n_items] logits are never held at once: rows are done in blocks of at most
    ``CATALOGUE_BLOCK_BYTES``, and each block's softmax gives its gradients on the spot. With a large
    catalogue (Amazon Beauty: 54,542 items) the full logits are hundreds of MB per step, which glibc
    maps and unmaps for every allocation; the page faults alone cost about as much as the arithmetic.
    """
    first = 0 if padding_class else 1
    weight = embeddings[first:]
    bias = bias[first:] if bias is not None else weight.new_zeros(len(weight))
    block = max(1, CATALOGUE_BLOCK_BYTES // (4 * max(len(weight), 1)))
    return _CatalogueCrossEntropy.apply(states, weight, bias, targets - first, block)


def relative_positions(window: torch.Tensor) -> torch.Tensor:
    """Position of every window slot counted from the first real item (0), padding slots 0.

    Left padding puts a prefix of k items in the last k slots at serving time,
    while training sequences put it wherever it falls; counting from the first
    real item makes both see the same position ids.
    """
    length = window.shape[1]
    n_pad = (window == 0).sum(1, keepdim=True)
    return (torch.arange(length, device=window.device)[None, :] - n_pad).clamp(min=0)


def attention_mask(window: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask of allowed (query, key) pairs.

    Keys must be real items (and not in the future when ``causal``); every
    query may always attend to itself, so rows of padding slots are never all
    masked and softmax never sees only -inf (the NaN trap of
    ``nn.TransformerEncoder`` with heavy padding). Built from arange
    comparisons: ``torch.eye`` exports to EyeLike, which onnxruntime rejects.
    """
    length = window.shape[1]
    pos = torch.arange(length, device=window.device)
    allowed = (window != 0)[:, None, None, :].expand(-1, 1, length, length)
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])[None, None]
    return allowed | (pos[None, :] == pos[:, None])[None, None]


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with an explicit boolean mask."""

    def __init__(self, size: int, heads: int, dropout: float):
        super().__init__()
        if size % heads:
            raise UserError(f"hidden size {size} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(size, 3 * size)
        self.out = nn.Linear(size, size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Queries from ``x``; keys and values from ``context`` (default ``x``)."""
        b, length, size = x.shape
        if context is None:
            q, k, v = self.qkv(x).view(b, length, 3, self.heads, size // self.heads).permute(2, 0, 3, 1, 4)
        else:  # project x only to queries and the context only to keys and values
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, weight[:size], bias[:size]).view(b, length, self.heads, size // self.heads).transpose(1, 2)
            k, v = F.linear(context, weight[size:], bias[size:]).view(b, length, 2, self.heads, size // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2)) * (size // self.heads) ** -0.5
        weights = self.dropout(weights.masked_fill(~allowed, float("-inf")).softmax(-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, length, size))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN x), then x + FFN(LN x)."""

    def __init__(self, size: int, heads: int, dropout: float, ffn_size: int | None = None, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        ffn_size = ffn_size or size
        self.norm1 = nn.LayerNorm(size)
        self.attention = SelfAttention(size, heads, dropout)
        self.norm2 = nn.LayerNorm(size)
        self.ffn = nn.Sequential(nn.Linear(size, ffn_size), activation(), nn.Dropout(dropout), nn.Linear(ffn_size, size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), allowed))
        return x + self.dropout(self.ffn(self.norm2(x)))


class PostNormBlock(nn.Module):
    """BERT's block (Hugging Face's ``BertLayer``): the norm after each residual sum, x = LN(x + attention(x)),
    then LN(x + FFN(x)); dropout on the attention weights and on each part's output, none inside the FFN."""

    def __init__(self, size: int, heads: int, dropout: float, ffn_size: int | None = None, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        ffn_size = ffn_size or size
        self.attention = SelfAttention(size, heads, dropout)
        self.norm1 = nn.LayerNorm(size, eps=1e-12)  # BERT's epsilon
        self.ffn = nn.Sequential(nn.Linear(size, ffn_size), activation(), nn.Linear(ffn_size, size))
        self.norm2 = nn.LayerNorm(size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x, allowed)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class QueryNormBlock(nn.Module):
    """The SASRec paper's block as its widely used PyTorch port (pmixer's, also Klenitskiy & Vasilev's)
    writes it: only the queries are normalised, the residual adds the attention to them, and the
    feed-forward part normalises its input and adds its own residual: q = LN x; x = q + attention(q, x, x);
    x = LN x; x + FFN(x)."""

    def __init__(self, size: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(size)
        self.attention = SelfAttention(size, heads, dropout)
        self.norm2 = nn.LayerNorm(size)
        self.ffn = nn.Sequential(nn.Linear(size, size), nn.Dropout(dropout), nn.ReLU(), nn.Linear(size, size), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        q = self.norm1(x)
        x = self.norm2(q + self.attention(q, allowed, context=x))
        return x + self.ffn(x)


def first_column(window: np.ndarray | torch.Tensor, keep: int = 0) -> int:
    """First window column worth computing: leading columns that are padding in every row are skipped,
    except the last ``keep`` of them (and the last column is always kept).

    Session windows are mostly padding, so trimming a batch to its longest row saves most of the
    work; it is exact for networks whose output ignores padding slots (masked attention with
    positions counted from the first item, or graphs of the real items).
    """
    used = (window != 0).any(0)
    first = int(used.nonzero()[0][0]) if bool(used.any()) else window.shape[1] - 1
    return max(first - keep, 0)


class EpochBatches:
    """The mini-batches of one epoch: a shuffled order cut into batches, tensors built lazily."""

    def __init__(self, order: np.ndarray, batch_size: int, make: Callable[[np.ndarray], Any]):
        self.order, self.batch_size, self.make = order, batch_size, make

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            yield self.make(self.order[start : start + self.batch_size])


def shuffled(config, epoch: int, n: int, make: Callable[[np.ndarray, np.random.Generator], Any]) -> EpochBatches:
    """Epoch ``epoch``'s batches over ``n`` examples; ``make(indices, rng)`` may draw more randomness from the epoch's rng."""
    rng = epoch_rng(config, epoch)
    return EpochBatches(rng.permutation(n), config.batch_size, lambda idx: make(idx, rng))


def training_split(model: "WindowModel", data: PreparedData) -> tuple[Sessions, Callable[[], float] | None]:
    """(sessions to train on, validation callback) for the shared trainer.

    With a validation split, training uses ``early_stopping_split`` (train
    without the validation sessions / targets, so early stopping is not fooled
    by leakage) and the callback returns MRR@20 and NDCG@10 at the dataset's evaluation
    positions ("next": every position, "last": each sequence's last target),
    full ranking with conservative ties, in batches that keep the [rows, n_items + 1]
    scores within the evaluator's score budget; with the setting ``valid_exclude_seen`` the user's own
    items up to each position are ranked last; with ``valid_users`` only that many sessions, drawn once. Without one: all of train, no callback.
    """
    if data.valid is None or len(data.valid) == 0:
        return data.train, None
    fit_sessions, valid = early_stopping_split(data)
    valid = validation_sample(valid, model.config)
    positions = evaluation_positions(valid, data.stats.get("eval_mode", "next"))
    targets = valid.items[positions + 1]
    windows, feats = prefix_windows(valid, positions, model.history_len, model.event_features)
    inputs = [torch.from_numpy(windows)] + [torch.from_numpy(feats[name]) for name in model.event_features]

    batch = score_rows(model.n_items, VALIDATION_BATCH)
    seen_rows, seen = seen_items(valid, positions) if model.config.valid_exclude_seen else (None, None)  # sorted by row

    def validate() -> dict[str, float]:
        found = []
        for start in range(0, len(targets), batch):
            rows = slice(start, start + batch)
            scores = model.scores(*(x[rows] for x in inputs), on_device=True)  # ranked where they were computed
            if seen is not None:
                lo, hi = np.searchsorted(seen_rows, [start, start + batch])
                scores[torch.from_numpy(seen_rows[lo:hi] - start).to(scores.device), torch.from_numpy(seen[lo:hi]).to(scores.device)] = -torch.inf
            rank, _ = ranks(scores, np.maximum(targets[rows], 1))
            found.append(np.where(targets[rows] > 0, rank, np.inf))  # an unknown target is a miss
        return validation_subset(rank_metrics(np.concatenate(found) if found else np.zeros(0), VALID_KS))

    return fit_sessions, validate


class WindowModel(SessionModel):
    """Base of the window models; a subclass sets name, Config and ``build_net``."""

    state_kind = "window"
    # Leading all-padding window columns the network must still see, or None when its output
    # depends on the full width (flattened or convolved windows); see ``first_column``.
    padding_columns_needed: ClassVar[int | None] = None

    def __init__(self, config, n_items: int, net_args: dict | None = None):
        self.config = config
        self.n_items = n_items
        self.net_args = net_args or {}
        self.net = self.build_net(n_items, config, **self.net_args)

    @classmethod
    def build_net(cls, n_items: int, config, **net_args) -> nn.Module:
        raise NotImplementedError

    @property
    def history_len(self) -> int:
        return self.config.history_len

    @property
    def event_features(self) -> tuple[str, ...]:
        """Names of the per-event features the network's forward takes after the window, in order."""
        return tuple(self.net_args.get("event_features", {}))

    def score_next(self, sessions: Sessions, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.score_positions(sessions, next_positions(sessions), batch_size)

    def score_positions(self, sessions: Sessions, positions: np.ndarray, batch_size: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``score_next`` restricted to some positions: leave-one-out evaluation scores one position per sequence, not all."""
        missing = [name for name in self.event_features if name not in sessions.features]
        if missing:
            raise UserError(f"{self.name} was trained with event features {', '.join(self.event_features)}; these sessions lack {', '.join(missing)}")
        positions = np.asarray(positions, dtype=np.int64)
        known = KnownEvents.of(sessions)
        self.net.eval()
        with torch.no_grad():
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                windows, feats = prefix_windows(sessions, chunk, self.history_len, self.event_features, known=known)
                scores = self.scores(torch.from_numpy(windows), *(torch.from_numpy(feats[name]) for name in self.event_features))
                yield chunk, scores.numpy()

    def scores(self, window: torch.Tensor, *features: torch.Tensor, on_device: bool = False) -> torch.Tensor:
        """The network's scores (on the CPU) for a batch of windows, skipping all-padding columns where that is exact.

        The inputs go to the network's device first: validation during a GPU run scores there, and with
        ``on_device`` leaves the float32 scores there too, so only the ranks come back (not rows x items).
        """
        if self.padding_columns_needed is not None:
            start = first_column(window, self.padding_columns_needed)
            window, features = window[:, start:], tuple(f[:, start:] for f in features)
        device = next(self.net.parameters()).device
        if device.type == "cpu":
            return self.net(window, *features)
        scores = self.net(window.to(device), *(f.to(device) for f in features)).float()
        return scores if on_device else scores.cpu()

    def export_module(self) -> nn.Module:
        """A copy of the network in eval mode: ``forward(window, *features) -> scores [B, n_items + 1]``."""
        return copy.deepcopy(self.net).eval()

    def save(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        write_run_config(run_dir, self, {"history_len": self.history_len, "event_features": list(self.event_features), "net_args": self.net_args})
        torch.save(self.net.state_dict(), run_dir / "model.pt")

    @classmethod
    def load(cls, run_dir: Path) -> "WindowModel":
        run_dir = Path(run_dir)
        try:
            doc = json.loads((run_dir / "config.json").read_text())
            config = cls.Config(**doc["config"])
            model = cls(config, int(doc["n_items"]), doc.get("net_args") or {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{run_dir / 'config.json'}: not a {cls.name} run config ({e})") from None
        weights = run_dir / "model.pt"
        if not weights.is_file():
            raise UserError(f"{run_dir}: model.pt missing")
        try:
            model.net.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
        except (RuntimeError, OSError, ValueError) as e:
            raise UserError(f"{weights}: does not fit a {cls.name} with this config ({str(e).splitlines()[0]})") from None
        model.net.eval()
        return model
