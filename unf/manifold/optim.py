"""``MetricCorrected``: basis gradients times the inverse metric of the manifold, then the inner optimizer's step.

The loss averaged over contexts has gradient ``dL/dP_k = int c_k(s) dL/dW(s) ds``; steepest descent in the metric of
the weights on the manifold (``||dW||^2 = int ||sum_k c_k(s) dP_k||^2 ds = dP^T G dP``) is ``-G^{-1} dL/dP``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..optim.wrapper import GradientWrapper
from .basis import metric_inverse
from .wrap import manifold_layers

__all__ = ["MetricCorrected"]


class MetricCorrected(GradientWrapper):
    """Wrap ``optimizer`` so that every manifold layer's ``basis`` and ``basis_bias`` gradients (``[K, ...]``) are
    multiplied by ``G^{-1}`` (:func:`~unf.manifold.metric_inverse`) along ``K`` before the inner step; other
    parameters keep their gradients. ``model``: the module holding the manifold layers (e.g. ``wrap``'s result).

    Example::

        opt = MetricCorrected(torch.optim.SGD(model.parameters(), lr=0.05), model)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        super().__init__(optimizer)
        layers = manifold_layers(model)
        if not layers:
            raise ValueError("model: it has no manifold layer (ManifoldLinear/ManifoldConv2d); build them or use "
                             "unf.manifold.wrap(model, manifold)")
        ids = {id(p) for p in self.params()}
        self._targets = []  # (parameter, manifold)
        for name, m in layers:
            for p in (m.basis, m.basis_bias):
                if p is not None and id(p) in ids:
                    self._targets.append((p, m.manifold))
        if not self._targets:
            raise ValueError(f"optimizer: none of the manifold layers' parameters ({layers[0][0]}.basis, ...) is in "
                             "it; build the optimizer from the same model's parameters")
        self._inverse: dict = {}

    def _g_inv(self, manifold: str, like: torch.Tensor) -> torch.Tensor:
        key = (manifold, like.device, like.dtype)
        if key not in self._inverse:
            self._inverse[key] = metric_inverse(manifold, dtype=like.dtype, device=like.device)
        return self._inverse[key]

    def transform_grads(self) -> None:
        for p, manifold in self._targets:
            if p.grad is not None:
                g = p.grad.reshape(p.shape[0], -1)
                p.grad.copy_((self._g_inv(manifold, g) @ g).reshape(p.shape))
