"""The typed contracts (streamrec/contracts.py): every registered model satisfies what export uses of it,
every scorer kind what the stream uses of it, and export refuses a model that does not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from export.exporter import _check_contract, export_run
from export.scorer import KINDS, load_scorer
from streamrec import contracts
from streamrec.errors import UserError
from tests.test_bundle import make_data, make_run
from training.models import available_models, get_model, load_run

TINY = dict(epochs=1, layers="[8]", hidden_size=8, embedding_dim=8, n_sample=16, batch_size=64, history_len=5, threads=1)
ONE_PER_KIND = {"hidden": "gru4rec", "window": "caser", "graph": "srgnn", "items": "markov"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> run dir of every available model, trained for one epoch on a small synthetic log."""
    root = tmp_path_factory.mktemp("contracts")
    make_data(root / "data")
    out = {}
    for name in available_models():
        make_run(name, root / "data", root / name, **TINY)
        out[name] = root / name
    return out


def test_every_registered_model_satisfies_the_export_contract_of_its_state_kind(runs):
    assert set(runs) == set(available_models())
    for name, run_dir in runs.items():
        model = load_run(run_dir)
        assert model.state_kind in contracts.KIND_CONTRACTS, name
        assert isinstance(model, contracts.ExportableModel), name
        assert isinstance(model, contracts.KIND_CONTRACTS[model.state_kind]), f"{name} ({model.state_kind})"
        assert get_model(name).state_kind == model.state_kind


def test_every_scorer_kind_satisfies_the_scorer_contract(runs, tmp_path):
    assert set(KINDS) == set(contracts.KIND_CONTRACTS)
    for kind, name in ONE_PER_KIND.items():
        if name not in runs:
            pytest.skip(f"model {name} is not available in this build")
        export_run(runs[name], tmp_path / name, parity_sessions=20, log=lambda line: None)
        scorer = load_scorer(tmp_path / name)
        assert type(scorer) is KINDS[kind] and scorer.kind == kind
        assert isinstance(scorer, contracts.Scorer), kind


def test_export_refuses_a_model_without_what_its_state_kind_needs():
    def method(*args, **kwargs):
        raise AssertionError("not called")

    model = SimpleNamespace(name="fake", state_kind="items", n_items=3, config=None, score_next=method, save=method, arrays=method, from_arrays=method)
    with pytest.raises(UserError, match=r"lacks score_histories \(ItemsStateModel"):
        _check_contract(model, "items")
    model.score_histories = method
    _check_contract(model, "items")
    with pytest.raises(UserError, match="unknown state kind 'tree'"):
        _check_contract(model, "tree")
