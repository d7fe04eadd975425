"""Symmetric uniform per-tensor weight quantisation (the grid of PSG, Kim et al. NeurIPS 2020).

``b`` bits give the restricted range ``-(2^(b-1)-1) .. 2^(b-1)-1`` (3 levels at 2 bits, 7 at 3, 15 at 4), step
``delta = max|w| / (2^(b-1)-1)``; values are rounded to the nearest level (ties to even, as ``torch.round``).
``quantize_model`` quantises a trained model's Linear/Conv weights (every parameter with two or more dimensions);
below 4 bits its first and last such layers stay at 8 bits, as the PSG paper (and most low-bit work) does. Biases
and normalisation parameters stay in full precision.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = ["check_bits", "layer_bits", "levels", "quantization_mse", "quantize", "quantize_model", "step_size"]


def check_bits(bits, name: str = "bits") -> int:
    """``bits`` as an int >= 2 (1 bit has no symmetric restricted grid), or a ValueError naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(f"{name}: expected an integer number of bits >= 2, got {bits!r}")
    return bits


def levels(bits: int) -> int:
    """The largest integer level ``2^(b-1) - 1`` of the restricted symmetric grid."""
    return 2 ** (check_bits(bits) - 1) - 1


def step_size(w: torch.Tensor, bits: int, max_abs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The grid step ``max|w| / (2^(b-1)-1)`` (a 0-d tensor); ``max_abs`` replaces ``max|w|`` (a running range)."""
    m = w.detach().abs().amax() if max_abs is None else torch.as_tensor(max_abs, dtype=w.dtype, device=w.device)
    return m / levels(bits)


def quantize(w: torch.Tensor, bits: int, max_abs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Q(w)``: ``w`` ([any shape]) rounded to the nearest point of the symmetric ``bits``-bit grid.

    ``max_abs`` (a float or 0-d tensor) fixes the range instead of ``max|w|``, e.g. a running mean of it as in the
    paper; entries beyond the range are clipped to the outermost level. An all-zero tensor stays zero."""
    n = levels(bits)
    delta = step_size(w, bits, max_abs)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    return torch.where(delta > 0, torch.round(w / safe).clamp(-n, n) * safe, torch.zeros_like(w))


def _weights(model: nn.Module, skip: Iterable[str]) -> list[str]:
    skip = set(skip)
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    unknown = skip - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"skip: {sorted(unknown)} are not parameter names of the model "
                         f"(its weights: {names[:6]}{'...' if len(names) > 6 else ''})")
    return [n for n in names if n not in skip]


def layer_bits(model: nn.Module, bits: int, skip: Iterable[str] = (), first_last_bits: Optional[int] = 8
               ) -> dict[str, int]:
    """Bits per quantised weight: every parameter with >= 2 dimensions not in ``skip``, in registration order
    (``named_parameters``, the forward order of a ``Sequential``). Below 4 bits the first and last get
    ``first_last_bits`` (None: no exception)."""
    check_bits(bits)
    names = _weights(model, skip)
    out = {n: bits for n in names}
    if first_last_bits is not None and bits < 4 and names:
        check_bits(first_last_bits, "first_last_bits")
        out[names[0]] = out[names[-1]] = first_last_bits
    return out


def _bits_map(model: nn.Module, bits: Union[int, Mapping[str, int]], skip, first_last_bits) -> dict[str, int]:
    if isinstance(bits, Mapping):
        known = dict(model.named_parameters())
        bad = [n for n in bits if n not in known]
        if bad:
            raise ValueError(f"bits: {bad} are not parameter names of the model")
        return {n: check_bits(b, f"bits[{n!r}]") for n, b in bits.items()}
    return layer_bits(model, bits, skip, first_last_bits)


def quantize_model(model: nn.Module, bits: Union[int, Mapping[str, int]], skip: Iterable[str] = (),
                   first_last_bits: Optional[int] = 8, inplace: bool = False) -> nn.Module:
    """Post-training weight quantisation: a copy of ``model`` (``inplace=True``: the model itself) whose weights
    (parameters with >= 2 dims, names in ``skip`` excluded) are replaced by ``quantize(w, bits)``; first and last
    layer at ``first_last_bits`` below 4 bits. ``bits`` may also be a mapping ``{name: bits}`` of exactly the
    parameters to quantise (then ``skip`` and ``first_last_bits`` are not used)."""
    plan = _bits_map(model, bits, skip, first_last_bits)
    out = model if inplace else copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for n, b in plan.items():
            params[n].copy_(quantize(params[n], b))
    return out


def quantization_mse(model: nn.Module, bits: Union[int, Mapping[str, int]], skip: Iterable[str] = (),
                     first_last_bits: Optional[int] = 8) -> float:
    """Mean squared quantisation error ``mean (w - Q(w))^2`` over every quantised weight entry of ``model`` (the
    entries ``quantize_model`` with the same arguments changes)."""
    plan = _bits_map(model, bits, skip, first_last_bits)
    params = dict(model.named_parameters())
    with torch.no_grad():
        sq = sum(float((params[n] - quantize(params[n], b)).double().pow(2).sum()) for n, b in plan.items())
        count = sum(params[n].numel() for n in plan)
    return sq / max(count, 1)
