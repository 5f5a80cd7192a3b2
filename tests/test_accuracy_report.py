"""benchmarks/accuracy.py and tune.py: the best-neural-vs-baseline summary, the settings column, the tuning draws."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402
import tune  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.models import get_model  # noqa: E402


def row(dataset: str, model: str, mrr20: float, **extra) -> dict:
    return {"dataset": dataset, "model": model, "MRR@20": mrr20, **extra}


def test_the_summary_sets_the_best_neural_row_against_the_best_baseline_of_each_dataset():
    rows = [
        row("yoochoose", "vsknn", 0.36), row("yoochoose", "vstan", 0.37), row("yoochoose", "sasrec", 0.38), row("yoochoose", "caser", 0.27),
        row("beauty", "sr", 0.0283), row("beauty", "gru4rec", 0.0252), row("beauty", "markov", 0.0276),
    ]
    text = accuracy.summary(rows)
    assert "| yoochoose | `sasrec` | 0.3800 | vstan | 0.3700 | +0.0100" in text
    assert "| beauty | `gru4rec` | 0.0252 | sr | 0.0283 | -0.0031" in text
    assert "No neural model leads on: beauty" in text


def test_the_summary_says_so_when_a_neural_model_leads_everywhere():
    text = accuracy.summary([row("diginetica", "vstan", 0.3757), row("diginetica", "gru4rec:lr=0.05", 0.3771)])
    assert "A neural model leads on every dataset." in text


def test_every_row_of_a_published_model_cites_its_figure_whatever_its_settings():
    assert accuracy.published("beauty", "bert4rec:init=normal,unmasked=skip")[1] == {"HR@10": 0.0338, "NDCG@10": 0.0187}
    assert accuracy.published("beauty", "sasrec:hidden_size=64,init=normal")[1]["HR@10"] == 0.0533  # SASRec+ (full CE)
    assert accuracy.published("beauty", "sasrec:loss=bce")[1]["HR@10"] == 0.0246
    assert accuracy.published("beauty", "sasrec:loss=sampled") is None  # neither of their losses
    assert accuracy.published("beauty", "gru4rec") is None and accuracy.published("diginetica", "bert4rec") is None


def test_a_tuned_rows_settings_cell_states_its_budget_and_validation_figure():
    tuned = row("diginetica", "gru4rec:lr=0.05", 0.3771, refit=True,
                tuning={"trials": 24, "seed": 1, "val_mrr20": 0.2496, "val_mrr20_default": 0.2088})
    cell = accuracy.settings_cell(tuned)
    assert "best of 24" in cell and "0.2496" in cell and "defaults 0.2088" in cell and "--seed 1" in cell and "refit" in cell
    assert accuracy.settings_cell(row("beauty", "vstan", 0.01)) == "literature defaults"
    assert accuracy.settings_cell(row("beauty", "sasrec", 0.01)) == "defaults"
    assert accuracy.settings_cell(row("beauty", "sasrec:init=normal", 0.01)) == "fixed (the row's name)"


def test_a_row_tuned_on_validation_ndcg10_says_so_in_its_settings_cell():
    tuned = row("beauty", "bert4rec:valid_metric=ndcg10", 0.01, refit=True,
                tuning={"trials": 4, "seed": 2, "valid_metric": "ndcg10", "val_score": 0.0247, "val_score_default": 0.0199})
    cell = accuracy.settings_cell(tuned)
    assert "validation NDCG@10 (0.0247; defaults 0.0199)" in cell and "MRR@20" not in cell


def test_a_second_tuning_stage_tries_the_spec_as_it_is_and_each_other_value_and_its_row_states_both_budgets(tmp_path, monkeypatch):
    spec = 'gru4rec:lr=0.05,sample_alpha=0.5,loss="bpr-max"'
    monkeypatch.setattr(accuracy, "STORE", tmp_path / "accuracy.json")
    draws, first = tune.refine("beauty", "gru4rec", spec, "sample_alpha=0.0,0.5,1")
    base = {"lr": 0.05, "sample_alpha": 0.5, "loss": "bpr-max"}
    assert draws == [base, {**base, "sample_alpha": 0.0}, {**base, "sample_alpha": 1}] and first is None
    accuracy.STORE.write_text(json.dumps([row("beauty", spec, 0.0285, tuning={"trials": 16, "seed": 1, "val_score": 0.0313, "val_score_default": 0.0302})]))
    assert tune.refine("beauty", "gru4rec", spec, 'loss="cross-entropy"')[1]["trials"] == 16
    for vary, message in (("sample_alpha", "give NAME=V1,V2"), ("alpha=0.1", "no setting 'alpha'"), ("loss=bpr", "must be JSON")):
        with pytest.raises(tune.UserError, match=message):
            tune.refine("beauty", "gru4rec", spec, vary)
    with pytest.raises(tune.UserError, match="a gru4rec spec, not sasrec"):
        tune.refine("beauty", "sasrec", spec, "lr=0.1")
    second = row("beauty", spec.replace("0.5", "0.0"), 0.029, refit=True,
                 tuning={"trials": 3, "seed": 1, "val_score": 0.0320, "val_score_default": 0.0312, "around": spec,
                         "vary": "sample_alpha=0.0,0.5,1", "first_stage": {"trials": 16, "seed": 1}})
    cell = accuracy.settings_cell(second)
    assert "best of 16 random draws" in cell and "3 trials more" in cell and "varying sample_alpha=0.0,0.5,1" in cell and "0.0320" in cell


def test_a_stage_that_varies_the_loss_drops_the_old_loss_companions_and_brings_the_new_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "STORE", tmp_path / "accuracy.json")
    bpr_max = 'gru4rec:lr=0.05,loss="bpr-max",elu_param=0.5,logq=0.0,bpreg=1.0,sample_alpha=0.25'
    as_is, cross_entropy = tune.refine("beauty", "gru4rec", bpr_max, 'loss="cross-entropy"')[0]
    assert as_is["elu_param"] == 0.5 and cross_entropy == {"lr": 0.05, "loss": "cross-entropy", "sample_alpha": 0.25}
    assert tune.refine("beauty", "gru4rec", 'gru4rec:loss="cross-entropy"', 'loss="bpr-max"')[0][1] == {
        "loss": "bpr-max", "elu_param": 0.5, "logq": 0.0, "bpreg": 1.0}


def test_a_third_stage_states_every_stage_s_budget_in_order():
    first = {"trials": 16, "seed": 1}
    second = {"trials": 4, "seed": 1, "val_score": 0.0318, "val_score_default": 0.0313, "around": "gru4rec:lr=0.05",
              "vary": "sample_alpha=0.0,0.25,0.75", "first_stage": first}
    third = row("beauty", 'gru4rec:lr=0.05,loss="cross-entropy"', 0.03, refit=True,
                tuning={"trials": 2, "seed": 1, "val_score": 0.0321, "val_score_default": 0.0318, "around": "gru4rec:lr=0.05,sample_alpha=0.25",
                        "vary": 'loss="cross-entropy"', "first_stage": second, "from_journal": 1})
    cell = accuracy.settings_cell(third)
    assert cell.startswith("best of 16 random draws (`benchmarks/tune.py --trials 16 --seed 1`), then 4 trials more varying "
                           "sample_alpha=0.0,0.25,0.75 around it (0.0318), then 2 trials more on validation MRR@20 varying "
                           'loss="cross-entropy" around that (0.0321; the previous stage\'s best from the journal 0.0318)')
    hand_started = {**third, "tuning": {**third["tuning"], "first_stage": {**second, "first_stage": None}}}
    assert accuracy.settings_cell(hand_started).startswith(
        "around `gru4rec:lr=0.05`, 4 trials more varying sample_alpha=0.0,0.25,0.75 around it (0.0318), then 2 trials more")


def test_a_row_trained_again_keeps_its_paired_interval_while_its_figures_match(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "STORE", tmp_path / "accuracy.json")
    paired = {"MRR@20": {"against": "sr", "mrr": [0.0292, 0.0283], "interval": [0.0001, 0.0018]}}
    accuracy.STORE.write_text(json.dumps([row("beauty", "sr", 0.0283), row("beauty", "gru4rec", 0.0292, paired=paired)]))
    same, other = row("beauty", "gru4rec", 0.0292), row("beauty", "gru4rec", 0.0290)
    assert "+0.0001 to +0.0018" in accuracy.summary(accuracy.merge([same]))
    assert "not measured" in accuracy.summary(accuracy.merge([other]))  # carried, and refused: its figure changed


def test_the_search_chooses_on_the_figure_its_trials_followed_and_refuses_trials_that_followed_different_ones():
    ndcg = [{"valid_metric": "ndcg10", "val_score": 0.020, "val_mrr20": 0.030},
            {"valid_metric": "ndcg10", "val_score": 0.025, "val_mrr20": 0.010}]
    assert tune.choose(ndcg) == ("ndcg10", ndcg[1])  # the better NDCG@10, though its MRR@20 is worse
    journal_of_before = [{"val_mrr20": 0.02}, {"val_mrr20": 0.03}]  # entries from before valid_metric: MRR@20
    assert tune.choose(journal_of_before) == ("mrr20", journal_of_before[1])
    with pytest.raises(tune.UserError, match=r"different validation figures \(mrr20, ndcg10\)"):
        tune.choose(journal_of_before + ndcg)


def test_the_tuning_draws_start_with_the_defaults_are_distinct_and_stay_in_the_space():
    space = tune.SPACES["gru4rec"]
    draws = tune.draw(space, 12, seed=3)
    assert draws[0] == {} and len(draws) == 12
    assert len({json.dumps(d, sort_keys=True) for d in draws}) == 12
    assert all(d[k] in space[k] for d in draws[1:] for k in space)
    assert draws == tune.draw(space, 12, seed=3)  # seeded: a run can be repeated


def test_bpr_max_trials_get_the_official_bpr_max_companions():
    settings = tune.with_companions("gru4rec", {"loss": "bpr-max", "lr": 0.05})
    assert settings == {"loss": "bpr-max", "lr": 0.05, "elu_param": 0.5, "logq": 0.0, "bpreg": 1.0}
    assert tune.with_companions("gru4rec", {"loss": "cross-entropy"}) == {"loss": "cross-entropy"}
    assert tune.spec_of("gru4rec", {"layers": [64], "loss": "bpr-max", "lr": 0.05}) == 'gru4rec:layers=[64],loss="bpr-max",lr=0.05'


def test_a_row_trained_on_a_gpu_names_the_device_in_the_table():
    base = {"HR@10": 0.05, "HR@20": 0.07, "MRR@10": 0.02, "MRR@20": 0.021, "NDCG@10": 0.03, "NDCG@20": 0.035,
            "best_epochs": 8, "epochs_run": 13, "max_epochs": 200, "stopped_early": True, "train_s": 95.0, "eval_s": 30.0,
            "events": 40226, "measured": "2026-12-05"}
    rows = [{"dataset": "beauty", "model": "sasrec", **base, "device": "cuda (NVIDIA H200)"},
            {"dataset": "beauty", "model": "bert4rec", **base}]
    text = accuracy.markdown(rows)
    assert "| 95 on cuda (NVIDIA H200) |" in text
    assert text.count(" on cuda") == 1  # the CPU row names nothing


def test_the_gpu_script_runs_its_smoke_on_the_cpu_and_every_model_loads_back_with_the_same_figures(tmp_path):
    import gpu_issue17

    lines = gpu_issue17.smoke("cpu", tmp_path)
    assert {(line["model"], line["precision"]) for line in lines} == {(m, p) for m in gpu_issue17.SMOKE for p in ("fp32", "bf16")}
    assert all(line["mrr20"] == line["mrr20_loaded_on_cpu"] and line["device"] == "cpu" for line in lines)
    assert json.loads((tmp_path / "smoke.json").read_text()) == lines


def test_every_beauty_spec_of_the_gpu_script_parses_into_its_model_config_before_device_time_is_spent():
    import gpu_issue17
    from training.models import get_model
    from training.models.base import config_from_options

    for spec in gpu_issue17.BEAUTY:
        name, options = accuracy.parse_spec(spec)
        config = config_from_options(get_model(name).Config, options)
        assert all(str(getattr(config, key)).lower() == value.lower() for key, value in options.items()), spec


def test_a_row_its_time_budget_cut_short_is_marked_in_the_epochs_column_and_counts_as_budget_limited():
    base = {"best_epochs": 40, "epochs_run": 60, "max_epochs": 200, "stopped_early": False}
    cut = {**base, "time_budget_s": 250.0, "out_of_time": True}
    assert accuracy.epochs_cell(cut) == "40/60 (budget 250 s)" and accuracy.capped(cut)
    assert accuracy.epochs_cell({**base, "stopped_early": True}) == "40/60" and not accuracy.capped({**base, "stopped_early": True})
    within = {**base, "epochs_run": 60, "stopped_early": True, "time_budget_s": 250.0, "out_of_time": False}
    assert accuracy.epochs_cell(within) == "40/60" and not accuracy.capped(within)
    assert accuracy.epochs_cell({**base, "epochs_run": 200}) == "40/200 (cap 200)"


def test_the_gpu_script_cuts_a_row_short_at_its_budget_and_such_a_row_keeps_its_device_in_its_name(shared_data, tmp_path):
    """A lent GPU's minutes are fixed: each row trains within its budget, and a row cut short sits beside the CPU row."""
    import gpu_issue17

    deadline = time.perf_counter() + gpu_issue17.RESERVE_S + 1000  # the second row's budget: the rest, about 1,000 s
    rows = gpu_issue17.beauty("cpu", 3, 1, tmp_path, "diginetica", budgets=(1e-6, None), deadline=deadline)
    cut, whole = rows
    assert cut["out_of_time"] and (cut["best_epochs"], cut["epochs_run"]) == (1, 1) and cut["model"] == f"{gpu_issue17.BEAUTY[0]},device=cpu"
    assert not whole["out_of_time"] and 900 < whole["time_budget_s"] < 1000 and whole["model"] == gpu_issue17.BEAUTY[1]
    assert accuracy.epochs_cell(cut) == "1/1 (budget 1e-06 s)"
    assert all(r["step_ms"] > 0 and 0 <= r["batch_ms"] <= r["step_ms"] and "gpu_util" not in r for r in rows)  # GPU % on CUDA only
    assert json.loads((tmp_path / "accuracy-gpu.json").read_text()) == rows


