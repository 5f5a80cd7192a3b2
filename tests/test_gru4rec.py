"""GRU4Rec: learns structure, session-parallel schedule, sampling + logQ, export parity, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from streamrec.errors import UserError
from training.evaluate import evaluate
from training.models import load_run
from training.models.base import next_positions
from training.models.gru4rec import (
    Config,
    GRU4Rec,
    Sampler,
    SessionParallelBatches,
    carry_hidden,
    sampled_loss,
)
from training.sessions import Sessions
from training.synth import synthesize

SMALL = dict(layers=(32,), batch_size=16, n_sample=32, epochs=1, threads=1, lr=0.1, dropout_p_hidden=0.0)


def ragged_sessions(lengths, seed=0, n_items=None) -> Sessions:
    """Sessions whose events have distinct item ids (event p has item p + 1), so schedules can be decoded."""
    starts = np.random.default_rng(seed).permutation(len(lengths)).astype(float) * 100  # not in session order
    items = np.arange(1, sum(lengths) + 1)
    if n_items is not None:
        items = np.random.default_rng(seed + 1).integers(1, n_items + 1, size=sum(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    times = np.repeat(starts, lengths) + np.concatenate([np.arange(n) for n in lengths])
    return Sessions(np.arange(len(lengths)).astype(str), offsets, items, times)


def test_beats_most_popular_on_structured_data():
    data = synthesize(n_items=300, n_sessions=1500, seed=3, test_fraction=0.2)
    config = Config(layers=(64,), batch_size=32, n_sample=64, epochs=4, threads=1, lr=0.1, dropout_p_hidden=0.0)
    model = GRU4Rec.train(data, config, progress=False)
    hr = evaluate(model, data.test, ks=(20,), progress=False)["HR@20"]

    counts = np.bincount(data.train.items, minlength=data.n_items + 1)
    counts[0] = -1
    top20 = np.argsort(-counts, kind="stable")[:20]
    targets = data.test.items[next_positions(data.test) + 1]
    targets = targets[targets > 0]
    pop_hr = float(np.isin(targets, top20).mean())
    assert hr > pop_hr + 0.3, (hr, pop_hr)


def test_schedule_visits_every_pair_once_and_resets_at_session_starts():
    lengths = [3, 1, 5, 2, 7, 2, 4, 1, 6, 3, 2]
    sessions = ragged_sessions(lengths)
    schedule = SessionParallelBatches.build(sessions, batch_size=3)
    first_event = set(sessions.offsets[:-1][np.array(lengths) >= 2] + 1)  # items are position + 1

    pairs = []
    prev_inputs = None
    for inputs, targets, carry in zip(schedule.inputs, schedule.targets, schedule.carry):
        assert len(inputs) <= 3
        pairs += list(zip(inputs.tolist(), targets.tolist()))
        for i, item in enumerate(inputs.tolist()):
            if carry[i] < 0:
                assert item in first_event  # reset exactly when a session starts
            else:
                assert item not in first_event
                assert prev_inputs[carry[i]] == item - 1  # carried from the same session's previous click
        prev_inputs = inputs
    expected = [(p + 1, p + 2) for p in next_positions(sessions)]
    assert sorted(pairs) == sorted(expected)
    assert len(pairs) == len(set(pairs))

    # sessions enter in start-time order
    order = [item for inputs, carry in zip(schedule.inputs, schedule.carry) for item, c in zip(inputs.tolist(), carry) if c < 0]
    starts_of = {sessions.offsets[s] + 1: sessions.times[sessions.offsets[s]] for s in range(len(sessions))}
    assert [starts_of[i] for i in order] == sorted(starts_of[i] for i in order)


def test_carried_hidden_equals_running_each_session_alone():
    sessions = ragged_sessions([4, 2, 6, 3, 5, 2, 3], seed=1, n_items=20)
    model = GRU4Rec(20, Config(**{**SMALL, "layers": (8, 6)}))
    model.net.eval()
    schedule = SessionParallelBatches.build(sessions, batch_size=2)

    alone = {}
    with torch.no_grad():
        for s in range(len(sessions)):
            hidden = model.net.init_hidden(1)
            for p in range(sessions.offsets[s], sessions.offsets[s + 1]):
                hidden, _ = model.net.step(torch.tensor([sessions.items[p]]), hidden)
                alone[p] = torch.cat(hidden, 1)[0]

        positions = ragged_sessions([4, 2, 6, 3, 5, 2, 3], seed=1)  # same layout, item = position + 1
        pos_schedule = SessionParallelBatches.build(positions, batch_size=2)
        prev = None
        for inputs, carry, pos_inputs in zip(schedule.inputs, schedule.carry, pos_schedule.inputs):
            hidden = carry_hidden(prev, torch.from_numpy(carry), model.net)
            prev, _ = model.net.step(torch.from_numpy(inputs), hidden)
            flat = torch.cat(prev, 1)
            for row, p in enumerate(pos_inputs - 1):
                torch.testing.assert_close(flat[row], alone[int(p)])


def test_negatives_are_shared_and_logq_is_applied():
    sessions = ragged_sessions([5, 4, 6, 3], seed=2, n_items=40)
    support = np.bincount(sessions.items, minlength=41).astype(float)
    model = GRU4Rec(40, Config(**{**SMALL, "n_sample": 12, "dropout_p_hidden": 0.0, "logq": 1.0}))
    schedule = SessionParallelBatches.build(sessions, batch_size=3)
    batches, loss_fn = model.training_closures(schedule, support)
    inputs, targets, carry, samples = next(iter(batches(0)))
    assert samples.shape == (12,)  # one draw for the whole mini-batch

    hidden = model.net.init_hidden(len(inputs))
    _, out = model.net.step(inputs, hidden)
    candidates = torch.cat([targets, samples])
    logits = out @ model.net.item_out[candidates].t() + model.net.item_bias[candidates, 0]
    log_support = torch.log(torch.from_numpy(np.maximum(support, 1)).float())
    log_q = torch.cat([log_support[targets], model.config.sample_alpha * log_support[samples]])  # each column's proposal, unnormalised
    expected = F.cross_entropy(logits - log_q, torch.arange(len(inputs)))
    without_logq = F.cross_entropy(logits, torch.arange(len(inputs)))
    got = loss_fn((inputs, targets, carry, samples))
    torch.testing.assert_close(got, expected)
    assert not torch.isclose(got, without_logq)


def test_sampler_follows_support_power_alpha():
    support = np.array([0, 1000, 100, 10, 1], dtype=float)
    sampler = Sampler(support, alpha=0.5, n_sample=1000, rng=np.random.default_rng(0), steps=50)
    draws = np.concatenate([sampler.draw() for _ in range(200)])  # 4 chunks of 50 steps
    assert draws.min() >= 1
    freq = np.bincount(draws, minlength=5)[1:] / len(draws)
    want = support[1:] ** 0.5 / (support[1:] ** 0.5).sum()
    np.testing.assert_allclose(freq, want, atol=0.01)


def test_bpr_max_matches_its_formula():
    scores = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.1, 1.5, 0.7, -0.2]])
    config = Config(loss="bpr-max", bpreg=0.5, elu_param=0.0)
    got = sampled_loss(scores, config, None, torch.ones(2))
    total = 0.0  # mean over the two rows
    for i in range(2):
        neg = [j for j in range(4) if j != i]
        s = scores[i].numpy().astype(float)
        w = np.exp(s[neg]) / np.exp(s[neg]).sum()
        rank = (w / (1 + np.exp(-(s[i] - s[neg])))).sum()
        total += (-math.log(rank) + 0.5 * (w * s[neg] ** 2).sum()) / 2
    assert float(got) == pytest.approx(total, rel=1e-5)


def test_export_module_steps_equal_score_next_and_skip_unknown_items():
    sessions = Sessions.from_lists([[3, 5, 0, 7, 2], [4, 4, 9], [1, 2], [8, 0, 0, 6]])
    model = GRU4Rec(10, Config(**{**SMALL, "layers": (12, 8), "constrained_embedding": False, "embedding": 0}))
    step = model.export_module()
    H = model.hidden_size
    assert H == 20
    with torch.no_grad():
        expected = {}
        for s in range(len(sessions)):
            hidden = torch.zeros(1, H)
            for p in range(sessions.offsets[s], sessions.offsets[s + 1]):
                before = hidden
                hidden, scores = step(torch.tensor([sessions.items[p]]), hidden)
                if sessions.items[p] == 0:
                    torch.testing.assert_close(hidden, before)
                assert float(scores[0, 0]) < -1e20
                expected[p] = scores[0]
    seen = []
    for positions, scores in model.score_next(sessions, batch_size=3):
        assert scores.shape[1] == 11
        for p, row in zip(positions, scores):
            torch.testing.assert_close(torch.from_numpy(row[1:]), expected[int(p)][1:], rtol=1e-5, atol=1e-5)
            seen.append(int(p))
    assert sorted(seen) == next_positions(sessions).tolist()


def test_export_module_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = GRU4Rec(15, Config(**{**SMALL, "layers": (10,)}))
    step = model.export_module()
    items = torch.tensor([3, 0, 15])
    hidden = torch.randn(3, 10)
    path = tmp_path / "gru4rec.onnx"
    torch.onnx.export(
        step, (items, hidden), path, input_names=["item_idx", "hidden"], output_names=["hidden_out", "scores"],
        dynamic_axes={"item_idx": {0: "batch"}, "hidden": {0: "batch"}, "hidden_out": {0: "batch"}, "scores": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    items5 = np.array([1, 2, 0, 7, 15], dtype=np.int64)
    hidden5 = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)
    got_hidden, got_scores = session.run(None, {"item_idx": items5, "hidden": hidden5})
    with torch.no_grad():
        want_hidden, want_scores = step(torch.from_numpy(items5), torch.from_numpy(hidden5))
    np.testing.assert_allclose(got_hidden, want_hidden.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_scores[:, 1:], want_scores.numpy()[:, 1:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_hidden[2], hidden5[2])


def test_save_load_roundtrip(tmp_path):
    data = synthesize(n_items=50, n_sessions=200, seed=1, test_fraction=0.2)
    model = GRU4Rec.train(data, Config(**SMALL), progress=False, run_dir=tmp_path)
    model.save(tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "item_out" in state
    loaded = load_run(tmp_path)
    assert isinstance(loaded, GRU4Rec) and loaded.config == model.config
    a = np.concatenate([s for _, s in model.score_next(data.test)])
    b = np.concatenate([s for _, s in loaded.score_next(data.test)])
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "train_log.jsonl").is_file() and (tmp_path / "learning_curve.png").is_file()


def test_bad_settings_are_one_line_errors():
    data = synthesize(n_items=20, n_sessions=20, seed=1, test_fraction=0.2)
    with pytest.raises(UserError, match="loss 'top2' unknown"):
        GRU4Rec.train(data, Config(loss="top2"), progress=False)
    with pytest.raises(UserError, match="dropout_p_hidden"):
        GRU4Rec.train(data, Config(dropout_p_hidden=1.5), progress=False)


class ScoreNextOnly:
    """A GRU4Rec seen only through ``score_next``: what the evaluator did before ``score_positions`` existed."""

    def __init__(self, model: GRU4Rec):
        self.n_items, self.score_next = model.n_items, model.score_next


def leave_one_out_data():
    from training.protocols import leave_one_out
    from training.synth import generate_log

    return leave_one_out(generate_log(n_items=200, n_sessions=600, seed=5), min_core=0)


def test_on_leave_one_out_data_validation_scores_only_the_held_out_validation_targets():
    data = leave_one_out_data()
    train, valid, mode = GRU4Rec.training_split(data)
    assert mode == "last" and len(valid) == len(data.valid)
    # the validation targets (each validation user's last train item) are not trained on
    assert train.n_events == data.train.n_events - len(data.valid)
    model = GRU4Rec.train(data, Config(**SMALL), progress=False)
    logged = model.fit_result.history[0]["val_mrr20"]
    last = evaluate(model, data.valid, ks=(20,), mode="last", progress=False)
    every = evaluate(model, data.valid, ks=(20,), mode="next", progress=False)
    assert last["n_events"] == len(data.valid) < every["n_events"]
    assert logged == pytest.approx(last["MRR@20"], abs=1e-12)
    assert logged != pytest.approx(every["MRR@20"], abs=1e-6)


def test_validation_with_valid_exclude_seen_ranks_without_the_users_own_items():
    data = leave_one_out_data()
    logged = {}
    for exclude in (False, True):
        model = GRU4Rec.train(data, Config(**SMALL, valid_exclude_seen=exclude), progress=False)
        line = model.fit_result.history[0]
        logged[exclude] = line["val_mrr20"]
        figures = evaluate(model, data.valid, ks=(10, 20), mode="last", exclude_seen=exclude, progress=False)
        assert (line["val_mrr20"], line["val_ndcg10"]) == (pytest.approx(figures["MRR@20"], abs=1e-12), pytest.approx(figures["NDCG@10"], abs=1e-12))
    assert logged[True] != pytest.approx(logged[False], abs=1e-6)


def test_validation_with_valid_users_ranks_a_fixed_sample_of_the_validation_users():
    from training.trainer import validation_sample

    data = leave_one_out_data()
    config = Config(**SMALL, valid_users=len(data.valid) // 2)
    sample = validation_sample(data.valid, config)
    assert len(sample) == len(data.valid) // 2
    model = GRU4Rec.train(data, config, progress=False)
    logged = model.fit_result.history[0]["val_mrr20"]
    assert logged == pytest.approx(evaluate(model, sample, ks=(20,), mode="last", progress=False)["MRR@20"], abs=1e-12)
    assert logged != pytest.approx(evaluate(model, data.valid, ks=(20,), mode="last", progress=False)["MRR@20"], abs=1e-6)


def test_evaluation_on_leave_one_out_data_scores_only_each_sequences_last_position():
    data = leave_one_out_data()
    model = GRU4Rec.train(data, Config(**SMALL), progress=False)
    last = data.test.offsets[1:][data.test.lengths >= 2] - 2
    scored = [(p, s) for p, s in model.score_positions(data.test, last)]
    positions = np.concatenate([p for p, _ in scored])
    assert sorted(positions.tolist()) == sorted(last.tolist())  # one row per sequence, nothing else ranked
    by_position = dict(zip(positions.tolist(), np.concatenate([s for _, s in scored])))
    for p, s in model.score_next(data.test):  # the scores the full pass gives there, up to float rounding of a smaller product
        for q, row in zip(p.tolist(), s):
            if q in by_position:
                np.testing.assert_allclose(by_position[q], row, rtol=1e-5, atol=1e-5)
    fast = evaluate(model, data.test, mode="last", progress=False)
    slow = evaluate(ScoreNextOnly(model), data.test, mode="last", progress=False)
    assert fast["n_events"] == slow["n_events"] == len(last)
    for key in ("HR@20", "MRR@20", "NDCG@20"):
        assert fast[key] == pytest.approx(slow[key], abs=2 / len(last)), key


def test_every_position_evaluation_is_unchanged_by_scoring_only_wanted_positions():
    data = synthesize(n_items=150, n_sessions=400, seed=4, test_fraction=0.2)
    model = GRU4Rec.train(data, Config(**SMALL), progress=False)
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    fast = evaluate(model, data.test, mode="next", popularity=popularity, progress=False)
    slow = evaluate(ScoreNextOnly(model), data.test, mode="next", popularity=popularity, progress=False)
    assert fast == slow and fast["n_events"] > len(data.test)
