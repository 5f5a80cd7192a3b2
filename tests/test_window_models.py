"""Window models (Caser, SASRec, BERT4Rec, BST, SR-GNN) and the window builders they share.

Each model trains briefly on synthetic walks and must beat most-popular by a
clear margin; its exported module must rank exactly like ``score_next``, and a
saved run must load back (``weights_only``) with the same scores.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamrec.errors import UserError
from training.evaluate import evaluate
from training.models import get_model, load_run
from training.models.base import next_positions
from training.models.pop import MostPopular
from training.models.srgnn import SRGNNConfig, SRGNNNet, session_graphs
from training.models.window import catalogue_cross_entropy, first_column, mask_padding_column
from training.sessions import Sessions
from training.synth import synthesize
from training.windows import next_item_pairs, prefix_windows, sequence_chunks

# Small sizes and quick learning rates: enough to learn the synthetic graph in seconds.
SMALL = {
    "caser": dict(epochs=4, batch_size=64, lr=3e-3),
    "sasrec": dict(epochs=4, history_len=10, dropout=0.1, lr=5e-3, batch_size=64),
    "bert4rec": dict(epochs=6, history_len=10, lr=5e-3, batch_size=64),
    "bst": dict(epochs=4, history_len=10, embedding_size=32, heads=2, mlp=(64,), dropout=0.0, lr=3e-3, batch_size=64),
    "srgnn": dict(epochs=3, history_len=10, hidden_size=32, lr=5e-3),
}
MARGIN = 0.1  # MRR@20 above most-popular


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_device_feature(s: Sessions) -> Sessions:
    """The same sessions with an event feature "device" (0..2, constant per session), for BST."""
    s.features["device"] = (s.session_index() % 3).astype(np.int64)
    return s


@pytest.fixture(scope="module")
def data():
    d = synthesize(n_items=100, n_sessions=2000, seed=0, test_fraction=0.2)
    for s in (d.train, d.valid, d.test):
        with_device_feature(s)
    return d


@pytest.fixture(scope="module")
def pop_mrr(data):
    return evaluate(MostPopular.train(data), data.test, ks=(20,), progress=False)["MRR@20"]


@pytest.fixture(scope="module", params=list(SMALL))
def trained(request, data):
    cls = get_model(request.param)
    torch.set_num_threads(1)
    return cls.train(data, cls.Config(threads=1, **SMALL[request.param]), progress=False)


# ---------------------------------------------------------------- windows


def hand_made() -> Sessions:
    s = Sessions.from_lists([[1, 2, 0, 3, 4, 5], [0], [], [6, 0, 7], [8]])
    s.features["city"] = np.arange(11, 22, dtype=np.int64)
    return s


def test_prefix_windows_are_left_padded_drop_unknowns_and_stay_in_their_session():
    s = hand_made()
    windows, feats = prefix_windows(s, np.arange(s.n_events), 3, ("city",))
    expected = [
        [0, 0, 1], [0, 1, 2], [0, 1, 2],  # the unknown at position 2 changes nothing
        [1, 2, 3], [2, 3, 4], [3, 4, 5],
        [0, 0, 0],  # a session of one unknown item: empty window
        [0, 0, 6], [0, 0, 6], [0, 6, 7],  # never reaches back into the previous session
        [0, 0, 8],
    ]
    np.testing.assert_array_equal(windows, expected)
    # the features travel with their items: city of event p is 11 + p
    np.testing.assert_array_equal(feats["city"][5], [11 + 3, 11 + 4, 11 + 5])
    np.testing.assert_array_equal(feats["city"][9], [0, 11 + 7, 11 + 9])


def test_next_item_pairs_predict_the_next_known_items():
    windows, targets, _ = next_item_pairs(hand_made(), 2, targets=2)
    np.testing.assert_array_equal(windows, [[0, 1], [1, 2], [2, 3], [3, 4], [0, 6]])
    np.testing.assert_array_equal(targets, [[2, 3], [3, 4], [4, 5], [5, 0], [7, 0]])


def test_sequence_chunks_make_every_later_item_a_target_exactly_once():
    chunks, _ = sequence_chunks(hand_made(), 3)
    np.testing.assert_array_equal(chunks, [[3, 4, 5], [1, 2, 3], [0, 6, 7]])
    rng = np.random.default_rng(0)
    s = Sessions.from_lists([list(rng.integers(1, 50, size=n)) for n in rng.integers(1, 30, size=40)])
    for length in (2, 4, 7):
        chunks, _ = sequence_chunks(s, length)
        targets = chunks[:, 1:][chunks[:, :-1] > 0]  # (input, target) pairs with a real input
        assert len(targets) == int(np.maximum(s.lengths - 1, 0).sum())


def test_sequence_chunks_last_only_keeps_each_sessions_last_items_only():
    chunks, _ = sequence_chunks(hand_made(), 3, last_only=True)
    np.testing.assert_array_equal(chunks, [[3, 4, 5], [0, 6, 7]])


def test_first_column_skips_columns_that_are_padding_in_every_row():
    window = np.array([[0, 0, 0, 4, 5], [0, 0, 2, 3, 6]])
    assert first_column(window) == 2 and first_column(window, keep=1) == 1
    assert first_column(torch.from_numpy(window)) == 2
    assert first_column(np.zeros((2, 5), dtype=np.int64)) == 4  # the last column always stays


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("with_bias", [False, True])
def test_catalogue_cross_entropy_equals_full_softmax_cross_entropy(with_bias, monkeypatch):
    import training.models.window as window

    monkeypatch.setattr(window, "CATALOGUE_BLOCK_BYTES", 3 * 4 * 40)  # 3 rows per block: several blocks and a ragged last one
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(10, 8, generator=gen, requires_grad=True)
    weight = torch.randn(41, 8, generator=gen, requires_grad=True)
    bias = torch.randn(41, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(1, 41, (10,), generator=gen)

    def grads(loss):
        params = [states, weight] + ([bias] if with_bias else [])
        return [loss.detach()] + list(torch.autograd.grad(3.0 * loss, params))

    logits = states @ weight.T + (bias if with_bias else 0.0)
    expected = grads(torch.nn.functional.cross_entropy(mask_padding_column(logits), targets))
    got = grads(catalogue_cross_entropy(states, weight, targets, bias))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_beats_most_popular(trained, data, pop_mrr):
    mrr = evaluate(trained, data.test, ks=(20,), progress=False)["MRR@20"]
    assert mrr > pop_mrr + MARGIN, (trained.name, mrr, pop_mrr)
    assert trained.fit_result.best_epoch >= 0


def test_export_module_ranks_like_score_next(trained, data):
    positions, scores = next(trained.score_next(data.test, batch_size=64))
    windows, feats = prefix_windows(data.test, positions, trained.history_len, trained.event_features)
    module = trained.export_module()
    with torch.no_grad():
        exported = module(torch.from_numpy(windows), *(torch.from_numpy(feats[n]) for n in trained.event_features)).numpy()
    np.testing.assert_allclose(exported, scores, rtol=1e-5, atol=1e-5)
    assert scores.shape == (len(positions), data.n_items + 1)
    assert (scores[:, 0] < scores[:, 1:].min(1)).all()  # column 0 is never recommended
    assert np.isfinite(scores).all()


def test_save_and_load_give_the_same_scores(trained, data, tmp_path):
    trained.save(tmp_path)
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == set(trained.net.state_dict())
    loaded = load_run(tmp_path)
    assert loaded.state_kind == trained.state_kind and loaded.history_len == trained.history_len
    _, a = next(trained.score_next(data.test, batch_size=128))
    _, b = next(loaded.score_next(data.test, batch_size=128))
    np.testing.assert_array_equal(a, b)


def test_every_position_is_scored_once(trained):
    s = with_device_feature(Sessions.from_lists([[3, 0, 5, 7], [9], [0, 0], [4, 4, 4, 2]]))
    positions = np.concatenate([p for p, _ in trained.score_next(s, batch_size=3)])
    np.testing.assert_array_equal(positions, next_positions(s))


class ScoreNextOnly:
    """A window model with ``score_positions`` hidden, so the evaluator scores every position and drops the rest."""

    def __init__(self, model):
        self.model, self.n_items = model, model.n_items

    def score_next(self, sessions, batch_size=512):
        return self.model.score_next(sessions, batch_size)


def test_last_mode_scores_only_the_last_positions_with_the_same_figures(trained, data):
    scored = np.concatenate([p for p, _ in trained.score_positions(data.test, np.array([5, 2, 9]), batch_size=2)])
    np.testing.assert_array_equal(scored, [5, 2, 9])
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    direct = evaluate(trained, data.test, mode="last", popularity=popularity, batch_size=64, progress=False)
    generic = evaluate(ScoreNextOnly(trained), data.test, mode="last", popularity=popularity, batch_size=64, progress=False)
    assert direct == generic


# ---------------------------------------------------------------- model specifics


@pytest.mark.parametrize("block", ["prenorm", "querynorm"])
def test_sasrec_padding_gives_finite_scores_in_onnxruntime(tmp_path, block):
    """Nearly empty windows are where masked attention used to give NaN (eager and ORT)."""
    ort = pytest.importorskip("onnxruntime")
    cls = get_model("sasrec")
    model = cls(cls.Config(history_len=50, blocks=2, heads=2, hidden_size=16, block=block), 30)
    window = torch.zeros(3, 50, dtype=torch.int64)
    window[1, -1] = 7
    window[2, -3:] = torch.tensor([4, 9, 4])
    module = model.export_module()
    eager = module(window).detach().numpy()
    torch.onnx.export(module, (window,), tmp_path / "m.onnx", dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, {session.get_inputs()[0].name: window.numpy()})[0]
    assert np.isfinite(eager).all() and np.isfinite(served).all()
    np.testing.assert_allclose(served, eager, rtol=1e-4, atol=1e-4)


def test_sasrec_and_caser_paper_losses_train(data):
    for name in ("sasrec", "caser"):
        cls = get_model(name)
        config = cls.Config(threads=1, loss="bce", **{**SMALL[name], "epochs": 2})
        model = cls.train(data, config, progress=False)
        losses = [h["loss"] for h in model.fit_result.history]
        assert len(losses) == 2 and losses[1] < losses[0], (name, losses)
    with pytest.raises(UserError, match="loss"):
        get_model("sasrec").train(data, get_model("sasrec").Config(loss="hinge"), progress=False)


def test_bst_uses_item_and_event_features_and_works_without(data):
    cls = get_model("bst")
    small = {**SMALL["bst"], "epochs": 1}
    with_features = cls.train(data, cls.Config(threads=1, **small), progress=False)
    assert with_features.event_features == ("device",)
    assert with_features.item_features == ("category",)
    np.testing.assert_array_equal(with_features.net.item_feature_category.numpy(), data.item_features["category"])
    bare = Sessions(data.test.session_ids, data.test.offsets, data.test.items, data.test.times)
    with pytest.raises(UserError, match="device"):
        next(with_features.score_next(bare))
    # the device feature changes the scores of the same window
    window = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 5, 9, 12]])
    net = with_features.export_module()
    a, b = net(window, torch.zeros_like(window)), net(window, torch.full_like(window, 2))
    assert not torch.allclose(a, b)

    plain = cls.train(data, cls.Config(threads=1, use_features=False, **small), progress=False)
    assert plain.event_features == () and plain.item_features == ()
    positions, scores = next(plain.score_next(bare, batch_size=64))
    assert np.isfinite(scores).all() and len(positions) == 64


def test_bert4rec_predicts_through_a_trailing_mask_token():
    cls = get_model("bert4rec")
    model = cls(cls.Config(history_len=6, hidden_size=16, heads=2), 20)
    net = model.export_module()
    window = torch.tensor([[0, 0, 3, 4, 5, 6]])
    expected = net.logits(net.hidden(torch.tensor([[0, 3, 4, 5, 6, 21]]))[:, -1])
    torch.testing.assert_close(net(window), expected)
    assert net(window).shape == (1, 21)  # the mask token is never a candidate


# ---------------------------------------------------------------- SR-GNN graphs


def reference_graph(row: np.ndarray):
    """One session's graph the obvious way: (sorted node items, slot -> node, edge set)."""
    items = row[row > 0] if (row > 0).any() else np.array([0])
    nodes, alias = np.unique(items, return_inverse=True)
    edges = {(int(alias[t]), int(alias[t + 1])) for t in range(len(items) - 1)}
    return nodes, alias, edges


