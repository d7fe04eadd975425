"""Couplings of source noise and target networks for flow matching.

- ``ot_pairing``: minibatch optimal transport (Tong et al. 2023; Pooladian et al. 2023): for equal batch sizes the
  OT plan under squared Euclidean cost is a permutation, found by scipy's assignment solver. Straighter paths, fewer
  solver steps.
- ``align_source``: permute each noise sample's hidden units towards its target by weight matching (``unf.align``).
  The source N(0, I) is invariant under the spec's permutations, so this leaves the source distribution unchanged
  while removing path length that only reflects the symmetry.
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


def align_source(x0: WeightSpace, x1: WeightSpace, max_iter: int = 10, seed: int = 0) -> WeightSpace:
    """``x0`` (noise, ``[B, 1]``) with each sample permuted to best match the target ``x1[b]``, by batched weight
    matching over every float tensor (:func:`unf.align.matching.match_batched`, as ``unf.align.weight_matching``:
    an exact permuted copy is recovered)."""
    spec = x0.spec
    ref = {n: x1[n][:, 0].float() for n in spec.float_names}
    oth = {n: x0[n][:, 0].float() for n in spec.float_names}
    perms, _ = match_batched(spec, ref, oth, max_iter=max_iter, seed=seed)
    out = {n: permute_batched(spec, n, x0[n][:, 0], perms)[:, None] for n in spec.float_names}
    return WeightSpace(spec, out, x0.extras)
