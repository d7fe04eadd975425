"""Task families for learned optimizers, the evaluation tasks, and one training loop for all.

A :class:`TaskFamily` is a model (one fresh initialisation per seed), a dataset, a loss, a batch size and a horizon:
the distribution a learned optimizer is meta-trained on (``unf.optim.meta_train(cfg, family)``) and tested on with
new seeds (:func:`train_curve`).

``TASKS``: name -> :class:`TaskFamily`, the held-out evaluation tasks of the shipped weights. None was meta-trained
on: a wider and deeper digits MLP, the digits CNN (a family never meta-trained on), an MLP on breast cancer (a dataset
never seen), a horizon 5x the meta-training maximum, a GRU on a synthetic sequence task, and a 4x wider MLP (for
divergence). ``FAMILIES``: the built-in families to meta-train on (issue 29's protocol), all cross-entropy on
classification data, minibatches of 64:

* ``"digits-mlp"``: 64-128-128-10 ReLU MLP on 8x8 digits (flattened), horizon 1,000.
* ``"digits-cnn-family"``: the digits CNN of ``unf.zoo.builtin.cnn`` (conv 1->8 3x3, conv 8->8 3x3 stride 2, conv
  8->8 3x3 stride 2, ReLU, global average pool, linear 8->10; 1,338 parameters), horizon 500.
* ``"majority-gru-family"``: :class:`GRUClassifier` (embedding 6x16, one GRU layer of 32 units, linear head 32->2 on
  the last step) on :func:`majority_data` (length-12 sequences, 2,000 training and 1,000 test), horizon 500.

Why 500: an Adam step of the CNN and of the GRU costs 1.7x and 2.8x the MLP's on one CPU thread (and a GRU
meta-training step runs its 17 members one by one, see ``unf.optim.meta``); at 500 steps a family's 5-seed evaluation
against 28 tuned baseline runs per seed stays within minutes on one core.
They are distinct from the held-out ``TASKS`` "digits-cnn" and "majority-gru" (same models, horizon 200).
:func:`get_family` resolves a name of either, or a ``FILE.py:FN`` reference.

``MIXES``: named lists of families that one rule is meta-trained on together (``meta_train(cfg, [f1, f2, ...])``: each
inner task is one of them, drawn uniformly). ``"broad"`` is the shipped default's mix; it leaves every ``TASKS`` entry
held out (other datasets, widths, depths, shapes and sequence tasks; not the digits CNN or the majority GRU):

* ``"iris-mlp-32"``: 4-32-3 ReLU MLP on iris, batch 32, horizon 200;
* ``"wine-mlp-64x2"``: 13-64-64-3 tanh MLP on wine, batch 32, horizon 200;
* ``"digits-mlp-96x3"``: 64-96-96-96-10 ReLU MLP on digits, batch 64, horizon 300;
* ``"digits-mlp-32x2-long"``: 64-32-32-10 GELU MLP on digits, batch 64, horizon 1,000 (long horizons);
* ``"digits-cnn-16x2"``: conv 1->16 3x3, conv 16->16 3x3 stride 2, ReLU, global average pool, linear 16->10, batch
  64, horizon 200;
* ``"parity-gru"``: embedding 4x8, a GRU of 16 units, linear head on the last step, on :func:`parity_data` (is the
  count of token 2 even; length-10 sequences of 4 tokens), batch 64, horizon 200.

:func:`get_families` resolves a comma-separated list of names, mix names and ``FILE.py:FN`` references.

Seeds: evaluation uses seeds below ``META_SEED_BASE`` (2**30); meta-training on a family draws its seeds from
``[META_SEED_BASE, 2**31)``, so a rule is never tested on an initialisation or batch order it was meta-trained on.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the tuning grid for Adam (7 values, log-spaced)
SGD_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # and for SGD with momentum 0.9
META_SEED_BASE = 1 << 30  # meta-training seeds are >= this, evaluation seeds below it

Data = tuple  # (x_train, y_train, x_test, y_test)


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


def parity_data(seed: int = 0, n_train: int = 2000, n_test: int = 1000, length: int = 10, vocab: int = 4):
    """Synthetic sequences, fixed by ``seed``: is the count of token 2 even? (``x_tr, y_tr, x_te, y_te``)"""
    g = torch.Generator().manual_seed(seed + 17)
    x = torch.randint(vocab, (n_train + n_test, length), generator=g)
    y = ((x == 2).sum(1) % 2 == 0).long()
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _embedded(name: str):
    def load():
        from .. import data

        s = data.load(name)
        return s.x_train, s.y_train, s.x_test, s.y_test
    return load


class TaskFamily:
    """A family of training tasks: one model architecture trained on one dataset, at any seed.

    ``model(seed) -> nn.Module``: a freshly initialised model for ``seed`` (callers also seed the global RNG with it
    first, so a factory that ignores ``seed`` is still reproducible). ``data``: ``(x_train, y_train, x_test, y_test)``
    tensors, or a zero-argument callable returning them (called once, on first use). ``loss(output, target)``: a
    scalar tensor, the mean over the batch (e.g. ``F.cross_entropy``, ``F.mse_loss``); it must work on one model's
    output, and is vmapped over a population's members where possible. Minibatches of ``batch_size`` are drawn from
    the training split with replacement by a generator seeded with the task's seed; a task is ``horizon`` steps.
    ``name``: how runs and checkpoints record the family (default: the model factory's name).

    Classification (accuracy reported beside the loss): integer training targets, unless ``classification`` says.
    """

    def __init__(self, model: Callable[[int], nn.Module], data: Union[Data, Callable[[], Data]],
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int, horizon: int,
                 name: Optional[str] = None, *, classification: Optional[bool] = None):
        if not callable(model):
            raise TypeError(f"TaskFamily: model must be a callable seed -> nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"TaskFamily: loss must be a callable (output, target) -> scalar, got "
                            f"{type(loss).__name__}")
        for what, v in (("batch_size", batch_size), ("horizon", horizon)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TaskFamily: {what} must be a positive int, got {v!r}")
        self.model, self.loss, self.batch_size, self.horizon = model, loss, batch_size, horizon
        self.name = name if name is not None else getattr(model, "__qualname__", type(model).__name__)
        self.named = name is not None
        self._data = data if callable(data) else _check_data(data, self.name)
        self._classification = classification

    def __repr__(self) -> str:
        return f"TaskFamily({self.name!r}, batch_size={self.batch_size}, horizon={self.horizon})"

    def data(self) -> Data:
        """``(x_train, y_train, x_test, y_test)``, loaded on first use."""
        if callable(self._data):
            try:
                loaded = self._data()
            except Exception as e:  # the user's loader: say which family's data failed, keep the cause
                raise ValueError(f"task family {self.name!r}: loading its data failed ({type(e).__name__}: {e})") \
                    from e
            self._data = _check_data(loaded, self.name)
        return self._data

    @property
    def classification(self) -> bool:
        if self._classification is None:
            y = self.data()[1]
            self._classification = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
        return self._classification

    def build(self, seed: int) -> nn.Module:
        """``model(seed)`` after seeding the global RNG with ``seed``; refuses anything but an ``nn.Module``."""
        torch.manual_seed(seed)
        m = self.model(seed)
        if not isinstance(m, nn.Module):
            raise TypeError(f"task family {self.name!r}: model({seed}) returned {type(m).__name__}, not an nn.Module")
        return m

    def spec(self):
        """The parameters-only weight-space spec of the family's model (the rule's plan and ``unf-exact`` need it)."""
        from .. import spec_from_module

        with torch.random.fork_rng(devices=[]):  # building a model here must not move anyone's random stream
            m = self.build(0)
        x = self.data()[0]
        return spec_from_module(m, x[:1]).subset(dict(m.named_parameters()))

    def fingerprint(self) -> str:
        """A hash of what a meta-trained rule depends on: the model's spec, the data's shapes and dtypes, the loss,
        batch size and horizon (not the data's values: retraining on refreshed data of the same shape is allowed)."""
        desc = {"spec": json.loads(self.spec().to_json()), "batch_size": self.batch_size, "horizon": self.horizon,
                "loss": getattr(self.loss, "__qualname__", type(self.loss).__name__),
                "data": [[list(t.shape), str(t.dtype)] for t in self.data()]}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def loss_and_accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
                          ) -> tuple[float, Optional[float]]:
        """The family's loss over all of ``(x, y)`` (batches weighted by size, eval mode) and the accuracy, for
        classification (else ``None``)."""
        if self.loss is F.cross_entropy:  # the shared evaluation loop (the numbers of earlier runs stay the same)
            from ..training import evaluate

            loss, acc = evaluate(model, x, y, batch_size)
            return loss, acc if self.classification else None
        was = model.training
        model.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out, yb = model(x[i:i + batch_size]), y[i:i + batch_size]
                total += float(self.loss(out, yb)) * len(yb)
                if self.classification:
                    correct += int((out.argmax(1) == yb).sum())
        model.train(was)
        return total / len(x), (correct / len(x) if self.classification else None)


