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

A weight between two hidden layers, ``W[i, k]``, depends on BOTH units' identities; a per-unit output broadcast over
the other axis cannot write it. With ``rank > 0`` the MLPs of the two groups also emit ``rank`` factors per channel
for each such piece, and the piece gets their product ``sum_r a_r[i] b_r[k]``: a rank-``rank`` table of unit pairs
(products of per-unit values commute with both groups' permutations).

``activation="softmax"`` makes each MLP an explicit key-value memory: the hidden layer is a softmax over ``hidden``
learned prototypes (keys: the first layer's rows; values: the second layer's columns), so a unit's output is a
convex mix of prototype rows, and a sharp softmax writes one prototype exactly. The pair tables then read the two
units' prototype weights, ``sum_r (A h_i)_r (B h_k)_r``: a learned table of prototype pairs. With SiLU the same
memory must be carved out of ReLU-like pieces, which writes blends.

A softmax decides each unit alone, so two units of one network can pick the same prototype: the network gets a
duplicated unit and loses another (what a generator's samples showed on the orbit rung: accurate units, 12-15
distinct of 16). ``activation="sinkhorn"`` makes the units of each network compete: the unit-by-prototype softmax is
alternately projected so that no prototype carries more than ``max(1, n / hidden)`` units' worth of weight (a few
Bregman steps of capacity-constrained optimal transport, differentiable). Column sums are symmetric in the units, so
this too commutes with the group's permutations.

