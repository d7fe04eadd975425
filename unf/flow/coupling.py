"""Couplings of source noise and target networks for flow matching.

- ``ot_pairing``: minibatch optimal transport (Tong et al. 2023; Pooladian et al. 2023): for equal batch sizes the
  OT plan under squared Euclidean cost is a permutation, found by scipy's assignment solver. Straighter paths, fewer
  solver steps.
- ``align_source``: permute each noise sample's hidden units towards its target by weight matching (``unf.align``).
  The source N(0, I) is invariant under the spec's permutations, so this leaves the source distribution unchanged
  while removing path length that only reflects the symmetry.
- ``align_target``: the other way round, as the per-pair alignment of equivariant OT flow matching (Klein, Kraemer,
  Noe 2023): permute each target network towards its noise sample.
- ``aligned_ot_pairing``: the minibatch pairing chosen on aligned distances (the other half of equivariant OT flow
  matching), capped to a few candidates per target. A permuted network computes the same function, so the targets stay in the
  zoo's orbits; unlike ``align_source`` this keeps any source (also one whose entries are told apart).
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from ..align.matching import match_batched, permute_batched
from ..weights import WeightSpace


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """``x0``, ``x1``: ``[B, D]``. Returns ``idx`` ``[B]`` such that ``x0[idx]`` is paired with ``x1`` at least total
    squared distance."""
    if x0.shape != x1.shape:
        raise ValueError(f"ot_pairing needs equal batches: x0 {tuple(x0.shape)}, x1 {tuple(x1.shape)}")
    cost = torch.cdist(x1.double(), x0.double()).square().cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    idx = torch.empty(len(rows), dtype=torch.long)
    idx[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return idx.to(x0.device)


def aligned_ot_pairing(x0: WeightSpace, x1: WeightSpace, candidates: int = 4, max_iter: int = 10,
                       seed: int = 0) -> torch.Tensor:
    """Minibatch OT with aligned costs (equivariant OT flow matching, Klein, Kraemer, Noe 2023): ``idx`` ``[B]`` such
    that noise ``x0[idx[i]]`` is paired with target ``x1[i]`` at least total squared distance AFTER permuting each
    target towards its noise. All ``B x B`` alignments cost too much, so each target is matched only against its
    ``candidates`` nearest noise samples by raw distance (``B * candidates`` batched weight matchings per step); other
    pairs keep their raw cost (an upper bound of their aligned one)."""
    spec = x0.spec
    a, b = x0.flatten().double(), x1.flatten().double()
    cost = torch.cdist(b, a).square()  # [targets, noise]
    k = min(max(candidates, 1), a.shape[0])
    near = cost.topk(k, dim=1, largest=False).indices  # [B, k] noise candidates per target
    tgt = torch.arange(b.shape[0]).repeat_interleave(k)
    src = near.reshape(-1).cpu()
    pick = lambda ws, i: WeightSpace(spec, {n: t[i.to(t.device)] for n, t in ws.items()})  # noqa: E731
    moved = align_source(pick(x1, tgt), pick(x0, src), max_iter, seed)  # targets towards their candidate noise
    d = (moved.flatten().double() - a[src.to(a.device)]).square().sum(1).to(cost.device)
    t_, s_ = tgt.to(cost.device), src.to(cost.device)
    cost[t_, s_] = torch.minimum(cost[t_, s_], d)  # weight matching is a local search: never above the raw cost
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    idx = torch.empty(len(rows), dtype=torch.long)
    idx[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return idx.to(x0.flatten().device)


def align_source(x0: WeightSpace, x1: WeightSpace, max_iter: int = 10, seed: int = 0) -> WeightSpace:
    """``x0`` (``[B, 1]``) with each sample permuted to best match ``x1[b]``, by batched weight matching over every
    float tensor (:func:`unf.align.matching.match_batched`, as ``unf.align.weight_matching``: an exact permuted copy
    is recovered). Used both ways: noise towards targets, and (``align_target``) targets towards noise."""
    spec = x0.spec
    ref = {n: x1[n][:, 0].float() for n in spec.float_names}
    oth = {n: x0[n][:, 0].float() for n in spec.float_names}
    perms, _ = match_batched(spec, ref, oth, max_iter=max_iter, seed=seed)
    out = {n: permute_batched(spec, n, x0[n][:, 0], perms)[:, None] for n in spec.float_names}
    return WeightSpace(spec, out, x0.extras)


def align_target(x1: WeightSpace, x0: WeightSpace, max_iter: int = 10, seed: int = 0) -> WeightSpace:
    """``x1`` (targets, ``[B, 1]``) with each network permuted towards its noise sample ``x0[b]``."""
    return align_source(x1, x0, max_iter, seed)
