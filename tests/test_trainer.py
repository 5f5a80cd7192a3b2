"""The shared trainer: early stopping keeps the best weights, resume equals an uninterrupted run, logs."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from streamrec.errors import UserError
from training.trainer import AdagradMomentum, TrainerConfig, epoch_rng, fit, lr_factor


def regression_task(config: TrainerConfig, fail_at_epoch: int | None = None):
    """A tiny linear model on noisy linear data; batches drawn from epoch_rng as the contract asks."""
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    true_w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def batches(epoch: int):
        if epoch == fail_at_epoch:
            raise KeyboardInterrupt  # the run is interrupted at the start of this epoch
        rng = epoch_rng(config, epoch)
        x = torch.from_numpy(rng.normal(size=(64, 4))).float()
        y = x @ true_w.t() + 0.1 * torch.from_numpy(rng.normal(size=(64, 1))).float()
        return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def loss_fn(batch):
        x, y = batch
        return nn.functional.mse_loss(nn.functional.dropout(module(x), 0.1, module.training), y)

    return module, batches, loss_fn


def test_early_stopping_keeps_the_best_epoch_weights(tmp_path):
    config = TrainerConfig(epochs=10, lr=0.05, patience=2, threads=1)
    module, batches, loss_fn = regression_task(config)
    scores = iter([0.1, 0.3, 0.5, 0.4, 0.45, 0.9, 0.9])
    snapshots = []

    def validate():
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scores)

    result = fit(module, config, batches, loss_fn, validate=validate, run_dir=tmp_path, progress=False)
    assert result.stopped_early and result.best_epoch == 2 and result.best_score == 0.5
    assert len(result.history) == 5  # epochs 3 and 4 did not beat 0.5
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, snapshots[2][key])
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [line["val_mrr20"] for line in log] == [0.1, 0.3, 0.5, 0.4, 0.45]
    assert all(line["seconds"] >= 0 and math.isfinite(line["loss"]) for line in log)
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000


def test_valid_metric_picks_the_validation_figure_that_early_stopping_follows_and_both_are_logged(tmp_path):
    """Klenitskiy & Vasilev keep the epoch with the best NDCG@10: with valid_metric=ndcg10 that figure decides."""
    answers = [{"mrr20": 0.1, "ndcg10": 0.5}, {"mrr20": 0.3, "ndcg10": 0.4}, {"mrr20": 0.2, "ndcg10": 0.45}]
    kept = {}
    for metric in ("mrr20", "ndcg10"):
        config = TrainerConfig(epochs=3, lr=0.05, threads=1, patience=1, valid_metric=metric)
        module, batches, loss_fn = regression_task(config)
        figures = iter(answers)
        result = fit(module, config, batches, loss_fn, validate=lambda: next(figures), run_dir=tmp_path / metric, progress=False)
        kept[metric] = (result.best_epoch, result.best_score, len(result.history))
        log = [json.loads(line) for line in (tmp_path / metric / "train_log.jsonl").read_text().splitlines()]
        assert [(line["val_mrr20"], line["val_ndcg10"]) for line in log] == [(a["mrr20"], a["ndcg10"]) for a in answers[: len(log)]]
    assert kept == {"mrr20": (1, 0.3, 3), "ndcg10": (0, 0.5, 2)}  # ndcg10 fell after epoch 1: patience 1 stops at 2
    with pytest.raises(UserError, match="valid_metric 'hr10' unknown"):
        TrainerConfig(valid_metric="hr10").check()
    config = TrainerConfig(epochs=1, threads=1, valid_metric="ndcg10")
    module, batches, loss_fn = regression_task(config)
    with pytest.raises(UserError, match="validation gives mrr20 only"):  # a bare float is MRR@20
        fit(module, config, batches, loss_fn, validate=lambda: 0.1, progress=False)


def test_keep_epochs_saves_the_weights_after_every_epoch_and_only_when_asked(tmp_path):
    config = TrainerConfig(epochs=3, lr=0.05, threads=1, keep_epochs=True)
    module, batches, loss_fn = regression_task(config)
    snapshots = []

    def validate():
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
        return -float(len(snapshots))  # falling: the best is epoch 1, the module ends on it

    fit(module, config, batches, loss_fn, validate=validate, run_dir=tmp_path / "kept", progress=False)
    kept = sorted((tmp_path / "kept" / "epochs").glob("*.pt"))
    assert [p.name for p in kept] == ["001.pt", "002.pt", "003.pt"]
    for path, snapshot in zip(kept, snapshots):
        for key, value in torch.load(path, weights_only=True).items():
            torch.testing.assert_close(value, snapshot[key])
    module, batches, loss_fn = regression_task(config)
    fit(module, TrainerConfig(epochs=3, lr=0.05, threads=1), batches, loss_fn, run_dir=tmp_path / "default", progress=False)
    assert not (tmp_path / "default" / "epochs").exists()


def test_stop_after_ends_training_early_on_the_schedule_of_the_whole_run():
    """A refit for the best epoch count repeats the chosen run's first epochs, cosine decay included."""
    weights = {}
    for name, settings in (("stopped", {"stop_after": 2}), ("whole", {}), ("shortened", {"epochs": 2})):
        config = TrainerConfig(**{"epochs": 4, **settings}, lr=0.05, optimizer="adam", lr_schedule="cosine", threads=1)
        module, batches, loss_fn = regression_task(config)
        snapshots = []

        def after_epoch(module=module, snapshots=snapshots):
            snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
            return float(len(snapshots))  # rising: every epoch is the best so far

        result = fit(module, config, batches, loss_fn, validate=after_epoch, progress=False)
        weights[name] = snapshots
        assert len(result.history) == (4 if name == "whole" else 2)
    for key, value in weights["stopped"][-1].items():
        torch.testing.assert_close(value, weights["whole"][1][key])  # the whole run's weights after its 2nd epoch
    assert any(not torch.equal(v, weights["shortened"][-1][k]) for k, v in weights["stopped"][-1].items())  # a 2-epoch schedule differs
    with pytest.raises(UserError, match="stop_after"):
        TrainerConfig(stop_after=-1).check()