``attention=L`` puts ``L`` self-attention layers across the units of each group (Neural Functional Transformer
style, no positional encoding) between the first layer and the activation: each unit's hidden vector then depends
on every other unit of its network, so the units of a sample can decide together (which prototype each takes, how
a layer's units share the work) instead of each alone. Attention without positions commutes with permutations of
its tokens.
"""
from __future__ import annotations

import math
import warnings
from typing import Union

import torch
import torch.nn as nn

from ..weights import WeightSpace
from .layout import Layout


class UnitMLP(nn.Module):
    """``WeightSpace[B, C] -> WeightSpace[B, C]``: for every group, ``Linear(F, hidden) -> SiLU -> Linear(hidden, F')``
    on each unit's features ``[B, n, F]`` (``F``: the group's touching entries per channel, see the module docstring),
    the output added to the pieces' entries of that unit. The last layer starts at zero (the module starts as 0).
    ``rank``: pair tables of that rank on pieces with two group axes (one factor starts at zero).

    ``max_features``: a group whose feature vector would be longer is skipped (its units are too big to memorise
    entry by entry; the UNF layers still see them). ``activation``: ``"silu"`` or ``"softmax"`` (over the hidden
    width: a memory of ``hidden`` unit prototypes) or ``"sinkhorn"`` (the same memory, each prototype used by at
    most ``max(1, n / hidden)`` of a network's ``n`` units; see the module docstring). ``hidden="units"``: each
    group's width is its number of units, so a Sinkhorn memory holds one prototype per unit and its capacity of one
    unit per prototype forbids two units to take one (with more prototypes than units, one unit can be stored in two
    prototypes and collisions come back; BENCHMARKS.md, the orbit rung). ``attention``: that many pre-norm
    transformer layers (``nn.TransformerEncoderLayer``, up to 4 heads, feed-forward ``2 * hidden``, no dropout)
    across the units of each group, on the hidden vectors before the activation (see the module docstring)."""

    ACTIVATIONS = ("silu", "softmax", "sinkhorn")
    SINKHORN_STEPS = 20  # enough for logit gaps up to about 20 log(n / cap)

    def __init__(self, layout: Layout, channels: int, hidden: Union[int, str] = 128, max_features: int = 4096,
                 rank: int = 0, activation: str = "silu", attention: int = 0):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"UnitMLP activation {activation!r}: choose from {self.ACTIVATIONS}")
        if not (hidden == "units" or (isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0)):
            raise ValueError(f"UnitMLP hidden {hidden!r}: a positive width or 'units' (one per unit of the group)")
        if not (isinstance(attention, int) and attention >= 0):
            raise ValueError(f"UnitMLP attention {attention!r}: a number of layers >= 0")
        self.layout, self.channels, self.rank, self.activation = layout, channels, rank, activation
        self.slots: dict[str, list[tuple[int, int]]] = {}  # group -> [(piece, kept-axis position)]
        widths: dict[str, list[int]] = {}
        units: dict[str, int] = {}  # group -> its number of units
        for q, p in enumerate(layout.pieces):
            for a, g in enumerate(p.kept_labels):
                if g.startswith("~"):
                    continue
                fixed = math.prod(n for lab, n in zip(p.kept_labels, p.kept_sizes) if lab.startswith("~"))
                self.slots.setdefault(g, []).append((q, a))
                widths.setdefault(g, []).append(channels * p.fold * fixed)
                units[g] = p.kept_sizes[a]
        self.widths = {g: w for g, w in widths.items() if sum(w) <= max_features}
        skipped = sorted(g for g in widths if g not in self.widths)
        if skipped:
            warnings.warn(f"UnitMLP: groups {skipped} touch more than max_features={max_features} entries per unit "
                          "and get no unit MLP (raise max_features, or lower channels or fold_max)", stacklevel=2)
        self.slots = {g: s for g, s in self.slots.items() if g in self.widths}
        # pieces indexed by exactly two kept group axes (weights between hidden layers) get a rank-`rank` pair table
        self.pairs = [q for q, p in enumerate(layout.pieces) if rank and len(p.kept_labels) == 2
                      and all(g in self.widths for g in p.kept_labels)]
        self.pair_slots: dict[str, list[tuple[int, int]]] = {g: [] for g in self.slots}  # group -> [(piece, side)]
        for q in self.pairs:
            for side, g in enumerate(layout.pieces[q].kept_labels):
                self.pair_slots[g].append((q, side))
        self.keys = {g: f"g{i}" for i, g in enumerate(self.slots)}  # group names may hold dots: not module keys
        self.inp, self.out, self.pair = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.mix = nn.ModuleDict()  # attention across units, per group
        for g, w in self.widths.items():
            k, h = self.keys[g], units[g] if hidden == "units" else hidden
            self.inp[k] = nn.Linear(sum(w), h)
            self.out[k] = nn.Linear(h, sum(w))
            if attention:
                heads = next(a for a in (4, 2, 1) if h % a == 0)
                self.mix[k] = nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(h, heads, 2 * h, dropout=0.0, batch_first=True, norm_first=True),
                    attention, enable_nested_tensor=False)
            nn.init.zeros_(self.out[k].weight)  # the module starts at zero
            nn.init.zeros_(self.out[k].bias)
            if self.pair_slots[g]:
                pw = self._pair_width(g)
                self.pair[k] = nn.Linear(h, sum(pw))
                with torch.no_grad():  # the second factor of each table starts at zero: the table does, but learns
                    for (q, side), rows, bias in zip(self.pair_slots[g], self.pair[k].weight.split(pw, 0),
                                                     self.pair[k].bias.split(pw, 0)):
                        if side == 1:
                            rows.zero_()
                            bias.zero_()

    def _pair_width(self, g: str) -> list[int]:
        return [self.channels * self.layout.pieces[q].fold * self.rank for q, _ in self.pair_slots[g]]

    def _sinkhorn(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, n, K]`` logits -> unit-by-prototype weights: rows sum to 1, column sums at most ``max(1, n / K)``
        (alternating projections in the log domain; the last one is the rows')."""
        n, k = logits.shape[-2:]
        log_cap = math.log(max(1.0, n / k))
        a = logits.log_softmax(-1)
        for _ in range(self.SINKHORN_STEPS):
            a = a - (a.logsumexp(-2, keepdim=True) - log_cap).clamp_min(0)  # over-used prototypes scaled down
            a = a.log_softmax(-1)
        return a.exp()

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
        factors: dict[tuple[int, int], torch.Tensor] = {}
        for g, slots in self.slots.items():
            k = self.keys[g]
            feats = [self._moved(xs[q], layout.pieces[q].kept_labels, a)[0] for q, a in slots]
            h = self.inp[k](torch.cat(feats, 1).transpose(1, 2))  # [B, n, hidden]
            if k in self.mix:
                h = self.mix[k](h)  # the units of each network attend to each other
            h = torch.nn.functional.silu(h) if self.activation == "silu" else \
                h.softmax(-1) if self.activation == "softmax" else self._sinkhorn(h)
            out = self.out[k](h).transpose(1, 2)  # [B, F, n]
            if self.pair_slots[g]:
                for key, f in zip(self.pair_slots[g], self.pair[k](h).split(self._pair_width(g), 2)):
                    factors[key] = f  # [B, n, C' * rank]
            for (q, a), y in zip(slots, out.split(self.widths[g], 1)):
                p, x = layout.pieces[q], xs[q]
                # the inverse of _moved: unflatten the kept axes (averaged ones as size 1), move the unit axis back
                shape = [1 if (i != a and not lab.startswith("~")) else n
                         for i, (lab, n) in enumerate(zip(p.kept_labels, p.kept_sizes))]
                rest = [n for i, n in enumerate(shape) if i != a]
                y = y.reshape(x.shape[0], x.shape[1], *rest, shape[a]).movedim(-1, a + 2)
                adds[q].append(y)
        for q in self.pairs:
            b, c = xs[q].shape[:2]
            f0, f1 = (factors[(q, side)].view(b, -1, c, self.rank) for side in (0, 1))
            adds[q].append(torch.einsum("bicr,bkcr->bcik", f0, f1) / math.sqrt(self.rank))
        blocks = []
        for x, terms in zip(xs, adds):
            out = torch.zeros_like(x)
            for t in terms:
                out = out + t  # broadcast over the averaged axes
            blocks.append(out)
        return WeightSpace(ws.spec, {n: layout.insert(n, [blocks[i] for i in layout.by_tensor[n]], self.channels)
                                     for n in layout.spec.float_names}, ws.extras)


__all__ = ["UnitMLP"]
