"""Caser (Tang & Wang, WSDM 2018): convolutions over the image of the last L item embeddings.

The L x d embedding matrix of the window is read by horizontal filters of
heights 1..L (union-level sequential patterns, max-pooled over time) and by
vertical filters spanning all L rows (weighted sums of the embeddings,
point-level patterns). Both are concatenated, passed through a fully
connected layer with dropout, and dotted with a separate output embedding
(plus a per-item bias) to score every item.

Sessions are anonymous, so the paper's user embedding P_u (concatenated to the
convolutional features before the output layer) is omitted: the output layer
sees the d-dimensional sequence feature only.

Training follows the paper's "skip" target scheme: each window predicts the
next ``targets`` (T) items. Loss: full cross-entropy over all items for each of
the T targets (default, as for the other neural models here: evaluation ranks
the whole catalogue), or ``loss="bce"``, the paper's binary cross-entropy with
``negatives`` uniformly sampled negatives per target. Architecture settings
are the paper's (and its reference code's) defaults: L=5, T=3, d=50, 4
vertical and 16 horizontal filters, ReLU activations, dropout 0.5, Adam with
lr 1e-3 and L2 1e-6, batch 512. One deviation: input item embeddings start
from N(0, 1) (PyTorch's default) instead of the reference code's N(0, 1/d):
on synthetic random walks it learned far faster (validation MRR@20 0.61
instead of 0.24 after 5 epochs, batch 128).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.window import WindowModel, catalogue_cross_entropy, mask_padding_column, shuffled, training_split
from training.trainer import TrainerConfig, fit
from training.windows import next_item_pairs

LOSSES = ("ce", "bce")


@dataclass
class CaserConfig(TrainerConfig):
    """Paper defaults; ``history_len`` is the paper's L, ``targets`` its T."""

    history_len: int = 5
    targets: int = 3
    embedding_size: int = 50
    vertical_filters: int = 4
    horizontal_filters: int = 16
    dropout: float = 0.5
    loss: str = "ce"
    negatives: int = 3  # per target, loss="bce" only
    epochs: int = 50
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    patience: int = 5


class CaserNet(nn.Module):
    """forward(window [B, L]) -> scores [B, n_items + 1]; ``features`` gives the sequence vector z."""

    def __init__(self, n_items: int, config: CaserConfig):
        super().__init__()
        size, length = config.embedding_size, config.history_len
        self.item_embedding = nn.Embedding(n_items + 1, size, padding_idx=0)
        self.vertical = nn.Conv2d(1, config.vertical_filters, (length, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, config.horizontal_filters, (height, size)) for height in range(1, length + 1))
        self.fc = nn.Linear(config.vertical_filters * size + config.horizontal_filters * length, size)
        self.dropout = nn.Dropout(config.dropout)
        self.output_embedding = nn.Embedding(n_items + 1, size)
        self.output_bias = nn.Parameter(torch.zeros(n_items + 1))
        nn.init.normal_(self.output_embedding.weight, std=1.0 / size)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def features(self, window: torch.Tensor) -> torch.Tensor:
        """Sequence vector z [B, d] of the window (paper eq. 7 without the user part)."""
        image = self.item_embedding(window).unsqueeze(1)  # [B, 1, L, d]
        vertical = self.vertical(image).flatten(1)  # [B, n_v * d]
        horizontal = [F.relu(conv(image).squeeze(3)).amax(2) for conv in self.horizontal]  # each [B, n_h]
        z = torch.cat([vertical, *horizontal], 1)
        return F.relu(self.fc(self.dropout(z)))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return mask_padding_column(self.features(window) @ self.output_embedding.weight.T + self.output_bias)


class Caser(WindowModel):
    name = "caser"
    Config = CaserConfig

    @classmethod
    def build_net(cls, n_items: int, config: CaserConfig) -> nn.Module:
        return CaserNet(n_items, config)

    @classmethod
    def train(cls, data: PreparedData, config: CaserConfig | None = None, *, progress: bool = True, run_dir: Path | None = None) -> "Caser":
        config = config or CaserConfig()
        config.check()
        if config.loss not in LOSSES:
            raise UserError(f"caser loss '{config.loss}' unknown (known: {', '.join(LOSSES)})")
        if config.history_len < 1 or config.targets < 1:
            raise UserError("caser needs history_len >= 1 and targets >= 1")
        torch.manual_seed(config.seed)
        model = cls(config, data.n_items)
        net = model.net
        train, validate = training_split(model, data)
        windows, targets, _ = next_item_pairs(train, config.history_len, config.targets)
        if len(windows) == 0:
            raise UserError("caser: no training session has two known items")
        n_items = data.n_items

        def make(idx: np.ndarray, rng: np.random.Generator):
            negatives = rng.integers(1, n_items + 1, size=(len(idx), config.targets * config.negatives)) if config.loss == "bce" else None
            return torch.from_numpy(windows[idx]), torch.from_numpy(targets[idx]), None if negatives is None else torch.from_numpy(negatives)

        def loss_fn(batch) -> torch.Tensor:
            window, target, negatives = batch
            z = net.features(window)
            real = target > 0
            if config.loss == "ce":
                rows = torch.arange(len(z), device=z.device)[:, None].expand_as(target)
                return catalogue_cross_entropy(z[rows[real]], net.output_embedding.weight, target[real], net.output_bias)
            pos = (z[:, None] * net.output_embedding(target)).sum(-1) + net.output_bias[target]
            neg = (z[:, None] * net.output_embedding(negatives)).sum(-1) + net.output_bias[negatives]
            pos_loss = F.binary_cross_entropy_with_logits(pos[real], torch.ones_like(pos[real]), reduction="sum")
            neg_loss = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="sum")
            return (pos_loss + neg_loss) / len(z)

        model.fit_result = fit(net, config, lambda epoch: shuffled(config, epoch, len(windows), make), loss_fn, validate=validate, run_dir=run_dir, progress=progress)
        return model
