"""``UNFLinear``: the full equivariant linear layer between weight spaces of one spec."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .basis import Plan, Reduction, embed, reduce_piece
from .layout import DEFAULT_FOLD_MAX, Layout


def as_layout(spec: Union[WeightSpaceSpec, Layout], fold_max: int = DEFAULT_FOLD_MAX) -> Layout:
    return spec if isinstance(spec, Layout) else Layout(spec, fold_max)


class UNFLinear(nn.Module):
    """Equivariant linear map ``WeightSpace[B, in_channels] -> WeightSpace[B, out_channels]``.

    Spans every linear map that commutes with the spec's permutations (the basis of :mod:`unf.nn.basis`, compiled
    once here), plus, with ``bias``, every equivariant constant. Pass a :class:`Layout` to share the fixed-axis
    policy (``fold_max``) between layers. Coefficients start at ``N(0, gain^2 / fan_in)`` (``fan_in``: all input
    channels of all terms reaching an output piece). Pooled terms have less variance than the identity term, so a
    bare layer shrinks unit-scale inputs somewhat (std ~0.4-0.6); ``UNFNet`` normalises between layers.
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

    def cost(self, batch: int, backward: bool = False, itemsize: int = 4) -> dict[str, int]:
        """What one pass over ``batch`` weight spaces needs by the plan, whatever the implementation does: ``flops``
        of the channel-mixing products (2 per multiply-add) and ``bytes``, the fewest a pass can move (input read
        and output written once, coefficients read once; reductions and broadcast terms are smaller than a piece
        and not counted). With ``backward`` the pass is forward and backward: the products of the input and
        coefficient gradients (3x the flops), the input read twice, the output gradient read, the input gradient
        and the coefficient gradients written. Achieved rates against these (FLOP/s against the matmul peak,
        bytes/s against the copy bandwidth) say how far a timing is from the hardware's limits."""
        pieces = self.layout.pieces
        flops = 0
        for q, groups in enumerate(self.plan.groups):
            cout = self.out_channels * pieces[q].fold
            for g, slot in zip(groups, self._slots[q]):
                red = self.plan.reductions[g.inputs[0][0]]  # a group's inputs share their kept shape
                m = 1 if red.source < 0 else math.prod(pieces[red.source].kept_sizes[blk[0]]
                                                       for blk, k in zip(red.blocks, red.kept) if k)
                flops += 2 * batch * cout * self.weights[slot].shape[1] * m
        n = sum(math.prod(self.layout.spec[name].shape) for name in self.layout.spec.float_names)
        params = sum(w.numel() for w in self.weights)
        cin, cout = self.in_channels, self.out_channels
        if not backward:
            return {"flops": flops, "bytes": itemsize * (batch * n * (cin + cout) + params)}
        return {"flops": 3 * flops, "bytes": itemsize * (batch * n * (3 * cin + 2 * cout) + 3 * params)}

    def forward(self, ws: WeightSpace, residual: Optional[WeightSpace] = None) -> WeightSpace:
        """``residual`` (``[B, out_channels]``, optional) is added to the output in the same passes: ``residual +
        layer(ws)`` with one full-size pass less than adding it afterwards."""
        if ws.channels != self.in_channels:
            raise ValueError(f"UNFLinear expects {self.in_channels} channels, got {ws.channels}")
        if residual is not None and (residual.channels != self.out_channels or residual.batch_size != ws.batch_size):
            raise ValueError(f"residual has {residual.batch_size} members of {residual.channels} channels; expected "
                             f"{ws.batch_size} of {self.out_channels}")
        layout, plan = self.layout, self.plan
        xs = [layout.extract(p, ws[p.tensor]) for p in layout.pieces]
        b = ws.batch_size
        reduced = _Reductions(xs, plan.reductions, xs[0].new_ones(b, 1))
        blocks = []
        for q, groups in enumerate(plan.groups):
            sizes = layout.pieces[q].kept_sizes
            terms, main = [], None
            for g, slot in zip(groups, self._slots[q]):
                parts = [self._reordered(reduced[r], reorder) for r, reorder in g.inputs]
                x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # cat would copy a single part
                w = self.weights[slot].expand(b, *self.weights[slot].shape)
                if g.embedding.axes == tuple(("k", j) for j in range(len(sizes))):
                    main = (w, x)  # full-size term: its matmul absorbs the sum of all others (one pass less)
                    continue
                # bmm on [B, C, M] keeps x in place (matmul would transpose and copy it)
                y = torch.bmm(w, x.reshape(b, x.shape[1], -1))
                terms.append(embed(y.view(b, w.shape[1], *x.shape[2:]), g.embedding, sizes))
            cout = self.out_channels * layout.pieces[q].fold
            res = None
            if residual is not None:
                p = layout.pieces[q]
                res = layout.extract(p, residual[p.tensor]).reshape(b, cout, *sizes)
            blocks.append(accumulate(terms, main, b, cout, sizes, res))
        out = {}
        for name in layout.spec.float_names:
            out[name] = layout.insert(name, [blocks[i] for i in layout.by_tensor[name]], self.out_channels)
        return WeightSpace(layout.spec, out, ws.extras)


    @staticmethod
    def _reordered(y: torch.Tensor, reorder: tuple) -> torch.Tensor:
        return y if reorder == tuple(range(len(reorder))) else y.permute(0, 1, *[i + 2 for i in reorder])