class FakeClock:
    """Stands in for the trainer's ``time`` module: the clock moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_a_time_budget_ends_training_after_the_epoch_that_spent_it_and_keeps_the_best_epoch_so_far(monkeypatch):
    import training.trainer as trainer

    clock = FakeClock()
    monkeypatch.setattr(trainer, "time", clock)
    config = TrainerConfig(epochs=6, lr=0.05, threads=1, time_budget_s=25)
    module, batches, loss_fn = regression_task(config)
    scores, snapshots = iter([0.1, 0.5, 0.3, 0.9, 0.9, 0.9]), []

    def validate():  # each epoch, validation included, takes 10 s of the fake clock: 10, 20, 30 s ...
        clock.now += 10
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scores)

    result = fit(module, config, batches, loss_fn, validate=validate, progress=False)
    assert result.out_of_time and not result.stopped_early
    assert len(result.history) == 3 and result.best_epoch == 1  # 30 s passed 25 after epoch 3; epoch 2 was the best
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, snapshots[1][key])

    for budget, epochs_run in ((0, 6), (60, 6), (55, 6)):  # none; never passed; passed only after the last epoch
        clock.now, scores = 0.0, iter([0.1] * 6)
        config = TrainerConfig(epochs=6, lr=0.05, threads=1, time_budget_s=budget)
        module, batches, loss_fn = regression_task(config)
        result = fit(module, config, batches, loss_fn, validate=validate, progress=False)
        assert (len(result.history), result.out_of_time) == (epochs_run, False), budget
    with pytest.raises(UserError, match="'time_budget_s' must not be negative"):
        TrainerConfig(time_budget_s=-1).check()


def test_a_run_its_time_budget_cut_short_resumes_with_a_budget_of_its_own_to_the_uninterrupted_run(tmp_path, monkeypatch):
    import training.trainer as trainer

    clock = FakeClock()
    monkeypatch.setattr(trainer, "time", clock)

    calls: list[float] = []

    def validate():
        clock.now += 10
        calls.append(clock.now)
        return float(len(calls))  # rising over the whole run, resumed or not: every epoch is the best so far

    weights = {}
    for name, budget in (("straight", 0), ("budgeted", 15)):
        clock.now, calls[:] = 0.0, []
        config = TrainerConfig(epochs=4, lr=0.05, optimizer="adam", lr_schedule="cosine", threads=1, time_budget_s=budget)
        module, batches, loss_fn = regression_task(config)
        result = fit(module, config, batches, loss_fn, validate=validate, run_dir=tmp_path / name, progress=False)
        assert len(result.history) == (4 if name == "straight" else 2) and result.out_of_time == (name == "budgeted")
        if name == "budgeted":  # started again with resume: on from epoch 3, a new 15 s budget, so two more epochs
            clock.now = 0.0
            config = dataclasses.replace(config, resume=True)
            module, batches, loss_fn = regression_task(config)
            result = fit(module, config, batches, loss_fn, validate=validate, run_dir=tmp_path / name, progress=False)
            assert len(result.history) == 4 and not result.out_of_time
        weights[name] = module.state_dict()
    for key, value in weights["budgeted"].items():
        torch.testing.assert_close(value, weights["straight"][key])


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    config = TrainerConfig(epochs=5, lr=0.05, optimizer="adam", lr_schedule="cosine", threads=1)
    module, batches, loss_fn = regression_task(config)
    fit(module, config, batches, loss_fn, run_dir=tmp_path / "straight", progress=False)

    interrupted, batches_i, loss_i = regression_task(config, fail_at_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, config, batches_i, loss_i, run_dir=tmp_path / "resumed", progress=False)
    resumed, batches_r, loss_r = regression_task(config)  # a fresh process: new module, same run_dir
    result = fit(resumed, TrainerConfig(**{**config.__dict__, "resume": True}), batches_r, loss_r, run_dir=tmp_path / "resumed", progress=False)

    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3, 4]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)
    lines = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and "optimizer" in ckpt


def test_without_resume_an_old_log_is_replaced(tmp_path):
    config = TrainerConfig(epochs=2, threads=1)
    for _ in range(2):
        module, batches, loss_fn = regression_task(config)
        fit(module, config, batches, loss_fn, run_dir=tmp_path, progress=False)
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 2


def test_diverging_loss_is_a_user_error():
    config = TrainerConfig(epochs=1, threads=1)
    module = nn.Linear(2, 1)
    with pytest.raises(UserError, match="diverged"):
        fit(module, config, lambda epoch: [torch.ones(1)], lambda batch: module.weight.sum() * float("nan"), progress=False)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="optimizer 'rmsprop' unknown"):
        TrainerConfig(optimizer="rmsprop").check()
    with pytest.raises(UserError, match="lr_schedule"):
        TrainerConfig(lr_schedule="step").check()
    with pytest.raises(UserError, match="epochs"):
        TrainerConfig(epochs=0).check()


@pytest.mark.parametrize("nesterov", [False, True])
def test_adagrad_momentum_matches_its_formula_dense_and_sparse(nesterov):
    torch.manual_seed(0)
    lr, momentum, eps = 0.1, 0.5, 1e-6
    dense = nn.Parameter(torch.randn(5, 3))
    table = nn.Parameter(torch.randn(6, 3))
    opt = AdagradMomentum([dense, table], lr=lr, momentum=momentum, eps=eps, nesterov=nesterov)
    ref_p = [dense.detach().clone(), table.detach().clone()]
    acc = [torch.zeros(5, 3), torch.zeros(6, 3)]
    vel = [torch.zeros(5, 3), torch.zeros(6, 3)]
    for step in range(3):
        rows = torch.tensor([1, 4, 1]) if step != 1 else torch.tensor([2])
        opt.zero_grad()
        loss = (dense**2).sum() + (nn.functional.embedding(rows, table, sparse=True) ** 3).sum()
        loss.backward()
        grads = [dense.grad.clone(), table.grad.to_dense()]
        touched = [torch.ones(5, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)]
        touched[1][rows] = True
        for i in range(2):
            t = touched[i]
            acc[i][t] += grads[i][t] ** 2
            u = lr * grads[i][t] / torch.sqrt(acc[i][t] + eps)
            vel[i][t] = momentum * vel[i][t] - u
            ref_p[i][t] += momentum * vel[i][t] - u if nesterov else vel[i][t]
        opt.step()
        torch.testing.assert_close(dense.detach(), ref_p[0])
        torch.testing.assert_close(table.detach(), ref_p[1])
    assert torch.equal(table.detach()[[0, 3, 5]], ref_p[1][[0, 3, 5]])  # never-touched rows did not move


def test_lr_schedules():
    cosine = TrainerConfig(lr_schedule="cosine")
    assert lr_factor(cosine, 0, 0.0) == pytest.approx(1.0)
    assert lr_factor(cosine, 0, 0.5) == pytest.approx(0.5)
    assert lr_factor(cosine, 0, 1.0) == pytest.approx(0.0)
    linear = TrainerConfig(lr_schedule="linear", warmup_steps=10)
    assert lr_factor(linear, 4, 0.5) == pytest.approx(0.25)
    assert lr_factor(TrainerConfig(), 100, 0.7) == 1.0


def test_epoch_rng_depends_on_seed_and_epoch_only():
    a = epoch_rng(TrainerConfig(seed=1), 3).random(4)
    assert np.array_equal(a, epoch_rng(TrainerConfig(seed=1), 3).random(4))
    assert not np.array_equal(a, epoch_rng(TrainerConfig(seed=1), 4).random(4))
    assert not np.array_equal(a, epoch_rng(TrainerConfig(seed=2), 3).random(4))


class TableRegression(nn.Module):
    """An item table plus a dense layer; the table's gradient is sparse when ``sparse`` (as SASRec's with loss "sampled")."""

    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(30, 4, sparse=sparse)
        self.head = nn.Linear(4, 1)

    def sparse_parameters(self):
        return [self.table.weight] if self.table.sparse else []


def table_task(module: TableRegression, config: TrainerConfig, rows_per_batch: int, fail_at_epoch: int | None = None):
    def batches(epoch: int):
        if epoch == fail_at_epoch:
            raise KeyboardInterrupt
        rng = epoch_rng(config, epoch)
        return [torch.from_numpy(rng.permutation(30)[:rows_per_batch]) for _ in range(4)]

    def loss_fn(rows):
        return ((module.head(module.table(rows)).squeeze(1) - rows.float() / 10) ** 2).mean()

    return batches, loss_fn


def test_sparse_item_tables_train_with_adam_like_dense_ones_when_every_row_is_touched():
    config = TrainerConfig(epochs=3, lr=0.05, optimizer="adam", threads=1)
    dense, sparse = TableRegression(sparse=False), TableRegression(sparse=True)
    start = TableRegression(sparse=False).table.weight.detach().clone()
    fit(dense, config, *table_task(dense, config, rows_per_batch=30), progress=False)
    fit(sparse, config, *table_task(sparse, config, rows_per_batch=30), progress=False)
    assert (dense.table.weight - start).abs().min() > 0.02  # every row moved, by far more than the tolerance below
    for key, value in dense.state_dict().items():  # SparseAdam adds eps after the bias correction, Adam before: close, not equal
        torch.testing.assert_close(sparse.state_dict()[key], value, rtol=1e-2, atol=1e-3)


def test_a_sparse_step_leaves_untouched_rows_alone_and_resume_equals_an_uninterrupted_run(tmp_path):
    config = TrainerConfig(epochs=4, lr=0.05, optimizer="adam", lr_schedule="cosine", threads=1)
    before = TableRegression(sparse=True).table.weight.detach().clone()
    straight = TableRegression(sparse=True)
    batches, loss_fn = table_task(straight, config, rows_per_batch=3)
    seen = torch.cat([b for epoch in range(4) for b in batches(epoch)]).unique()
    fit(straight, config, batches, loss_fn, run_dir=tmp_path / "straight", progress=False)
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[seen] = False
    assert untouched.any() and torch.equal(straight.table.weight[untouched], before[untouched])
    assert not torch.equal(straight.table.weight[seen], before[seen])

    interrupted = TableRegression(sparse=True)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, config, *table_task(interrupted, config, 3, fail_at_epoch=2), run_dir=tmp_path / "resumed", progress=False)
    resumed = TableRegression(sparse=True)
    fit(resumed, TrainerConfig(**{**config.__dict__, "resume": True}), *table_task(resumed, config, 3), run_dir=tmp_path / "resumed", progress=False)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


@pytest.mark.parametrize("setting, message", [({"weight_decay": 0.1}, "weight decay"), ({"grad_clip": 1.0}, "grad_clip")])
def test_sparse_item_tables_refuse_weight_decay_and_clipping(setting, message):
    config = TrainerConfig(epochs=1, optimizer="adamw", threads=1, **setting)
    module = TableRegression(sparse=True)
    with pytest.raises(UserError, match=message):
        fit(module, config, *table_task(module, config, 3), progress=False)
