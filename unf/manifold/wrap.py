"""``wrap(model, manifold)``: an existing model whose Linear/Conv2d layers live on a weight manifold."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable

import torch
import torch.nn as nn

from .basis import check_context, check_manifold
from .layers import ManifoldConv2d, ManifoldLayer, ManifoldLinear

__all__ = ["ManifoldModel", "manifold_layers", "wrap"]


def manifold_layers(model: nn.Module) -> list[tuple[str, ManifoldLayer]]:
    """The manifold layers of ``model`` with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ManifoldLayer)]


class ManifoldModel(nn.Module):
    """``model(x, s)``: runs the wrapped module on ``x`` with every manifold layer at the per-example contexts
    ``s`` (``[batch]``; torus ``[batch, 2]``). The layers read ``s`` from the call, so any forward structure works;
    one call at a time per model (the context is set for the duration of the call)."""

    def __init__(self, module: nn.Module, manifold: str):
        super().__init__()
        self.module, self.manifold = module, check_manifold(manifold)

    @contextlib.contextmanager
    def context(self, s):
        """Set the context of every manifold layer for the body (for code that calls ``self.module`` itself)."""
        layers = [m for _, m in manifold_layers(self.module)]
        for m in layers:
            m._context = s
        try:
            yield
        finally:
            for m in layers:
                m._context = None

    def forward(self, x: torch.Tensor, s) -> torch.Tensor:
        s = check_context(self.manifold, s, batch=x.shape[0])
        with self.context(s):
            return self.module(x)


def wrap(model: nn.Module, manifold: str, layers: Iterable[type] = (nn.Linear, nn.Conv2d), copy_model: bool = True
         ) -> ManifoldModel:
    """Replace ``model``'s Linear and Conv2d layers by manifold layers and return a model that takes ``(x, s)``.

    The new layers start on a constant manifold, ``W(s) = W`` for every ``s`` (line: both basis points are ``W``;
    circle and torus: the constant term is ``W``, the others zero), so the wrapped model computes the original
    function until it is trained. ``copy_model=False`` replaces the layers in ``model`` itself."""
    check_manifold(manifold)
    kinds = tuple(layers)
    model = copy.deepcopy(model) if copy_model else model
    found = 0

    def convert(parent: nn.Module) -> None:
        nonlocal found
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and nn.Linear in kinds:
                setattr(parent, name, ManifoldLinear.from_linear(child, manifold))
                found += 1
            elif isinstance(child, nn.Conv2d) and nn.Conv2d in kinds:
                setattr(parent, name, ManifoldConv2d.from_conv(child, manifold))
                found += 1
            else:
                convert(child)

    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise ValueError("model: wrap a model that contains layers; for one layer use ManifoldLinear/ManifoldConv2d")
    convert(model)
    if not found:
        raise ValueError(f"model: no nn.Linear or nn.Conv2d layer to put on the {manifold}")
    return ManifoldModel(model, manifold)
