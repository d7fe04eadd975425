import sys
import types

import numpy as np
import pytest
import torch

from unf import data

EMBEDDED = {  # name -> (N, input_shape, num_classes)
    "digits": (1797, (1, 8, 8), 10),
    "digits-flat": (1797, (64,), 10),
    "iris": (150, (4,), 3),
    "wine": (178, (13,), 3),
    "breast_cancer": (569, (30,), 2),
}


def _has_torchvision() -> bool:
    try:
        import torchvision.datasets  # noqa: F401
    except Exception:  # missing, or broken (built for another torch)
        return False
    return True


HAS_TORCHVISION = _has_torchvision()


def test_available():
    names = data.available()
    assert set(EMBEDDED) <= set(names)
    assert {"mnist", "fashion_mnist", "cifar10"} <= set(names)


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_shapes_dtypes_and_sizes(name):
    n, shape, num_classes = EMBEDDED[name]
    s = data.load(name, test_fraction=0.25)
    assert s.name == name and s.input_shape == shape and s.num_classes == num_classes
    assert s.x_train.dtype == s.x_test.dtype == torch.float32
    assert s.y_train.dtype == s.y_test.dtype == torch.int64
    assert s.x_train.shape[1:] == s.x_test.shape[1:] == shape
    assert len(s.x_train) == len(s.y_train) and len(s.x_test) == len(s.y_test)
    assert len(s.y_train) + len(s.y_test) == n
    assert abs(len(s.y_test) - 0.25 * n) <= 1
    assert str(len(s.y_train)) in repr(s) and str(len(s.y_test)) in repr(s)


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_split_is_stratified(name):
    s = data.load(name, test_fraction=0.3)
    y = torch.cat([s.y_train, s.y_test])
    total, test = torch.bincount(y), torch.bincount(s.y_test, minlength=s.num_classes)
    assert (total > 0).all() and len(total) == s.num_classes
    assert ((test - 0.3 * total).abs() <= 1).all()


def test_split_indices_disjoint_and_complete():
    _, y = data._sklearn_arrays("load_digits")
    train_idx, test_idx = data._split_indices(y, 0.2, seed=0)
    assert not set(train_idx) & set(test_idx)
    assert sorted([*train_idx, *test_idx]) == list(range(len(y)))


def test_determinism_and_seed_dependence():
    a, b = data.load("digits", seed=3), data.load("digits", seed=3)
    for t in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, t), getattr(b, t))
    c = data.load("digits", seed=4)
    assert c.x_test.shape == a.x_test.shape and not torch.equal(c.x_test, a.x_test)


def test_fresh_tensors_do_not_corrupt_cache():
    a = data.load("iris")
    a.x_train.zero_()
    a.y_train.fill_(7)
    b = data.load("iris")
    assert b.x_train.abs().sum() > 0 and (b.y_train < 3).all()


def test_digits_range_and_flat_matches_images():
    img, flat = data.load("digits"), data.load("digits-flat")
    for x in (img.x_train, img.x_test):
        assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert torch.equal(img.x_train.flatten(1), flat.x_train)
    assert torch.equal(img.y_test, flat.y_test)


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer"])
def test_standardised_with_train_stats(name):
    s = data.load(name)
    mean, std = s.x_train.mean(0), s.x_train.std(0, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)
    # Test data was not used for the statistics, so it is not exactly standardised.
    assert (s.x_test.mean(0).abs() > 1e-3).any()
    # Test features are transformed with the train statistics.
    x_raw, y = data._sklearn_arrays(data._EMBEDDED[name][0])
    train_idx, test_idx = data._split_indices(y, 0.2, seed=0)
    raw_train = torch.from_numpy(x_raw[train_idx])
    expect = (torch.from_numpy(x_raw[test_idx]) - raw_train.mean(0)) / raw_train.std(0, unbiased=False)
    torch.testing.assert_close(s.x_test, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["nope", "MNIST", ""])
