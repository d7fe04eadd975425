"""Align models to a reference by permutation (:mod:`unf.align`) before merging their task vectors."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..align import align_many
from ..spec import Permutation, WeightSpaceSpec
from .methods import merge
from .task_vector import TaskVector, check_compatible

StateDict = Mapping[str, torch.Tensor]


def align_then_merge(models: Sequence[StateDict], reference: StateDict, spec: WeightSpaceSpec,
                     method: str = "task_arithmetic", base: Optional[StateDict] = None, *,
                     weights: Optional[Sequence[float]] = None, density: float = 1.0, lam: float = 1.0,
                     seed: int = 0, align: bool = True, **align_kwargs) -> tuple[dict, list[Permutation]]:
    """Weight-match every model to ``reference`` (``unf.align.align_many``), then merge their task vectors
    relative to ``base`` (default: ``reference``, e.g. the shared pretrained model).

    Returns the merged state_dict (``base`` plus the merged vector) and the permutation applied to each model.
    Experts fine-tuned from ``reference`` stay in its basin, so their permutations come out as the identity;
    experts from other initialisations, or permuted/protected copies, are moved into it. ``align=False`` merges
    as they are (for comparison). ``align_kwargs`` go to ``align_many`` (``max_iter``, ``init``, ...).
    """
    models = list(models)
    base = reference if base is None else base
    for i, sd in enumerate(models):
        check_compatible(reference, sd, f"reference and model #{i}")
    perms = align_many(spec, reference, models, seed=seed, **align_kwargs) if align \
        else [spec.identity() for _ in models]
    tvs = [TaskVector(base, spec.permute(sd, p), spec) for sd, p in zip(models, perms)]
    merged = merge(tvs, method, weights=weights, density=density, lam=lam, seed=seed)
    return merged.apply(base, 1.0), perms
