"""Equivariant layers whose parameters fit *every* spec: coefficients shared by the kind of basis term.

``UNFLinear`` stores one coefficient matrix per (output piece, term), so a trained layer serves one architecture.
Here each basis term is described by a short, model-independent *descriptor* (how the two tensors relate, how many
blocks the term carries, reduces and broadcasts, and how many of those are pseudo-groups, ...; see
:func:`term_descriptor`), and a small hypernetwork maps a descriptor to the term's ``[C_out, C_in]`` coefficients.
The parameters are those of the hypernetwork alone: their number does not depend on the model, and a layer trained on
MLPs runs on CNNs, RNNs or transformers.

Fixed axes: every fixed axis is a pseudo-group (``fold_max=0``), without positional tables, so no parameter depends
on an axis size. Terms with equal descriptors that land in the same output piece are *averaged* (not summed), so the
scale of the output does not grow with the number of neighbours a tensor has.

Exactly equivariant: the coefficients are constants of the layer (they do not depend on the input), each term is a
basis element of the equivariant maps of :mod:`unf.nn.basis`, and a sum or mean of such terms is equivariant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional
import torch
import torch.nn as nn

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .basis import Plan, embed
from .layout import Layout
from .linear import _Reductions, _compiling, accumulate

BASES = ("unf", "deepsets", "pointwise")
RELATIONS = ("self", "same-tensor", "other", "bias")
NUM_DESCRIPTOR_FEATURES = len(RELATIONS) + 11


def term_descriptor(plan: Plan, q: int, red_id: int, emb, reorder: tuple) -> tuple:
    """Model-independent description of one basis term of ``plan``: output piece ``q``, input reduction ``red_id``,
    output embedding ``emb`` and ``reorder`` (which kept input block feeds each carried output block)."""
    red = plan.reductions[red_id]
    out_p = plan.out_pieces[q]
    out_labels = out_p.kept_labels
    if red.source < 0:
        relation, in_labels = "bias", ()
    else:
        in_p = plan.in_pieces[red.source]
        in_labels = in_p.kept_labels
        relation = "self" if red.source == q else "same-tensor" if in_p.tensor == out_p.tensor else "other"
    pseudo = lambda lab: lab.startswith("~")  # noqa: E731
    carried = [b for b, k in zip(red.blocks, red.kept) if k]
    reduced = [b for b, k in zip(red.blocks, red.kept) if not k]
    bcast = sorted({j for kind, j in emb.axes if kind == "b"})
    bcast_labels = [out_labels[emb.axes.index(("b", j))] for j in bcast]
    # carried blocks whose first input axis lands on the same output axis (row to row, column to column)
    aligned = sum(emb.axes.index(("k", j)) == carried[reorder[j]][0] for j in range(len(carried)))
    return (relation, len(out_labels), len(in_labels), len(carried), len(reduced), len(bcast),
            sum(pseudo(in_labels[b[0]]) for b in carried), sum(pseudo(in_labels[b[0]]) for b in reduced),
            sum(pseudo(lab) for lab in bcast_labels),
            int(any(len(b) > 1 for b in red.blocks)), int(emb.diagonal), aligned)


def descriptor_features(desc: tuple) -> list[float]:
    """A descriptor as ``NUM_DESCRIPTOR_FEATURES`` numbers: one-hot relation, then counts scaled to about [0, 1]."""
    return [float(desc[0] == r) for r in RELATIONS] + [v / 4.0 for v in desc[1:]]


def _in_basis(desc: tuple, basis: str) -> bool:
    relation, _, _, carried, reduced, bcast, *_, diag_in, diag_out, aligned = desc
    if diag_in or diag_out:
        return basis == "unf"
    identity = relation == "self" and reduced == 0 and bcast == 0 and aligned == carried  # no axis swapped
    constant = relation == "bias" and carried == 0
    if basis == "pointwise":
        return identity or (constant and bcast == desc[1])
    if basis == "deepsets":  # per tensor: the entry itself, the tensor's mean, a constant
        whole_mean = relation == "self" and carried == 0 and bcast == desc[1]
        return identity or constant and bcast == desc[1] or whole_mean
    return True


@dataclass
class _OutGroup:
    embedding: object
    inputs: list  # (reduction id, reorder)
    start: int  # this group's terms are terms start..stop of the plan (see SharedPlan.term_desc)
    stop: int


class SharedPlan:
    """The basis of one spec compiled for :class:`SharedUNFLinear`: pieces, reductions, and per output piece the
    embedding groups with each term's descriptor id. Build once per spec (``SharedPlan(spec, basis)``).

    ``exact=True``: every term is its own descriptor (the per-pair UNF of the paper, fixed axes as pseudo-groups):
    a layer for this one spec, with a coefficient table of ``len(plan.descriptors)`` entries."""

    def __init__(self, spec: WeightSpaceSpec, basis: str = "unf", exact: bool = False):
        if basis not in BASES:
            raise ValueError(f"basis {basis!r}: choose from {BASES}")
        self.layout = Layout(spec, fold_max=0)
        plan = Plan(self.layout.pieces, self.layout.pieces, bias=True)
        self.reductions = plan.reductions
        descs: dict[tuple, int] = {}
        self.groups: list[list[_OutGroup]] = []
        term_desc, term_scale = [], []
        for q, groups in enumerate(plan.groups):
            terms = []  # (group index, red id, reorder, descriptor id)
            for gi, g in enumerate(groups):
                for r, reorder in g.inputs:
                    d = term_descriptor(plan, q, r, g.embedding, reorder)
                    if _in_basis(d, basis):
                        key = ("term", q, gi, r, reorder) if exact else d
                        terms.append((gi, r, reorder, descs.setdefault(key, len(descs))))
            count = {}
            for t in terms:
                count[t[3]] = count.get(t[3], 0) + 1
            fan = math.sqrt(max(1, len(count)))
            out = []
            for gi, g in enumerate(groups):
                mine = [t for t in terms if t[0] == gi]
                if mine:
                    out.append(_OutGroup(g.embedding, [(r, ro) for _, r, ro, _ in mine], len(term_desc),
                                         len(term_desc) + len(mine)))
                    term_desc += [d for *_, d in mine]
                    term_scale += [1.0 / count[d] / fan for *_, d in mine]
            self.groups.append(out)
        self.descriptors, self.exact = list(descs), exact
        # per term, the float tensor its input comes from (len(spec.float_names) for the bias' constant 1), and per
        # output piece its terms: what a layer needs to apply channels that are constant over every tensor without
        # materialising them (SharedUNFLinear.forward's ``const``)
        tensor_id = {n: i for i, n in enumerate(spec.float_names)}
        sources = [self.reductions[r].source for groups in self.groups for g in groups for r, _ in g.inputs]
        self.term_tensor = torch.tensor([tensor_id[self.layout.pieces[s].tensor] if s >= 0 else len(tensor_id)
                                         for s in sources], dtype=torch.long)  # [T]
        self.term_piece = torch.tensor([q for q, groups in enumerate(self.groups) for g in groups
                                        for _ in g.inputs], dtype=torch.long)  # [T]
        # a diagonal embedding puts a constant on a diagonal only: its output is not constant over the piece
        self.constant_channels = not any(g.embedding.diagonal for groups in self.groups for g in groups)
        self.features = (torch.zeros(len(descs), NUM_DESCRIPTOR_FEATURES) if exact else  # [U, F]
                         torch.tensor([descriptor_features(d) for d in self.descriptors]))
        self.term_desc = torch.tensor(term_desc, dtype=torch.long)  # [T]: descriptor id of every term
        self.term_scale = torch.tensor(term_scale, dtype=torch.float64)  # [T]: 1 / (same-descriptor terms) / sqrt(fan)
        self._on: dict = {}

    def tensors(self, device, dtype) -> tuple[torch.Tensor, ...]:
        """``features``, ``term_desc``, ``term_scale``, ``term_tensor`` and ``term_piece`` on ``device`` (cached:
        moved once)."""
        key = (str(device), dtype)
        if key not in self._on:
            self._on[key] = (self.features.to(device, dtype), self.term_desc.to(device),
                             self.term_scale.to(device, dtype), self.term_tensor.to(device),
                             self.term_piece.to(device))
        return self._on[key]


class SharedUNFLinear(nn.Module):
    """Equivariant linear map ``WeightSpace[B, in_channels] -> WeightSpace[B, out_channels]`` for any spec.

    ``forward(ws, plan)`` with a :class:`SharedPlan` of ``ws.spec`` (same ``basis``). The hypernetwork
    ``descriptor -> [C_out, C_in]`` has ``hyper_hidden`` tanh units. Its parameters may carry a leading batch axis of
    the input's batch size (``torch.func.functional_call`` with stacked parameters): then every batch member has its
    own coefficients, computed in one batched matmul (evolution strategies use this). ``zero_init`` makes the layer
    output zero until trained. ``table=U``: no hypernetwork, a table of ``U`` coefficient matrices for the terms of an
    ``exact`` plan (one spec only).
    """

    def __init__(self, in_channels: int, out_channels: int, basis: str = "unf", hyper_hidden: int = 32,
                 zero_init: bool = False, table: Optional[int] = None):
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"basis {basis!r}: choose from {BASES}")
        self.in_channels, self.out_channels, self.basis, self.exact = in_channels, out_channels, basis, table
        self.cache_coefficients = False
        if table is not None:
            std = 0.0 if zero_init else 1.0 / math.sqrt(in_channels)
            self.table = nn.Parameter(torch.randn(table, out_channels * in_channels) * std)
            return
        f = NUM_DESCRIPTOR_FEATURES
        self.w1 = nn.Parameter(torch.randn(f, hyper_hidden) / math.sqrt(f))
        self.b1 = nn.Parameter(torch.randn(hyper_hidden) * 0.5)
        # each coefficient ~ N(0, 1 / in_channels) at initialisation (the tanh units have variance ~0.3-0.4)
        std = 0.0 if zero_init else 1.0 / math.sqrt(0.35 * hyper_hidden * in_channels)
        self.w2 = nn.Parameter(torch.randn(hyper_hidden, out_channels * in_channels) * std)
        self.b2 = nn.Parameter(torch.zeros(out_channels * in_channels))

    def coefficients(self, plan: SharedPlan) -> torch.Tensor:
        """``[U, C_out, C_in]`` (or ``[B, U, C_out, C_in]`` with batched parameters) for the plan's descriptors."""
        if self.exact is not None:
            if not plan.exact or len(plan.descriptors) != self.exact:
                raise ValueError(f"this layer holds {self.exact} per-term coefficients; the plan has "
                                 f"{len(plan.descriptors)} {'terms' if plan.exact else 'shared descriptors'}: it was "
                                 "built for another spec")
            return self.table.view(*self.table.shape[:-1], self.out_channels, self.in_channels)
        feats = plan.tensors(self.w1.device, self.w1.dtype)[0]
        if self.w1.dim() == 3:
            h = torch.tanh(torch.matmul(feats, self.w1) + self.b1[:, None])
            c = torch.matmul(h, self.w2) + self.b2[:, None]
            return c.view(c.shape[0], -1, self.out_channels, self.in_channels)
        h = torch.tanh(feats @ self.w1 + self.b1)
        return (h @ self.w2 + self.b2).view(-1, self.out_channels, self.in_channels)

    def _wall(self, plan: SharedPlan, b: int) -> torch.Tensor:
        """Every term's coefficients at once, ``[B, C_out, T * C_in]``: a group's matrix is a column slice. With
        ``cache_coefficients`` (a frozen copy, as in ``UNFOptimizer``) kept per plan while no parameter needs a
        gradient or changes in place."""
        params = list(self.parameters())
        # under torch.compile the coefficients are part of the graph: a cache would only add a second trace
        frozen = self.cache_coefficients and not _compiling() and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in params))
        versions = [p._version for p in params]
        hit = self.__dict__.get("_wall_cache")  # (plan, params, versions, wall); not a buffer: never saved or moved
        if frozen and hit is not None and hit[0] is plan and hit[2] == versions and hit[3].shape[0] in (1, b) and all(
                a is c for a, c in zip(hit[1], params)):  # the cache holds the tensors, so no id is reused
            return hit[3].expand(b, -1, -1)
        coef = self.coefficients(plan)
        batched = coef.dim() == 4
        if batched and coef.shape[0] != b:
            raise ValueError(f"batched coefficients for {coef.shape[0]} members, but the weight space has {b}")
        _, idx, scale, *_ = plan.tensors(coef.device, coef.dtype)
        cout = self.out_channels
        if batched:
            wall = (coef[:, idx] * scale[:, None, None]).permute(0, 2, 1, 3).reshape(b, cout, -1)
        else:
            wall = (coef[idx] * scale[:, None, None]).permute(1, 0, 2).reshape(1, cout, -1).contiguous()
        if frozen:
            self.__dict__["_wall_cache"] = (plan, params, versions, wall)
        return wall.expand(b, -1, -1)

    def forward(self, ws: WeightSpace, plan: SharedPlan, const: Optional[torch.Tensor] = None) -> WeightSpace:
        """``ws`` ``[B, C_in]`` -> ``[B, C_out]``. ``const`` ``[B or 1, S, T]`` (``T`` float tensors in spec order):
        the last ``S`` input channels, each constant over every tensor; then ``ws`` carries the first ``C_in - S``.
        The same output as those channels written out in full (to float rounding), without reading or writing them
        at full size: every mean of a constant is that constant, so their terms add one ``[B, C_out]`` vector per
        output piece. Needs ``plan.constant_channels`` (no diagonal embedding)."""
        nc = 0 if const is None else const.shape[1]
        if ws.channels + nc != self.in_channels:
            raise ValueError(f"SharedUNFLinear expects {self.in_channels} channels, got {ws.channels}"
                             + (f" plus {nc} constant ones" if nc else ""))
        layout, b, cout = plan.layout, ws.batch_size, self.out_channels
        wall = self._wall(plan, b)
        cin = self.in_channels - nc
        pieces_const = None
        if nc:
            if not plan.constant_channels:
                raise ValueError("constant channels need a plan without diagonal embeddings (plan.constant_channels "
                                 "is False for this spec): write them into the weight space instead")
            ntensors = len(layout.spec.float_names)
            if const.dim() != 3 or const.shape[2] != ntensors or const.shape[0] not in (1, b):
                raise ValueError(f"const has shape {tuple(const.shape)}; expected [{b} or 1, {nc}, {ntensors}]")
            wall = wall.view(b, cout, -1, self.in_channels)
            wall, wc = wall[..., :cin].reshape(b, cout, -1), wall[..., cin:]  # [B, C_out, T*C], [B, C_out, T, S]
            _, _, _, term_tensor, term_piece = plan.tensors(ws.device, wall.dtype)
            src = torch.cat([const, const.new_ones(*const.shape[:2], 1)], 2).expand(b, -1, -1)  # bias: constant 1
            per_term = torch.einsum("bots,bst->bot", wc, src[:, :, term_tensor])  # [B, C_out, T]
            pieces_const = per_term.new_zeros(b, cout, len(layout.pieces)).index_add_(2, term_piece, per_term)
        xs = [layout.extract(p, ws[p.tensor]) for p in layout.pieces]
        reduced = _Reductions(xs, plan.reductions, xs[0].new_ones(b, cin))  # bias: [C_out, C_in] @ 1
        blocks = []
        for q, groups in enumerate(plan.groups):
            sizes = layout.pieces[q].kept_sizes
            full = tuple(("k", j) for j in range(len(sizes)))
            terms, main = [], None
            for g in groups:
                parts = [_reordered(reduced[r], ro) for r, ro in g.inputs]
                x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
                w = wall[:, :, g.start * cin:g.stop * cin]
                x = x.reshape(b, x.shape[1], -1)
                if g.embedding.axes == full:
                    main = (w, x)  # full-size term: one baddbmm adds it to the sum of the others
                    continue
                y = torch.bmm(w, x)
                terms.append(embed(y.view(b, cout, *parts[0].shape[2:]), g.embedding, sizes))
            if pieces_const is not None:
                terms.append(pieces_const[:, :, q].reshape(b, cout, *([1] * len(sizes))))
            if main is None and not terms:
                terms = [xs[q].new_zeros(b, cout, *([1] * len(sizes)))]
            blocks.append(accumulate(terms, main, b, cout, sizes))
        out = {n: layout.insert(n, [blocks[i] for i in layout.by_tensor[n]], cout) for n in layout.spec.float_names}
        return WeightSpace(layout.spec, out, ws.extras)


def _reordered(y: torch.Tensor, reorder: tuple) -> torch.Tensor:
    return y if reorder == tuple(range(len(reorder))) else y.permute(0, 1, *[i + 2 for i in reorder])


__all__ = ["BASES", "SharedPlan", "SharedUNFLinear", "term_descriptor"]