def test_a_row_gives_the_median_step_and_batch_time_of_its_epochs_and_on_a_gpu_the_mean_utilisation():
    history = [{"step_ms": 10.0, "batch_ms": 1.0, "gpu_util": 90.0}, {"step_ms": 30.0, "batch_ms": 2.0, "gpu_util": None},
               {"step_ms": 20.0, "batch_ms": 9.0, "gpu_util": 70.0}]
    assert accuracy.step_figures(history) == {"step_ms": 20.0, "batch_ms": 2.0, "gpu_util": 80.0}
    assert accuracy.step_figures([{k: v for k, v in h.items() if k != "gpu_util"} for h in history]) == {"step_ms": 20.0, "batch_ms": 2.0}
    assert accuracy.step_figures(None) == {} and accuracy.step_figures([{"epoch": 0, "loss": 1.0}]) == {}  # a baseline; an old log


def test_learning_curves_read_every_kept_run_and_mark_the_epoch_the_trainer_keeps(tmp_path, monkeypatch, capsys):
    import learning_curves

    for name, vals in (("a", [0.1, 0.3, 0.3, 0.2]), ("b", [0.2, 0.25])):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"epoch": i, "loss": 5.0 - i, "val_mrr20": v}) for i, v in enumerate(vals)]
        (tmp_path / name / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "unvalidated").mkdir()
    (tmp_path / "unvalidated" / "train_log.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0, "val_mrr20": None}) + "\n")
    logs = learning_curves.read_logs(tmp_path)
    assert list(logs) == ["a", "b"]
    assert learning_curves.best(logs["a"])["epoch"] == 1  # the first of equal figures, as the trainer keeps it
    monkeypatch.setattr(sys, "argv", ["learning_curves.py", "--runs", str(tmp_path), "--out", str(tmp_path / "c.png")])
    learning_curves.main()
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "| a | 2 | 4 | 0.3000 | 2.000 |" in capsys.readouterr().out
    (tmp_path / "ndcg").mkdir()  # a run logged with both figures: NDCG@10 keeps another epoch
    lines = [json.dumps({"epoch": i, "loss": 1.0, "val_mrr20": m, "val_ndcg10": n}) for i, (m, n) in enumerate([(0.1, 0.4), (0.2, 0.3)])]
    (tmp_path / "ndcg" / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    assert list(learning_curves.read_logs(tmp_path, "ndcg10")) == ["ndcg"]  # the older logs have no NDCG@10
    assert learning_curves.best(learning_curves.read_logs(tmp_path, "ndcg10")["ndcg"], "ndcg10")["epoch"] == 0
    monkeypatch.setattr(sys, "argv", ["learning_curves.py", "--runs", str(tmp_path), "--out", str(tmp_path / "n.png"), "--metric", "ndcg10"])
    learning_curves.main()
    assert "| ndcg | 1 | 2 | 0.4000 | 1.000 |" in capsys.readouterr().out


def test_epoch_curves_rank_each_kept_epochs_weights_as_the_run_and_the_evaluator_did(shared_data, tmp_path, monkeypatch, capsys):
    """The kept weights of the best epoch give the run's logged validation figure and the returned model's test figure."""
    import epoch_curves
    from training.evaluate import evaluate
    from training.models import get_model

    spec = "sasrec:hidden_size=16,epochs=3,valid_exclude_seen=true"
    name, options = accuracy.parse_spec(spec)
    cls = get_model(name)
    data = accuracy.load_diginetica()
    config = accuracy.config_from_options(cls.Config, options)
    config.threads, config.keep_epochs = 1, True
    model = cls.train(data, config, progress=False, run_dir=tmp_path / "run")
    assert epoch_curves.kept_epochs(tmp_path / "run", every=2, best=2) == [1, 2, 3]
    assert epoch_curves.kept_epochs(tmp_path / "run", every=10, best=1) == [1, 3]
    assert epoch_curves.kept_epochs(tmp_path / "run", every=10, best=1, also=(2, 7)) == [1, 2, 3]  # 7 was never kept
    out = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["epoch_curves.py", "--dataset", "diginetica", "--model", spec, "--run", str(tmp_path / "run"),
                                      "--every", "2", "--exclude-seen", "--out", str(out)])
    epoch_curves.main()
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    figures = json.loads(out.with_suffix(".json").read_text())
    best = next(f for f in figures["epochs"] if f["epoch"] == model.fit_result.best_epoch + 1)
    assert [f["epoch"] for f in figures["epochs"]] == [1, 2, 3]
    assert best["valid MRR@20"] == pytest.approx(best["logged_val_mrr20"], abs=1e-9)
    test = evaluate(model, data.test, ks=(10, 20), mode="last", exclude_seen=True, progress=False)
    assert best["test NDCG@10"] == pytest.approx(test["NDCG@10"], abs=1e-9)
    assert len({f["test MRR@20"] for f in figures["epochs"]}) == 3  # each epoch's own weights, not one model three times


def test_a_parallel_tuning_run_journals_each_trial_and_a_second_run_takes_them_from_the_journal(shared_data, tmp_path, monkeypatch, capsys):
    """Two trials at once, each in its own process, give the figures a trial trained alone gives; started again
    with the same journal, the search trains no trial twice and picks the same row."""
    journal = tmp_path / "trials.jsonl"
    argv = ["tune.py", "--dataset", "diginetica", "--model", "gru4rec", "--trials", "2", "--journal", str(journal), "--no-docs"]
    monkeypatch.setattr(sys, "argv", argv + ["--jobs", "2"])
    tune.main()
    first = capsys.readouterr().out
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    draws = [tune.with_companions("gru4rec", d) for d in tune.draw(tune.space_for("diginetica", "gru4rec"), 2, seed=1)]
    assert sorted(json.dumps(e["settings"], sort_keys=True) for e in entries) == sorted(json.dumps(d, sort_keys=True) for d in draws)
    alone = tune.run_trial("diginetica", "gru4rec", {}, threads=1, data=accuracy.load_diginetica())
    defaults = next(e for e in entries if e["settings"] == {})
    assert (defaults["val_mrr20"], defaults["best_epochs"]) == (alone["val_mrr20"], alone["best_epochs"])

    monkeypatch.setattr(sys, "argv", argv)
    tune.main()
    second = capsys.readouterr().out
    assert second.count("from the journal") == 2 and len(journal.read_text().splitlines()) == 2
    pick = [line for line in first.splitlines() if line.startswith(("best on validation", "test:"))]
    assert len(pick) == 2 and all(line.split("(tuning")[0] in second for line in pick)


def test_a_trial_that_follows_validation_ndcg10_is_scored_by_it_and_logs_mrr20_beside_it(shared_data):
    data = accuracy.load_diginetica()
    by_mrr = tune.run_trial("diginetica", "gru4rec", {}, threads=1, data=data)
    by_ndcg = tune.run_trial("diginetica", "gru4rec", {"valid_metric": "ndcg10"}, threads=1, data=data)
    assert (by_mrr["valid_metric"], by_ndcg["valid_metric"]) == ("mrr20", "ndcg10")
    assert by_mrr["val_score"] == by_mrr["val_mrr20"] and by_ndcg["val_score"] == by_ndcg["val_ndcg10"]
    assert by_ndcg["val_score"] != by_ndcg["val_mrr20"] and by_ndcg["error"] is None


def test_a_journal_line_that_is_not_a_trial_is_a_one_line_error(tmp_path):
    journal = tmp_path / "trials.jsonl"
    journal.write_text('{"dataset": "beauty", "model": "gru4rec", "settings": {}, "val_mrr20": 0.02}\nnot json\n')
    with pytest.raises(tune.UserError, match=r"trials.jsonl:2: not a tune.py journal line"):
        tune.read_journal(journal)
    assert tune.read_journal(tmp_path / "absent.jsonl") == {}


def test_beauty_tunes_gru4rec_in_its_own_space_and_other_datasets_in_the_models():
    assert tune.space_for("beauty", "gru4rec") is tune.DATASET_SPACES[("beauty", "gru4rec")]
    assert tune.space_for("diginetica", "gru4rec") is tune.SPACES["gru4rec"]
    assert set(tune.DATASET_SPACES[("beauty", "gru4rec")]) <= set(tune.SPACES["gru4rec"])  # the same knobs, fewer dear values


def test_a_failed_or_diverged_trial_is_never_the_one_chosen():
    entries = [{"val_mrr20": float("nan")}, {"val_mrr20": None}, {"val_mrr20": 0.01}]
    assert [tune.validation_score(e) for e in entries][:2] == [float("-inf")] * 2
    assert max(entries, key=tune.validation_score)["val_mrr20"] == 0.01


def test_the_summary_shows_a_recorded_interval_and_calls_a_lead_inside_it_a_tie_until_a_row_changes():
    paired = {"MRR@20": {"against": "sr", "mrr": [0.0285, 0.0283], "interval": [-0.0007, 0.0009]}}
    rows = [row("beauty", "sr", 0.0283), row("beauty", "gru4rec", 0.0285, paired=paired),
            row("diginetica", "vstan", 0.3757), row("diginetica", "sasrec", 0.4231)]
    text = accuracy.summary(rows)
    assert "| +0.0002 (+0.7%) | -0.0007 to +0.0009 |" in text and "| +0.0474 (+12.6%) | not measured |" in text
    assert "A neural model leads on every dataset. Within noise (the interval holds 0, so neither side is shown to lead) on: beauty." in text
    assert "Not tested against noise: diginetica." in text
    rows[0]["MRR@20"] = 0.0280  # the baseline measured again: the interval belongs to other figures
    assert "-0.0007 to +0.0009" not in accuracy.summary(rows) and "Within noise" not in accuracy.summary(rows)
    rows[2:] = []
    rows[1]["paired"]["MRR@20"].update(mrr=[0.0285, 0.0280], interval=[0.0001, 0.0009])
    assert "Within noise" not in accuracy.summary(rows) and "+0.0001 to +0.0009" in accuracy.summary(rows)


def test_a_paired_bootstrap_of_a_model_against_itself_is_a_tie_with_a_zero_width_interval():
    import paired

    ranks = np.array([1, 3, 25, 2, 40, 7])
    result = paired.paired_bootstrap(ranks, ranks, k=20, resamples=200)
    assert result.difference == 0.0 and result.interval == (0.0, 0.0) and result.only_a == result.only_b == 0
    assert "a tie" in paired.report(result, ("a", "b"), 20)


def test_a_paired_bootstrap_finds_a_lead_every_resample_shows_and_its_interval_holds_the_difference():
    import paired

    rng = np.random.default_rng(0)
    b = rng.integers(1, 60, 500)
    a = np.maximum(b - 5, 1)  # a ranks every target at least as high as b
    result = paired.paired_bootstrap(a, b, k=20, resamples=500)
    assert result.difference > 0 and 0 < result.interval[0] <= result.difference <= result.interval[1]
    assert result.only_b == 0 and result.only_a > 0
    assert result.mrr[0] == pytest.approx(np.mean(np.where(a <= 20, 1 / a, 0)))
    assert result.ndcg[0] == pytest.approx(np.mean(np.where(a <= 20, 1 / np.log2(a + 1), 0)))
    for pair, interval in ((result.hr, result.hr_interval), (result.ndcg, result.ndcg_interval)):
        assert 0 < interval[0] <= pair[0] - pair[1] <= interval[1]
    assert "difference NDCG@20" in paired.report(result, ("a", "b"), 20)
    with pytest.raises(ValueError):
        paired.paired_bootstrap(a, b[:-1])


def test_the_paired_difference_split_into_groups_counts_every_event_once_and_finds_the_group_that_makes_it():
    import paired
    from training.sessions import Sessions

    sessions = Sessions(session_ids=np.array(["u1", "u2"]), items=np.array([5, 6, 7, 8, 9, 5, 6]), offsets=np.array([0, 4, 7]), times=np.arange(7.0))
    assert paired.history_lengths(sessions, np.array([0, 2, 3, 4, 5])).tolist() == [1, 3, 4, 1, 2]
    rng = np.random.default_rng(1)
    history = rng.integers(1, 30, 2000)
    b = rng.integers(1, 40, 2000)
    a = np.where(history >= 10, np.maximum(b - 8, 1), b)  # a gains on long histories only
    groups = paired.split_difference(a, b, history, paired.GROUPINGS["history"][0], k=20, resamples=300)
    assert sum(g["events"] for g in groups) == 2000 and sum(g["share"] for g in groups) == pytest.approx(1.0)
    assert sum(g["weight"] for g in groups) == pytest.approx(1.0)
    by_name = {g["group"]: g for g in groups}
    assert by_name["1"]["difference"] == 0.0 and by_name["1"]["interval"] == (0.0, 0.0)
    assert by_name["10-19"]["interval"][0] > 0 and by_name["20+"]["interval"][0] > 0
    assert by_name["10-19"]["weight"] + by_name["20+"]["weight"] == pytest.approx(1.0)
    table = paired.split_table(groups, "items before the target", ("a", "b"), 20)
    assert table.count("\n") == len(groups) + 1 and "| 10-19 |" in table and "part of the overall difference" in table
    assert "part of" not in paired.split_table(groups, "items before the target", ("a", "b"), 20, parts=False)


def test_paired_splits_two_rebuilt_rows_by_history_and_target_popularity_over_all_their_test_events(shared_data):
    import paired

    result = paired.compare("diginetica", "sknn", "sr", resamples=100, by=("history", "popularity"))
    data = accuracy.DATASETS["diginetica"][1]()
    popularity = np.bincount(data.train.items, minlength=data.n_items + 1)
    for grouping in ("history", "popularity"):
        rows = result.splits[grouping]
        assert sum(g["events"] for g in rows) == result.events
        assert sum(g["difference"] * g["events"] for g in rows) / result.events == pytest.approx(result.difference, abs=1e-12)
    last = data.test.offsets[1:] - 2  # leave-one-out: each user's last click before the target
    assert np.array_equal(paired.target_popularity(popularity, data.test, last), popularity[data.test.items[last + 1]])
    text = paired.report(result, ("sknn", "sr"), 20)
    assert "MRR@20 by items before the target" in text and "MRR@20 by the target's training clicks" in text
    tie = result.interval[0] <= 0 <= result.interval[1]
    assert ("part of the overall difference |" in text) != tie and ("it is a tie" in text) == tie


def test_paired_on_the_validation_split_ranks_each_spec_as_a_tuning_trial_scores_it_and_never_reads_test(shared_data, monkeypatch):
    """``--split valid``: a spec that is no row (a trial) against a baseline, both trained on the early-stopping split,
    on every validation target; the neural side's figure is its own early stopping's best; test is not there."""
    import paired
    from training.protocols import early_stopping_split

    data = accuracy.DATASETS["diginetica"][1]()
    blind = dataclasses.replace(data, test=None)  # any read of test fails
    monkeypatch.setitem(accuracy.DATASETS, "diginetica", (accuracy.DATASETS["diginetica"][0], lambda: blind))
    spec = "sasrec:hidden_size=16,epochs=2,patience=1"
    result = paired.compare("diginetica", spec, "sr", resamples=100, split="valid", by=("popularity",))
    fit, valid = early_stopping_split(data)
    assert result.events == len(valid)
    cls, config = paired.spec_config(spec)
    trial = cls.train(data, dataclasses.replace(config, threads=1), progress=False).fit_result
    assert result.mrr[0] == pytest.approx(trial.best_score, abs=1e-9)
    sr = get_model("sr").train(dataclasses.replace(data, train=fit, valid=None), progress=False)
    popularity = np.bincount(fit.items, minlength=data.n_items + 1)
    assert result.mrr[1] == pytest.approx(evaluate(sr, valid, ks=(20,), mode="last", popularity=popularity, progress=False)["MRR@20"], abs=1e-12)
    assert sum(g["events"] for g in result.splits["popularity"]) == result.events
    with pytest.raises(SystemExit, match="no --record"):
        paired.compare("diginetica", spec, "sr", split="valid", record=True)


def test_a_spec_is_read_as_tune_writes_it_and_as_accuracy_writes_it():
    import paired

    cls, config = paired.spec_config('gru4rec:layers=[64],loss="bpr-max",sample_alpha=0.25')
    assert cls.name == "gru4rec" and list(config.layers) == [64] and config.loss == "bpr-max" and config.sample_alpha == 0.25
    cls, config = paired.spec_config("sasrec:hidden_size=64,dropout=0.1,init=normal")
    assert cls.name == "sasrec" and config.hidden_size == 64 and config.init == "normal"


def test_paired_rebuilds_two_stored_rows_gives_their_figures_again_and_records_the_interval_in_the_first(shared_data, tmp_path, monkeypatch):
    """A refit neural row and a baseline of the Diginetica sample, rebuilt from (a copy of) docs/accuracy.json."""
    import paired

    (tmp_path / "accuracy.json").write_text(accuracy.STORE.read_text())
    for name, path in (("REPO", tmp_path), ("STORE", tmp_path / "accuracy.json"), ("RESULTS", tmp_path / "results.md"), ("CHART", tmp_path / "accuracy.png")):
        monkeypatch.setattr(accuracy, name, path)
    rows = {r["model"]: r for r in json.loads(accuracy.STORE.read_text()) if r["dataset"] == "diginetica"}
    result = paired.compare("diginetica", "sasrec", "vsknn", resamples=200, record=True)
    assert result.events == rows["vsknn"]["events"]
    assert result.mrr == (pytest.approx(rows["sasrec"]["MRR@20"], abs=1e-9), pytest.approx(rows["vsknn"]["MRR@20"], abs=1e-9))
    assert result.hr == (pytest.approx(rows["sasrec"]["HR@20"], abs=1e-9), pytest.approx(rows["vsknn"]["HR@20"], abs=1e-9))
    assert result.interval[0] <= result.difference <= result.interval[1]
    stored = next(r for r in json.loads(accuracy.STORE.read_text()) if (r["dataset"], r["model"]) == ("diginetica", "sasrec"))
    assert stored["paired"]["MRR@20"]["against"] == "vsknn" and stored["paired"]["MRR@20"]["interval"] == list(result.interval)
    assert "## Best neural model against the best baseline" in accuracy.RESULTS.read_text()


def test_paired_record_keeps_an_entry_another_run_recorded_into_the_same_row_while_it_ranked(shared_data, tmp_path, monkeypatch):
    import paired

    (tmp_path / "accuracy.json").write_text(accuracy.STORE.read_text())
    for name, path in (("REPO", tmp_path), ("STORE", tmp_path / "accuracy.json"), ("RESULTS", tmp_path / "results.md"), ("CHART", tmp_path / "accuracy.png")):
        monkeypatch.setattr(accuracy, name, path)
    ranks = paired.event_ranks

    def another_run_records_meanwhile(row, *args, **kwargs):
        if row["model"] == "sr":  # while the second row is ranked, a second paired.py records into the first row
            rows = json.loads(accuracy.STORE.read_text())
            for r in rows:
                if (r["dataset"], r["model"]) == ("diginetica", "sknn"):
                    r["paired"] = {"MRR@20 seen removed": {"against": "stan"}}
            accuracy.STORE.write_text(json.dumps(rows))
        return ranks(row, *args, **kwargs)

    monkeypatch.setattr(paired, "event_ranks", another_run_records_meanwhile)
    paired.compare("diginetica", "sknn", "sr", resamples=50, record=True)
    stored = next(r for r in json.loads(accuracy.STORE.read_text()) if (r["dataset"], r["model"]) == ("diginetica", "sknn"))
    assert set(stored["paired"]) == {"MRR@20", "MRR@20 seen removed"} and stored["paired"]["MRR@20"]["against"] == "sr"


def test_paired_loads_an_early_stopped_row_from_its_kept_run_instead_of_training_it_again(shared_data, tmp_path, monkeypatch):
    """``--runs``: the kept epoch's weights give the row's figure again; a run that was not kept is a one-line error."""
    import paired

    spec = "sasrec:hidden_size=16,epochs=2,patience=1"
    rows = accuracy.run_dataset("diginetica", [spec], max_epochs=2, threads=1, record=lambda row: None, runs=tmp_path / "runs")
    store = tmp_path / "accuracy.json"
    store.write_text(json.dumps(rows + [{**rows[0], "model": "sasrec:hidden_size=16,epochs=2,patience=1,seed=3"}]))
    monkeypatch.setattr(accuracy, "STORE", store)
    checkpoint = accuracy.run_folder(tmp_path / "runs", "diginetica", spec) / "checkpoint.pt"
    written = checkpoint.stat().st_mtime_ns
    monkeypatch.setattr(paired.accuracy, "refit_on_all", lambda *a: pytest.fail("a kept leave-one-out run is not refit"))
    result = paired.compare("diginetica", spec, spec, resamples=50, runs=tmp_path / "runs")  # its row's MRR@20, checked
    assert result.difference == 0.0 and checkpoint.stat().st_mtime_ns == written  # loaded, no epoch trained again
    with pytest.raises(SystemExit, match="no kept run for 'sasrec:hidden_size=16,epochs=2,patience=1,seed=3'"):
        paired.compare("diginetica", spec, f"{spec},seed=3", resamples=10, runs=tmp_path / "runs")
    store.write_text(json.dumps([{**rows[0], "best_epochs": rows[0]["best_epochs"] % 2 + 1}]))  # the other epoch
    with pytest.raises(SystemExit, match="kept epoch .* its row .* not the row's run"):
        paired.compare("diginetica", spec, spec, resamples=10, runs=tmp_path / "runs")


def test_paired_stops_when_a_rebuilt_model_does_not_give_its_rows_figure(shared_data, tmp_path, monkeypatch, capsys):
    import paired

    rows = json.loads(accuracy.STORE.read_text())
    for r in rows:
        if (r["dataset"], r["model"]) == ("diginetica", "sr"):
            r["MRR@20"] += 0.01
    store = tmp_path / "accuracy.json"
    store.write_text(json.dumps(rows))
    monkeypatch.setattr(accuracy, "STORE", store)
    with pytest.raises(SystemExit, match="rebuilt gives MRR@20 .* not the row's model"):
        paired.compare("diginetica", "sr", "markov", resamples=10)
    result = paired.compare("diginetica", "sr", "markov", resamples=10, tolerance=0.011)  # what a rebuild on another CPU may need
    assert "within --tolerance" in capsys.readouterr().out and result.events > 0
    with pytest.raises(SystemExit, match="--record stores the interval of the rows themselves"):
        paired.compare("diginetica", "sr", "markov", resamples=10, record=True, tolerance=0.011)
    with pytest.raises(SystemExit, match="no row for model 'nosuch'"):
        paired.compare("diginetica", "nosuch", "markov", resamples=10)


def test_the_bert4rec_reference_script_draws_a_journal_beside_ours_and_refuses_a_folder_without_their_code(tmp_path, capsys):
    """What runs without their checkout: the plot from a journal, and one-line errors (training needs their src/)."""
    import bert4rec_reference

    journal = tmp_path / "theirs.jsonl"
    rows = [{"epoch": e, "seed": 0, "loss": 10 - e, "valid NDCG@10": 0.01 * e, **({"test NDCG@10": 0.008 * e} if e % 2 else {})} for e in (1, 2, 3)]
    journal.write_text("\n".join(json.dumps(r) for r in rows + [{"final": True, "best_epoch": 3, "test HR@10": 0.05, "test NDCG@10": 0.024}]) + "\n")
    epochs, final = bert4rec_reference.read_journal(journal)
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and final["best_epoch"] == 3
    out = tmp_path / "ref.png"
    bert4rec_reference.plot([journal], out)
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    journal.write_text("{not json\n")
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        bert4rec_reference.read_journal(journal)
    with pytest.raises(SystemExit, match="src/ folder of a sasrec-bert4rec-recsys23 checkout"):
        bert4rec_reference.import_reference(tmp_path)
