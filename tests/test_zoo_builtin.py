"""Built-in zoos, predictors and the zoo/predict commands on a small zoo."""
import json

import pytest
import torch

import unf
from unf.cli import main
from unf.training import evaluate
from unf.zoo import Zoo
from unf.zoo.builtin import GRID_ACTIVATIONS, build_builtin, cnn, mlp, sample_members
from unf.zoo.predict import fit_predictor


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "digits-cnn"
    return build_builtin("digits-cnn", str(root), num_models=16, chunk_size=8, progress=False)


def test_builtin_zoo_contents(small_zoo):
    assert small_zoo.complete and len(small_zoo) == 16 * 3
    row = small_zoo.metadata[5]
    for col in ("activation", "lr", "weight_decay", "dropout", "optimizer", "train_fraction", "test_acc",
                "train_acc", "generalization_gap"):
        assert col in row
    # a stored network is a plain module with the recorded accuracy
    split = unf.data.load("digits-flat")
    net = cnn(row["activation"], float(row["dropout"]))
    net.load_state_dict(small_zoo.state_dict(row["model_id"], row["epoch"]))
    _, acc = evaluate(net, split.x_test, split.y_test)
    assert acc == pytest.approx(float(row["test_acc"]), abs=1e-6)
    assert len({r["activation"] for r in small_zoo.metadata}) > 1


def test_builtin_zoo_resumes(tmp_path):
    root = tmp_path / "z"
    build_builtin("digits-mlp", str(root), num_models=8, chunk_size=4, progress=False)
    again = build_builtin("digits-mlp", str(root), num_models=8, chunk_size=4, progress=False)
    assert len(again) == 8 * 3 and sorted({r["model_id"] for r in again.metadata}, key=int) == [str(i)
                                                                                               for i in range(8)]
    with pytest.raises(ValueError, match="unknown zoo 'nope'"):
        build_builtin("nope", str(tmp_path / "x"))
    assert sum(p.numel() for p in mlp().parameters()) == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10


def test_hyperparameter_grid():
    members = sample_members(400, seed=3, first_id=100)
    assert [m.seed for m in members] == list(range(100, 500))
    assert [m.to_dict() for m in members] == [m.to_dict() for m in sample_members(400, seed=3, first_id=100)]
    assert {m.activation for m in members} == set(GRID_ACTIVATIONS)
    for opt, lo, hi in (("adam", 1e-3, 10 ** -1.75), ("sgd", 10 ** -1.5, 10 ** -0.25)):
        lrs = [m.lr for m in members if m.optimizer == opt]
        assert len(lrs) > 100 and lo <= min(lrs) and max(lrs) <= hi
    assert {m.train_fraction for m in members} == {0.1, 0.25, 0.5, 1.0}
    assert sample_members(5, seed=4)[0].to_dict() != sample_members(5, seed=3)[0].to_dict()


@pytest.mark.parametrize("model", ["unf", "statnn", "deepsets", "gmn"])
def test_predictors_fit_and_report(small_zoo, model):
    r = fit_predictor(small_zoo, model, epochs=2, seed=0)
    assert set(r) >= {"kendall_tau", "r2", "mae"} and r["n_train"] + r["n_val"] + r["n_test"] == len(small_zoo)
    assert -1 <= r["kendall_tau"] <= 1 and r["mae"] >= 0
    with pytest.raises(ValueError, match="unknown predictor"):
        fit_predictor(small_zoo, "nope")


def test_zoo_and_predict_commands(small_zoo, capsys):
    assert main(["zoo", "info", str(small_zoo.root)]) == 0
    assert "16 networks, 48 rows" in capsys.readouterr().out
    assert main(["predict", "fit", "--zoo", str(small_zoo.root), "--model", "statnn", "--epochs", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "statnn" and "kendall_tau" in out and out["seed"] == 0 and out["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_and_build_on_cuda(small_zoo, tmp_path, capsys):
    for model in ("unf", "gmn"):
        r = fit_predictor(small_zoo, model, epochs=1, seed=0, device="cuda")
        assert -1 <= r["kendall_tau"] <= 1 and r["mae"] >= 0
    zoo = build_builtin("digits-mlp", str(tmp_path / "z"), num_models=4, chunk_size=4, progress=False, device="cuda")
    assert zoo.complete and len(zoo) == 12 and zoo.state_dict(0, 10)["0.weight"].device.type == "cpu"
    assert main(["predict", "fit", "--zoo", str(small_zoo.root), "--model", "statnn", "--epochs", "1", "--json",
                 "--device", "cuda"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cuda"
