"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the last L items.

Item embeddings (shared with the output layer, as in the paper) plus learned
position embeddings go through ``blocks`` pre-norm transformer blocks whose
attention only looks back; the output at the last slot, dotted with every
item embedding, scores the next item.

Loss: by default full cross-entropy over all items at every position
(Klenitskiy & Vasilev, RecSys 2023, "Turning Dross Into Gold Loss: is BERT4Rec
really better than SASRec?": it beats the paper's sampled BCE by a wide margin
under full ranking). ``loss="bce"`` is the paper's binary cross-entropy with
one uniformly sampled negative per target (the paper excludes the user's own
items from negatives; we sample from the whole catalogue). ``loss="sampled"`` is
a softmax over each target and ``n_sample`` items drawn uniformly from the
catalogue, one draw shared by the mini-batch (a negative that is the row's own
target is masked out; uniform draws need no logQ correction): the full softmax
costs every position a product with the whole item table, which on a 1M-item
catalogue is hours per epoch on two cores (benchmarks/training_scale.py). With
it the item table gets sparse gradients (SparseAdam for its rows, see
``trainer.make_optimizer``), so a step's cost no longer grows with the catalogue.

Initialisation (``init``): ``default`` draws item embeddings from N(0, 1/d) and leaves the
other layers at PyTorch's defaults (position embeddings N(0, 1), Linear layers Kaiming-uniform);
``normal`` draws every Linear and Embedding weight from N(0, 0.02) with zero biases, as
Klenitskiy & Vasilev's SASRec does (``_init_weights`` in their src/models.py, after GPT-2 and
RecBole; their attention's input projection, a ``nn.MultiheadAttention`` parameter, keeps
Xavier, ours is a Linear and gets N(0, 0.02) too). With ``default`` the position embeddings start as large as the scaled item embeddings;
with ``normal`` they start 8x smaller (d = 64), so the first epochs learn mostly from the items.

Implementation notes: the attention is hand-written (``window.SelfAttention``)
with a mask that always allows the diagonal. ``nn.TransformerEncoder`` with a
causal mask plus key padding gave NaN scores for heavily padded windows, both
in eager mode (fast path) and in onnxruntime. Position ids count from the
session's first item in the window (``window.relative_positions``) so that the
prefixes seen in training and the left-padded windows seen in serving use the
same ids.
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
from training.models.window import QueryNormBlock, TransformerBlock, WindowModel, attention_mask, catalogue_cross_entropy, first_column, mask_padding_column, relative_positions, shuffled, training_split
from training.trainer import TrainerConfig, fit
from training.windows import sequence_chunks

LOSSES = ("ce", "bce", "sampled")
INITS = ("default", "normal")
BLOCKS = ("prenorm", "querynorm")


@dataclass
class SASRecConfig(TrainerConfig):
    """Paper defaults (Beauty setting) except the loss; ``history_len`` is the paper's n."""

    history_len: int = 50
    hidden_size: int = 50
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.5
    loss: str = "ce"
    n_sample: int = 1024  # loss "sampled": uniform negatives per mini-batch
    init: str = "default"  # "normal": N(0, 0.02) everywhere, Klenitskiy & Vasilev's SASRec
    block: str = "prenorm"  # "querynorm": the paper's block as pmixer's and Klenitskiy & Vasilev's code write it
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    patience: int = 5


