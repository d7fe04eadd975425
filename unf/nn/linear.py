"""``UNFLinear``: the full equivariant linear layer between weight spaces of one spec."""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .basis import Plan, embed, reduce_piece
from .layout import DEFAULT_FOLD_MAX, Layout


def as_layout(spec: Union[WeightSpaceSpec, Layout], fold_max: int = DEFAULT_FOLD_MAX) -> Layout:
    return spec if isinstance(spec, Layout) else Layout(spec, fold_max)


class UNFLinear(nn.Module):
    """Equivariant linear map ``WeightSpace[B, in_channels] -> WeightSpace[B, out_channels]``.

    Spans every linear map that commutes with the spec's permutations (the basis of :mod:`unf.nn.basis`, compiled
    once here), plus, with ``bias``, every equivariant constant. Pass a :class:`Layout` to share the fixed-axis
    policy (``fold_max``) between layers. Coefficients start at ``N(0, gain^2 / fan_in)`` (``fan_in``: all input
    channels of all terms reaching an output piece), so unit-scale inputs give unit-scale outputs for ``gain=1``.
    """

    def __init__(self, spec: Union[WeightSpaceSpec, Layout], in_channels: int, out_channels: int,
                 bias: bool = True, fold_max: int = DEFAULT_FOLD_MAX, gain: float = 1.0):
        super().__init__()
        self.layout = as_layout(spec, fold_max)
        self.in_channels, self.out_channels = in_channels, out_channels
        pieces = self.layout.pieces
        self.plan = Plan(pieces, pieces, bias)
        width = [in_channels * p.fold for p in pieces]
        self.weights = nn.ParameterList()
        self._slots: list[list[int]] = []
        for q, groups in enumerate(self.plan.groups):
            cols = [sum(width[self.plan.reductions[r].source] if self.plan.reductions[r].source >= 0 else 1
                        for r, _ in g.inputs) for g in groups]
            std = gain / math.sqrt(max(1, sum(cols)))  # unit-scale outputs for unit-scale inputs (gain 1)
            slots = []
            for c in cols:
                slots.append(len(self.weights))
                self.weights.append(nn.Parameter(torch.randn(out_channels * pieces[q].fold, c) * std))
            self._slots.append(slots)

    def num_terms(self) -> dict[tuple[str, str], int]:
        """Number of basis terms per (output tensor, input tensor); ``"1"`` is the bias source."""
        out: dict[tuple[str, str], int] = {}
        pieces = self.layout.pieces
        for (q, s), n in self.plan.counts.items():
            key = (pieces[q].tensor, pieces[s].tensor if s >= 0 else "1")
            out[key] = out.get(key, 0) + n
        return out

    def forward(self, ws: WeightSpace) -> WeightSpace:
        if ws.channels != self.in_channels:
            raise ValueError(f"UNFLinear expects {self.in_channels} channels, got {ws.channels}")
        layout, plan = self.layout, self.plan
        xs = [layout.extract(p, ws[p.tensor]) for p in layout.pieces]
        b = ws.batch_size
        one = xs[0].new_ones(b, 1)
        reds: dict[int, torch.Tensor] = {}

        def reduced(r: int) -> torch.Tensor:
            if r not in reds:
                red = plan.reductions[r]
                reds[r] = one if red.source < 0 else reduce_piece(xs[red.source], red)
            return reds[r]

        blocks = []
        for q, groups in enumerate(plan.groups):
            sizes = layout.pieces[q].kept_sizes
            terms = []
            for g, slot in zip(groups, self._slots[q]):
                parts = []
                for r, reorder in g.inputs:
                    y = reduced(r)
                    if reorder != tuple(range(len(reorder))):
                        y = y.permute(0, 1, *[i + 2 for i in reorder])
                    parts.append(y)
                x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
                w = self.weights[slot]
                y = torch.matmul(w, x.reshape(b, x.shape[1], -1)).reshape(b, w.shape[0], *x.shape[2:])
                terms.append(embed(y, g.embedding, sizes))
            terms.sort(key=lambda t: t.numel())  # add the small broadcast terms first
            acc = terms[0]
            for t in terms[1:]:
                acc = acc + t
            blocks.append(acc.expand(b, acc.shape[1], *sizes))
        out = {}
        for name in layout.spec.float_names:
            out[name] = layout.insert(name, [blocks[i] for i in layout.by_tensor[name]], self.out_channels)
        return WeightSpace(layout.spec, out, ws.extras)
