"""Head-aware matching for attention (TransFusion, ICML 2025).

A *head group* permutes whole blocks: it only ever acts as an outer factor of a product whose inner factors are
groups too, e.g. ``("heads", "qk")``. Matching such a group by coordinate descent compares heads under the current
within-head permutations, which are arbitrary at the start. TransFusion instead compares heads by a signature that
no within-head permutation (and no permutation of the other axes) can change: the singular values of each head's
block of every projection it appears in. Heads are assigned by these signatures first, then everything else is
matched with the heads held.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..spec import WeightSpaceSpec
from .assignment import places, solve_assignment


def head_groups(spec: WeightSpaceSpec) -> list[str]:
    """Groups that act only as a non-innermost factor of products whose inner factors include a group."""
    out = []
    for g, where in places(spec).items():
        if where and all(p.j < len(p.factors) - 1 and _inner_has_group(spec, p) for p in where):
            out.append(g)
    return out


def _inner_has_group(spec: WeightSpaceSpec, p) -> bool:
    from ..spec.axes import _factors, _segments

    seg = _segments(spec[p.name].axes[p.axis])[p.segment]
    return any(isinstance(f, str) for f in _factors(seg)[p.j + 1:])


def head_signatures(spec: WeightSpaceSpec, group: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N, heads, features]``: per head, the singular values of its block in every place of ``group``."""
    feats = []
    for p in places(spec, list(tensors))[group]:
        x = tensors[p.name]  # [N, *shape]
        seg = x.narrow(p.axis + 1, p.start, p.length)
        shape = list(seg.shape)
        seg = seg.reshape(*shape[:p.axis + 1], *p.factors, *shape[p.axis + 2:])
        head_dim = p.axis + 1 + p.j
        inner = list(range(head_dim + 1, head_dim + len(p.factors) - p.j))
        seg = seg.movedim([head_dim] + inner, list(range(1, 2 + len(inner))))
        n_inner = 1
        for d in range(2, 2 + len(inner)):
            n_inner *= seg.shape[d]
        block = seg.reshape(seg.shape[0], seg.shape[1], n_inner, -1)  # [N, heads, within-head, rest]
        feats.append(torch.linalg.svdvals(block))
    return torch.cat(feats, dim=2)


def match_heads(spec: WeightSpaceSpec, reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                groups: list[str]) -> dict[str, torch.Tensor]:
    """``[N, heads]`` permutations of each head group from signature distances (independent of all other groups)."""
    out = {}
    for g in groups:
        ref, oth = head_signatures(spec, g, reference), head_signatures(spec, g, other)
        dist = torch.cdist(ref.expand(oth.shape[0], *ref.shape[1:]), oth)
        out[g] = solve_assignment(-dist.square())
    return out
