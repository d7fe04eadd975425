"""Walking the weight manifold (Benjamin et al.): weights as a function of a per-example context ``s``.

``ManifoldLinear`` / ``ManifoldConv2d`` hold basis points ``basis`` ``[K, out, in, ...]`` and ``basis_bias``
``[K, out]``; ``W(s) = sum_k c_k(s) P_k`` on a line, circle or torus (:mod:`unf.manifold.basis`). ``wrap(model,
manifold)`` puts an existing model on a manifold; ``MetricCorrected(optimizer, model)`` preconditions the basis
gradients by the inverse metric.

Example::

    model = unf.manifold.wrap(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), "circle")
    opt = unf.manifold.MetricCorrected(torch.optim.SGD(model.parameters(), lr=0.05), model)
    loss = F.cross_entropy(model(x, s), y)    # x [B, 64], s [B] in turns
"""
from .basis import MANIFOLDS, coefficients, metric, metric_inverse, num_basis
from .layers import ManifoldConv2d, ManifoldLayer, ManifoldLinear
from .optim import MetricCorrected
from .wrap import ManifoldModel, manifold_layers, wrap

__all__ = ["MANIFOLDS", "ManifoldConv2d", "ManifoldLayer", "ManifoldLinear", "ManifoldModel", "MetricCorrected",
           "coefficients", "manifold_layers", "metric", "metric_inverse", "num_basis", "wrap"]