def test_srgnn_batched_graphs_equal_per_session_construction():
    window = torch.tensor([
        [0, 0, 0, 0, 5, 3, 5, 3, 9],  # repeats: 2 x (5 -> 3) is one edge, 3 -> 5 another
        [0, 0, 0, 0, 0, 0, 0, 0, 4],  # one click: one node, no edge
        [0, 0, 0, 0, 0, 0, 0, 0, 0],  # empty: a single node of item 0
        [1, 2, 3, 4, 5, 6, 7, 8, 8],  # full window, a self loop at the end
        [0, 0, 0, 7, 2, 7, 2, 7, 1],
    ])
    g = session_graphs(window, n_items=10)
    assert (g.node_batch[1:] >= g.node_batch[:-1]).all()
    for b, row in enumerate(window.numpy()):
        nodes, alias, edges = reference_graph(row)
        mine = torch.nonzero(g.node_batch == b).flatten()
        first = int(mine[0])
        np.testing.assert_array_equal(g.node_items[mine].numpy(), nodes)
        used = g.slot_used[b].numpy()
        np.testing.assert_array_equal(g.slot_node[b].numpy()[used] - first, alias)
        in_row = (g.edge_index[0] >= first) & (g.edge_index[0] < first + len(nodes))
        got = {(int(s) - first, int(t) - first) for s, t in g.edge_index[:, in_row].T}
        assert got == edges
        assert ((g.edge_index[1, in_row] >= first) & (g.edge_index[1, in_row] < first + len(nodes))).all()
    in_degree = torch.bincount(g.edge_index[1], minlength=len(g.node_items)).float()
    torch.testing.assert_close(g.edge_weight, 1.0 / in_degree[g.edge_index[1]])


