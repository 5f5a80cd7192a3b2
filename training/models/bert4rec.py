"""BERT4Rec (Sun et al., CIKM 2019): bidirectional self-attention trained with the cloze task.

Training hides a random share (``mask_prob``) of the items of each sequence
behind a mask token (embedding row ``n_items + 1``) and predicts them from
both sides. To predict the next item the window's last L - 1 items are
followed by the mask token and the output at that slot is ranked (the paper's
inference). The output layer is the paper's: a dense layer with GELU and
layer norm, then a dot product with the (shared) item embeddings plus a
per-item bias.

Defaults: the paper's architecture (2 blocks, 2 heads, hidden 64, dropout 0.1,
GELU, n = 50 for the Amazon data). Petrov & Macdonald (RecSys 2022, "A
Systematic Review and Replicability Study of BERT4Rec") found that BERT4Rec
only reaches its published quality when trained far longer than common
default configurations (the original code needed up to 30x the default
training time). On a shared CPU we cannot do that, so we take a higher
learning rate than the paper's 1e-4 (1e-3, Adam, no decay), ``mask_prob`` 0.2
(the paper's value for ML-1m; it used 0.6 for Beauty) and many epochs with
early stopping on validation MRR@20 (patience 10). Expect BERT4Rec to trail
SASRec with full cross-entropy at equal CPU time.

Block and output layer (``block``, ``head``): ``prenorm`` (default) normalises each part's input and the
final states; ``postnorm`` is BERT's block (Hugging Face's ``BertLayer``, as in Klenitskiy & Vasilev's
BERT4Rec): the norm after each residual sum, no final norm. ``head=transform`` (default) is the paper's output
layer above; ``tied`` is theirs: the states times the item embeddings, nothing between, no bias.

Training data (``unmasked``, ``train_windows``): by default a sequence whose random draw masked nothing has
its last item hidden (``mask_last``), and every item is trained on, in chunks of ``history_len``. Klenitskiy &
Vasilev's data gives such a sequence no target (``skip``) and takes each user's last ``history_len`` items only
(``last``).

Training softmax (``softmax``): ``items`` (default) makes the items the classes of the training loss;
``vocab`` makes every embedding row one, the padding and mask rows too, as Klenitskiy & Vasilev's output over
their whole vocabulary does (their padding row then learns through the output layer, and every masked slot
pushes its state away from the mask token's embedding). Scoring ranks items only either way.

Input layer (``embeddings``): ``plain`` (default) sums item and position embeddings and normalises them
(epsilon 1e-5); ``bert`` is Hugging Face's ``BertEmbeddings`` as Klenitskiy & Vasilev's BERT4Rec uses it: one
learned token-type vector (N(0, 0.02)) added to every slot too, and the norm's epsilon BERT's 1e-12. The vector
could be folded into the position embeddings, so the two differ in how Adam trains them, not in what they can
represent.

Initialisation (``init``): ``default`` draws item and position embeddings from
a truncated N(0, 0.02) and leaves the Linear layers at PyTorch's defaults;
``normal`` also draws every Linear weight from N(0, 0.02) with zero biases, as
the Hugging Face ``BertModel`` in Klenitskiy & Vasilev's BERT4Rec does (the
same setting as SASRec's ``init``, where it mattered a lot; not measured here).
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
from training.models.window import PostNormBlock, TransformerBlock, WindowModel, attention_mask, catalogue_cross_entropy, first_column, mask_padding_column, relative_positions, shuffled, training_split
from training.trainer import TrainerConfig, fit
from training.windows import sequence_chunks


@dataclass
class BERT4RecConfig(TrainerConfig):
    """Paper architecture; training settings chosen to converge on a CPU (see module docstring)."""

    history_len: int = 50
    hidden_size: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.1
    mask_prob: float = 0.2
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    init: str = "default"  # "normal": every Linear weight N(0, 0.02) too, as Hugging Face's BERT
    block: str = "prenorm"  # "postnorm": BERT's block (norm after each residual sum), as Hugging Face's BERT
    head: str = "transform"  # "tied": scores = states x item embeddings, no dense layer, norm or bias between
    unmasked: str = "mask_last"  # a sequence whose draw masked nothing: hide its last item; "skip": no target (Klenitskiy & Vasilev)
    train_windows: str = "all"  # every item, in chunks of history_len; "last": each user's last history_len items only (theirs)
    softmax: str = "items"  # classes of the training loss; "vocab": every embedding row, padding and mask too (theirs)
    embeddings: str = "plain"  # "bert": Hugging Face's BertEmbeddings (a learned token-type vector, norm epsilon 1e-12)


class BERT4RecNet(nn.Module):
    """forward(window [B, L]) -> scores [B, n_items + 1] for the item after the window."""

    def __init__(self, n_items: int, config: BERT4RecConfig):
        super().__init__()
        size = config.hidden_size
        self.n_items = n_items
        self.mask_token = n_items + 1
        self.item_embedding = nn.Embedding(n_items + 2, size, padding_idx=0)
        self.position_embedding = nn.Embedding(config.history_len, size)
        bert_input = config.embeddings == "bert"
        self.norm_in = nn.LayerNorm(size, eps=1e-12 if bert_input else 1e-5)
        # BERT's token-type embedding for type 0, the only type a sequence of items has
        self.token_type = nn.Parameter(torch.randn(size) * 0.02) if bert_input else None
        self.dropout = nn.Dropout(config.dropout)
        block = PostNormBlock if config.block == "postnorm" else TransformerBlock
        self.blocks = nn.ModuleList(block(size, config.heads, config.dropout, 4 * size, nn.GELU) for _ in range(config.blocks))
        # the last post-norm block already ends in a norm (BERT has no other)
        self.norm = nn.Identity() if config.block == "postnorm" else nn.LayerNorm(size)
        if config.head == "tied":
            self.head, self.output_bias = nn.Identity(), None
        else:
            self.head = nn.Sequential(nn.Linear(size, size), nn.GELU(), nn.LayerNorm(size))
            self.output_bias = nn.Parameter(torch.zeros(n_items + 1))
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02)
        nn.init.trunc_normal_(self.position_embedding.weight, std=0.02)
        if config.init == "normal":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def hidden(self, sequence: torch.Tensor) -> torch.Tensor:
        """States [B, L, H] of a left-padded sequence that may contain mask tokens."""
        x = self.item_embedding(sequence) + self.position_embedding(relative_positions(sequence))
        if self.token_type is not None:
            x = x + self.token_type
        x = self.dropout(self.norm_in(x))
        allowed = attention_mask(sequence, causal=False)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Scores over items 0..n_items (the mask token is never a candidate)."""
        scores = self.head(states) @ self.item_embedding.weight[: self.n_items + 1].T
        return mask_padding_column(scores if self.output_bias is None else scores + self.output_bias)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(window[:, :1], self.mask_token)
        sequence = torch.cat([window[:, 1:], mask], 1)
        return self.logits(self.hidden(sequence)[:, -1])


