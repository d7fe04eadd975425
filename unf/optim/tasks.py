"""Evaluation tasks for learned optimizers, outside the meta-training distribution, and one training loop for all.

``TASKS``: name -> :class:`EvalTask`. None was meta-trained on: a wider and deeper digits MLP, the digits CNN (a family
never meta-trained on), an MLP on breast cancer (a dataset never seen), a horizon 5x the meta-training maximum, a GRU
on a synthetic sequence task, and a 4x wider MLP (for divergence).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the tuning grid for Adam (7 values, log-spaced)
SGD_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # and for SGD with momentum 0.9


def mlp(inp: int, widths, out: int, activation: type = nn.ReLU) -> nn.Module:
    layers, w = [], inp
    for h in widths:
        layers += [nn.Linear(w, h), activation()]
        w = h
    return nn.Sequential(*layers, nn.Linear(w, out))


class GRUClassifier(nn.Module):
    """Token ids ``[B, T]`` -> class logits: embedding, one GRU layer, a linear head on the last step."""

    def __init__(self, vocab: int = 6, dim: int = 16, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(vocab, dim), nn.GRU(dim, hidden, batch_first=True), \
            nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


def majority_data(seed: int = 0, n_train: int = 2000, n_test: int = 1000, length: int = 12, vocab: int = 6):
    """Synthetic sequences, fixed by ``seed``: is token 0 more frequent than token 1? (``x_tr, y_tr, x_te, y_te``)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (n_train + n_test, length), generator=g)
    y = ((x == 0).sum(1) > (x == 1).sum(1)).long()
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _embedded(name: str):
    def load():
        from .. import data

        s = data.load(name)
        return s.x_train, s.y_train, s.x_test, s.y_test
    return load


@dataclass(frozen=True)
class EvalTask:
    data: Callable  # () -> (x_train, y_train, x_test, y_test)
    model: Callable  # () -> nn.Module
    batch_size: int
    horizon: int


def _cnn():
    from ..zoo.builtin import cnn

    return cnn()


H = 200  # MetaConfig().max_horizon of the shipped weights
TASKS = {
    "digits-mlp-256x4": EvalTask(_embedded("digits-flat"), lambda: mlp(64, [256] * 4, 10), 128, H),
    "digits-cnn": EvalTask(_embedded("digits-flat"), _cnn, 64, H),
    "breast-cancer-mlp": EvalTask(_embedded("breast_cancer"), lambda: mlp(30, [64, 64], 2), 32, H),
    "digits-mlp-5xH": EvalTask(_embedded("digits-flat"), lambda: mlp(64, [64, 64], 10), 64, 5 * H),
    "majority-gru": EvalTask(majority_data, GRUClassifier, 64, H),
    "digits-mlp-512x2": EvalTask(_embedded("digits-flat"), lambda: mlp(64, [512] * 2, 10), 64, H),
}


@torch.no_grad()
def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on all of ``(x, y)`` in eval mode."""
    from ..training import evaluate

    return evaluate(model, x, y)


def train_curve(task: EvalTask, make_optimizer: Callable[[nn.Module, torch.Tensor], torch.optim.Optimizer],
                seed: int, eval_every: int = 10, steps: int | None = None, device="cpu") -> dict:
    """Train ``task``'s model (seeded init and batches) with ``make_optimizer(model, example_input)``.

    Returns the full-batch training and test losses every ``eval_every`` steps (``None`` where not finite), final
    test accuracy, whether it diverged (final training loss not finite or above twice the initial), whether it stalled
    (final training loss not below half the initial: e.g. a network collapsed to chance), and seconds."""
    xtr, ytr, xte, yte = (t.to(device) for t in task.data())
    torch.manual_seed(seed)
    model = task.model().to(device)
    opt = make_optimizer(model, xtr[:1])
    g = torch.Generator().manual_seed(seed)
    clean = lambda v: v if math.isfinite(v) else None  # noqa: E731 (JSON has no NaN)
    train, test = [full_loss(model, xtr, ytr)[0]], [full_loss(model, xte, yte)[0]]
    t0 = time.perf_counter()
    for step in range(1, (steps or task.horizon) + 1):
        idx = torch.randint(len(xtr), (task.batch_size,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        if step % eval_every == 0:
            train.append(full_loss(model, xtr, ytr)[0])
            test.append(full_loss(model, xte, yte)[0])
    seconds = time.perf_counter() - t0
    test_loss, test_acc = full_loss(model, xte, yte)
    return {"train": [clean(v) for v in train], "test": [clean(v) for v in test], "eval_every": eval_every,
            "test_acc": test_acc if math.isfinite(test_loss) else 0.0,
            "diverged": not math.isfinite(train[-1]) or train[-1] > 2 * train[0],
            "stalled": not math.isfinite(train[-1]) or train[-1] >= 0.5 * train[0], "seconds": seconds}


def steps_to_reach(curve: list, target: float) -> int | None:
    """Index of the first value <= ``target`` (``None``: never)."""
    for i, v in enumerate(curve):
        if v is not None and v <= target:
            return i
    return None


def speedup(reference: list, curve: list) -> float:
    """Steps ``reference`` needs to reach its best value / steps ``curve`` needs to reach it (0.0: never)."""
    best = min(v for v in reference if v is not None)
    n = steps_to_reach(curve, best)
    n_ref = steps_to_reach(reference, best)
    return 0.0 if n is None else max(n_ref, 1) / max(n, 1)


__all__ = ["ADAM_LRS", "EvalTask", "GRUClassifier", "SGD_LRS", "TASKS", "full_loss", "majority_data", "mlp", "speedup",
           "steps_to_reach", "train_curve"]
