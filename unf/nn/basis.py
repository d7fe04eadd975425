"""The equivariant linear basis between pieces, compiled into a reusable plan.

For an input piece with permuted axes labelled ``in_labels`` and an output piece labelled ``out_labels``, the
equivariant linear maps are spanned by one term per choice, for every group, of a set partition of that group's
output and input axes (Zhou, Finn, Harrison 2024): indices in one block are equal, blocks are otherwise unconstrained.
A term therefore

1. *reduces* the input: input axes of one block are taken along their diagonal, blocks with no output axis are
   averaged away -- this depends only on the input side and is shared by every term (and every output) using it;
2. *mixes channels* with its own ``[C_out, C_in]`` coefficients -- terms that land in the output the same way are
   concatenated along channels and mixed by one matmul;
3. *embeds* into the output: blocks carried through fill their output axes (their diagonal, if several), output-only
   blocks broadcast.

The plan stores the distinct reductions, and for each output piece the distinct embeddings with the reductions that
feed them; it never builds a matrix whose size grows with the square of a tensor.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product as cartesian
import torch


@lru_cache(maxsize=None)
def set_partitions(n: int) -> tuple:
    """All set partitions of ``range(n)`` as tuples of blocks (tuples), in a fixed order."""
    if n == 0:
        return ((),)
    out = []
    for part in set_partitions(n - 1):
        for i in range(len(part)):
            out.append(part[:i] + (part[i] + (n - 1,),) + part[i + 1:])
        out.append(part + ((n - 1,),))
    return tuple(out)


def bell(n: int) -> int:
    return len(set_partitions(n))


@dataclass(frozen=True)
class Reduction:
    """Input side of a term: ``blocks`` are tuples of input-axis positions; ``kept[i]``: block i survives."""
    source: int  # index of the input piece (-1: the constant 1, used for biases)
    blocks: tuple
    kept: tuple

    @property
    def out_blocks(self) -> tuple:
        return tuple(b for b, k in zip(self.blocks, self.kept) if k)


@dataclass(frozen=True)
class Embedding:
    """Output side: per output axis, ``("k", j)`` = intermediate axis j, or ``("b", j)`` = broadcast block j."""
    axes: tuple

    @property
    def diagonal(self) -> bool:
        return len(set(self.axes)) < len(self.axes)


@dataclass
class Group:
    """Terms landing in one output piece the same way: their reductions (reordered) are mixed by one matmul."""
    embedding: Embedding
    inputs: list = field(default_factory=list)  # (reduction id, permutation of its kept axes)


def enumerate_terms(out_labels: tuple, in_labels: tuple):
    """Yield (reduction blocks, kept flags, embedding, reorder) for every basis term between two pieces.

    Block positions: output axes are 0..m-1, input axes m..m+k-1 (in the combined partition).
    """
    m = len(out_labels)
    labels = list(out_labels) + list(in_labels)
    groups = list(dict.fromkeys(labels))
    positions = {g: [i for i, lab in enumerate(labels) if lab == g] for g in groups}
    for choice in cartesian(*[set_partitions(len(positions[g])) for g in groups]):
        blocks = [tuple(positions[g][i] for i in blk) for g, part in zip(groups, choice) for blk in part]
        in_blocks = [(tuple(p - m for p in blk if p >= m), any(p < m for p in blk)) for blk in blocks]
        in_blocks = [(b, k) for b, k in in_blocks if b]
        in_blocks.sort(key=lambda bk: bk[0][0])
        red_blocks = tuple(b for b, _ in in_blocks)
        kept = tuple(k for _, k in in_blocks)
        # intermediate axes in reduction order: kept input blocks by first input position
        kept_in = [b for b, k in in_blocks if k]
        out_of = {}  # output axis -> ("k", j) / ("b", j)
        carried = [blk for blk in blocks if any(p < m for p in blk) and any(p >= m for p in blk)]
        bcast = [blk for blk in blocks if all(p < m for p in blk)]
        # order intermediate axes by first output position, remember how to reorder from reduction order
        carried.sort(key=lambda blk: min(blk))
        reorder = tuple(kept_in.index(tuple(p - m for p in blk if p >= m)) for blk in carried)
        for j, blk in enumerate(carried):
            for p in blk:
                if p < m:
                    out_of[p] = ("k", j)
        bcast.sort(key=lambda blk: min(blk))
        for j, blk in enumerate(bcast):
            for p in blk:
                out_of[p] = ("b", j)
        yield red_blocks, kept, Embedding(tuple(out_of[p] for p in range(m))), reorder


class Plan:
    """Compiled basis between the pieces of an input and an output layout (see module docstring).

    ``reductions``: distinct input reductions; ``groups[q]``: embedding groups of output piece q.
    ``bias``: include terms from the constant 1 (an equivariant bias).
    """

    def __init__(self, in_pieces: list, out_pieces: list, bias: bool):
        self.in_pieces, self.out_pieces = in_pieces, out_pieces
        self.reductions: list[Reduction] = []
        red_ids: dict[Reduction, int] = {}
        self.groups: list[list[Group]] = []
        self.counts: dict[tuple[int, int], int] = {}
        sources = list(enumerate(in_pieces)) + ([(-1, None)] if bias else [])
        for q, out_p in enumerate(out_pieces):
            by_emb: dict[Embedding, Group] = {}
            for s, in_p in sources:
                in_labels = in_p.kept_labels if in_p is not None else ()
                n = 0
                for blocks, kept, emb, reorder in enumerate_terms(out_p.kept_labels, in_labels):
                    red = Reduction(s, blocks, kept)
                    if red not in red_ids:
                        red_ids[red] = len(self.reductions)
                        self.reductions.append(red)
                    by_emb.setdefault(emb, Group(emb)).inputs.append((red_ids[red], reorder))
                    n += 1
                self.counts[(q, s)] = n
            self.groups.append(list(by_emb.values()))


def reduce_piece(x: torch.Tensor, red: Reduction) -> torch.Tensor:
    """``[B, C, *kept]`` -> ``[B, C, *surviving blocks]``: diagonals within blocks, means over dropped blocks."""
    if all(len(b) == 1 for b in red.blocks):
        dropped = [b[0] + 2 for b, k in zip(red.blocks, red.kept) if not k]
        return x.mean(dim=dropped) if dropped else x
    letters = string.ascii_letters[2:]
    sub = ["?"] * (x.dim() - 2)
    for j, blk in enumerate(red.blocks):
        for p in blk:
            sub[p] = letters[j]
    out = "".join(letters[j] for j, k in enumerate(red.kept) if k)
    y = torch.einsum(f"ab{''.join(sub)}->ab{out}", x)
    n = math.prod([x.shape[2 + blk[0]] for blk, k in zip(red.blocks, red.kept) if not k])
    return y / n if n > 1 else y


def embed(y: torch.Tensor, emb: Embedding, out_sizes: tuple) -> torch.Tensor:
    """``[B, C, *carried axes]`` -> a tensor broadcastable to ``[B, C, *out_sizes]`` (dense only for diagonals)."""
    b, c = y.shape[:2]
    if not emb.diagonal:
        return y.reshape(b, c, *[out_sizes[i] if kind == "k" else 1 for i, (kind, _) in enumerate(emb.axes)])
    # diagonal embedding: write into a zero tensor through a strided view with one axis per block
    z = y.new_zeros(b, c, *out_sizes)
    blocks = list(dict.fromkeys(emb.axes))
    strides = [sum(z.stride(2 + i) for i, a in enumerate(emb.axes) if a == blk) for blk in blocks]
    sizes = [out_sizes[emb.axes.index(blk)] for blk in blocks]
    view = z.as_strided((b, c, *sizes), (z.stride(0), z.stride(1), *strides))
    src = y.reshape(b, c, *[sizes[i] if blk[0] == "k" else 1 for i, blk in enumerate(blocks)])
    view.copy_(src.expand_as(view))
    return z