def test_unknown_name(name):
    with pytest.raises(ValueError, match="available") as e:
        data.load(name)
    assert "digits" in str(e.value) and "iris" in str(e.value)


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction(frac):
    with pytest.raises(ValueError, match="test_fraction"):
        data.load("iris", test_fraction=frac)


def test_to_moves_x_dtype_only():
    s = data.load("iris").to("cpu", torch.float64)
    assert s.x_train.dtype == s.x_test.dtype == torch.float64
    assert s.y_train.dtype == s.y_test.dtype == torch.int64
    assert s.name == "iris" and s.num_classes == 3


def test_loaders():
    s = data.load("digits")
    g = torch.Generator().manual_seed(0)
    batches = list(s.train_loader(batch_size=100, generator=g))
    assert batches[0][0].shape == (100, 1, 8, 8) and batches[0][1].shape == (100,)
    assert sum(len(y) for _, y in batches) == len(s.y_train)
    g2 = torch.Generator().manual_seed(0)
    again = next(iter(s.train_loader(batch_size=100, generator=g2)))
    assert torch.equal(batches[0][1], again[1])  # seeded shuffling is reproducible
    xs, ys = zip(*s.test_loader(batch_size=64))
    assert xs[0].shape == (64, 1, 8, 8)
    assert torch.equal(torch.cat(ys), s.y_test)  # test loader keeps order


# --- torchvision datasets ---------------------------------------------------------------

@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is importable")
def test_torchvision_missing_raises_helpful_import_error(tmp_path):
    with pytest.raises(ImportError, match="pip install torchvision") as e:
        data.load("mnist", root=str(tmp_path))
    assert "digits" in str(e.value)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not importable")
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_missing_files_raise(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="download=True") as e:
        data.load(name, root=str(tmp_path))
    assert str(tmp_path) in str(e.value)
    assert not any(tmp_path.rglob("*.gz")) and not any(tmp_path.rglob("*.tar.gz"))


def test_import_error_when_torchvision_blocked(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        data.load("cifar10")


def _fake_torchvision(monkeypatch, cls_name, make):
    datasets = types.ModuleType("torchvision.datasets")
    setattr(datasets, cls_name, make)
    tv = types.ModuleType("torchvision")
    tv.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_fake_torchvision_not_found_and_no_download(monkeypatch, tmp_path):
    calls = []

    def missing(root, train, download):
        calls.append(download)
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    _fake_torchvision(monkeypatch, "MNIST", missing)
    with pytest.raises(FileNotFoundError, match="download=True") as e:
        data.load("mnist", root=str(tmp_path))
    assert str(tmp_path) in str(e.value) and calls == [False]


def test_fake_torchvision_default_root_from_env(monkeypatch, tmp_path):
    roots = []

    def missing(root, train, download):
        roots.append(root)
        raise RuntimeError("Dataset not found")

    _fake_torchvision(monkeypatch, "FashionMNIST", missing)
    monkeypatch.setenv("UNF_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        data.load("fashion_mnist")
    assert roots == [str(tmp_path)]


def test_fake_torchvision_conversion(monkeypatch):
    class FakeCIFAR:  # torchvision stores CIFAR as uint8 numpy [N, H, W, C] and list targets
        def __init__(self, root, train, download):
            n = 6 if train else 4
            self.data = np.full((n, 32, 32, 3), 255, dtype=np.uint8)
            self.data[..., 0] = 0
            self.targets = list(range(n))

    _fake_torchvision(monkeypatch, "CIFAR10", FakeCIFAR)
    s = data.load("cifar10", test_fraction=0.9)  # test_fraction ignored: official split
    assert s.x_train.shape == (6, 3, 32, 32) and s.x_test.shape == (4, 3, 32, 32)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.x_train[:, 0].max() == 0 and s.x_train[:, 1:].min() == 1
    assert s.y_test.tolist() == [0, 1, 2, 3]