class SASRecNet(nn.Module):
    """forward(window [B, L]) -> scores [B, n_items + 1]; ``hidden`` gives every slot's state."""

    def __init__(self, n_items: int, config: SASRecConfig):
        super().__init__()
        size = config.hidden_size
        self.item_embedding = nn.Embedding(n_items + 1, size, padding_idx=0)
        self.position_embedding = nn.Embedding(config.history_len, size)
        self.dropout = nn.Dropout(config.dropout)
        block = QueryNormBlock if config.block == "querynorm" else TransformerBlock
        self.blocks = nn.ModuleList(block(size, config.heads, config.dropout) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(size)
        nn.init.normal_(self.item_embedding.weight, std=size**-0.5)
        if config.init == "normal":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def hidden(self, window: torch.Tensor) -> torch.Tensor:
        """States [B, L, H]: slot t summarises the items up to slot t."""
        x = self.item_embedding(window) * self.item_embedding.embedding_dim**0.5 + self.position_embedding(relative_positions(window))
        x = self.dropout(x)
        allowed = attention_mask(window, causal=True)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The item table while training looks it up sparsely (loss "sampled"; see ``trainer.make_optimizer``)."""
        return [self.item_embedding.weight] if self.item_embedding.sparse else []

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        last = self.hidden(window)[:, -1]
        return mask_padding_column(last @ self.item_embedding.weight.T)


def sampled_cross_entropy(states: torch.Tensor, embedding: nn.Embedding, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of each state over its target and the shared ``negatives`` [S].

    Column 0 of the logits is the target; a negative equal to the row's target is masked, so the
    target is never its own negative. Cost [N, S] instead of [N, n_items].
    """
    positive = (states * embedding(targets)).sum(-1, keepdim=True)
    negative = (states @ embedding(negatives).T).masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive, negative], 1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class SASRec(WindowModel):
    name = "sasrec"
    Config = SASRecConfig
    padding_columns_needed = 0

    @classmethod
    def build_net(cls, n_items: int, config: SASRecConfig) -> nn.Module:
        return SASRecNet(n_items, config)

    @classmethod
    def train(cls, data: PreparedData, config: SASRecConfig | None = None, *, progress: bool = True, run_dir: Path | None = None) -> "SASRec":
        config = config or SASRecConfig()
        config.check()
        if config.loss not in LOSSES:
            raise UserError(f"sasrec loss '{config.loss}' unknown (known: {', '.join(LOSSES)})")
        if config.n_sample < 1:
            raise UserError(f"setting 'n_sample' must be at least 1, got {config.n_sample}")
        if config.init not in INITS:
            raise UserError(f"sasrec init '{config.init}' unknown (known: {', '.join(INITS)})")
        if config.block not in BLOCKS:
            raise UserError(f"sasrec block '{config.block}' unknown (known: {', '.join(BLOCKS)})")
        torch.manual_seed(config.seed)
        model = cls(config, data.n_items)
        net = model.net
        train, validate = training_split(model, data)
        chunks, _ = sequence_chunks(train, config.history_len + 1)
        if len(chunks) == 0:
            raise UserError("sasrec: no training session has two known items")
        n_items = data.n_items

        def make(idx: np.ndarray, rng: np.random.Generator):
            batch = chunks[idx]
            start = first_column(batch)  # all-padding columns dropped here, on the CPU: no GPU sync in loss_fn
            trimmed = torch.from_numpy(np.ascontiguousarray(batch[:, start:]))
            if config.loss == "bce":
                negatives = rng.integers(1, n_items + 1, size=(len(idx), config.history_len))
                return trimmed, torch.from_numpy(np.ascontiguousarray(negatives[:, start:]))
            if config.loss == "sampled":
                return trimmed, torch.from_numpy(rng.integers(1, n_items + 1, size=config.n_sample))
            return trimmed, None

        def loss_fn(batch) -> torch.Tensor:
            chunk, negatives = batch
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            hidden = net.hidden(inputs)
            real = targets > 0
            states = hidden[real]
            if config.loss == "ce":
                return catalogue_cross_entropy(states, net.item_embedding.weight, targets[real])
            if config.loss == "sampled":
                return sampled_cross_entropy(states, net.item_embedding, targets[real], negatives)
            pos = (states * net.item_embedding(targets[real])).sum(-1)
            neg = (states * net.item_embedding(negatives[real])).sum(-1)
            return F.binary_cross_entropy_with_logits(torch.cat([pos, neg]), torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]))

        # sampled: every use of the item table in the loss is a lookup, so its gradient is the rows a
        # step touches (a dense one over 1M items costs a second per step in Adam alone)
        net.item_embedding.sparse = config.loss == "sampled"
        try:
            model.fit_result = fit(net, config, lambda epoch: shuffled(config, epoch, len(chunks), make), loss_fn, validate=validate, run_dir=run_dir, progress=progress)
        finally:
            net.item_embedding.sparse = False
        return model
