"""Where training runs: `--device` and `--precision`, through the real `streamrec train` / `evaluate` commands.

These tests run on the CPU. The CUDA path itself is exercised only where a GPU is present
(the tests that need a machine without CUDA skip there).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from stream.cli import cli
from streamrec.errors import UserError
from training.models import load_run
from training.models.window import catalogue_cross_entropy
from training.synth import synthesize
from training.trainer import TrainerConfig, fit, to_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# Tiny settings: each run takes a second or two on one thread.
SMALL = {
    "gru4rec": ["layers=[16]", "n_sample=16", "batch_size=16"],
    "sasrec": ["history_len=8", "hidden_size=16", "dropout=0.1", "batch_size=64"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    synthesize(n_items=120, n_sessions=300, seed=7, test_fraction=0.2).save(path)
    return path


def train(data_dir, out, model, *extra):
    args = ["train", "--model", model, "--data", str(data_dir), "--out", str(out), "--epochs", "2", "--threads", "1"]
    args += [a for s in SMALL[model] for a in ("--set", s)] + list(extra)
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def log_of(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@no_cuda
@pytest.mark.parametrize("model", ["gru4rec", "sasrec"])
def test_device_cpu_gives_exactly_the_run_the_default_gives_on_a_cpu_only_machine(data_dir, tmp_path, model):
    default = train(data_dir, tmp_path / "default", model)
    cpu = train(data_dir, tmp_path / "cpu", model, "--device", "cpu")
    a = torch.load(default / "model.pt", weights_only=True)
    b = torch.load(cpu / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [(h["loss"], h["val_mrr20"]) for h in log_of(default)] == [(h["loss"], h["val_mrr20"]) for h in log_of(cpu)]
    assert json.loads((default / "config.json").read_text())["trained_on"] == "cpu"


def test_the_train_log_reports_step_time_and_the_device(data_dir, tmp_path):
    run = train(data_dir, tmp_path / "run", "sasrec", "--device", "cpu")
    for line in log_of(run):
        assert line["device"] == "cpu" and line["step_ms"] > 0 and 0 <= line["batch_ms"] <= line["step_ms"]
        assert "gpu_util" not in line  # only reported on CUDA


def test_a_run_its_time_budget_cut_short_says_so_in_its_config_and_loads_for_evaluation(data_dir, tmp_path):
    run = train(data_dir, tmp_path / "cut", "sasrec", "--device", "cpu", "--set", "time_budget_s=0.001")
    doc = json.loads((run / "config.json").read_text())
    assert doc["out_of_time"] and (doc["best_epoch"], doc["epochs_run"]) == (1, 1) and len(log_of(run)) == 1
    result = CliRunner().invoke(cli, ["evaluate", "--run", str(run), "--data", str(data_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    whole = json.loads((train(data_dir, tmp_path / "whole", "sasrec", "--device", "cpu") / "config.json").read_text())
    assert "out_of_time" not in whole and whole["epochs_run"] == 2


def one_line_error(args):
    """Exit status and stderr of the real `streamrec` entry point (a fresh process, as a user runs it)."""
    done = subprocess.run([sys.executable, "-c", "from stream.cli import main; main()", *args], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stderr.strip()


@no_cuda
def test_device_cuda_on_a_machine_without_cuda_is_a_one_line_error(data_dir, tmp_path):
    code, err = one_line_error(["train", "--model", "sasrec", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and "no CUDA device" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unknown_device_or_precision_is_a_one_line_error(data_dir, tmp_path):
    for flag, value, message in (("--device", "tpu", "device 'tpu' unknown"), ("--precision", "fp16", "precision 'fp16' unknown")):
        code, err = one_line_error(["train", "--model", "gru4rec", "--data", str(data_dir), "--out", str(tmp_path / "run"), flag, value])
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(UserError, match="cuda:N"):
        TrainerConfig(device="gpu").check()


def test_a_run_trained_with_a_device_setting_loads_and_evaluates_on_the_cpu(data_dir, tmp_path):
    run = train(data_dir, tmp_path / "run", "sasrec", "--device", "cpu", "--precision", "bf16")
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")
    tensors = [t for t in checkpoint["model"].values()] + [t for t in checkpoint["best_model"].values()]
    assert tensors and all(t.device.type == "cpu" and t.dtype == torch.float32 or not t.is_floating_point() for t in tensors)
    # a GPU run records device "cuda" in its config; loading must not ask for that device
    doc = json.loads((run / "config.json").read_text())
    doc["config"]["device"] = "cuda"
    (run / "config.json").write_text(json.dumps(doc))
    model = load_run(run)
    assert all(p.device.type == "cpu" for p in model.net.parameters())
    result = CliRunner().invoke(cli, ["evaluate", "--run", str(run), "--data", str(data_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_events"] > 0 and 0 < metrics["HR@20"] <= 1


def test_bf16_catalogue_cross_entropy_is_close_to_float32_in_value_and_gradients():
    torch.manual_seed(0)
    states = torch.randn(300, 16, requires_grad=True)
    items = torch.randn(501, 16, requires_grad=True)
    bias = torch.randn(501, requires_grad=True)
    targets = torch.randint(1, 501, (300,))
    exact = catalogue_cross_entropy(states, items, targets, bias)
    exact_grads = torch.autograd.grad(exact, (states, items, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = catalogue_cross_entropy(states, items, targets, bias)
    assert low.dtype == torch.float32
    low_grads = torch.autograd.grad(low, (states, items, bias))
    assert float(low.detach()) == pytest.approx(float(exact.detach()), rel=2e-2)
    for g, e in zip(low_grads, exact_grads):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.1, atol=0.02 * float(e.abs().max()))


@pytest.mark.parametrize("model", ["gru4rec", "sasrec"])
def test_bf16_training_on_the_cpu_learns_like_float32(data_dir, tmp_path, model):
    fp32 = log_of(train(data_dir, tmp_path / "fp32", model, "--device", "cpu"))
    bf16 = log_of(train(data_dir, tmp_path / "bf16", model, "--device", "cpu", "--precision", "bf16"))
    assert bf16[-1]["loss"] < bf16[0]["loss"]
    assert bf16[-1]["loss"] == pytest.approx(fp32[-1]["loss"], rel=0.05)
    assert bf16[-1]["val_mrr20"] == pytest.approx(fp32[-1]["val_mrr20"], abs=0.05)


def test_batches_move_to_the_device_inside_nested_containers():
    batch = (torch.ones(2), [torch.zeros(1), None], {"a": torch.arange(3)}, 5)
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved, tuple) and isinstance(moved[1], list) and moved[1][1] is None and moved[3] == 5
    assert torch.equal(moved[2]["a"], torch.arange(3))


def test_fit_returns_the_module_on_the_cpu_with_every_setting():
    module = torch.nn.Linear(3, 1)
    config = TrainerConfig(epochs=1, threads=1, device="auto", precision="bf16")
    x = torch.randn(8, 3)
    result = fit(module, config, lambda epoch: [x], lambda b: module(b).pow(2).mean(), progress=False)
    assert all(p.device.type == "cpu" for p in module.parameters()) and result.device in ("cpu", "cuda", "cuda:0")
