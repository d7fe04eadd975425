"""A torch Dataset of weight spaces and targets read from a zoo, with splits by training run."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.stats import kendalltau

from ..weights import WeightSpace
from .store import Zoo


def split_by_run(rows: Sequence[Mapping], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                 run_key: str = "model_id") -> list[list[int]]:
    """Row indices of each split; all rows (epochs) of one training run land in the same split."""
    if abs(sum(fractions) - 1) > 1e-9 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions {tuple(fractions)} must be non-negative and sum to 1")
    runs = sorted({str(r[run_key]) for r in rows})
    order = np.random.default_rng(seed).permutation(len(runs))
    bounds = np.round(np.cumsum([0, *fractions]) * len(runs)).astype(int)
    which = {}
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        for i in order[a:b]:
            which[runs[i]] = s
    out: list[list[int]] = [[] for _ in fractions]
    for i, r in enumerate(rows):
        out[which[str(r[run_key])]].append(i)
    return out


class WeightDataset(torch.utils.data.Dataset):
    """Items ``(tensors, target)``: ``tensors`` name -> ``[1, *shape]`` (one channel), ``target`` a float.

    ``rows``: indices into ``zoo.metadata`` (e.g. one split); ``stats``: per-tensor normalisation (from
    :meth:`WeightSpace.tensor_stats` on the training split only, ``robust=True`` for zoos with diverged networks);
    ``clip``: clamp normalised entries to ``[-clip, clip]`` (only with ``stats``); ``augment``: apply a random
    permutation from the spec to every item (the target is invariant). Batch with :func:`collate`.
    """

    def __init__(self, zoo: Zoo, target: str, rows: Optional[Sequence[int]] = None,
                 stats: Optional[Mapping[str, tuple]] = None, augment: bool = False, seed: int = 0,
                 clip: Optional[float] = None):
        self.zoo, self.target, self.stats, self.augment, self.clip = zoo, target, stats, augment, clip
        self.rows = list(range(len(zoo.metadata))) if rows is None else list(rows)
        missing = [i for i in self.rows if target not in zoo.metadata[i] or zoo.metadata[i][target] in ("", None)]
        if missing:
            raise ValueError(f"target {target!r} is missing in {len(missing)} rows of {zoo.root}/metadata.csv "
                             f"(columns: {sorted(zoo.metadata[0])})")
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.zoo.metadata[self.rows[i]]
        sd = self.zoo.state_dict(row["model_id"], row["epoch"])
        spec = self.zoo.spec
        if self.augment:
            sd = spec.permute(sd, spec.sample_permutation(self.generator))
        ws = WeightSpace(spec, {n: sd[n].float()[None, None] for n in spec.float_names})  # batch 1, channel 1
        if self.stats is not None:
            ws = ws.normalize(self.stats, clip=self.clip)
        return {n: t[0] for n, t in ws.items()}, torch.tensor(float(row[self.target]))


def collate(spec):
    """A ``collate_fn`` turning items into ``(WeightSpace[B, 1], targets[B])``."""
    def fn(items):
        tensors = {n: torch.stack([t[n] for t, _ in items]) for n in spec.float_names}
        return WeightSpace(spec, tensors), torch.stack([y for _, y in items])
    return fn


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Kendall's tau, R^2 and mean absolute error of predictions ``[N]`` against targets ``[N]``."""
    pred, target = pred.detach().double().flatten(), target.detach().double().flatten()
    tau = kendalltau(pred.numpy(), target.numpy()).statistic
    ss_res = (pred - target).square().sum()
    ss_tot = (target - target.mean()).square().sum()
    return {"kendall_tau": float(tau), "r2": float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan"),
            "mae": float((pred - target).abs().mean())}
