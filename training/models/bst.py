"""BST, Behavior Sequence Transformer (Chen et al., DLP-KDD 2019), as a next-item ranker.

Every slot of the window is embedded as item + item side features (category,
price bucket, genre, ... whatever ``PreparedData.item_features`` offers) +
event features (city, device, ... from ``Sessions.features``) + position, the
paper's "sequence item features" summed into one vector. One transformer block
(8 heads) reads the whole window; its outputs are concatenated and go through
the paper's LeakyReLU MLP (1024-512-256), projected to the embedding size.

Unlike the paper, which puts the candidate item inside the sequence and
predicts a click probability (a CTR head), here the MLP output is dotted with
every item's representation (item embedding + its side-feature embeddings) and
trained with full cross-entropy over all items (``catalogue_cross_entropy``, a
block of rows at a time, as the other window models): the stream needs one
pass that ranks the whole catalogue. The paper's position feature is the time gap
to the candidate; the serving window carries no times, so positions are slots
counted from the window's first item. Without features the model still works
(item + position only). Adam with lr 1e-3 replaces the paper's Adagrad with
lr 0.01; the window length (20) and embedding size (64) are our choices.

Feature values are embedded as value + 1; 0 is padding, and values outside
the range seen in training (or negative) fall back to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.window import TransformerBlock, WindowModel, attention_mask, catalogue_cross_entropy, mask_padding_column, relative_positions, shuffled, training_split
from training.trainer import TrainerConfig, fit
from training.windows import next_item_pairs


@dataclass
class BSTConfig(TrainerConfig):
    """Paper's transformer (1 block, 8 heads, dropout 0.2) and MLP; see module docstring for the rest."""

    history_len: int = 20
    embedding_size: int = 64
    blocks: int = 1
    heads: int = 8
    dropout: float = 0.2
    mlp: tuple[int, ...] = (1024, 512, 256)  # hidden widths of the MLP after the transformer
    use_features: bool = True
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    patience: int = 3

    def __post_init__(self) -> None:
        self.mlp = tuple(int(h) for h in ([self.mlp] if isinstance(self.mlp, int) else self.mlp))


def _feature_index(values: torch.Tensor, cardinality: int, present: torch.Tensor) -> torch.Tensor:
    """Embedding rows for feature values: value + 1, or 0 for padding slots and unseen values."""
    ok = present & (values >= 0) & (values < cardinality)
    return torch.where(ok, values + 1, torch.zeros_like(values))


class BSTNet(nn.Module):
    """forward(window [B, L], *event_features [B, L]) -> scores [B, n_items + 1]."""

    def __init__(self, n_items: int, config: BSTConfig, item_features: dict[str, int] | None = None, event_features: dict[str, int] | None = None):
        super().__init__()
        size = config.embedding_size
        self.item_cards = dict(item_features or {})
        self.event_cards = dict(event_features or {})
        self.item_embedding = nn.Embedding(n_items + 1, size, padding_idx=0)
        self.item_feature_embeddings = nn.ModuleDict({name: nn.Embedding(card + 1, size, padding_idx=0) for name, card in self.item_cards.items()})
        for name in self.item_cards:
            self.register_buffer(f"item_feature_{name}", torch.zeros(n_items + 1, dtype=torch.int64))
        self.event_feature_embeddings = nn.ModuleDict({name: nn.Embedding(card + 1, size, padding_idx=0) for name, card in self.event_cards.items()})
        self.position_embedding = nn.Embedding(config.history_len, size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(size, config.heads, config.dropout) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(size)
        layers: list[nn.Module] = []
        width = config.history_len * size
        for hidden in config.mlp:
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(), nn.Dropout(config.dropout)]
            width = hidden
        layers.append(nn.Linear(width, size))
        self.mlp = nn.Sequential(*layers)

    def item_side(self, items: torch.Tensor) -> torch.Tensor:
        """Item embedding plus its side-feature embeddings, for any shape of item indices."""
        x = self.item_embedding(items)
        present = items > 0
        for name, card in self.item_cards.items():
            values = getattr(self, f"item_feature_{name}")[items]
            x = x + self.item_feature_embeddings[name](_feature_index(values, card, present))
        return x

    _catalogue_cache: tuple[tuple, torch.Tensor] | None = None  # (versions of the weights it was made from, catalogue)

    def catalogue(self) -> torch.Tensor:
        """Representation [n_items + 1, d] of every item, what the sequence vector is scored against.

        Scoring (eval mode, no gradients) reuses it until a weight it depends on changes: an optimizer step or
        ``load_state_dict`` bumps the tensors' versions, ``train()``/``eval()`` drop it. Training and export
        tracing always compute it, so gradients flow and the exported graph keeps the computation.
        """
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.item_side(torch.arange(self.item_embedding.num_embeddings, device=self.item_embedding.weight.device))
        weights = [self.item_embedding.weight, *self.item_feature_embeddings.parameters(), *(getattr(self, f"item_feature_{name}") for name in self.item_cards)]
        versions = tuple((t.data_ptr(), t._version) for t in weights)
        if self._catalogue_cache is None or self._catalogue_cache[0] != versions:
            self._catalogue_cache = (versions, self.item_side(torch.arange(self.item_embedding.num_embeddings, device=self.item_embedding.weight.device)))
        return self._catalogue_cache[1]

    def train(self, mode: bool = True) -> "BSTNet":
        self._catalogue_cache = None
        return super().train(mode)

    def features(self, window: torch.Tensor, *event_features: torch.Tensor) -> torch.Tensor:
        """Sequence vector [B, d] of a window and its event features (in ``event_cards`` order)."""
        present = window > 0
        x = self.item_side(window) + self.position_embedding(relative_positions(window))
        for (name, card), values in zip(self.event_cards.items(), event_features):
            x = x + self.event_feature_embeddings[name](_feature_index(values, card, present))
        x = self.dropout(x)
        allowed = attention_mask(window, causal=False)
        for block in self.blocks:
            x = block(x, allowed)
        return self.mlp(self.norm(x).flatten(1))

    def forward(self, window: torch.Tensor, *event_features: torch.Tensor) -> torch.Tensor:
        return mask_padding_column(self.features(window, *event_features) @ self.catalogue().T)


