"""Loaders for public zoo formats: Small CNN Zoo (Unterthiner et al. 2020) and Model Zoos (Schurholt et al. 2022).

Small synthetic zoos are written in exactly the published on-disk layouts; the converted PyTorch networks are checked
against an independent NumPy implementation of the TF network that uses the TF-layout (HWIO) weights directly.
"""
import csv
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from unf.zoo import WeightDataset, Zoo, ZooFormatError, split_by_run
from unf.zoo.loaders import (SMALL_CNN_ZOO_LAYOUT, SmallCNN, convert_model_zoos, convert_small_cnn_zoo,
                             load_model_zoos, load_small_cnn_zoo)

# -- Small CNN Zoo ---------------------------------------------------------------------------------------------------

# the released layout: bias before kernel per layer, TF shapes (HWIO conv kernels, [in, out] dense kernel)
TF_VARS = [("sequential/conv2d/bias:0", (16,)), ("sequential/conv2d/kernel:0", (3, 3, 1, 16)),
           ("sequential/conv2d_1/bias:0", (16,)), ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)),
           ("sequential/conv2d_2/bias:0", (16,)), ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)),
           ("sequential/dense/bias:0", (10,)), ("sequential/dense/kernel:0", (16, 10))]
ACTS = ["relu", "tanh", "relu", "tanh", "relu"]
STEPS = [0, 86, 0, 1, 86]
MODELDIRS = ["/zoo/run_a", "/zoo/run_a", "/zoo/run_b", "/zoo/run_b", "/zoo/run_b"]
METRIC_COLUMNS = ["config.activation", "config.b_init", "config.dataset", "config.dnn_architecture", "config.dropout",
                  "config.epochs", "config.init_std", "config.l2reg", "config.learning_rate", "config.optimizer",
                  "config.train_fraction", "config.w_init", "modeldir", "step", "test_accuracy", "test_loss",
                  "train_accuracy", "train_loss"]


