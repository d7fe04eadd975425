"""Predict a property of trained networks (test accuracy, ...) from their weights, behind one interface."""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import DeepSetsEncoder, StatNN, UNFEncoder
from ..spec import WeightSpaceSpec
from .dataset import regression_metrics, split_by_run
from .store import Zoo


def _gmn(spec: WeightSpaceSpec, hidden: int) -> nn.Module:
    from ..nn.graph import GraphMetanetwork  # needs torch_geometric (imported only when asked for)

    return GraphMetanetwork(spec, hidden=hidden, out_features=1)


PREDICTORS: dict[str, Callable[[WeightSpaceSpec, int], nn.Module]] = {
    # fold_max=0: conv kernel taps as pseudo-groups with positional encodings instead of 9x channels; ten times
    # cheaper on the digits CNN zoo (20 s instead of ~200 s per epoch on 2 cores). readout="stats": the invariant
    # features include StatNN's statistics of the input, so the equivariant trunk adds to that prior
    "unf": lambda spec, hidden: UNFEncoder(spec, 1, hidden, 1, depth=2, head_hidden=4 * hidden, fold_max=0,
                                           readout="stats"),
    "statnn": lambda spec, hidden: StatNN(spec, 1, 1, hidden=4 * hidden),
    "deepsets": lambda spec, hidden: DeepSetsEncoder(spec, 1, 4 * hidden, 1),
    "gmn": _gmn,
}


def fit_predictor(zoo: Zoo, model: str = "unf", target: str = "test_acc", seed: int = 0, epochs: int = 20,
                  batch_size: int = 64, lr: float = 1e-3, hidden: int = 16, fractions=(0.8, 0.1, 0.1),
                  augment: bool = False, clip: Optional[float] = 10.0, progress: bool = False,
                  device: torch.device | str = "cpu", predictions: bool = False) -> dict:
    """Train a predictor on the train split (runs never straddle splits), pick its epoch on the validation split,
    and report Kendall tau, R^2 and MAE on the test split.

    Inputs are normalised per tensor with robust training-split statistics (median, IQR / 1.349) and clipped at
    ``+-clip`` of those units: zoos hold a few diverged networks whose weights are up to 10^6 times the typical ones,
    and with mean/std scaling those few set the scale for everyone (BENCHMARKS.md shows the effect on StatNN).
    Targets are standardised with training-split mean and std. Training runs on ``device`` (the split, the
    normalisation statistics and the permutations sampled for ``augment`` stay on the CPU, so a seed gives the same
    split and order on every device). ``predictions``: add the test split's ``"predictions"`` and ``"targets"``."""
    if model not in PREDICTORS:
        raise ValueError(f"unknown predictor {model!r}; choose from {sorted(PREDICTORS)}")
    torch.manual_seed(seed)
    rows = zoo.metadata
    if not rows or target not in rows[0]:
        raise ValueError(f"target {target!r} is not a column of {zoo.root}/metadata.csv")
    train, val, test = split_by_run(rows, fractions, seed)
    ws = zoo.weight_space()
    y = torch.tensor([float(r[target]) for r in rows])
    train_ws = _subset(ws, train)
    stats = train_ws.tensor_stats(robust=True)
    ws = ws.normalize(stats, clip=clip).to(device)
    mu, sd = y[train].mean(), y[train].std().clamp_min(1e-8)
    z = ((y - mu) / sd).to(device)  # standardised targets
    net = PREDICTORS[model](zoo.spec, hidden).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = math.inf, None
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc=f"fitting {model}", unit="epoch")
    train_idx = torch.tensor(train)
    for _ in epoch_iter:
        net.train()
        order = train_idx[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(train), batch_size):
            idx = order[i:i + batch_size]
            batch = _subset(ws, idx.tolist())
            if augment:
                batch = batch.permute(zoo.spec.sample_permutation(gen))
            loss = F.mse_loss(net(batch).squeeze(1), z[idx.to(device)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_loss = F.mse_loss(_predict(net, ws, val, batch_size), z[val]).item()
        if val_loss < best:
            best, best_state = val_loss, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    pred = _predict(net, ws, test, batch_size).cpu() * sd + mu
    out = {"model": model, "target": target, "seed": seed, "epochs": epochs, "clip": clip,
           **regression_metrics(pred, y[test]),
           "n_train": len(train), "n_val": len(val), "n_test": len(test), "val_mse": best}
    if predictions:
        out.update(predictions=pred.tolist(), targets=y[test].tolist())
    return out


def _subset(ws, idx):
    return ws.map(lambda t: t[idx])


@torch.no_grad()
def _predict(net: nn.Module, ws, rows, batch_size: int) -> torch.Tensor:
    net.eval()
    return torch.cat([net(_subset(ws, rows[i:i + batch_size])).squeeze(1) for i in range(0, len(rows), batch_size)])
