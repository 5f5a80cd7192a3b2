"""SR-GNN (Wu et al., AAAI 2019): a gated graph network over each session's item graph.

Each session (here: its window of the last L known items) becomes a directed
graph: one node per distinct item, an edge for every consecutive pair. A gated
graph layer (torch-geometric's ``GatedGraphConv``: messages along incoming
edges, weighted 1 / in-degree like the paper's normalised A_in, then a GRU
update) refines the node embeddings. The session vector is the paper's hybrid:
a soft-attention sum over the session's clicks, concatenated with the last
click and linearly transformed; dotted with every item embedding it scores the
next item. Trained with cross-entropy over all items, as in the paper.

Differences from the paper: ``GatedGraphConv`` propagates one direction only,
so the outgoing half of the paper's [A_in, A_out] connection matrix is not
modelled; the session is capped at the window (L = 50 covers nearly every
session); the paper's step decay of the learning rate (x0.1 every 3 epochs) is
not available in the shared trainer, which runs a constant lr.

The graphs of a whole batch are built with tensor operations (``session_graphs``):
``torch.unique`` over (row, item) keys gives every row's nodes and each slot's
node, consecutive slots give the edges. No Python loop over sessions, so
the same code serves training, offline scoring and the stream (served by
Torch, not ONNX: ``unique`` and scatter-based message passing stay in Torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch_geometric.nn import GatedGraphConv

from streamrec.errors import UserError
from training.data import PreparedData
from training.models.window import WindowModel, catalogue_cross_entropy, first_column, mask_padding_column, shuffled, training_split
from training.trainer import TrainerConfig, fit
from training.windows import next_item_pairs


@dataclass
class SRGNNConfig(TrainerConfig):
    """Paper defaults: hidden size 100, one propagation step, Adam lr 1e-3, L2 1e-5, batch 100, 30 epochs."""

    history_len: int = 50
    hidden_size: int = 100
    steps: int = 1
    epochs: int = 30
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 3


class SessionGraphs(NamedTuple):
    """A batch of session graphs as one disjoint graph (torch-geometric layout)."""

    node_items: torch.Tensor  # [N] item of every node
    node_batch: torch.Tensor  # [N] window row of every node (sorted)
    edge_index: torch.Tensor  # [2, E] (source node, target node), unique per graph
    edge_weight: torch.Tensor  # [E] 1 / in-degree of the target
    slot_node: torch.Tensor  # [B, L] node of every window slot (0 where the slot is unused)
    slot_used: torch.Tensor  # [B, L] slot holds a click (the last slot always counts)


def session_graphs(window: torch.Tensor, n_items: int) -> SessionGraphs:
    """Graphs of all rows of a left-padded window batch, built without a loop over rows.

    Nodes are the distinct (row, item) pairs in sorted order, so each row's
    nodes are contiguous and sorted by item. The last slot always makes a node,
    so an empty window becomes a single node of item 0 (whose embedding is zero).
    """
    b, length = window.shape
    slots = torch.arange(length, device=window.device)
    used = (window > 0) | (slots == length - 1)[None, :]
    rows = torch.arange(b, device=window.device)[:, None].expand(b, length)
    keys = rows * (n_items + 1) + window
    node_keys, slot_of_used = torch.unique(keys[used], sorted=True, return_inverse=True)
    slot_node = torch.zeros_like(window).masked_scatter(used, slot_of_used)
    step = used[:, :-1] & used[:, 1:]
    n_nodes = node_keys.shape[0]
    edge_keys = torch.unique(slot_node[:, :-1][step] * n_nodes + slot_node[:, 1:][step])
    source, target = edge_keys // n_nodes, edge_keys % n_nodes
    in_degree = torch.bincount(target, minlength=n_nodes)
    return SessionGraphs(
        node_items=node_keys % (n_items + 1),
        node_batch=node_keys // (n_items + 1),
        edge_index=torch.stack([source, target]),
        edge_weight=1.0 / in_degree[target].float(),
        slot_node=slot_node,
        slot_used=used,
    )


class SRGNNNet(nn.Module):
    """forward(window [B, L]) -> scores [B, n_items + 1]; ``session_vectors`` gives s_h."""

    def __init__(self, n_items: int, config: SRGNNConfig):
        super().__init__()
        size = config.hidden_size
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items + 1, size, padding_idx=0)
        self.ggnn = GatedGraphConv(size, config.steps)
        self.attention_last = nn.Linear(size, size)
        self.attention_clicks = nn.Linear(size, size)
        self.attention_score = nn.Linear(size, 1, bias=False)
        self.transform = nn.Linear(2 * size, size)
        bound = size**-0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)  # the paper's initialisation
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def session_vectors(self, window: torch.Tensor) -> torch.Tensor:
        """Hybrid session embeddings s_h [B, d] (paper eqs. 6-9)."""
        graphs = session_graphs(window, self.n_items)
        nodes = self.ggnn(self.item_embedding(graphs.node_items), graphs.edge_index, graphs.edge_weight)
        clicks = nodes[graphs.slot_node] * graphs.slot_used[..., None]  # [B, L, d]
        last = clicks[:, -1]
        alpha = self.attention_score(torch.sigmoid(self.attention_last(last)[:, None] + self.attention_clicks(clicks)))
        global_ = (alpha * clicks * graphs.slot_used[..., None]).sum(1)
        return self.transform(torch.cat([last, global_], 1))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return mask_padding_column(self.session_vectors(window) @ self.item_embedding.weight.T)


class SRGNN(WindowModel):
    name = "srgnn"
    state_kind = "graph"
    Config = SRGNNConfig
    padding_columns_needed = 0

    @classmethod
    def build_net(cls, n_items: int, config: SRGNNConfig) -> nn.Module:
        return SRGNNNet(n_items, config)

    @classmethod
    def train(cls, data: PreparedData, config: SRGNNConfig | None = None, *, progress: bool = True, run_dir: Path | None = None) -> "SRGNN":
        config = config or SRGNNConfig()
        config.check()
        if config.steps < 1:
            raise UserError(f"srgnn steps must be at least 1, got {config.steps}")
        torch.manual_seed(config.seed)
        model = cls(config, data.n_items)
        net = model.net
        train, validate = training_split(model, data)
        windows, targets, _ = next_item_pairs(train, config.history_len)
        if len(windows) == 0:
            raise UserError("srgnn: no training session has two known items")

        def make(idx: np.ndarray, rng: np.random.Generator):
            window = windows[idx]
            window = np.ascontiguousarray(window[:, first_column(window) :])  # on the CPU: no GPU sync in loss_fn
            return torch.from_numpy(window), torch.from_numpy(targets[idx, 0])

        def loss_fn(batch) -> torch.Tensor:
            window, target = batch
            return catalogue_cross_entropy(net.session_vectors(window), net.item_embedding.weight, target)

        model.fit_result = fit(net, config, lambda epoch: shuffled(config, epoch, len(windows), make), loss_fn, validate=validate, run_dir=run_dir, progress=progress)
        return model