def _check_data(data, name: str) -> Data:
    """``data`` as a 4-tuple of tensors with matching lengths, or a ``ValueError`` naming the tensor."""
    names = ("x_train", "y_train", "x_test", "y_test")
    if not isinstance(data, Sequence) or len(data) != 4:
        raise ValueError(f"task family {name!r}: data must be (x_train, y_train, x_test, y_test), got "
                         f"{type(data).__name__}{f' of length {len(data)}' if isinstance(data, Sequence) else ''}")
    for n, t in zip(names, data):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"task family {name!r}: {n} is a {type(t).__name__}, not a tensor")
    for xs, ys in ((0, 1), (2, 3)):
        if len(data[xs]) != len(data[ys]) or len(data[xs]) == 0:
            raise ValueError(f"task family {name!r}: {names[xs]} has {len(data[xs])} rows and {names[ys]} "
                             f"{len(data[ys])}; they must match and be non-empty")
    return tuple(data)


def _seeded(make: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    """A zero-argument model constructor as a ``model(seed)`` factory (seeds the global RNG first)."""
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return make()
    build.__qualname__ = getattr(make, "__qualname__", "model")
    return build


def _cnn():
    from ..zoo.builtin import cnn

    return cnn()


def _family(name: str, data, make, batch_size: int, horizon: int) -> TaskFamily:
    return TaskFamily(_seeded(make), data, F.cross_entropy, batch_size, horizon, name=name)


H = 200  # MetaConfig().max_horizon of the shipped weights
TASKS = {name: _family(name, *rest) for name, *rest in (
    ("digits-mlp-256x4", _embedded("digits-flat"), lambda: mlp(64, [256] * 4, 10), 128, H),
    ("digits-cnn", _embedded("digits-flat"), _cnn, 64, H),
    ("breast-cancer-mlp", _embedded("breast_cancer"), lambda: mlp(30, [64, 64], 2), 32, H),
    ("digits-mlp-5xH", _embedded("digits-flat"), lambda: mlp(64, [64, 64], 10), 64, 5 * H),
    ("majority-gru", majority_data, GRUClassifier, 64, H),
    ("digits-mlp-512x2", _embedded("digits-flat"), lambda: mlp(64, [512] * 2, 10), 64, H),
)}
# families to meta-train on (issue 29's protocol: meta-train on a family, test on new seeds of it); architectures and
# horizons are fixed in the module docstring
FAMILIES = {
    "digits-mlp": _family("digits-mlp", _embedded("digits-flat"), lambda: mlp(64, [128, 128], 10), 64, 1000),
    "digits-cnn-family": _family("digits-cnn-family", _embedded("digits-flat"), _cnn, 64, 500),
    "majority-gru-family": _family("majority-gru-family", majority_data, GRUClassifier, 64, 500),
}


def _cnn16():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


MIXES = {"broad": [_family(name, *rest) for name, *rest in (
    ("iris-mlp-32", _embedded("iris"), lambda: mlp(4, [32], 3), 32, 200),
    ("wine-mlp-64x2", _embedded("wine"), lambda: mlp(13, [64, 64], 3, nn.Tanh), 32, 200),
    ("digits-mlp-96x3", _embedded("digits-flat"), lambda: mlp(64, [96] * 3, 10), 64, 300),
    ("digits-mlp-32x2-long", _embedded("digits-flat"), lambda: mlp(64, [32, 32], 10, nn.GELU), 64, 1000),
    ("digits-cnn-16x2", _embedded("digits-flat"), _cnn16, 64, 200),
    ("parity-gru", parity_data, lambda: GRUClassifier(vocab=4, dim=8, hidden=16), 64, 200),
)]}


def get_families(ref: str) -> list:
    """``A,B,...`` -> the families named (each as :func:`get_family` resolves it; a name of ``MIXES`` stands for its
    families). Raises ``ValueError`` for an unknown name or a family named twice."""
    out: list = []
    for part in (p.strip() for p in ref.split(",")):
        if not part:
            raise ValueError(f"task {ref!r}: an empty name in the list")
        out.extend(MIXES[part] if part in MIXES else [get_family(part)])
    names = [f.name for f in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"task {ref!r}: {', '.join(twice)} named more than once")
    return out


def get_family(ref: str) -> TaskFamily:
    """A built-in family (a name of ``FAMILIES`` or ``TASKS``) or ``FILE.py:FN`` / ``module:FN``, where ``FN()``
    returns a :class:`TaskFamily` (its name defaults to ``ref``). Raises ``ValueError`` saying what is wrong."""
    known = {**TASKS, **FAMILIES, **{f.name: f for fams in MIXES.values() for f in fams}}
    if ref in known:
        return known[ref]
    if ":" not in ref:
        raise ValueError(f"task {ref!r}: not a built-in family ({', '.join(sorted(known))}) and not FILE.py:FN")
    from ..io import load_factory

    fn = load_factory(ref, kind="task")
    try:
        fam = fn()
    except Exception as e:
        raise ValueError(f"task {ref!r}: calling it failed ({type(e).__name__}: {e})") from e
    if not isinstance(fam, TaskFamily):
        raise ValueError(f"task {ref!r} returned {type(fam).__name__}, not a unf.optim.TaskFamily")
    if not fam.named:  # record where it came from (the file's absolute path: a resume from elsewhere still matches)
        target, _, attr = ref.rpartition(":")
        fam.name = f"{Path(target).resolve()}:{attr}" if target.endswith(".py") or "/" in target else ref
    return fam


@torch.no_grad()
def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on all of ``(x, y)`` in eval mode (see ``TaskFamily.loss_and_accuracy``)."""
    from ..training import evaluate

    return evaluate(model, x, y)


SCHEDULES = ("constant", "cosine")


def train_curve(task: TaskFamily, make_optimizer: Callable[[nn.Module, torch.Tensor], torch.optim.Optimizer],
                seed: int, eval_every: int = 10, steps: Optional[int] = None, device="cpu",
                schedule: str = "constant") -> dict:
    """Train ``task``'s model at ``seed`` (its initialisation and batch order) with ``make_optimizer(model,
    example_input)`` on the family's loss; ``schedule="cosine"`` decays the learning rate to zero over the steps
    (a baseline that knows the horizon, as a learned rule can).

    Returns the full-batch training and test losses every ``eval_every`` steps (``None`` where not finite), final
    test accuracy (``None`` unless the family is classification), whether it diverged (final training loss not finite
    or above twice the initial), whether it stalled (final training loss not below half the initial: e.g. a network
    collapsed to chance), and seconds."""
    xtr, ytr, xte, yte = (t.to(device) for t in task.data())
    model = task.build(seed).to(device)
    opt = make_optimizer(model, xtr[:1])
    n = steps or task.horizon
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose from {SCHEDULES}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / n))) \
        if schedule == "cosine" else None
    g = torch.Generator().manual_seed(seed)
    clean = lambda v: v if math.isfinite(v) else None  # noqa: E731 (JSON has no NaN)
    measure = lambda x, y: task.loss_and_accuracy(model, x, y)[0]  # noqa: E731
    train, test = [measure(xtr, ytr)], [measure(xte, yte)]
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        idx = torch.randint(len(xtr), (task.batch_size,), generator=g).to(device)
        opt.zero_grad()
        task.loss(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % eval_every == 0:
            train.append(measure(xtr, ytr))
            test.append(measure(xte, yte))
    seconds = time.perf_counter() - t0
    test_loss, test_acc = task.loss_and_accuracy(model, xte, yte)
    if test_acc is not None and not math.isfinite(test_loss):
        test_acc = 0.0
    return {"train": [clean(v) for v in train], "test": [clean(v) for v in test], "eval_every": eval_every,
            "test_acc": test_acc, "diverged": not math.isfinite(train[-1]) or train[-1] > 2 * train[0],
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


__all__ = ["ADAM_LRS", "FAMILIES", "GRUClassifier", "META_SEED_BASE", "MIXES", "SCHEDULES", "SGD_LRS", "TASKS",
           "TaskFamily", "full_loss", "get_families", "get_family", "majority_data", "mlp", "parity_data", "speedup",
           "steps_to_reach", "train_curve"]
