"""Where the groups of a spec act (:func:`places`) and the linear assignment solver: the primitives that weight
matching (:mod:`unf.align.matching`) and head matching (:mod:`unf.align.heads`) share."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..spec import WeightSpaceSpec
from ..spec.axes import _factors, _segments


@dataclass(frozen=True)
class Place:
    """Where a group acts: tensor ``name``, ``axis``, segment ``[start, start+length)``, factor ``j`` of ``factors``."""
    name: str
    axis: int
    start: int
    length: int
    factors: tuple  # sizes of the segment's factors
    j: int
    segment: int


def places(spec: WeightSpaceSpec, names: Optional[Sequence[str]] = None) -> dict[str, list[Place]]:
    """Every place each group acts on, in the tensors ``names`` (default: all float tensors)."""
    out: dict[str, list[Place]] = {g: [] for g in spec.groups}
    for name in (spec.float_names if names is None else names):
        for axis, entry in enumerate(spec[name].axes):
            if entry is None:
                continue
            start = 0
            for k, seg in enumerate(_segments(entry)):
                facs = _factors(seg)
                sizes = tuple(spec.groups[f] if isinstance(f, str) else f for f in facs)
                length = math.prod(sizes)
                for j, f in enumerate(facs):
                    if isinstance(f, str):
                        out[f].append(Place(name, axis, start, length, sizes, j, k))
                start += length
    return out


def solve_assignment(sim: torch.Tensor) -> torch.Tensor:
    """``[N, n, n]`` similarities -> ``[N, n]`` permutations maximising the total (one LAP per model)."""
    cost = sim.detach().to("cpu", torch.float64).numpy()
    out = np.empty(cost.shape[:2], dtype=np.int64)
    for m in range(cost.shape[0]):
        _, cols = linear_sum_assignment(cost[m], maximize=True)
        out[m] = cols
    return torch.from_numpy(out).to(sim.device)
