"""Merging task vectors: task arithmetic, TIES, DARE (semantics of PEFT's ``merge_utils``).

Per tensor, with task vectors ``t_i`` and weights ``w_i``:

- ``task_arithmetic``: ``sum_i w_i t_i``.
- ``ties`` (Yadav et al. 2023): keep the ``density`` fraction of largest-magnitude entries of each ``t_i`` (top-k per
  tensor, ``k = int(density * numel)``); elect a sign per entry, the sign of ``sum_i w_i t_i`` over the kept entries
  (ties go to +); average ``w_i t_i`` over the tasks whose kept entry has the elected sign (disjoint mean; entries
  no task keeps are 0).
- ``dare_linear`` (Yu et al. 2024): keep each entry with probability ``density`` (Bernoulli), rescale kept entries
  by ``1 / density``, then the weighted sum.
- ``dare_ties``: the DARE drop-and-rescale, then TIES' sign election and disjoint mean.

The result is multiplied by ``lam``, so ``merged.apply(base, 1.0)`` is the merged model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .task_vector import TaskVector

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest-magnitude entries set to 0."""
    if density >= 1:
        return t.clone()
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    if k > 0:
        mask[t.abs().reshape(-1).topk(k).indices] = 1
    return t * mask.view(t.shape)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by ``1 / density``."""
    if density >= 1:
        return t.clone()
    keep = torch.rand(t.shape, generator=generator, dtype=torch.float64) < density  # drawn on CPU: reproducible
    return t * keep.to(t.device, t.dtype) / density


def sign_elected_mean(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' merge of ``[tasks, *shape]``: elect the sign of the weighted sum, average the agreeing weighted
    entries (zeros never agree)."""
    w = weights.view(-1, *([1] * (stacked.dim() - 1))).to(stacked)
    weighted = stacked * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked)
    agree = (weighted.sign() == elected).to(stacked)
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1.0)


def merge(task_vectors: Sequence[TaskVector], method: str = "task_arithmetic",
          weights: Optional[Sequence[float]] = None, density: float = 1.0, lam: float = 1.0,
          seed: int = 0) -> TaskVector:
    """Merge task vectors into one, already scaled by ``lam`` (see the module docstring for the methods).

    ``weights``: one per task vector (default 1 each). ``density`` in (0, 1]: the fraction kept by TIES' top-k or
    DARE's Bernoulli draw. ``seed``: DARE's draws (a CPU generator, so the result is device-independent).
    """
    tvs = list(task_vectors)
    if not tvs:
        raise ValueError("merge needs at least one task vector")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < density <= 1:
        raise ValueError(f"density={density}: must be in (0, 1]")
    for i, tv in enumerate(tvs[1:], 1):
        try:
            tvs[0]._check(tv)
        except ValueError as e:
            raise ValueError(f"task vector #{i} does not match task vector #0: {e}") from None
    w = torch.ones(len(tvs), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (len(tvs),):
        raise ValueError(f"weights: {w.numel()} given for {len(tvs)} task vectors")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in tvs[0].names:
        ts = [tv[name] for tv in tvs]
        if method == "ties":
            ts = [magnitude_prune(t, density) for t in ts]
        elif method.startswith("dare"):
            ts = [random_prune(t, density, gen) for t in ts]
        stacked = torch.stack(ts)
        if method in ("task_arithmetic", "dare_linear"):
            merged = (stacked * w.to(stacked).view(-1, *([1] * (stacked.dim() - 1)))).sum(0)
        else:
            merged = sign_elected_mean(stacked, w)
        out[name] = merged * lam
    return TaskVector.from_tensors(out, tvs[0].spec)
