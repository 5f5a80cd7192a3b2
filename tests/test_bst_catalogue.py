"""BST reuses its catalogue (item + side-feature representation) while scoring, and never a stale one."""

from __future__ import annotations

import torch

from training.models.bst import BSTConfig, BSTNet
from training.models.window import mask_padding_column


def small_net() -> BSTNet:
    torch.manual_seed(0)
    net = BSTNet(30, BSTConfig(history_len=5, embedding_size=16, heads=2, mlp=(32,), dropout=0.0), item_features={"category": 4}, event_features={"device": 3})
    with torch.no_grad():
        net.item_feature_category.copy_(torch.arange(31) % 4)
    return net


def fresh(net: BSTNet) -> torch.Tensor:
    """The catalogue computed from the current weights, bypassing any cache."""
    with torch.no_grad():
        return net.item_side(torch.arange(31))


def window() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[0, 0, 3, 7, 9], [1, 2, 3, 4, 5]]), torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 2, 2]])


def test_scoring_reuses_the_catalogue_and_matches_a_fresh_one():
    net = small_net().eval()
    with torch.no_grad():
        first = net.catalogue()
        assert net.catalogue() is first
        assert torch.equal(first, fresh(net))
        assert torch.equal(net(*window()), mask_padding_column(net.features(*window()) @ fresh(net).T))


def test_weight_changes_and_mode_switches_invalidate_it():
    net = small_net().eval()
    with torch.no_grad():
        before = net.catalogue()
        net.item_feature_embeddings["category"].weight.add_(1.0)  # in place, as an optimizer step
        assert not torch.equal(net.catalogue(), before)
        assert torch.equal(net.catalogue(), fresh(net))

        other = small_net()
        torch.nn.init.normal_(other.item_embedding.weight)
        net.load_state_dict(other.state_dict())
        assert torch.equal(net.catalogue(), fresh(net))

        net.item_feature_category.fill_(0)  # the side-feature table itself
        assert torch.equal(net.catalogue(), fresh(net))

        kept = net.catalogue()
        net.train()
        net.eval()
        assert net.catalogue() is not kept


def test_training_recomputes_it_with_gradients():
    net = small_net().eval()
    with torch.no_grad():
        net.catalogue()
    net.train()
    catalogue = net.catalogue()
    assert catalogue.requires_grad
    scores = net.features(*window()) @ catalogue.T
    torch.nn.functional.cross_entropy(scores, torch.tensor([4, 6])).backward()
    assert net.item_embedding.weight.grad is not None and net.item_embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():  # an SGD step, in place like every optimizer's
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    net.eval()
    with torch.no_grad():
        assert torch.equal(net.catalogue(), fresh(net))


def test_blockwise_training_loss_equals_full_softmax_over_the_scores(monkeypatch):
    """The loss BST trains with (catalogue_cross_entropy on the catalogue) has the value and gradients of cross-entropy on its scores."""
    import training.models.window as window_module

    monkeypatch.setattr(window_module, "CATALOGUE_BLOCK_BYTES", 4 * 31)  # one row per block
    targets = torch.tensor([4, 30])
    results = []
    for blockwise in (False, True):
        net = small_net().train()
        if blockwise:
            loss = window_module.catalogue_cross_entropy(net.features(*window()), net.catalogue(), targets)
        else:
            loss = torch.nn.functional.cross_entropy(net(*window()), targets)
        loss.backward()
        results.append((loss.detach(), net.item_embedding.weight.grad, net.item_feature_embeddings["category"].weight.grad, net.mlp[0].weight.grad))
    for full, blocks in zip(*results):
        assert blocks.abs().sum() > 0
        torch.testing.assert_close(blocks, full, rtol=1e-5, atol=1e-6)
