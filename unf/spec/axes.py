"""Axis entries: how a permutation acts on one axis of a tensor.

An axis entry is one of

* ``None`` -- the axis is fixed (never permuted);
* ``"g"`` -- the whole axis is permuted by group ``g``;
* a tuple of factors, outermost first, e.g. ``("c", 16)`` -- the axis is the row-major flattening of a product of
  sub-axes; each factor is a fixed size (``int``) or a group name (``str``).  A Linear after flattening a
  ``C x H x W`` map has in-axis ``("c", H * W)``;
* a list of segments, e.g. ``["a", "b"]`` or ``[("heads", "qk"), ("heads", "qk"), ("heads", "v")]`` -- the axis is a
  concatenation; each segment is a group name, a tuple as above, or an ``int`` (a fixed block of that size).

Permuting an axis means ``x.index_select(axis, idx)`` where ``idx`` is built from the group permutations by
:func:`axis_index`.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch

Factor = Union[int, str]
Segment = Union[int, str, tuple]
AxisEntry = Union[None, str, tuple, list]


def _segments(entry: AxisEntry) -> list:
    return list(entry) if isinstance(entry, list) else [entry]


def _factors(segment: Segment) -> tuple:
    return segment if isinstance(segment, tuple) else (segment,)


def entry_groups(entry: AxisEntry) -> list[str]:
    """Group names used by an axis entry, in order of appearance (with repeats)."""
    if entry is None:
        return []
    return [f for seg in _segments(entry) for f in _factors(seg) if isinstance(f, str)]


def entry_size(entry: AxisEntry, groups: Mapping[str, int]) -> Optional[int]:
    """Size of the axis an entry describes, or ``None`` if it cannot tell (a bare ``None``)."""
    if entry is None:
        return None
    total = 0
    for seg in _segments(entry):
        total += math.prod(groups[f] if isinstance(f, str) else f for f in _factors(seg))
    return total


def check_entry(entry: AxisEntry, where: str) -> None:
    """Raise ``ValueError`` if ``entry`` is not a well-formed axis entry; ``where`` names the tensor and axis."""
    if entry is None or isinstance(entry, str):
        return

    def check_factor(f, ctx):
        if isinstance(f, bool) or not isinstance(f, (int, str)):
            raise ValueError(f"{where}: factor {f!r} in {ctx} must be an int size or a group name (str)")
        if isinstance(f, int) and f < 1:
            raise ValueError(f"{where}: fixed size {f} in {ctx} must be >= 1")

    if isinstance(entry, tuple):
        if not entry:
            raise ValueError(f"{where}: an empty product () is not an axis entry; use None for a fixed axis")
        for f in entry:
            check_factor(f, f"product {entry!r}")
        return
    if isinstance(entry, list):
        if not entry:
            raise ValueError(f"{where}: an empty concatenation [] is not an axis entry; use None for a fixed axis")
        for seg in entry:
            if isinstance(seg, tuple):
                check_entry(seg, where)
            elif isinstance(seg, list) or seg is None:
                raise ValueError(
                    f"{where}: segment {seg!r} of {entry!r} must be a group name, a product tuple or an int size "
                    "(a fixed segment needs its size, so None is not allowed inside a concatenation)")
            else:
                check_factor(seg, f"concatenation {entry!r}")
        return
    raise ValueError(f"{where}: axis entry {entry!r} must be None, a group name, a tuple (product) or a list "
                     "(concatenation)")


def axis_index(entry: AxisEntry, perm: Mapping[str, torch.Tensor], groups: Mapping[str, int],
               device=None) -> Optional[torch.Tensor]:
    """Index tensor ``idx`` such that ``x.index_select(axis, idx)`` permutes the axis; ``None`` if it is fixed."""
    if not entry_groups(entry):
        return None
    pieces, offset = [], 0
    for seg in _segments(entry):
        idx = torch.zeros(1, dtype=torch.long, device=device)
        for f in _factors(seg):
            n = groups[f] if isinstance(f, str) else f
            sub = perm[f].to(device) if isinstance(f, str) else torch.arange(n, device=device)
            # row-major: the outer index varies slowest
            idx = (idx[:, None] * n + sub[None, :]).reshape(-1)
        pieces.append(idx + offset)
        offset += idx.numel()
    return torch.cat(pieces)


def entry_to_json(entry: AxisEntry):
    if isinstance(entry, tuple):
        return {"product": list(entry)}
    if isinstance(entry, list):
        return {"concat": [entry_to_json(s) for s in entry]}
    return entry


def entry_from_json(obj) -> AxisEntry:
    if isinstance(obj, dict):
        if set(obj) == {"product"}:
            return tuple(obj["product"])
        if set(obj) == {"concat"}:
            return [entry_from_json(s) for s in obj["concat"]]
        raise ValueError(f"axis entry {obj!r}: expected {{'product': [...]}} or {{'concat': [...]}}")
    return obj


def format_entry(entry: AxisEntry) -> str:
    if entry is None:
        return "-"
    if isinstance(entry, str):
        return entry
    if isinstance(entry, int):
        return str(entry)
    if isinstance(entry, tuple):
        return "(" + " x ".join(str(f) for f in entry) + ")"
    return "[" + " | ".join(format_entry(s) for s in entry) + "]"


def solve_group_sizes(axes: Mapping[str, Sequence[AxisEntry]], shapes: Mapping[str, Sequence[int]],
                      groups: Optional[Mapping[str, int]] = None) -> dict[str, int]:
    """Infer each group's size from the axis sizes it appears in; check every axis adds up.

    Raises ``ValueError`` naming the tensor and axis on any inconsistency.
    """
    sizes: dict[str, int] = dict(groups or {})
    todo = [(name, i, e, shapes[name][i]) for name, ax in axes.items() for i, e in enumerate(ax) if e is not None]
    changed = True
    while changed:
        changed = False
        for name, i, entry, n in todo:
            segs = _segments(entry)
            # solvable when one unknown group is left and the axis size is linear in it (at most once per segment)
            unknown = {f for s in segs for f in _factors(s) if isinstance(f, str) and f not in sizes}
            if len(unknown) != 1:
                continue
            g = unknown.pop()
            if any(_factors(s).count(g) > 1 for s in segs):
                continue
            rest = sum(math.prod(sizes[f] if isinstance(f, str) else f for f in _factors(s))
                       for s in segs if g not in _factors(s))
            inner = sum(math.prod(sizes[f] if isinstance(f, str) else f for f in _factors(s) if f != g)
                        for s in segs if g in _factors(s))
            if (n - rest) <= 0 or (n - rest) % inner:
                raise ValueError(f"tensor {name!r} axis {i}: size {n} cannot be split as {format_entry(entry)}")
            sizes[g] = (n - rest) // inner
            changed = True
    for name, i, entry, n in todo:
        missing = list(dict.fromkeys(g for g in entry_groups(entry) if g not in sizes))
        if missing:
            raise ValueError(f"tensor {name!r} axis {i}: cannot determine the size of group(s) {missing} from "
                             f"{format_entry(entry)}; pass groups={{name: size}}")
        got = entry_size(entry, sizes)
        if got != n:
            raise ValueError(f"tensor {name!r} axis {i}: entry {format_entry(entry)} has size {got} "
                             f"(groups {({g: sizes[g] for g in entry_groups(entry)})}) but the axis has size {n}")
    return sizes