def write_small_cnn_zoo(root: Path, dataset="mnist", seed=0, gz=True, index_col=False):
    """5 networks in the released format; returns their TF-layout weights and the metrics rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    nets = [{name: (0.4 * rng.standard_normal(shape)).astype(np.float32) for name, shape in TF_VARS} for _ in ACTS]
    weights = np.stack([np.concatenate([net[name].ravel() for name, _ in TF_VARS]) for net in nets])
    np.save(root / "weights.npy", weights)
    # layout.csv as pandas writes it (an unnamed index column), rows not in vector order
    entries, pos = [], 0
    for name, shape in TF_VARS:
        entries.append([name, pos, pos + math.prod(shape), str(shape)])
        pos += math.prod(shape)
    with open(root / "layout.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "varname", "start_idx", "end_idx", "shape"])
        for i in [7, 0, 3, 1, 2, 5, 4, 6]:
            w.writerow([i, *entries[i]])
    rows = []
    for i, (act, step, mdir) in enumerate(zip(ACTS, STEPS, MODELDIRS)):
        rows.append({"config.activation": act, "config.b_init": "zeros", "config.dataset": dataset,
                     "config.dnn_architecture": "cnn", "config.dropout": "0.0" if i % 2 else "0.2",
                     "config.epochs": "86", "config.init_std": "0.05", "config.l2reg": f"{0.001 * i:g}",
                     "config.learning_rate": "0.01", "config.optimizer": "adam", "config.train_fraction": "0.5",
                     "config.w_init": "he_normal", "modeldir": mdir, "step": str(step),
                     "test_accuracy": f"{0.5 + i / 20:.4f}", "test_loss": f"{1.5 - i / 10:.4f}",
                     "train_accuracy": f"{0.55 + i / 20:.4f}", "train_loss": f"{1.4 - i / 10:.4f}"})
    opener = (lambda: gzip.open(root / "metrics.csv.gz", "wt", newline="")) if gz else \
        (lambda: open(root / "metrics.csv", "w", newline=""))
    with opener() as f:
        w = csv.writer(f)
        w.writerow([""] * index_col + METRIC_COLUMNS)  # pandas.to_csv writes an unnamed index column
        w.writerows([[i] * index_col + [r[c] for c in METRIC_COLUMNS] for i, r in enumerate(rows)])
    return nets, rows


# an independent reference: the Keras network in NumPy, NHWC input, TF-layout weights used as they are
def np_conv_valid_stride2(x, kernel, bias):
    """TF Conv2D(strides=2, padding='valid'), NHWC input, HWIO kernel:
    out[n, i, j, o] = sum_{a, b, c} x[n, 2i+a, 2j+b, c] k[a, b, c, o] + bias[o]."""
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    ho, wo = (h - kh) // 2 + 1, (w - kw) // 2 + 1
    out = np.empty((n, ho, wo, o))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, 2 * i:2 * i + kh, 2 * j:2 * j + kw, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2])) + bias
    return out


def np_small_cnn(net, x_nhwc, activation):
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh}[activation]
    h = x_nhwc.astype(np.float64)
    for layer in ("conv2d", "conv2d_1", "conv2d_2"):
        h = act(np_conv_valid_stride2(h, net[f"sequential/{layer}/kernel:0"].astype(np.float64),
                                      net[f"sequential/{layer}/bias:0"].astype(np.float64)))
    h = h.mean(axis=(1, 2))  # GlobalAveragePooling2D
    return h @ net["sequential/dense/kernel:0"].astype(np.float64) + net["sequential/dense/bias:0"]


def test_published_layout_constant_matches_the_documented_slices():
    # the colab notebook's per-layer slices: (bias, kernel) = (0,16),(16,160) / (160,176),(176,2480) / ...
    got = [(e.start, e.end) for e in SMALL_CNN_ZOO_LAYOUT]
    assert got == [(0, 16), (16, 160), (160, 176), (176, 2480), (2480, 2496), (2496, 4800), (4800, 4810),
                   (4810, 4970)]
    assert [e.varname for e in SMALL_CNN_ZOO_LAYOUT] == [n for n, _ in TF_VARS]


@pytest.mark.parametrize("dataset,hw", [("mnist", 28), ("cifar10", 32)])
def test_small_cnn_zoo_computes_the_tf_function(tmp_path, dataset, hw):
    nets, _ = write_small_cnn_zoo(tmp_path / dataset, dataset)
    zoo = load_small_cnn_zoo(tmp_path / dataset)
    assert zoo.input_shape == (1, hw, hw) and len(zoo) == 5
    x = np.random.default_rng(1).uniform(-1, 1, size=(3, hw, hw, 1))  # NHWC, as TF sees it
    for i, (net, act, step) in enumerate(zip(nets, ACTS, STEPS)):
        want = np_small_cnn(net, x, act)
        model = zoo.model(i, step).double()
        assert isinstance(model.act, {"relu": nn.ReLU, "tanh": nn.Tanh}[act])
        got = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()  # NCHW
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_small_cnn_layout_transform_by_hand(tmp_path):
    nets, _ = write_small_cnn_zoo(tmp_path / "z")
    zoo = load_small_cnn_zoo(tmp_path / "z")
    sd = zoo.state_dict(1, 86)
    k = nets[1]["sequential/conv2d_1/kernel:0"]  # [kh, kw, in, out]
    for o, c, a, b in [(0, 0, 0, 0), (3, 7, 1, 2), (15, 2, 2, 1)]:
        assert sd["convs.1.weight"][o, c, a, b] == k[a, b, c, o]
    dense = nets[1]["sequential/dense/kernel:0"]  # [in, out]
    assert sd["fc.weight"][4, 9] == dense[9, 4] and tuple(sd["fc.weight"].shape) == (10, 16)
    assert torch.equal(sd["convs.0.bias"], torch.from_numpy(nets[1]["sequential/conv2d/bias:0"]))
    assert list(sd) == zoo.spec.names


def test_small_cnn_spec_ignores_activation_and_input_size():
    import unf

    specs = [unf.spec_from_module(SmallCNN(activation=a), torch.zeros(1, 1, s, s))
             for a, s in [("relu", 28), ("tanh", 32), ("sigmoid", 28)]]
    assert specs[0] == specs[1] == specs[2]
    assert specs[0]["convs.1.weight"].axes == ("convs.1", "convs.0", None, None)


def test_small_cnn_metadata_and_conversion_round_trip(tmp_path):
    _, rows = write_small_cnn_zoo(tmp_path / "src", gz=False, index_col=True)  # uncompressed metrics.csv works too
    zoo = load_small_cnn_zoo(tmp_path / "src")
    meta = zoo.metadata
    assert [r["model_id"] for r in meta] == ["0", "1", "2", "3", "4"]
    assert [r["epoch"] for r in meta] == [str(s) for s in STEPS]
    assert [r["run_id"] for r in meta] == ["0", "0", "1", "1", "1"]
    for r, src in zip(meta, rows):
        assert {k: r[k] for k in METRIC_COLUMNS} == src  # every source column, unchanged
    assert [r["index"] for r in meta] == ["0", "1", "2", "3", "4"]  # the unnamed index column
    splits = split_by_run(meta, (0.5, 0.5), run_key="run_id")
    assert sorted(map(len, splits)) == [2, 3]

    out = convert_small_cnn_zoo(tmp_path / "src", tmp_path / "dst", chunk_size=2, progress=False)
    assert isinstance(out, Zoo) and out.complete and out.spec == zoo.spec and len(out.shards) == 3
    assert [{k: v for k, v in r.items() if k != "chunk"} for r in out.metadata] == meta
    assert out.manifest["info"]["source"]["input_shape"] == [1, 28, 28]
    for r in meta:
        a, b = out.state_dict(r["model_id"], r["epoch"]), zoo.state_dict(r["model_id"], r["epoch"])
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # converting again finds every chunk stored; another source into the same directory is refused
    shards = json.loads((tmp_path / "dst" / "manifest.json").read_text())["shards"]
    again = convert_small_cnn_zoo(tmp_path / "src", tmp_path / "dst", chunk_size=2, progress=False)
    assert again.manifest["shards"] == shards
    write_small_cnn_zoo(tmp_path / "other", "cifar10", seed=3)
    with pytest.raises(ZooFormatError, match=r"built with other settings \(source\)"):
        convert_small_cnn_zoo(tmp_path / "other", tmp_path / "dst", chunk_size=2, progress=False)
    # the converted zoo feeds the weight dataset like any zoo
    tensors, target = WeightDataset(out, "test_accuracy")[3]
    assert target.item() == pytest.approx(float(rows[3]["test_accuracy"]))
    assert tensors["convs.0.weight"].shape == (1, 16, 1, 3, 3)
    ws = zoo.weight_space([1, 3])
    assert torch.equal(ws["fc.weight"][1, 0], zoo.state_dict(3, 1)["fc.weight"])
    if hasattr(out, "weight_space"):
        assert torch.equal(out.weight_space([1, 3])["convs.2.weight"], ws["convs.2.weight"])
    with pytest.raises(KeyError, match="no network '0' at epoch '86'"):
        zoo.state_dict("0", "86")


def _rewrite_csv(path, edit):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        lines = list(csv.reader(f))
    lines = edit(lines)
    with opener(path, "wt", newline="") as f:
        csv.writer(f).writerows(lines)


def _break(kind, root: Path):
    if kind == "no weights":
        (root / "weights.npy").unlink()
    elif kind == "no metrics":
        (root / "metrics.csv.gz").unlink()
    elif kind == "no layout":
        (root / "layout.csv").unlink()
    elif kind == "weights length":
        w = np.load(root / "weights.npy")
        np.save(root / "weights.npy", np.concatenate([w, np.zeros((len(w), 1), np.float32)], axis=1))
    elif kind == "weights not npy":
        (root / "weights.npy").write_bytes(b"\x93NUMPY garbage")
    elif kind == "layout column":
        _rewrite_csv(root / "layout.csv", lambda ls: [l[:4] for l in ls])
    elif kind == "layout size":
        _rewrite_csv(root / "layout.csv", lambda ls: [l if l[1] != "sequential/conv2d/kernel:0"
                                                      else [*l[:3], "159", l[4]] for l in ls])
    elif kind == "layout shape":
        _rewrite_csv(root / "layout.csv", lambda ls: [l if l[1] != "sequential/dense/kernel:0"
                                                      else [*l[:4], "16 x 10"] for l in ls])
    elif kind == "layout variable":
        _rewrite_csv(root / "layout.csv", lambda ls: [l if l[1] != "sequential/conv2d/bias:0"
                                                      else [l[0], "sequential/batch_norm/gamma:0", *l[2:]]
                                                      for l in ls])
    elif kind == "metrics fields":
        _rewrite_csv(root / "metrics.csv.gz", lambda ls: ls[:3] + [ls[3] + ["extra"]] + ls[4:])
    elif kind == "metrics rows":
        _rewrite_csv(root / "metrics.csv.gz", lambda ls: ls[:-1])
    elif kind == "metrics step":
        col = METRIC_COLUMNS.index("step")
        _rewrite_csv(root / "metrics.csv.gz", lambda ls: ls[:2] + [ls[2][:col] + ["last"] + ls[2][col + 1:]] + ls[3:])
    elif kind == "metrics gzip":
        data = (root / "metrics.csv.gz").read_bytes()
        (root / "metrics.csv.gz").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind,match", [
    ("no weights", r"weights\.npy: missing"),
    ("no metrics", r"metrics\.csv\.gz: missing \(nor is there a metrics\.csv\)"),
    ("no layout", r"layout\.csv: missing"),
    ("weights length", r"weights\.npy: rows hold 4971 values, .*layout\.csv describes 4970"),
    ("weights not npy", r"weights\.npy: cannot be read as a \.npy array"),
    ("layout column", r"layout\.csv: missing column\(s\) \['shape'\]"),
    ("layout size", r"layout\.csv: row \d \('sequential/conv2d/kernel:0'\): .* holds 143 values, shape "
                    r"\(3, 3, 1, 16\) needs 144"),
    ("layout shape", r"layout\.csv: row \d \('sequential/dense/kernel:0'\): column 'shape' '16 x 10' is not a tuple"),
    ("layout variable", r"layout\.csv: variable 'sequential/batch_norm/gamma:0' is not supported"),
    ("metrics fields", r"metrics\.csv\.gz: line 4 has 19 fields, the header has 18"),
    ("metrics rows", r"metrics\.csv\.gz: 4 rows, but .*weights\.npy holds 5 networks"),
    ("metrics step", r"metrics\.csv\.gz: row 2 \(line 3\), column 'step': 'last' is not a number"),
    ("metrics gzip", r"metrics\.csv\.gz: cannot be read as gzip-compressed CSV"),
])
def test_small_cnn_zoo_errors_name_file_and_place(tmp_path, kind, match):
    root = tmp_path / "z"
    write_small_cnn_zoo(root)
    _break(kind, root)
    with pytest.raises(ZooFormatError, match=match):
        load_small_cnn_zoo(root)


# -- Model Zoos --------------------------------------------------------------------------------------------------------

class ZooCNN(nn.Module):
    """The Model Zoos CNN-s (``def_net.CNN``): a module_list; dropout > 0 inserts Dropout modules."""

    def __init__(self, dropout=0.0):
        super().__init__()
        layers = [nn.Conv2d(1, 8, 5), nn.MaxPool2d(2, 2), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else [])
        layers += [nn.Conv2d(8, 6, 5), nn.MaxPool2d(2, 2), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else [])
        layers += [nn.Conv2d(6, 4, 2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 20), nn.Tanh()]
        layers += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(20, 10)]
        self.module_list = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.module_list:
            x = layer(x)
        return x


X28 = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def write_model_zoos(root: Path, n_models=3, epochs=(0, 1, 2)):
    """A raw Model Zoos experiment directory (Ray Tune layout); returns {(model, epoch): (model, params)}."""
    exp = root / "tune_zoo_mnist_uniform"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(json.dumps({"model::type": "CNN"}))
    (exp / "dataset.pt").write_bytes(b"not read by the loader")
    (exp / "experiment_state-2022-01-01_00-00-00.json").write_text("{}")
    saved = {}
    for m in range(n_models):
        dropout = 0.5 if m == 2 else 0.0
        params = {"model::type": "CNN", "model::nlin": "tanh", "model::dropout": dropout, "optim::lr": 3e-4 * (m + 1),
                  "seed": m + 1, "training::batchsize": 10, "dataset::dump": "/zoo/dataset.pt"}
        trial = exp / f"NN_tune_trainable_{m:05d}_{m}_seed={m + 1}_2022-01-01_00-00-0{m}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps(params))
        lines = []
        for e in epochs:
            if m == 0 and e == epochs[-1]:
                continue  # no result line for this checkpoint
            lines.append(json.dumps({"train_loss": 2.0 - e / 10 - m / 100, "train_acc": 0.1 * e,
                                     "test_loss": 2.1 - e / 10, "test_acc": 0.1 * e + m / 100, "training_iteration": e,
                                     "trial_id": f"abc{m}", "timestamp": 1650000000 + e, "hostname": "node",
                                     "time_this_iter_s": 1.5, "done": False, "config": params}))
        (trial / "result.json").write_text("\n".join(lines) + "\n")
        for e in epochs:
            torch.manual_seed(100 * m + e)
            model = ZooCNN(dropout)
            ck = trial / f"checkpoint_{e:06d}"
            ck.mkdir()
            torch.save(model.state_dict(), ck / "checkpoints")
            torch.save({"state": {}, "param_groups": []}, ck / "optimizer")
            saved[(m, e)] = (model, params)
    return exp, saved


def test_model_zoos_reader_and_conversion(tmp_path):
    exp, saved = write_model_zoos(tmp_path / "raw")
    zoo = load_model_zoos(exp, ZooCNN, X28)
    assert len(zoo) == 9
    meta = {(int(r["model_id"]), int(r["epoch"])): r for r in zoo.metadata}
    assert set(meta) == set(saved)
    r = meta[(1, 2)]
    assert r["trial"].startswith("NN_tune_trainable_00001") and r["model::nlin"] == "tanh"
    assert float(r["optim::lr"]) == pytest.approx(6e-4) and r["seed"] == "2" and r["model::dropout"] == "0.0"
    assert float(r["test_acc"]) == pytest.approx(0.21) and r["training_iteration"] == "2" and r["trial_id"] == "abc1"
    assert not {"timestamp", "hostname", "config", "done", "time_this_iter_s"} & set(r)
    assert meta[(0, 2)]["test_acc"] == "" and meta[(0, 1)]["test_acc"] != ""  # no result line: empty metrics
    for (m, e), (model, _) in saved.items():
        sd = zoo.state_dict(m, e)
        assert list(sd) == zoo.spec.names
        assert all(torch.equal(a, b) for a, b in zip(sd.values(), model.state_dict().values()))
        # the dropout model's keys are shifted (module_list.4 vs .3) and were matched by position
        with torch.no_grad():
            torch.testing.assert_close(zoo.model(m, e)(X28), model.eval()(X28), rtol=0, atol=0)

    out = convert_model_zoos(exp, tmp_path / "unf", ZooCNN, X28, chunk_size=4, progress=False)
    assert out.complete and out.spec == zoo.spec and len(out.shards) == 3
    assert [{k: v for k, v in r.items() if k != "chunk"} for r in out.metadata] == zoo.metadata
    for r in zoo.metadata:
        a, b = out.state_dict(r["model_id"], r["epoch"]), zoo.state_dict(r["model_id"], r["epoch"])
        assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ZooFormatError, match=r"built with other settings \(source\)"):
        convert_model_zoos(exp, tmp_path / "unf", ZooCNN, X28, epochs=[2], chunk_size=4, progress=False)

    last = load_model_zoos(exp, ZooCNN(), X28, epochs=[2], result_keys=["test_acc", "missing_key"])
    assert [(r["model_id"], r["epoch"]) for r in last.metadata] == [("0", "2"), ("1", "2"), ("2", "2")]
    assert set(last.metadata[1]) == {"model_id", "epoch", "trial", *saved[(1, 2)][1], "test_acc", "missing_key"}
    single = load_model_zoos(next(exp.glob("NN_*00001_*")), ZooCNN, X28)  # one model directory
    assert len(single) == 3 and single.metadata[0]["model_id"] == "0"


def test_model_zoos_refuses_unsafe_checkpoints_without_running_them(tmp_path):
    exp, _ = write_model_zoos(tmp_path / "raw", n_models=1, epochs=(0,))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create the marker if unpickled

    ck = next(exp.glob("NN_*/checkpoint_000000/checkpoints"))
    torch.save({"weight": Payload()}, ck)
    zoo = load_model_zoos(exp, ZooCNN, X28)
    with pytest.raises(ZooFormatError, match=r"checkpoint_000000/checkpoints: refused: loading it needs unsafe "
                                             r"unpickling .*weights_only=True"):
        zoo.state_dict(0, 0)
    assert not marker.exists()
    torch.save(nn.Linear(2, 2), ck)  # a whole pickled module is refused too
    with pytest.raises(ZooFormatError, match=r"checkpoints: refused: .*references torch\.nn\.modules\.linear\.Linear"):
        zoo.state_dict(0, 0)
    ck.write_bytes(b"\x00garbage")
    with pytest.raises(ZooFormatError, match=r"checkpoints: cannot be read as a weights-only torch checkpoint"):
        zoo.state_dict(0, 0)
    torch.save([torch.zeros(2)], ck)
    with pytest.raises(ZooFormatError, match=r"checkpoints: expected a state_dict \(a dict of tensors\), found list"):
        zoo.state_dict(0, 0)


def test_model_zoos_errors_name_the_file(tmp_path):
    exp, _ = write_model_zoos(tmp_path / "raw", n_models=3, epochs=(0, 1))
    trials = sorted(exp.glob("NN_*"))
    with pytest.raises(ZooFormatError, match="no model directories"):
        load_model_zoos(tmp_path, ZooCNN, X28)  # the parent of the experiment directory
    with pytest.raises(ZooFormatError, match=r"state_dict does not fit the model: missing keys .*module_list\.3"
                                             r".*unexpected keys .*module_list\.4.*'\]$"):
        load_model_zoos(exp, lambda: ZooCNN(0.0), X28, keys="exact").state_dict(2, 0)
    wrong = load_model_zoos(exp, lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), X28)
    with pytest.raises(ZooFormatError, match=r"checkpoint_000000/checkpoints: state_dict does not fit the model: "
                                             r"missing keys \['1\.weight', '1\.bias'\].*nor do its shapes in order"):
        wrong.state_dict(0, 0)

    (trials[1] / "result.json").write_text('{"training_iteration": 0}\n{"training_iteration": 1, oops}\n')
    with pytest.raises(ZooFormatError, match=r"00001_.*result\.json: line 2 is not valid JSON"):
        load_model_zoos(exp, ZooCNN, X28)
    (trials[1] / "result.json").write_text('{"test_acc": 0.5}\n')
    with pytest.raises(ZooFormatError, match=r"result\.json: line 1 has no integer 'training_iteration'"):
        load_model_zoos(exp, ZooCNN, X28)
    (trials[1] / "result.json").unlink()
    with pytest.raises(ZooFormatError, match=r"00001_.*result\.json: missing"):
        load_model_zoos(exp, ZooCNN, X28)
    (trials[1] / "result.json").write_text("")
    (trials[0] / "params.json").write_text('{"seed": 1,}')
    with pytest.raises(ZooFormatError, match=r"00000_.*params\.json: not valid JSON \(line 1"):
        load_model_zoos(exp, ZooCNN, X28)
    (trials[0] / "params.json").unlink()
    with pytest.raises(ZooFormatError, match=r"00000_.*params\.json: missing"):
        load_model_zoos(exp, ZooCNN, X28)
    (trials[0] / "params.json").write_text("{}")
    (trials[2] / "checkpoint_000001" / "checkpoints").unlink()
    with pytest.raises(ZooFormatError, match=r"00002_.*checkpoint_000001/checkpoints: missing"):
        load_model_zoos(exp, ZooCNN, X28)
