"""Built-in zoos on the embedded digits data: ``digits-mlp`` and ``digits-cnn``.

Hyperparameters are sampled per network as in the Small CNN Zoo (Unterthiner et al. 2020): activation, initialisation
scale, L2 weight decay, dropout, learning rate, optimizer and training fraction. Networks are trained as populations
(one per activation, so that no member pays for the others' activations), evaluated on the train and test splits at
the saved epochs, and written chunk by chunk (resumable).

The stored state_dicts are those of the plain architectures :func:`mlp` / :func:`cnn` (activation and dropout are
constructor arguments, recorded in the metadata), so they load into ordinary modules and the weights carry no
hyperparameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .. import data
from ..spec import spec_from_module
from .population import (ACTIVATIONS, Member, MemberDropout, MixedActivation, evaluate_population,
                         make_population, train_population)
from .store import Zoo, build

_PLAIN_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def mlp(activation: str = "relu", dropout: float = 0.0, population: bool = False) -> nn.Module:
    """MLP 64-32-32-10 on flattened digits."""
    act = MixedActivation if population else _PLAIN_ACT[activation]
    drop = (lambda: MemberDropout()) if population else (lambda: nn.Dropout(dropout))
    return nn.Sequential(nn.Linear(64, 32), act(), drop(), nn.Linear(32, 32), act(), drop(), nn.Linear(32, 10))


def cnn(activation: str = "relu", dropout: float = 0.0, population: bool = False) -> nn.Module:
    """Small CNN Zoo style on 8x8 digits: 3 conv layers of 8 channels (the last two with stride 2), global average
    pooling, a linear head (1,338 parameters). Input: flattened digits ``[B, 64]``."""
    act = MixedActivation if population else _PLAIN_ACT[activation]
    drop = (lambda: MemberDropout()) if population else (lambda: nn.Dropout(dropout))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                         nn.Conv2d(1, 8, 3, padding=1), act(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), act(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), act(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), drop(), nn.Linear(8, 10))


@dataclass(frozen=True)
class ZooConfig:
    architecture: Callable[..., nn.Module]
    epochs: int
    save_epochs: tuple
    default_size: int


ZOOS = {"digits-mlp": ZooConfig(mlp, epochs=10, save_epochs=(1, 4, 10), default_size=2000),
        "digits-cnn": ZooConfig(cnn, epochs=10, save_epochs=(1, 4, 10), default_size=2000)}


# Sampled activations. Sigmoid stays trainable in a population but is left out of the grid: in 10 epochs on digits
# 86% of sigmoid CNNs stayed at chance, and a zoo of tied chance-level targets teaches a predictor little (the Small
# CNN Zoo dropped its bad runs for the same reason).
GRID_ACTIVATIONS = ("relu", "tanh", "gelu")
GRID_VERSION = 2  # recorded in a zoo's manifest; bump when sample_members changes, so no zoo resumes on another grid


def sample_members(n: int, seed: int, first_id: int = 0) -> list[Member]:
    """Hyperparameters in the spirit of the Small CNN Zoo grid (log-uniform rates, discrete choices).

    Learning-rate ranges are set so that the low end still learns within the zoo's 10 epochs (the slowest runs are
    under-trained, the fastest may diverge): Adam 10^U(-3, -1.75), SGD 10^U(-1.5, -0.25)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        optimizer = str(rng.choice(["adam", "sgd"]))
        lr = float(10 ** rng.uniform(-3, -1.75)) if optimizer == "adam" else float(10 ** rng.uniform(-1.5, -0.25))
        out.append(Member(seed=first_id + i, lr=lr, init_scale=float(10 ** rng.uniform(-0.3, 0.3)),
                          weight_decay=float(rng.choice([0.0, 1e-4, 1e-3, 1e-2])),
                          dropout=float(rng.choice([0.0, 0.1, 0.3])), activation=str(rng.choice(GRID_ACTIVATIONS)),
                          optimizer=optimizer, train_fraction=float(rng.choice([0.1, 0.25, 0.5, 1.0]))))
    return out


def _plain_state_dict(sd: dict) -> dict:
    """Drop the population-only buffers (activation choice, dropout rate)."""
    return {k: v for k, v in sd.items() if not (k.endswith(".choice") or k.endswith(".p"))}


def build_builtin(name: str, out: str, num_models: Optional[int] = None, seed: int = 0, chunk_size: int = 250,
                  progress: bool = True, device: torch.device | str = "cpu") -> Zoo:
    """Build (or resume) built-in zoo ``name`` in directory ``out``, training on ``device``. Hyperparameters and
    seeds do not depend on the device (the manifest does not record it); trained weights agree across devices to
    float rounding."""
    if name not in ZOOS:
        raise ValueError(f"unknown zoo {name!r}; built-in zoos: {sorted(ZOOS)}")
    cfg = ZOOS[name]
    n = cfg.default_size if num_models is None else num_models
    split = data.load("digits-flat")
    spec = spec_from_module(cfg.architecture(), split.x_train[:2])
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    x_test, y_test = split.x_test.to(device), split.y_test.to(device)
    chunks = (n + chunk_size - 1) // chunk_size

    def make_chunk(c: int):
        first = c * chunk_size
        members = sample_members(min(chunk_size, n - first), seed * 1_000_003 + c, first_id=first)
        records, sds = [], []
        for act in ACTIVATIONS:  # one population per activation
            group = [m for m in members if m.activation == act]
            if not group:
                continue
            pop = make_population(lambda: cfg.architecture(population=True), group).to(device)

            def on_epoch(epoch, pop, group=group):
                if epoch not in cfg.save_epochs:
                    return
                train_loss, train_acc = evaluate_population(pop, x_train, y_train)
                test_loss, test_acc = evaluate_population(pop, x_test, y_test)
                for i, (m, sd) in enumerate(zip(group, pop.state_dicts())):
                    records.append({"model_id": m.seed, "epoch": epoch, **m.to_dict(),
                                    "train_loss": float(train_loss[i]), "train_acc": float(train_acc[i]),
                                    "test_loss": float(test_loss[i]), "test_acc": float(test_acc[i]),
                                    "generalization_gap": float(train_acc[i] - test_acc[i])})
                    sds.append(_plain_state_dict(sd))

            train_population(pop, x_train, y_train, cfg.epochs, batch_size=64, seed=seed,
                             on_epoch=on_epoch)
        return records, sds

    info = {"architecture": f"unf.zoo.builtin:{cfg.architecture.__name__}", "data": "digits-flat (split seed 0)",
            "num_models": n, "seed": seed, "epochs": cfg.epochs, "save_epochs": list(cfg.save_epochs),
            "grid": GRID_VERSION}
    return build(out, spec, chunks, make_chunk, name=name, info=info, progress=progress)
