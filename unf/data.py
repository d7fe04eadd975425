r"""Small datasets as fixed, seeded train/test splits of tensors.

Embedded datasets ship with scikit-learn and need neither network nor disk:

* ``"digits"``: 8x8 handwritten digits as images ``[N, 1, 8, 8]`` in ``[0, 1]``.
* ``"digits-flat"``: the same data as vectors ``[N, 64]``.
* ``"iris"``, ``"wine"``, ``"breast_cancer"``: feature vectors ``[N, F]``,
  standardised with the mean/std of the *train* split.

Embedded datasets are split with a stratified, seeded
:func:`sklearn.model_selection.train_test_split`.

``"mnist"``, ``"fashion_mnist"`` and ``"cifar10"`` come from torchvision (an
optional dependency) with their official train/test split, as images
``[N, C, H, W]`` in ``[0, 1]``. They are read from ``root`` (default: ``$UNF_DATA``
or ``~/.cache/unf``) and fetched from the network only with ``download=True``.

Example::

    from unf import data
    split = data.load("digits", seed=0)
    for x, y in split.train_loader(batch_size=64):
        ...  # x: [B, 1, 8, 8] float32, y: [B] int64
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Split", "load", "available"]


@dataclass(frozen=True)
class Split:
    r"""A fixed train/test split.

    Attributes:
        x_train: Inputs ``[N_train, *input_shape]`` (float32).
        y_train: Class labels ``[N_train]`` (int64).
        x_test: Inputs ``[N_test, *input_shape]`` (float32).
        y_test: Class labels ``[N_test]`` (int64).
        num_classes: Number of classes.
        input_shape: Shape of one input, e.g. ``(1, 8, 8)`` or ``(4,)``.
        name: Dataset name as passed to :func:`load`.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    name: str

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.name!r}, train={len(self.y_train)}, "
                f"test={len(self.y_test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Split:
        r"""Returns a copy with tensors moved to ``device``; ``dtype`` applies to ``x`` only."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device=device, dtype=dtype),
            y_train=self.y_train.to(device=device),
            x_test=self.x_test.to(device=device, dtype=dtype),
            y_test=self.y_test.to(device=device),
        )

    def train_loader(self, batch_size: int, shuffle: bool = True,
                     generator: torch.Generator | None = None) -> DataLoader:
        r"""A :class:`DataLoader` over ``(x_train, y_train)``."""
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=batch_size,
                          shuffle=shuffle, generator=generator)

    def test_loader(self, batch_size: int) -> DataLoader:
        r"""A :class:`DataLoader` over ``(x_test, y_test)``, in order."""
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=batch_size)


# --- embedded (scikit-learn) datasets -------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sklearn_arrays(loader: str) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets

    x, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    x.flags.writeable = False  # the cache is shared: guard it
    y.flags.writeable = False
    return x, y


# name -> (sklearn loader, input_shape, scale, standardise)
_EMBEDDED: dict[str, tuple[str, tuple[int, ...], float, bool]] = {
    "digits": ("load_digits", (1, 8, 8), 16.0, False),
    "digits-flat": ("load_digits", (64,), 16.0, False),
    "iris": ("load_iris", (4,), 1.0, True),
    "wine": ("load_wine", (13,), 1.0, True),
    "breast_cancer": ("load_breast_cancer", (30,), 1.0, True),
}

_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def available() -> list[str]:
    r"""Names accepted by :func:`load`: embedded ones first, then torchvision ones."""
    return [*_EMBEDDED, *_TORCHVISION]


def _split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Stratified, seeded ``(train_idx, test_idx)`` into ``y``."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                            random_state=seed)


def _load_embedded(name: str, test_fraction: float, seed: int) -> Split:
    loader, shape, scale, standardise = _EMBEDDED[name]
    x, y = _sklearn_arrays(loader)
    train_idx, test_idx = _split_indices(y, test_fraction, seed)
    # Fancy indexing copies, so callers get fresh tensors and cannot touch the cache.
    x_train, x_test = torch.from_numpy(x[train_idx]), torch.from_numpy(x[test_idx])
    x_train, x_test = x_train / scale, x_test / scale
    if standardise:  # statistics of the train split only
        mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-8)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Split(
        x_train=x_train.reshape(-1, *shape), y_train=torch.from_numpy(y[train_idx]),
        x_test=x_test.reshape(-1, *shape), y_test=torch.from_numpy(y[test_idx]),
        num_classes=int(y.max()) + 1, input_shape=shape, name=name)


# --- torchvision datasets -------------------------------------------------------------

def _default_root() -> str:
    return os.environ.get("UNF_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "unf")


def _load_torchvision(name: str, root: str | None, download: bool) -> Split:
    try:
        import torchvision.datasets
    except Exception as e:  # missing, or broken (e.g. built for another torch version)
        raise ImportError(
            f"Dataset {name!r} needs a working torchvision matching torch {torch.__version__}: "
            f"`pip install torchvision` ({type(e).__name__}: {e}). The embedded datasets "
            f"{list(_EMBEDDED)} work without it.") from e

    root = os.path.expanduser(root or _default_root())
    cls: Callable = getattr(torchvision.datasets, _TORCHVISION[name])

    def tensors(train: bool) -> tuple[Tensor, Tensor]:
        try:
            ds = cls(root, train=train, download=download)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            if download:
                raise
            raise FileNotFoundError(
                f"Dataset {name!r} not found under {root!r}. Pass `download=True` to fetch it "
                f"(or set UNF_DATA to a directory that holds it).") from e
        x = torch.as_tensor(np.asarray(ds.data)).float() / 255.0
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # [N, C, H, W]
        return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    (x_train, y_train), (x_test, y_test) = tensors(True), tensors(False)
    return Split(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                 num_classes=10, input_shape=tuple(x_train.shape[1:]), name=name)


# --- entry point ----------------------------------------------------------------------

def load(name: str, *, test_fraction: float = 0.2, seed: int = 0, root: str | None = None,
         download: bool = False) -> Split:
    r"""Loads dataset ``name`` as a fixed train/test :class:`Split`.

    Args:
        name: One of :func:`available`.
        test_fraction: Fraction of samples held out for testing, in ``(0, 1)``. Ignored by
            torchvision datasets, which use their official split.
        seed: Seed of the stratified split (embedded datasets).
        root: Directory of torchvision datasets; defaults to ``$UNF_DATA`` or
            ``~/.cache/unf``.
        download: Allow torchvision datasets to be fetched from the network.

    Returns:
        A :class:`Split` with float32 inputs ``[N, *input_shape]`` and int64 labels ``[N]``.
    """
    if name not in _EMBEDDED and name not in _TORCHVISION:
        raise ValueError(f"Unknown dataset {name!r}; available: {available()}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if name in _TORCHVISION:
        return _load_torchvision(name, root, download)
    return _load_embedded(name, test_fraction, seed)
