"""``WeightSpaceSpec``: which permutation group acts on each axis of each tensor of a state_dict."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch

from .axes import (AxisEntry, axis_index, check_entry, entry_from_json, entry_groups, entry_to_json, format_entry,
                   solve_group_sizes)
from .permutation import Permutation

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One state_dict entry: its shape and one axis entry per axis (see :mod:`unf.spec.axes`).

    ``floating``: False for integer buffers (``num_batches_tracked``), which weight-space models skip.
    ``buffer``: True for buffers (BatchNorm running statistics): permuted like parameters, but not learned.
    ``fixed_ids``: per axis, for a fixed axis that indexes the same units as fixed axes of other tensors (the output
    layer's weight rows and bias, say), a label shared by those axes; else None. Layers that treat fixed axes as
    pseudo-groups (:mod:`unf.nn`) use it to keep such axes aligned.
    """
    shape: tuple[int, ...]
    axes: tuple[AxisEntry, ...]
    floating: bool = True
    fixed_ids: Optional[tuple[Optional[str], ...]] = None
    buffer: bool = False

    @property
    def groups(self) -> list[str]:
        """Distinct groups acting on this tensor, in axis order."""
        return list(dict.fromkeys(g for e in self.axes for g in entry_groups(e)))

    @property
    def permuted(self) -> bool:
        return bool(self.groups)


