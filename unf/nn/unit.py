"""``UnitMLP``: a per-unit MLP over everything a unit touches, equivariant to the spec's groups.

A UNF layer is linear between (reduced) pieces; its only nonlinearity is pointwise over channels. So it cannot hold
many different *unit prototypes* and snap a noisy unit to the nearest one: to write the clean 64 input weights of
hidden unit ``i`` it would have to carry them through a few channels. This module gives every unit of every group a
wide MLP over a feature vector with all that the unit touches:

- for each piece with an axis in the group, the piece moved so that this axis is last; its other *group* axes are
  averaged (they are permuted too, so only symmetric functions of them are allowed), its fixed axes (pseudo-groups of
  the :class:`~unf.nn.Layout`, and folded channels) are kept as features, position by position, since nothing
  permutes them;
- the MLP's output is split the same way and broadcast back over the averaged axes.

So unit ``i`` of a hidden layer sees its whole row of input weights and its bias (and the means of its connections to
other hidden layers), and can write a whole new row: a key-value memory of units. Every unit goes through the same
MLP, so the map commutes with the group's permutations (tested in float64 in ``tests/test_nn_unit.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..weights import WeightSpace
from .layout import Layout


class UnitMLP(nn.Module):
    """``WeightSpace[B, C] -> WeightSpace[B, C]``: for every group, ``Linear(F, hidden) -> SiLU -> Linear(hidden, F')``
    on each unit's features ``[B, n, F]`` (``F``: the group's touching entries per channel, see the module docstring),
    the output added to the pieces' entries of that unit. The last layer starts at zero (the module starts as 0).

    ``max_features``: a group whose feature vector would be longer is skipped (its units are too big to memorise
    entry by entry; the UNF layers still see them)."""

    def __init__(self, layout: Layout, channels: int, hidden: int = 128, max_features: int = 4096):
        super().__init__()
        self.layout, self.channels = layout, channels
        self.slots: dict[str, list[tuple[int, int]]] = {}  # group -> [(piece, kept-axis position)]
        widths: dict[str, list[int]] = {}
        for q, p in enumerate(layout.pieces):
            for a, g in enumerate(p.kept_labels):
                if g.startswith("~"):
                    continue
                fixed = math.prod(n for lab, n in zip(p.kept_labels, p.kept_sizes) if lab.startswith("~"))
                self.slots.setdefault(g, []).append((q, a))
                widths.setdefault(g, []).append(channels * p.fold * fixed)
        self.widths = {g: w for g, w in widths.items() if sum(w) <= max_features}
        self.slots = {g: s for g, s in self.slots.items() if g in self.widths}
        self.keys = {g: f"g{i}" for i, g in enumerate(self.slots)}  # group names may hold dots: not module keys
        self.mlps = nn.ModuleDict()
        for g, w in self.widths.items():
            mlp = nn.Sequential(nn.Linear(sum(w), hidden), nn.SiLU(), nn.Linear(hidden, sum(w)))
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            self.mlps[self.keys[g]] = mlp

    def _moved(self, x: torch.Tensor, labels: tuple, a: int) -> tuple[torch.Tensor, list[int]]:
        """``x`` ``[B, C', *kept]`` -> ``[B, F, n]`` (group axes other than ``a`` averaged, fixed ones kept as
        features), and the averaged axes (positions in ``kept``)."""
        avg = [i for i, lab in enumerate(labels) if i != a and not lab.startswith("~")]
        if avg:
            x = x.mean(dim=[i + 2 for i in avg], keepdim=True)
        x = x.movedim(a + 2, -1)
        return x.reshape(x.shape[0], -1, x.shape[-1]), avg

    def forward(self, ws: WeightSpace) -> WeightSpace:
        layout = self.layout
        if ws.channels != self.channels:
            raise ValueError(f"UnitMLP expects {self.channels} channels, got {ws.channels}")
        xs = [layout.extract(p, ws[p.tensor]) for p in layout.pieces]
        adds: list[list[torch.Tensor]] = [[] for _ in layout.pieces]
        for g, slots in self.slots.items():
            feats = [self._moved(xs[q], layout.pieces[q].kept_labels, a)[0] for q, a in slots]
            out = self.mlps[self.keys[g]](torch.cat(feats, 1).transpose(1, 2)).transpose(1, 2)  # [B, F, n]
            for (q, a), y in zip(slots, out.split(self.widths[g], 1)):
                p, x = layout.pieces[q], xs[q]
                # the inverse of _moved: unflatten the kept axes (averaged ones as size 1), move the unit axis back
                shape = [1 if (i != a and not lab.startswith("~")) else n
                         for i, (lab, n) in enumerate(zip(p.kept_labels, p.kept_sizes))]
                rest = [n for i, n in enumerate(shape) if i != a]
                y = y.reshape(x.shape[0], x.shape[1], *rest, shape[a]).movedim(-1, a + 2)
                adds[q].append(y)
        blocks = []
        for x, terms in zip(xs, adds):
            out = torch.zeros_like(x)
            for t in terms:
                out = out + t  # broadcast over the averaged axes
            blocks.append(out)
        return WeightSpace(ws.spec, {n: layout.insert(n, [blocks[i] for i in layout.by_tensor[n]], self.channels)
                                     for n in layout.spec.float_names}, ws.extras)


__all__ = ["UnitMLP"]
