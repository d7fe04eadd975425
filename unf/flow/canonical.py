"""Canonicalise a zoo before fitting a flow: bring every network into one permutation of its hidden units.

A flat (MLP) velocity sees units by position, so a zoo whose networks sit in arbitrary permutations is a
multi-modal target; DeepWeightFlow aligns it by Git Re-Basin to one reference. An equivariant field with a symmetric
source should need this less: the benchmark measures both.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch

from ..align.matching import align_many, merge_many, permute_batched
from ..weights import WeightSpace

MODES = ("none", "reference", "barycentre")


def canonicalize(ws: WeightSpace, mode: str = "reference", reference: int = 0, seed: int = 0,
                 max_iter: int = 100, rounds: int = 5) -> WeightSpace:
    """``ws`` ``[N, 1]`` with each network permuted: ``"reference"`` aligns all to network ``reference`` (weight
    matching); ``"barycentre"`` iterates towards the zoo's barycentre (MergeMany, at most ``rounds`` rounds);
    ``"none"`` returns ``ws``. Functions are unchanged: only hidden units move."""
    if mode not in MODES:
        raise ValueError(f"canonicalize mode {mode!r}: choose from {MODES}")
    if mode == "none":
        return ws
    if ws.channels != 1:
        raise ValueError(f"canonicalize needs 1-channel weight spaces, got {ws.channels}")
    spec = ws.spec
    sds = [{n: ws[n][i, 0] for n in spec.float_names} for i in range(ws.batch_size)]
    if mode == "reference":
        perms = align_many(spec, sds[reference], sds, max_iter=max_iter, seed=seed)
    else:
        perms, _ = merge_many(spec, sds, max_iter=rounds, seed=seed)
    return permute_stacked(ws, perms)


def permute_stacked(ws: WeightSpace, perms: Sequence) -> WeightSpace:
    """Apply one permutation per batch member (``perms[i]``: group -> ``[n]``) to ``ws`` ``[N, C]``."""
    spec = ws.spec
    stacked = {g: torch.stack([torch.as_tensor(p[g]) for p in perms]).to(ws.device) for g in spec.groups}
    out = {}
    for n, t in ws.items():
        out[n] = torch.stack([permute_batched(spec, n, t[:, c], stacked) for c in range(t.shape[1])], 1)
    return WeightSpace(spec, out, ws.extras)


def reference_index(rows: Sequence[Mapping]) -> int:
    """The network most accurate on its training split (metadata ``train_acc``; ties: the first). Without a
    ``train_acc`` column: network 0, with a warning. Test accuracy is never read: it is for reports only."""
    if not rows or "train_acc" not in rows[0]:
        warnings.warn("the zoo's metadata has no train_acc column: canonicalisation aligns to network 0",
                      stacklevel=2)
        return 0
    acc = [float(r["train_acc"]) for r in rows]
    return max(range(len(acc)), key=lambda i: (acc[i], -i))