def test_srgnn_forward_has_no_python_loop_over_sessions():
    """The number of torch calls in a forward pass does not grow with the batch."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    net = SRGNNNet(50, dataclasses.replace(SRGNNConfig(), history_len=8, hidden_size=8)).eval()
    rng = np.random.default_rng(0)
    counts = []
    for batch in (4, 200):
        window = torch.from_numpy(rng.integers(1, 51, size=(batch, 8)))
        window[: batch // 2, :4] = 0  # left padding on half the rows
        Count.calls = 0
        with Count(), torch.no_grad():
            net(window)
        counts.append(Count.calls)
    assert counts[0] == counts[1], counts


def test_sasrec_normal_init_draws_every_weight_from_n_0_002_as_klenitskiy_and_vasilev_do():
    from training.models.sasrec import SASRecConfig, SASRecNet

    torch.manual_seed(0)
    ours = SASRecNet(2000, SASRecConfig(hidden_size=64))
    theirs = SASRecNet(2000, SASRecConfig(hidden_size=64, init="normal"))
    assert float(ours.position_embedding.weight.std()) == pytest.approx(1.0, rel=0.1)
    assert float(theirs.position_embedding.weight.std()) == pytest.approx(0.02, rel=0.1)
    assert float(theirs.item_embedding.weight[1:].std()) == pytest.approx(0.02, rel=0.1)
    assert float(theirs.item_embedding.weight[0].abs().max()) == 0.0  # padding row stays zero
    linear = theirs.blocks[0].attention.qkv
    assert float(linear.weight.std()) == pytest.approx(0.02, rel=0.1) and float(linear.bias.abs().max()) == 0.0
    assert float(theirs.blocks[0].norm1.weight.min()) == 1.0  # layer norms keep their identity start


def test_sasrec_unknown_init_is_a_one_line_error():
    data = synthesize(n_items=50, n_sessions=60, seed=1, test_fraction=0.2)
    with pytest.raises(UserError, match="init 'xavier' unknown"):
        get_model("sasrec").train(data, get_model("sasrec").Config(init="xavier", epochs=1), progress=False)


def test_bert4rec_normal_init_draws_its_linear_layers_from_n_0_002_like_hugging_faces_bert():
    from training.models.bert4rec import BERT4RecConfig, BERT4RecNet

    torch.manual_seed(0)
    ours = BERT4RecNet(2000, BERT4RecConfig())
    theirs = BERT4RecNet(2000, BERT4RecConfig(init="normal"))
    ffn = theirs.blocks[0].ffn[0]
    assert float(ffn.weight.std()) == pytest.approx(0.02, rel=0.1) and float(ffn.bias.abs().max()) == 0.0
    assert float(ours.blocks[0].ffn[0].weight.std()) > 0.05  # PyTorch's default, about 1 / sqrt(3 * 64)
    with pytest.raises(UserError, match="init 'xavier' unknown"):
        get_model("bert4rec").train(synthesize(n_items=50, n_sessions=60, seed=1, test_fraction=0.2), BERT4RecConfig(init="xavier"), progress=False)


def test_bert4rec_cloze_batch_skip_drops_the_sequences_whose_draw_masked_nothing_where_mask_last_hides_their_last_item():
    from training.models.bert4rec import cloze_batch

    batch = np.array([[0, 0, 0, 4, 5]] * 20 + [[1, 2, 3, 4, 5]] * 20)
    mask_token = 99
    sequence, masked, original = cloze_batch(batch, np.random.default_rng(7), 0.2, mask_token)
    skipped = cloze_batch(batch, np.random.default_rng(7), 0.2, mask_token, unmasked="skip")
    draw = (batch > 0) & (np.random.default_rng(7).random(batch.shape) < 0.2)  # the same draw both make
    empty = ~draw.any(1)
    assert 0 < empty.sum() < len(batch)
    # mask_last: every row has a target; the rows that drew none have exactly their last item hidden
    assert masked.any(1).all()
    np.testing.assert_array_equal(masked.numpy()[empty], np.eye(5, dtype=bool)[[4] * int(empty.sum())])
    np.testing.assert_array_equal(sequence.numpy(), np.where(masked.numpy(), mask_token, original.numpy()))
    # skip: those rows are gone, the others are unchanged (columns of padding in every kept row trimmed alike)
    keep = np.flatnonzero(~empty)
    width = skipped[0].shape[1]
    for got, want in zip(skipped, (sequence, masked, original)):
        np.testing.assert_array_equal(got.numpy(), want.numpy()[keep][:, -width:])
    assert bool(skipped[1].any(1).all())
    nothing = cloze_batch(np.array([[0, 0, 7]]), np.random.default_rng(0), 1e-9, mask_token, unmasked="skip")
    assert nothing[0].shape[0] == 0  # a batch with no target at all: the loss is a zero with no gradient


def test_bert4rec_trained_as_klenitskiy_and_vasilev_feed_it_learns_the_walks(data, pop_mrr):
    """unmasked=skip (no target where the draw masked nothing) and train_windows=last (each user's last items only),
    with their softmax over the whole vocabulary."""
    cls = get_model("bert4rec")
    # skip trains the trailing-mask slot that inference uses about half as often, so it needs 30 epochs here. With the
    # items-only softmax the figure hung on the seed and the CPU's float path (MRR@20 0.27 where this was written, 0.15 /
    # 0.16 / 0.26 for seeds 42 / 1 / 2 on an AMD EPYC); with softmax=vocab, their output layer, 0.33 / 0.27 / 0.38 / 0.36
    # for seeds 42 / 1 / 2 / 3 there
    settings = {**SMALL["bert4rec"], "epochs": 30}
    model = cls.train(data, cls.Config(threads=1, unmasked="skip", train_windows="last", softmax="vocab", **settings), progress=False)
    assert evaluate(model, data.test, ks=(20,), progress=False)["MRR@20"] > pop_mrr + MARGIN
    for setting in ({"unmasked": "keep"}, {"train_windows": "first"}, {"softmax": "all"}, {"embeddings": "roberta"}):
        with pytest.raises(UserError, match=f"bert4rec {next(iter(setting))} '{next(iter(setting.values()))}' unknown"):
            cls.train(data, cls.Config(epochs=1, **setting), progress=False)


@pytest.mark.parametrize("head", ["tied", "transform"])
def test_bert4rec_vocab_softmax_makes_every_embedding_row_a_class_where_items_leaves_padding_and_mask_out(head):
    """softmax=vocab is Klenitskiy & Vasilev's output over their whole vocabulary: padding and mask rows are classes too."""
    from training.models.bert4rec import BERT4RecNet, cloze_batch, cloze_loss

    torch.manual_seed(0)
    net = BERT4RecNet(30, get_model("bert4rec").Config(hidden_size=16, history_len=8, head=head)).eval()  # no dropout: one forward pass = another
    if net.output_bias is not None:
        torch.nn.init.normal_(net.output_bias)
    batch = cloze_batch(np.random.default_rng(1).integers(1, 31, (6, 8)), np.random.default_rng(2), 0.5, net.mask_token, "skip")
    sequence, masked, original = batch
    states = net.head(net.hidden(sequence)[masked])
    bias = torch.zeros(32) if net.output_bias is None else torch.cat([net.output_bias, torch.zeros(1)])
    logits = states @ net.item_embedding.weight.T + bias  # all 32 rows: padding, items 1..30, mask
    torch.testing.assert_close(cloze_loss(net, batch, "vocab"), F.cross_entropy(logits, original[masked]))
    torch.testing.assert_close(cloze_loss(net, batch, "items"), F.cross_entropy(logits[:, 1:31], original[masked] - 1))
    for softmax, padding_learns in (("vocab", True), ("items", False)):
        net.zero_grad()
        cloze_loss(net, batch, softmax).backward()
        assert bool(net.item_embedding.weight.grad[0].abs().sum() > 0) == padding_learns


def test_bert4rec_bert_embeddings_add_a_learned_token_type_vector_and_normalise_with_bert_epsilon():
    """embeddings=bert is Hugging Face's BertEmbeddings: LN(item + position + token type 0), epsilon 1e-12."""
    from training.models.bert4rec import BERT4RecNet
    from training.models.window import relative_positions

    config = get_model("bert4rec").Config(hidden_size=16, history_len=8, dropout=0.0, block="postnorm", head="tied")
    plain = BERT4RecNet(30, config)
    assert plain.token_type is None and plain.norm_in.eps == 1e-5
    torch.manual_seed(0)
    net = BERT4RecNet(30, get_model("bert4rec").Config(**{**vars(config), "embeddings": "bert"}))
    assert net.norm_in.eps == 1e-12 and 0 < float(net.token_type.abs().max()) < 0.2  # drawn from N(0, 0.02)
    sequence = torch.tensor([[0, 0, 3, 7, 31], [4, 5, 6, 7, 31]])  # 31: the mask token
    captured = []
    net.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    net.hidden(sequence).sum().backward()
    summed = net.item_embedding(sequence) + net.position_embedding(relative_positions(sequence)) + net.token_type
    torch.testing.assert_close(captured[0], F.layer_norm(summed, (16,), net.norm_in.weight, net.norm_in.bias, 1e-12))
    assert float(net.token_type.grad.abs().sum()) > 0  # trained, like any embedding


def test_sampled_cross_entropy_over_the_whole_catalogue_equals_the_full_softmax():
    from training.models.sasrec import sampled_cross_entropy

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(41, 8)
    states = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(1, 41, (13,))
    sampled = sampled_cross_entropy(states, embedding, targets, torch.arange(1, 41))
    full = catalogue_cross_entropy(states, embedding.weight, targets)
    torch.testing.assert_close(sampled, full)
    grad_sampled = torch.autograd.grad(sampled, states)[0]
    torch.testing.assert_close(grad_sampled, torch.autograd.grad(full, states)[0])


def test_sasrec_sampled_softmax_learns_the_walks_and_rejects_a_zero_sample(data, pop_mrr):
    cls = get_model("sasrec")
    model = cls.train(data, cls.Config(threads=1, loss="sampled", n_sample=30, **SMALL["sasrec"]), progress=False)
    assert evaluate(model, data.test, ks=(20,), progress=False)["MRR@20"] > pop_mrr + MARGIN
    with pytest.raises(UserError, match="n_sample"):
        cls.train(data, cls.Config(loss="sampled", n_sample=0, epochs=1), progress=False)


def test_attention_with_a_context_takes_keys_and_values_from_it():
    """The query-norm block attends from normalised queries to the unnormalised input (pmixer's SASRec)."""
    from training.models.window import SelfAttention, attention_mask

    torch.manual_seed(0)
    attention = SelfAttention(8, 1, 0.0).eval()
    x, context = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    allowed = attention_mask(torch.ones(2, 5, dtype=torch.int64), causal=True)
    q = x @ attention.qkv.weight[:8].T + attention.qkv.bias[:8]
    k = context @ attention.qkv.weight[8:16].T + attention.qkv.bias[8:16]
    v = context @ attention.qkv.weight[16:].T + attention.qkv.bias[16:]
    weights = ((q @ k.transpose(1, 2)) / 8**0.5).masked_fill(~allowed[:, 0], float("-inf")).softmax(-1)
    expected = attention.out(weights @ v)
    torch.testing.assert_close(attention(x, allowed, context=context), expected)
    assert not torch.allclose(attention(x, allowed), expected)  # without a context keys and values come from x


def test_sasrec_with_the_query_norm_block_learns_the_walks_and_rejects_an_unknown_block(data, pop_mrr):
    cls = get_model("sasrec")
    model = cls.train(data, cls.Config(threads=1, block="querynorm", **SMALL["sasrec"]), progress=False)
    assert evaluate(model, data.test, ks=(20,), progress=False)["MRR@20"] > pop_mrr + MARGIN
    assert type(model.net.blocks[0]).__name__ == "QueryNormBlock"
    with pytest.raises(UserError, match="block 'postnorm' unknown"):
        cls.train(data, cls.Config(block="postnorm", epochs=1), progress=False)


@pytest.mark.parametrize("name", ["bert4rec", "sasrec"])
def test_validation_with_valid_exclude_seen_ranks_as_the_evaluator_does_without_the_users_own_items(name):
    from training.protocols import early_stopping_split, leave_one_out
    from training.synth import generate_log

    data = leave_one_out(generate_log(n_items=200, n_sessions=600, seed=5), min_core=0)
    _, valid = early_stopping_split(data)
    cls = get_model(name)
    settings = {**SMALL[name], "epochs": 1}
    logged = {}
    for exclude in (False, True):
        model = cls.train(data, cls.Config(threads=1, valid_exclude_seen=exclude, **settings), progress=False)
        line = model.fit_result.history[0]
        logged[exclude] = line["val_mrr20"]
        figures = evaluate(model, valid, ks=(10, 20), mode="last", exclude_seen=exclude, progress=False)
        assert (line["val_mrr20"], line["val_ndcg10"]) == (pytest.approx(figures["MRR@20"], abs=1e-9), pytest.approx(figures["NDCG@10"], abs=1e-9))
    assert logged[True] != pytest.approx(logged[False], abs=1e-6)  # the setting changed what was ranked


@pytest.mark.parametrize("name", ["bert4rec", "sasrec"])
def test_validation_with_valid_users_ranks_a_fixed_sample_of_that_many_validation_users(name):
    from training.protocols import early_stopping_split, leave_one_out
    from training.synth import generate_log
    from training.trainer import validation_sample

    data = leave_one_out(generate_log(n_items=200, n_sessions=600, seed=5), min_core=0)
    _, valid = early_stopping_split(data)
    cls = get_model(name)
    config = cls.Config(threads=1, valid_users=150, **{**SMALL[name], "epochs": 1})
    sample = validation_sample(valid, config)
    assert len(sample) == 150 and set(sample.session_ids) < set(valid.session_ids)
    assert np.array_equal(validation_sample(valid, config).session_ids, sample.session_ids)  # drawn once, from the seed
    model = cls.train(data, config, progress=False)
    logged = model.fit_result.history[0]["val_mrr20"]
    assert logged == pytest.approx(evaluate(model, sample, ks=(20,), mode="last", progress=False)["MRR@20"], abs=1e-9)
    assert logged != pytest.approx(evaluate(model, valid, ks=(20,), mode="last", progress=False)["MRR@20"], abs=1e-6)
    assert validation_sample(valid, cls.Config(valid_users=0)) is valid
    with pytest.raises(UserError, match="'valid_users' must not be negative"):
        cls.train(data, cls.Config(valid_users=-1, epochs=1), progress=False)


def test_bert4rec_with_berts_block_and_the_bare_tied_head_learns_the_walks_and_exports(data, pop_mrr, tmp_path):
    """Klenitskiy & Vasilev's BERT4Rec: Hugging Face's post-norm BertLayer, scores = states x item embeddings."""
    from training.models.window import PostNormBlock, attention_mask

    cls = get_model("bert4rec")
    # their learning rate: at the tests' quick 5e-3 the post-norm block does not learn the walks (MRR@20 0.12 after 6 epochs)
    model = cls.train(data, cls.Config(threads=1, block="postnorm", head="tied", **{**SMALL["bert4rec"], "lr": 1e-3, "epochs": 8}), progress=False)
    assert evaluate(model, data.test, ks=(20,), progress=False)["MRR@20"] > pop_mrr + MARGIN
    net = model.net.eval()
    assert isinstance(net.blocks[0], PostNormBlock) and net.output_bias is None
    assert not any(isinstance(m, torch.nn.Linear) for m in net.head.modules())  # nothing between states and embeddings
    window = torch.tensor([[0, 0, 0, 5, 9, 12, 4, 7, 3, 2]])
    block, x = net.blocks[0], torch.randn(1, 10, net.item_embedding.embedding_dim)
    allowed = attention_mask(window, causal=False)
    with torch.no_grad():  # the norm after each residual sum, by hand
        h = block.norm1(x + block.attention(x, allowed))
        torch.testing.assert_close(block(x, allowed), block.norm2(h + block.ffn(h)))
        states = net.hidden(torch.cat([window[:, 1:], torch.tensor([[net.mask_token]])], 1))[:, -1]
        torch.testing.assert_close(net(window), mask_padding_column(states @ net.item_embedding.weight[: net.n_items + 1].T))
    ort = pytest.importorskip("onnxruntime")
    module = model.export_module()
    batch = torch.cat([window, torch.zeros_like(window)])
    batch[1, -1] = 6
    eager = module(batch).detach().numpy()
    torch.onnx.export(module, (batch,), tmp_path / "m.onnx", dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0], eager, rtol=1e-4, atol=1e-4)
    for setting in ({"block": "querynorm"}, {"head": "mlp"}):
        with pytest.raises(UserError, match=f"bert4rec {next(iter(setting))} '{next(iter(setting.values()))}' unknown"):
            cls.train(data, cls.Config(epochs=1, **setting), progress=False)
