"""``Layout``: a spec's tensors cut into *pieces* whose every axis is either one group or folded into channels.

A concatenated axis is a direct sum, so each segment becomes its own piece; a product axis is reshaped into its
factors. Each fixed factor is then handled by the fixed-axis policy:

* size <= ``fold_max``: folded into channels (exact: the layer sees every position as its own feature). This is the
  default for small axes -- conv kernel taps, LSTM/GRU gates.
* larger: treated as a *pseudo-group* (named ``~...``) the layer is equivariant to, as the UNF and NFN-NP papers do for
  network inputs/outputs; :class:`~unf.nn.PositionalEncoding` breaks this false symmetry. Fixed axes that index the
  same units (``TensorSpec.fixed_ids``: e.g. the last layer's weight rows and bias) share one pseudo-group.

With ``fold_max`` at least as large as every fixed size the layers built on a layout span exactly the equivariant maps
of the spec (tested against a brute-force null space).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product as cartesian
from typing import Optional

import torch

from ..spec import WeightSpaceSpec
from ..spec.axes import _factors, _segments

DEFAULT_FOLD_MAX = 4


@dataclass(frozen=True)
class Piece:
    """One block of one tensor. ``labels[i]``: group of sub-axis ``i``, or None where it is folded into channels."""
    tensor: str
    slices: tuple  # per tensor axis: (start, stop) of this block
    sub_sizes: tuple  # sizes of the sub-axes (product factors), row-major
    labels: tuple

    @property
    def kept(self) -> tuple:
        """Positions of the permuted sub-axes, in order."""
        return tuple(i for i, lab in enumerate(self.labels) if lab is not None)

    @property
    def kept_labels(self) -> tuple:
        return tuple(self.labels[i] for i in self.kept)

    @property
    def kept_sizes(self) -> tuple:
        return tuple(self.sub_sizes[i] for i in self.kept)

    @property
    def fold(self) -> int:
        return math.prod([n for n, lab in zip(self.sub_sizes, self.labels) if lab is None])  # a list: torch.compile


class Layout:
    """Pieces of every float tensor of ``spec``, and the sizes of all (pseudo-)groups."""

    def __init__(self, spec: WeightSpaceSpec, fold_max: int = DEFAULT_FOLD_MAX):
        self.spec, self.fold_max = spec, fold_max
        self.group_sizes: dict[str, int] = dict(spec.groups)
        self.pieces: list[Piece] = []
        self.by_tensor: dict[str, list[int]] = {}
        for name in spec.float_names:
            ts = spec[name]
            per_axis = []  # per axis: list of (slice, [(size, label)])
            for axis, (entry, n) in enumerate(zip(ts.axes, ts.shape)):
                fid = ts.fixed_ids[axis] if ts.fixed_ids else None
                per_axis.append(self._axis_blocks(name, axis, entry, n, fid))
            for combo in cartesian(*per_axis):
                subs = [f for _, fs in combo for f in fs]
                piece = Piece(name, tuple(s for s, _ in combo), tuple(n for n, _ in subs),
                              tuple(lab for _, lab in subs))
                self.by_tensor.setdefault(name, []).append(len(self.pieces))
                self.pieces.append(piece)
        # pieces that are their whole tensor, unfolded: extract and insert pass the tensor through
        self.whole = {p for p in self.pieces if None not in p.labels and p.sub_sizes == tuple(spec[p.tensor].shape)
                      and len(self.by_tensor[p.tensor]) == 1}

    def _axis_blocks(self, name, axis, entry, n, fid) -> list:
        if entry is None:
            return [((0, n), [(n, self._fixed_label(n, fid or f"{name}:{axis}"))])]
        out, start = [], 0
        for k, seg in enumerate(_segments(entry)):
            facs = []
            for j, f in enumerate(_factors(seg)):
                if isinstance(f, str):
                    facs.append((self.spec.groups[f], f))
                else:
                    facs.append((f, self._fixed_label(f, f"{name}:{axis}:{k}:{j}")))
            size = math.prod(s for s, _ in facs)
            out.append(((start, start + size), facs))
            start += size
        return out

    def _fixed_label(self, n: int, key: str) -> Optional[str]:
        if n <= self.fold_max:
            return None
        label = "~" + key
        self.group_sizes[label] = n
        return label

    def pseudo_groups(self) -> dict[str, int]:
        return {g: n for g, n in self.group_sizes.items() if g.startswith("~")}

    # -- moving data between tensors and pieces ----------------------------------------------------------------------
    def extract(self, piece: Piece, t: torch.Tensor) -> torch.Tensor:
        """``[B, C, *tensor shape]`` -> ``[B, C * fold, *kept sizes]`` (a view when nothing is folded)."""
        if piece in self.whole:
            return t
        b, c = t.shape[:2]
        idx = (slice(None), slice(None)) + tuple(slice(s, e) for s, e in piece.slices)
        x = t[idx].reshape(b, c, *piece.sub_sizes)
        folded = [i for i, lab in enumerate(piece.labels) if lab is None]
        if folded:
            x = x.permute(0, 1, *[i + 2 for i in folded], *[i + 2 for i in piece.kept])
        return x.reshape(b, c * piece.fold, *piece.kept_sizes)

    def insert(self, name: str, blocks: list[torch.Tensor], channels: int) -> torch.Tensor:
        """Inverse of :meth:`extract` for all pieces of tensor ``name``: ``[B, C * fold, *kept]`` -> ``[B, C, *shape]``."""
        ids = self.by_tensor[name]
        if len(ids) == 1 and self.pieces[ids[0]] in self.whole:
            return blocks[0]
        shape = self.spec[name].shape
        parts = []
        for i, x in zip(ids, blocks):
            p = self.pieces[i]
            b = x.shape[0]
            folded = [j for j, lab in enumerate(p.labels) if lab is None]
            if folded:
                x = x.reshape(b, channels, *[p.sub_sizes[j] for j in folded], *p.kept_sizes)
                order = folded + list(p.kept)
                inv = [order.index(j) for j in range(len(order))]
                x = x.permute(0, 1, *[j + 2 for j in inv])
            parts.append(x.reshape(b, channels, *[e - s for s, e in p.slices]))
        if len(parts) == 1:
            return parts[0]
        out = parts[0].new_zeros(parts[0].shape[0], channels, *shape)
        for i, x in zip(ids, parts):
            idx = (slice(None), slice(None)) + tuple(slice(s, e) for s, e in self.pieces[i].slices)
            out[idx] = x
        return out
