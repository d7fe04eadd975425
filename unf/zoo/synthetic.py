"""Zoos whose answer is known: permuted, noised copies of a few base networks (the generator's diagnostic ladder).

An *orbit zoo* holds, for each base network, ``copies`` random members of its permutation orbit (the spec's
symmetries, so every copy computes the base's function), each plus Gaussian noise of ``noise`` times each base
tensor's std. A generator of such a zoo is right when its samples are, after alignment (``unf.align``), close to a
base network, and new when they are not themselves training copies.
"""
from __future__ import annotations

import torch

from ..weights import WeightSpace


def orbit_zoo(base: WeightSpace, copies: int, noise: float = 0.01, seed: int = 0,
              identity_first: bool = False) -> tuple[WeightSpace, torch.Tensor]:
    """``copies`` permuted, noised copies of every base network.

    ``base``: ``WeightSpace[K, 1]``. Returns the zoo ``WeightSpace[K * copies, 1]`` (base ``k``'s copies at rows
    ``k * copies ... (k + 1) * copies - 1``) and the base index of every row ``[K * copies]`` (long). Every copy gets
    its own permutation (``spec.sample_permutation``) and noise ``N(0, (noise * std_t)^2)`` per entry of tensor ``t``
    (``std_t``: the std of that tensor in its base network). ``identity_first``: the first copy of each base is not
    permuted (a copy in the base's own coordinates). Drawn from ``seed`` on the CPU, so a seed gives the same zoo on
    every device."""
    if base.channels != 1:
        raise ValueError(f"orbit_zoo: base must have 1 channel, got {base.channels}")
    if copies < 1:
        raise ValueError(f"orbit_zoo: copies={copies} must be >= 1")
    if noise < 0:
        raise ValueError(f"orbit_zoo: noise={noise} must be >= 0")
    gen = torch.Generator().manual_seed(seed)
    spec, parts = base.spec, []
    for k in range(base.batch_size):
        one = WeightSpace(spec, {n: t[k:k + 1] for n, t in base.items()})
        for c in range(copies):
            perm = spec.sample_permutation(gen)
            moved = one if identity_first and c == 0 else one.permute(
                {g: p.to(base.device) for g, p in perm.items()})
            noisy = {}
            for n, t in moved.items():
                eps = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
                noisy[n] = t + noise * one[n].std(unbiased=False) * eps
            parts.append(WeightSpace(spec, noisy))
    labels = torch.arange(base.batch_size).repeat_interleave(copies)
    return WeightSpace.cat(parts), labels


def nearest_base(spec, samples: WeightSpace, base: WeightSpace, max_iter: int = 100,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """For every sample ``[N]``: its aligned L2 distance to each base network ``[N, K]`` (weight matching of the
    sample onto the base; exact for a permuted copy) and the index of the nearest base ``[N]``."""
    from ..flow.novelty import aligned_l2

    d = torch.stack([aligned_l2(spec, samples, WeightSpace(spec, {n: t[k:k + 1] for n, t in base.items()}),
                                candidates=1, max_iter=max_iter, seed=seed)
                     for k in range(base.batch_size)], 1)
    return d, d.argmin(1)


__all__ = ["nearest_base", "orbit_zoo"]