def accumulate(terms: list, main, b: int, cout: int, sizes: tuple,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum the broadcast ``terms`` (tensors broadcastable to ``[B, C_out, *sizes]``), a full-size ``residual`` and
    the full-size term ``main`` (``(w [B, C_out, K], x [B, K, M])``, its product, or None) with as few full-size
    passes as possible: small terms are added among themselves first, then to the residual; a full-size sum is the
    base of one ``baddbmm``; a broadcast one is added to the product in place (as a base it would be copied to full
    size first)."""
    terms = sorted(terms, key=lambda t: t.numel())  # add the small broadcast terms first
    acc = terms[0] if terms else None
    for t in terms[1:]:
        acc = acc + t
    if residual is not None:
        acc = residual if acc is None else residual + acc
    full = b * cout * math.prod(sizes)
    if main is not None:
        w, x = main
        x = x.reshape(b, x.shape[1], -1)
        if acc is None:
            acc = torch.bmm(w, x)
        elif _compiling():  # inductor fuses the add into the kernel that reads the sum next (no base copy)
            acc = torch.bmm(w, x).view(b, cout, *sizes) + acc
        elif acc.numel() == full and acc.shape[0] == b:
            acc = torch.baddbmm(acc.reshape(b, cout, -1), w, x)  # in place (baddbmm_) measured 20-30% slower
        else:
            acc = torch.bmm(w, x).view(b, cout, *sizes).add_(acc)  # bmm's backward does not need its output
        acc = acc.view(b, cout, *sizes)
    return acc.expand(b, cout, *sizes)


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling()) if is_compiling is not None else False


class _Reductions:
    """Lazily computed input reductions. Plain means (no diagonals) are taken from the smallest cached mean of the
    same piece that keeps a superset of the axes, so each full-size piece is read as few times as possible."""

    def __init__(self, xs: list, reductions: list, one: torch.Tensor):
        self.xs, self.reductions, self.one = xs, reductions, one
        self.cache: dict[int, torch.Tensor] = {}
        self.sums: dict[tuple[int, frozenset], torch.Tensor] = {}  # (piece, dropped axes) -> keepdim sum

    def __getitem__(self, r: int) -> torch.Tensor:
        if r not in self.cache:
            self.cache[r] = self._compute(self.reductions[r])
        return self.cache[r]

    def _compute(self, red: Reduction) -> torch.Tensor:
        if red.source < 0:
            return self.one
        x = self.xs[red.source]
        if any(len(blk) > 1 for blk in red.blocks):
            return reduce_piece(x, red)
        dropped = frozenset(blk[0] for blk, k in zip(red.blocks, red.kept) if not k)
        if not dropped:
            return x
        base, done = x, frozenset()
        for (src, d), t in self.sums.items():
            if src == red.source and d < dropped and len(d) > len(done):
                base, done = t, d
        s = base.sum(dim=[i + 2 for i in sorted(dropped - done)], keepdim=True)
        self.sums[(red.source, dropped)] = s
        n = 1
        for i in dropped:
            n *= x.shape[i + 2]
        return (s / n).squeeze([i + 2 for i in sorted(dropped)])