def _cardinality(values: np.ndarray) -> int:
    """Embedding rows needed for a non-negative int feature (max + 1)."""
    return int(values.max(initial=-1)) + 1


class BST(WindowModel):
    name = "bst"
    Config = BSTConfig

    @classmethod
    def build_net(cls, n_items: int, config: BSTConfig, item_features: dict[str, int] | None = None, event_features: dict[str, int] | None = None) -> nn.Module:
        return BSTNet(n_items, config, item_features, event_features)

    @property
    def item_features(self) -> tuple[str, ...]:
        """Names of the item side features the network embeds (tables stored in the weights)."""
        return tuple(self.net_args.get("item_features", {}))

    @classmethod
    def train(cls, data: PreparedData, config: BSTConfig | None = None, *, progress: bool = True, run_dir: Path | None = None) -> "BST":
        config = config or BSTConfig()
        config.check()
        if config.embedding_size % config.heads:
            raise UserError(f"bst embedding_size {config.embedding_size} is not divisible by heads {config.heads}")
        item_tables, event_names = {}, ()
        if config.use_features:
            for name, table in data.item_features.items():
                table = np.asarray(table)
                if table.ndim != 1 or len(table) != data.n_items + 1 or not np.issubdtype(table.dtype, np.integer):
                    raise UserError(f"item feature '{name}' is not an integer array of {data.n_items + 1} rows")
                item_tables[name] = table.astype(np.int64)
            event_names = tuple(sorted(data.train.features))
        net_args = {
            "item_features": {name: _cardinality(t) for name, t in item_tables.items()},
            "event_features": {name: _cardinality(data.train.features[name]) for name in event_names},
        }
        torch.manual_seed(config.seed)
        model = cls(config, data.n_items, net_args)
        net = model.net
        with torch.no_grad():
            for name, table in item_tables.items():
                getattr(net, f"item_feature_{name}").copy_(torch.from_numpy(table))
        train, validate = training_split(model, data)
        windows, targets, feats = next_item_pairs(train, config.history_len, 1, event_names)
        if len(windows) == 0:
            raise UserError("bst: no training session has two known items")

        def make(idx: np.ndarray, rng: np.random.Generator):
            return torch.from_numpy(windows[idx]), torch.from_numpy(targets[idx, 0]), [torch.from_numpy(feats[name][idx]) for name in event_names]

        def loss_fn(batch) -> torch.Tensor:
            window, target, event_features = batch
            return catalogue_cross_entropy(net.features(window, *event_features), net.catalogue(), target)

        model.fit_result = fit(net, config, lambda epoch: shuffled(config, epoch, len(windows), make), loss_fn, validate=validate, run_dir=run_dir, progress=progress)
        return model
