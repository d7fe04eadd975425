"""Baselines under the same interface as the UNF models.

* ``DeepSets`` / ``DeepSetsEncoder``: the same MLP on every entry's channel vector, plus (encoder) means per tensor.
  Equivariant to *any* permutation of a tensor's entries -- far more than the true symmetry, hence weaker.
* ``StatNN`` (Unterthiner et al. 2020): 7 statistics per tensor and channel (mean, variance, and the 0/25/50/75/100%
  quantiles) -> MLP. Invariant.

The NFN-NP layer of Zhou et al. (2023) needs no code of its own: for an MLP spec, ``UNFLinear`` with every fixed axis
treated as a pseudo-group (``fold_max=0``) spans the same maps (checked in ``tests/test_nn.py`` against the ``nfn``
package).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .modules import tensor_statistics


def _channel_mlp(cin: int, hidden: int, cout: int, depth: int) -> nn.Sequential:
    layers, width = [], cin
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, cout))


class DeepSets(nn.Module):
    """Per-entry MLP plus the mean over all entries of the weight set: ``WeightSpace[B, cin] -> [B, cout]``."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, hidden: int, out_channels: int, depth: int = 2):
        super().__init__()
        self.local = _channel_mlp(in_channels, hidden, out_channels, depth)
        self.glob = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, ws: WeightSpace) -> WeightSpace:
        flat = torch.cat([t.flatten(2) for t in ws.values()], dim=2)  # [B, C, N]
        g = self.glob(flat.mean(2))  # [B, cout]
        return ws.map(lambda t: (self.local(t.movedim(1, -1)) + g.view(g.shape[0], *[1] * (t.dim() - 2), -1))
                      .movedim(-1, 1))


class DeepSetsEncoder(nn.Module):
    """Per-entry MLP, mean per tensor, MLP head: ``WeightSpace[B, cin] -> [B, out_features]``."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, hidden: int, out_features: int, depth: int = 2):
        super().__init__()
        self.phi = _channel_mlp(in_channels, hidden, hidden, depth)
        n = len(spec.float_names) * hidden
        self.rho = nn.Sequential(nn.LayerNorm(n), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        pooled = [self.phi(t.flatten(2).transpose(1, 2)).mean(1) for t in ws.values()]
        return self.rho(torch.cat(pooled, dim=1))


class StatNN(nn.Module):
    """Unterthiner et al.'s statistics baseline: ``tensor_statistics`` -> standardisation -> MLP."""

    def __init__(self, spec: WeightSpaceSpec, in_channels: int, out_features: int, hidden: int = 128,
                 depth: int = 2):
        super().__init__()
        n = 7 * in_channels * len(spec.float_names)
        self.norm = nn.LayerNorm(n)
        self.mlp = _channel_mlp(n, hidden, out_features, depth)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        return self.mlp(self.norm(tensor_statistics(ws)))
