"""Basis functions of the weight manifolds ``W(s) = sum_k c_k(s) P_k`` and their integrated metric.

* ``"line"`` (K=2): ``c(s) = (1 - s, s)``, ``s`` of shape ``[batch]`` (the segment is ``s`` in [0, 1]).
* ``"circle"`` (K=3): ``c(s) = (1, cos 2 pi s, sin 2 pi s)``, ``s`` of shape ``[batch]`` (one turn per unit of s).
* ``"torus"`` (K=9): ``c_{3i+j}(s) = a_i(s[:, 0]) a_j(s[:, 1])`` with ``a`` the circle basis, ``s`` of shape
  ``[batch, 2]``.

The metric ``G = int c(s) c(s)^T ds`` over the whole manifold (s in [0, 1] per coordinate) has closed forms: line
``[[1/3, 1/6], [1/6, 1/3]]``, circle ``diag(1, 1/2, 1/2)``, torus their Kronecker product.
"""
from __future__ import annotations

import math

import torch

MANIFOLDS = {"line": 2, "circle": 3, "torus": 9}

__all__ = ["MANIFOLDS", "check_manifold", "coefficients", "metric", "metric_inverse", "num_basis"]


def check_manifold(manifold: str, name: str = "manifold") -> str:
    if manifold not in MANIFOLDS:
        raise ValueError(f"{name}: expected one of {list(MANIFOLDS)}, got {manifold!r}")
    return manifold


def num_basis(manifold: str) -> int:
    """``K``, the number of basis points."""
    return MANIFOLDS[check_manifold(manifold)]


def _circle(s: torch.Tensor) -> torch.Tensor:
    t = 2 * math.pi * s
    return torch.stack([torch.ones_like(s), torch.cos(t), torch.sin(t)], -1)


def check_context(manifold: str, s, batch: int | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
    """``s`` as a float tensor ``[batch]`` (line/circle; a number or 0-d tensor is broadcast) or ``[batch, 2]``
    (torus), or a ValueError naming ``s``."""
    check_manifold(manifold)
    if not isinstance(s, torch.Tensor):
        s = torch.tensor(s)
    if like is not None:
        s = s.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.get_default_dtype())
    elif not s.is_floating_point():
        s = s.to(torch.get_default_dtype())
    if manifold == "torus":
        if s.dim() != 2 or s.shape[1] != 2:
            raise ValueError(f"s: the torus needs a context of shape [batch, 2] (one angle per circle, in turns), "
                             f"got {tuple(s.shape)}")
    else:
        if s.dim() == 0 and batch is not None:
            s = s.expand(batch)
        if s.dim() != 1:
            raise ValueError(f"s: the {manifold} needs a context of shape [batch] (one number per example), got "
                             f"{tuple(s.shape)}")
    if batch is not None and s.shape[0] != batch:
        raise ValueError(f"s: {s.shape[0]} contexts for a batch of {batch} inputs; give one per example")
    return s


def coefficients(manifold: str, s) -> torch.Tensor:
    """``c(s)``: ``[batch, K]`` for a context ``s`` of shape ``[batch]`` (torus: ``[batch, 2]``)."""
    s = check_context(manifold, s)
    if manifold == "line":
        return torch.stack([1 - s, s], -1)
    if manifold == "circle":
        return _circle(s)
    a, b = _circle(s[:, 0]), _circle(s[:, 1])
    return (a[:, :, None] * b[:, None, :]).reshape(s.shape[0], 9)


def metric(manifold: str, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The Gram matrix ``int c(s) c(s)^T ds`` over the manifold, ``[K, K]`` (closed form)."""
    check_manifold(manifold)
    line = torch.tensor([[1 / 3, 1 / 6], [1 / 6, 1 / 3]], dtype=torch.float64)
    circle = torch.diag(torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))
    g = {"line": line, "circle": circle, "torus": torch.kron(circle, circle)}[manifold]
    return g.to(dtype=dtype, device=device)


def metric_inverse(manifold: str, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``G^{-1}``, ``[K, K]`` (closed form): line ``[[4, -2], [-2, 4]]``, circle ``diag(1, 2, 2)``, torus
    ``kron(diag(1, 2, 2), diag(1, 2, 2))``."""
    check_manifold(manifold)
    line = torch.tensor([[4.0, -2.0], [-2.0, 4.0]], dtype=torch.float64)
    circle = torch.diag(torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64))
    g = {"line": line, "circle": circle, "torus": torch.kron(circle, circle)}[manifold]
    return g.to(dtype=dtype, device=device)