def cloze_batch(batch: np.ndarray, rng: np.random.Generator, mask_prob: float, mask_token: int, unmasked: str = "mask_last") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input with mask tokens, where masked, original items) of left-padded chunks, each item masked with ``mask_prob``.

    A sequence whose draw masked nothing teaches nothing. ``mask_last`` hides its last item (what inference
    asks for); on short sequences that is common (Beauty's median training user has 4 items: a third of them
    draw no mask at 0.2) and those users then repeat one fixed example every epoch. ``skip`` leaves it without a
    target, as Klenitskiy & Vasilev's cloze data does, and drops it from the batch, which changes nothing else:
    sequences do not see each other and the loss is the mean over the masked items.
    """
    masked = (batch > 0) & (rng.random(batch.shape) < mask_prob)
    empty = ~masked.any(1)
    if unmasked == "skip":
        batch, masked = batch[~empty], masked[~empty]
    else:
        masked[empty, -1] = True
    start = first_column(batch)  # all-padding columns dropped here, on the CPU: no GPU sync in loss_fn
    sequence = np.where(masked, mask_token, batch)
    return tuple(torch.from_numpy(np.ascontiguousarray(a[:, start:])) for a in (sequence, masked, batch))


def cloze_loss(net: BERT4RecNet, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], softmax: str = "items") -> torch.Tensor:
    """Mean cross-entropy of the masked items of a ``cloze_batch``, over the items (``items``) or over every
    embedding row, padding and mask included (``vocab``)."""
    sequence, masked, original = batch
    if len(sequence) == 0:  # "skip" and a batch whose draw masked nothing at all: no target, no gradient
        return net.item_embedding.weight.sum() * 0.0
    states = net.head(net.hidden(sequence)[masked])
    if softmax == "vocab":  # the bias has no mask row: the mask's score is its dot product alone
        bias = None if net.output_bias is None else F.pad(net.output_bias, (0, 1))
        return catalogue_cross_entropy(states, net.item_embedding.weight, original[masked], bias, padding_class=True)
    return catalogue_cross_entropy(states, net.item_embedding.weight[: net.n_items + 1], original[masked], net.output_bias)


class BERT4Rec(WindowModel):
    name = "bert4rec"
    Config = BERT4RecConfig
    padding_columns_needed = 1  # forward drops the window's first column to append the mask

    @classmethod
    def build_net(cls, n_items: int, config: BERT4RecConfig) -> nn.Module:
        return BERT4RecNet(n_items, config)

    @classmethod
    def train(cls, data: PreparedData, config: BERT4RecConfig | None = None, *, progress: bool = True, run_dir: Path | None = None) -> "BERT4Rec":
        config = config or BERT4RecConfig()
        config.check()
        if not 0 < config.mask_prob < 1:
            raise UserError(f"bert4rec mask_prob must be in (0, 1), got {config.mask_prob}")
        for name, known in (("init", ("default", "normal")), ("block", ("prenorm", "postnorm")), ("head", ("transform", "tied")), ("unmasked", ("mask_last", "skip")), ("train_windows", ("all", "last")), ("softmax", ("items", "vocab")), ("embeddings", ("plain", "bert"))):
            if getattr(config, name) not in known:
                raise UserError(f"bert4rec {name} '{getattr(config, name)}' unknown (known: {', '.join(known)})")
        torch.manual_seed(config.seed)
        model = cls(config, data.n_items)
        net = model.net
        train, validate = training_split(model, data)
        chunks, _ = sequence_chunks(train, config.history_len, last_only=config.train_windows == "last")
        if len(chunks) == 0:
            raise UserError("bert4rec: no training session has two known items")

        def make(idx: np.ndarray, rng: np.random.Generator):
            return cloze_batch(chunks[idx], rng, config.mask_prob, net.mask_token, config.unmasked)

        model.fit_result = fit(net, config, lambda epoch: shuffled(config, epoch, len(chunks), make), lambda batch: cloze_loss(net, batch, config.softmax), validate=validate, run_dir=run_dir, progress=progress)
        return model