class WeightSpaceSpec(Mapping[str, TensorSpec]):
    """A permutation-symmetry spec for a weight space.

    ``spec.groups``: group name -> size. ``spec[name]``: the :class:`TensorSpec` of a state_dict entry.
    Build one with :func:`unf.spec_from_module` (inferred) or :meth:`from_axes` (by hand).
    """

    def __init__(self, groups: Mapping[str, int], tensors: Mapping[str, TensorSpec]):
        self.groups: dict[str, int] = dict(groups)
        self._tensors: dict[str, TensorSpec] = dict(tensors)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_axes(cls, axes: Mapping[str, Sequence[AxisEntry]], shapes: Mapping[str, Sequence[int]],
                  groups: Optional[Mapping[str, int]] = None,
                  fixed_ids: Optional[Mapping[str, Sequence[Optional[str]]]] = None,
                  buffers: Sequence[str] = ()) -> "WeightSpaceSpec":
        """A hand-written spec. ``axes``: name -> per-axis entries; ``shapes``: name -> shape, or a state_dict (then
        integer tensors are marked ``floating=False``). Group sizes are inferred from the axes (or given in
        ``groups``) and checked. ``fixed_ids`` and ``buffers`` (names of buffer entries): see :class:`TensorSpec`."""
        floating = {k: v.is_floating_point() for k, v in shapes.items() if isinstance(v, torch.Tensor)}
        shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
        fixed_ids = dict(fixed_ids or {})
        if set(axes) != set(shapes):
            missing, extra = sorted(set(shapes) - set(axes)), sorted(set(axes) - set(shapes))
            raise ValueError(f"axes and shapes name different tensors: no axes for {missing}, no shape for {extra}")
        tensors = {}
        for name, shape in shapes.items():
            ax = tuple(axes[name])
            if len(ax) != len(shape):
                raise ValueError(f"tensor {name!r}: {len(ax)} axis entries for a {len(shape)}-d shape {shape}")
            for i, e in enumerate(ax):
                check_entry(e, f"tensor {name!r} axis {i}")
            ids = fixed_ids.get(name)
            if ids is not None:
                ids = tuple(ids)
                if len(ids) != len(shape) or any(d is not None and e is not None for d, e in zip(ids, ax)):
                    raise ValueError(f"tensor {name!r}: fixed_ids {ids} must have one entry per axis, and only "
                                     "fixed (None) axes may carry an id")
                ids = ids if any(d is not None for d in ids) else None
            tensors[name] = TensorSpec(shape, ax, floating.get(name, True), ids, name in set(buffers))
        sizes = solve_group_sizes({k: t.axes for k, t in tensors.items()}, shapes, groups)
        id_sizes: dict = {}
        for name, t in tensors.items():
            for i, d in enumerate(t.fixed_ids or ()):
                if d is not None and id_sizes.setdefault(d, t.shape[i]) != t.shape[i]:
                    raise ValueError(f"tensor {name!r} axis {i}: fixed id {d!r} is used with sizes "
                                     f"{id_sizes[d]} and {t.shape[i]}")
        order = list(dict.fromkeys(g for t in tensors.values() for g in t.groups))
        unused = sorted(set(sizes) - set(order))
        if unused:
            raise ValueError(f"groups {unused} are given sizes but act on no axis")
        return cls({g: sizes[g] for g in order}, tensors)

    # -- mapping interface ----------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> TensorSpec:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    @property
    def parameter_names(self) -> list[str]:
        """Float entries that are parameters (not buffers)."""
        return [k for k, t in self._tensors.items() if t.floating and not t.buffer]

    @property
    def float_names(self) -> list[str]:
        """Entries that weight-space models see (integer buffers left out)."""
        return [k for k, t in self._tensors.items() if t.floating]

    def subset(self, names: Sequence[str]) -> "WeightSpaceSpec":
        """The spec of the tensors ``names`` alone (in that order), keeping only the groups they use.

        The parameters-only spec of a model is ``spec.subset(dict(model.named_parameters()))``: buffers and tied
        duplicates (which ``named_parameters`` lists once) drop out."""
        unknown = [n for n in names if n not in self._tensors]
        if unknown:
            raise KeyError(f"subset: tensors {unknown} are not in the spec (it has {list(self._tensors)[:8]}...)")
        tensors = {n: self._tensors[n] for n in names}
        used = dict.fromkeys(g for t in tensors.values() for g in t.groups)
        return WeightSpaceSpec({g: n for g, n in self.groups.items() if g in used}, tensors)

    def __eq__(self, other) -> bool:
        return (isinstance(other, WeightSpaceSpec) and self.groups == other.groups
                and self._tensors == other._tensors)

    # -- permutations ----------------------------------------------------------------------------------------------
    def identity(self, device=None) -> Permutation:
        return Permutation({g: torch.arange(n, device=device) for g, n in self.groups.items()})

    def sample_permutation(self, generator: Optional[torch.Generator] = None) -> Permutation:
        device = generator.device if generator is not None else None
        return Permutation({g: torch.randperm(n, generator=generator, device=device) for g, n in self.groups.items()})

    def axis_index(self, name: str, axis: int, perm: Mapping[str, torch.Tensor], device=None) -> Optional[torch.Tensor]:
        """Index tensor permuting ``axis`` of tensor ``name`` (``None`` if the axis is fixed)."""
        return axis_index(self._tensors[name].axes[axis], perm, self.groups, device)

    def permute(self, state_dict: Mapping[str, torch.Tensor], perm: Mapping[str, torch.Tensor]) -> dict:
        """A new state_dict with every tensor permuted by ``perm``; the input is not modified."""
        self.validate(state_dict)
        missing = sorted(set(self.groups) - set(perm))
        if missing:
            raise ValueError(f"permutation has no entry for group(s) {missing}")
        out = {}
        for name, t in state_dict.items():
            for axis in range(t.dim()):
                idx = self.axis_index(name, axis, perm, t.device)
                if idx is not None:
                    t = t.index_select(axis, idx)
            out[name] = t
        return out

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` if ``state_dict`` has missing/extra keys or shapes that do not fit this spec."""
        missing = [k for k in self._tensors if k not in state_dict]
        extra = [k for k in state_dict if k not in self._tensors]
        if missing or extra:
            raise ValueError(f"state_dict does not fit the spec: missing keys {missing}, unexpected keys {extra}")
        for name, ts in self._tensors.items():
            shape = tuple(state_dict[name].shape)
            if shape != ts.shape:
                raise ValueError(f"state_dict[{name!r}] has shape {shape}; the spec expects {ts.shape}")

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps({
            "format": "unf.WeightSpaceSpec", "version": FORMAT_VERSION, "groups": self.groups,
            "tensors": {k: {"shape": list(t.shape), "axes": [entry_to_json(e) for e in t.axes],
                            **({} if t.floating else {"floating": False}),
                            **({"buffer": True} if t.buffer else {}),
                            **({"fixed_ids": list(t.fixed_ids)} if t.fixed_ids else {})}
                        for k, t in self._tensors.items()},
        }, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "WeightSpaceSpec":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"spec JSON is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or obj.get("format") != "unf.WeightSpaceSpec":
            raise ValueError("not a unf.WeightSpaceSpec JSON document (missing 'format': 'unf.WeightSpaceSpec')")
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"spec JSON version {obj.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        tensors = obj["tensors"]
        spec = cls.from_axes({k: [entry_from_json(e) for e in t["axes"]] for k, t in tensors.items()},
                             {k: t["shape"] for k, t in tensors.items()}, obj["groups"],
                             {k: t["fixed_ids"] for k, t in tensors.items() if "fixed_ids" in t},
                             [k for k, t in tensors.items() if t.get("buffer")])
        spec._tensors = {k: (TensorSpec(t.shape, t.axes, False, t.fixed_ids, t.buffer)
                             if tensors[k].get("floating", True) is False else t) for k, t in spec._tensors.items()}
        spec.groups = {g: spec.groups[g] for g in obj["groups"]}  # keep the document's group order
        return spec

    # -- display -------------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"WeightSpaceSpec: {len(self.groups)} groups, {len(self)} tensors"]
        if self.groups:
            lines.append("groups: " + ", ".join(f"{g}={n}" for g, n in self.groups.items()))
        rows = [(k, "x".join(map(str, t.shape)) or "scalar", ", ".join(format_entry(e) for e in t.axes))
                for k, t in self._tensors.items()]
        w0 = max([len("tensor")] + [len(r[0]) for r in rows])
        w1 = max([len("shape")] + [len(r[1]) for r in rows])
        lines.append(f"{'tensor':<{w0}}  {'shape':<{w1}}  axes")
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"WeightSpaceSpec(groups={self.groups}, tensors={len(self)})"
