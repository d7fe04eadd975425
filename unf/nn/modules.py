"""Point-wise weight-space modules: non-linearities, dropout, normalisation, positional encodings, pooling.

Everything here commutes with the spec's permutations: point-wise maps trivially, normalisation because its
statistics are averages over whole tensors, pooling because it averages over every permuted axis.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .basis import Reduction, reduce_piece, set_partitions
from .layout import DEFAULT_FOLD_MAX, Layout
from .linear import as_layout

_ACTIVATIONS: dict[str, Callable] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
                                     "identity": lambda x: x}


class Pointwise(nn.Module):
    """An element-wise function applied to every entry: ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"`` or a callable."""

    def __init__(self, fn: Union[str, Callable] = "relu"):
        super().__init__()
        if isinstance(fn, str) and fn not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {fn!r}; choose from {sorted(_ACTIVATIONS)} or pass a callable")
        self.fn = _ACTIVATIONS[fn] if isinstance(fn, str) else fn

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return ws.map(self.fn)


class WSDropout(nn.Module):
    """Element-wise dropout (equivariant in distribution)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, ws: WeightSpace) -> WeightSpace:
        return ws.map(lambda t: F.dropout(t, self.p, self.training))


class WSNorm(nn.Module):
    """Per sample, tensor and channel: subtract the mean and divide by the std over the tensor's entries, then a
    learned per-tensor, per-channel scale and shift. Shapes: ``[B, C, *shape]`` in and out.

    ``forward(ws, scale, shift)`` also applies a FiLM modulation ``y * (1 + scale) + shift`` (``[B, T, C]`` each,
    ``T``: the spec's float tensors) in the same pass. The statistics come from ``F.group_norm`` with one group per
    channel (one fused kernel each way; ``torch.var`` is 10-80x slower on CPU); with gradients off the affine map
    works in place."""

    def __init__(self, spec: WeightSpaceSpec, channels: int, eps: float = 1e-5):
        super().__init__()
        self.names, self.eps = spec.float_names, eps
        self.weight = nn.Parameter(torch.ones(len(self.names), channels))
        self.bias = nn.Parameter(torch.zeros(len(self.names), channels))

    def forward(self, ws: WeightSpace, scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> WeightSpace:
        if (scale is None) != (shift is None):
            raise ValueError("WSNorm: pass both FiLM scale and shift, or neither")
        inplace = not torch.is_grad_enabled()
        out = {}
        for i, n in enumerate(self.names):
            t = ws[n]
            b, c = t.shape[:2]
            w, bias = self.weight[i].expand(b, c), self.bias[i].expand(b, c)  # [B, C]
            if scale is not None:
                w, bias = w * (1 + scale[:, i]), bias * (1 + scale[:, i]) + shift[:, i]
            if t.dim() == 2:  # a scalar per channel: nothing to normalise over
                out[n] = torch.addcmul(bias, t, w)
                continue
            # group norm with one group per channel is exactly this normalisation, in one fused kernel each way
            y = F.group_norm(t.reshape(b, c, -1), c, eps=self.eps)
            y = y.mul_(w[..., None]) if inplace else y * w[..., None]  # the product's backward needs y
            out[n] = y.add_(bias[..., None]).view(t.shape)
        return WeightSpace(ws.spec, out, ws.extras)


class PositionalEncoding(nn.Module):
    """Appends ``dim`` learned channels that tell apart the positions of every pseudo-group (fixed axes treated as
    permutable, see :class:`Layout`); pieces without pseudo-groups get zeros. ``[B, C, ...] -> [B, C + dim, ...]``.

    The result is still equivariant to the spec's true groups; it is no longer invariant to the pseudo-groups.
    """

    def __init__(self, spec: Union[WeightSpaceSpec, Layout], dim: int = 4, fold_max: int = DEFAULT_FOLD_MAX):
        super().__init__()
        self.layout = as_layout(spec, fold_max)
        self.dim = dim
        pseudo = self.layout.pseudo_groups()
        self.keys = {g: f"pg{i}" for i, g in enumerate(pseudo)}  # group names may hold dots: not valid keys
        self.tables = nn.ParameterDict({self.keys[g]: nn.Parameter(torch.randn(dim, n)) for g, n in pseudo.items()})

    def forward(self, ws: WeightSpace) -> WeightSpace:
        b, layout = ws.batch_size, self.layout
        blocks = []
        for p in layout.pieces:
            pe = torch.zeros(self.dim * p.fold, *p.kept_sizes, dtype=ws.dtype, device=ws.device)
            for axis, g in enumerate(p.kept_labels):
                if g.startswith("~"):
                    table = self.tables[self.keys[g]].to(ws.dtype).repeat_interleave(p.fold, 0)
                    shape = [table.shape[0]] + [1] * len(p.kept_sizes)
                    shape[1 + axis] = table.shape[1]
                    pe = pe + table.view(shape)
            blocks.append(pe.expand(b, *pe.shape))
        out = {}
        for n in layout.spec.float_names:
            pe = layout.insert(n, [blocks[i] for i in layout.by_tensor[n]], self.dim)
            out[n] = torch.cat([ws[n], pe], dim=1)
        return WeightSpace(ws.spec, out, ws.extras)


class InvariantPool(nn.Module):
    """All invariant linear features: per piece, for each set partition of each group's axes, the mean over the
    corresponding diagonals. ``WeightSpace[B, C] -> [B, num_features(C)]``."""

    def __init__(self, spec: Union[WeightSpaceSpec, Layout], fold_max: int = DEFAULT_FOLD_MAX):
        super().__init__()
        self.layout = as_layout(spec, fold_max)
        self.reductions = []
        for i, p in enumerate(self.layout.pieces):
            labels = p.kept_labels
            groups = list(dict.fromkeys(labels))
            positions = {g: [j for j, lab in enumerate(labels) if lab == g] for g in groups}
            combos = [[]]
            for g in groups:
                combos = [c + [tuple(positions[g][k] for k in blk) for blk in part]
                          for c in combos for part in set_partitions(len(positions[g]))]
            for blocks in combos:
                blocks = tuple(sorted(blocks))
                self.reductions.append(Reduction(i, blocks, (False,) * len(blocks)))

    def num_features(self, channels: int) -> int:
        return sum(channels * self.layout.pieces[r.source].fold for r in self.reductions)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        xs = {}
        feats = []
        for r in self.reductions:
            p = self.layout.pieces[r.source]
            if r.source not in xs:
                xs[r.source] = self.layout.extract(p, ws[p.tensor])
            feats.append(reduce_piece(xs[r.source], r).reshape(ws.batch_size, -1))
        return torch.cat(feats, dim=1)


def tensor_statistics(ws: WeightSpace) -> torch.Tensor:
    """``[B, 7 * channels * tensors]``: mean, variance and 0/25/50/75/100% quantiles (linear interpolation, as
    ``torch.quantile``) of every tensor and channel. Computed in at least float32, from one sort: unlike
    ``torch.quantile`` this has no input-size limit and takes half precision."""
    feats = []
    for t in ws.values():
        flat = t.flatten(2)  # [B, C, N]
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        pos = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64) * (flat.shape[2] - 1)
        lo, frac = pos.floor().long(), (pos - pos.floor()).to(device=flat.device, dtype=flat.dtype)
        hi = (lo + 1).clamp_max(flat.shape[2] - 1)
        # sort without autograd and gather the 10 order statistics: the same values and gradients, but the backward
        # scatters into 10 entries per row instead of the whole sorted tensor
        order = flat.detach().argsort(dim=2)[..., torch.cat([lo, hi]).to(flat.device)]
        picked = flat.gather(2, order)
        quant = picked[..., :5] + (picked[..., 5:] - picked[..., :5]) * frac  # [B, C, 5]
        mean = flat.mean(2, keepdim=True)
        var = torch.linalg.vector_norm(flat - mean, dim=2, keepdim=True).square() / flat.shape[2]  # not torch.var: slow
        feats += [mean, var, quant]
    return torch.cat(feats, dim=2).flatten(1)
