"""Checking a spec on its model: how much the output moves when the weights are permuted by the spec."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .spec import WeightSpaceSpec


@torch.no_grad()
def symmetry_error(model: nn.Module, spec: WeightSpaceSpec, example_inputs, num_permutations: int = 3,
                   seed: int = 0) -> float:
    """Worst relative change ``max|f_P(x) - f(x)| / max|f(x)|`` of ``model``'s output over ``num_permutations``
    permutations sampled from ``spec`` (seeded). A sound spec gives rounding error only (about 1e-15 in float64).

    The model is used in the mode it is in (put it in ``eval()`` where dropout or BatchNorm statistics would differ
    between calls); ``example_inputs``: one input or a tuple of positional inputs; the output must be a tensor."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    y = model(*args)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"symmetry_error needs a model whose output is a tensor, got {type(y).__name__}; wrap the "
                        "model so that it returns the tensor to compare")
    gen = torch.Generator().manual_seed(seed)
    scale = y.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
    worst = 0.0
    for _ in range(num_permutations):
        other = copy.deepcopy(model)
        other.load_state_dict(spec.permute(model.state_dict(), spec.sample_permutation(gen)))
        worst = max(worst, ((other(*args) - y).abs().max() / scale).item())
    return worst


__all__ = ["symmetry_error"]
