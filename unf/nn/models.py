"""Ready-made weight-space networks: ``UNFNet`` (equivariant) and ``UNFEncoder`` (invariant)."""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .layout import DEFAULT_FOLD_MAX, Layout
from .linear import UNFLinear, as_layout
from .modules import InvariantPool, Pointwise, PositionalEncoding, WSDropout, WSNorm, tensor_statistics


class UNFBlock(nn.Module):
    """Pre-norm residual block ``x + Linear(act(Norm(x)))``; the residual branch starts scaled down by ``scale``."""

    def __init__(self, layout: Layout, channels: int, activation: str, dropout: float, scale: float):
        super().__init__()
        self.norm = WSNorm(layout.spec, channels)
        self.act = Pointwise(activation)
        self.drop = WSDropout(dropout)
        self.linear = UNFLinear(layout, channels, channels, gain=math.sqrt(2.0) * scale)

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return self.linear(self.drop(self.act(self.norm(ws))), residual=ws)


class UNFNet(nn.Module):
    """Equivariant network ``WeightSpace[B, in_channels] -> WeightSpace[B, out_channels]``.

    Positional encoding of the pseudo-groups (``pos_dim`` channels, see :class:`Layout`), an input projection,
    ``depth`` residual blocks, and an output projection. Residual branches start scaled by ``1/sqrt(depth)``, so
    activations keep their scale through depth.
    """

    def __init__(self, spec: Union[WeightSpaceSpec, Layout], in_channels: int, hidden: int, out_channels: int,
                 depth: int = 2, activation: str = "relu", dropout: float = 0.0, pos_dim: int = 4,
                 fold_max: int = DEFAULT_FOLD_MAX):
        super().__init__()
        self.layout = as_layout(spec, fold_max)
        self.pos = PositionalEncoding(self.layout, pos_dim) if pos_dim and self.layout.pseudo_groups() else None
        cin = in_channels + (pos_dim if self.pos is not None else 0)
        self.inp = UNFLinear(self.layout, cin, hidden)
        scale = 1.0 / math.sqrt(max(depth, 1))
        self.blocks = nn.ModuleList([UNFBlock(self.layout, hidden, activation, dropout, scale) for _ in range(depth)])
        self.out_norm = WSNorm(self.layout.spec, hidden)
        self.act = Pointwise(activation)
        self.out = UNFLinear(self.layout, hidden, out_channels, gain=math.sqrt(2.0))

    def features(self, ws: WeightSpace) -> WeightSpace:
        """The hidden representation ``[B, hidden]`` after the residual blocks (normalised and activated)."""
        if self.pos is not None:
            ws = self.pos(ws)
        ws = self.inp(ws)
        for block in self.blocks:
            ws = block(ws)
        return self.act(self.out_norm(ws))

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return self.out(self.features(ws))


class UNFEncoder(nn.Module):
    """Invariant network ``WeightSpace[B, in_channels] -> [B, out_features]``: ``UNFNet`` trunk, activation,
    invariant readout, MLP head.

    ``readout="mean"`` is the invariant linear basis (``InvariantPool``). ``readout="stats"`` adds, per tensor and
    channel, the mean, variance and quantiles of the trunk's features and of the input itself (Unterthiner et al.'s
    statistics, which are invariant too), so the encoder sees at least what StatNN sees; on small zoos this prior
    matters more than depth.
    """

    def __init__(self, spec: Union[WeightSpaceSpec, Layout], in_channels: int, hidden: int, out_features: int,
                 depth: int = 2, head_hidden: int = 128, activation: str = "relu", dropout: float = 0.0,
                 pos_dim: int = 4, fold_max: int = DEFAULT_FOLD_MAX, readout: str = "mean"):
        super().__init__()
        if readout not in ("mean", "stats"):
            raise ValueError(f"readout {readout!r}: choose 'mean' or 'stats'")
        layout = as_layout(spec, fold_max)
        self.readout = readout
        self.trunk = UNFNet(layout, in_channels, hidden, hidden, depth, activation, dropout, pos_dim)
        self.act = Pointwise(activation)
        self.pool = InvariantPool(layout)
        n = self.pool.num_features(hidden)
        if readout == "stats":
            n += 7 * (hidden + in_channels) * len(layout.spec.float_names)
        self.head = nn.Sequential(nn.LayerNorm(n), nn.Linear(n, head_hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(head_hidden, out_features))

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        h = self.act(self.trunk(ws))
        feats = self.pool(h)
        if self.readout == "stats":
            feats = torch.cat([feats, tensor_statistics(h), tensor_statistics(ws)], dim=1)
        return self.head(feats)
