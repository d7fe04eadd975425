"""``TaskVector``: the difference ``finetuned - base`` of two state_dicts, with the arithmetic of task arithmetic.

Built on the parameters-only part of a spec (:meth:`unf.WeightSpaceSpec.subset`) and on :class:`unf.WeightSpace`
arithmetic, so :meth:`TaskVector.permute` uses the spec's own permutation logic.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace

StateDict = Mapping[str, torch.Tensor]
Exclude = Union[str, Sequence[str], Callable[[str, torch.Tensor], bool]]

# Without a spec, BatchNorm statistics are recognised by name.
_STAT_PATTERNS = ("*running_mean", "*running_var", "*num_batches_tracked")


def _excluded(name: str, t: torch.Tensor, spec: Optional[WeightSpaceSpec], exclude: Exclude) -> bool:
    if not t.is_floating_point():  # integer buffers (num_batches_tracked) never enter arithmetic
        return True
    if callable(exclude):
        return bool(exclude(name, t))
    if isinstance(exclude, str):
        if exclude == "buffers":
            return spec[name].buffer if spec is not None else any(fnmatch.fnmatch(name, p) for p in _STAT_PATTERNS)
        if exclude == "none":
            return False
        raise ValueError(f"exclude={exclude!r}: use 'buffers' (default), 'none', a list of name patterns or a "
                         "callable (name, tensor) -> bool")
    return any(fnmatch.fnmatch(name, p) for p in exclude)


def check_compatible(a: StateDict, b: StateDict, what: str = "state_dicts") -> None:
    """Raise ``ValueError`` naming the first tensor on which ``a`` and ``b`` differ in presence or shape."""
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    if only_a or only_b:
        raise ValueError(f"{what} do not match: tensors only in the first: {only_a[:5]}, only in the second: "
                         f"{only_b[:5]}; pass state_dicts of the same architecture")
    for k in a:
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise ValueError(f"{what} do not match: tensor {k!r} has shape {tuple(a[k].shape)} in the first and "
                             f"{tuple(b[k].shape)} in the second")


class TaskVector:
    """``finetuned - base`` over the parameters (``tv[name]``: a tensor of the parameter's shape).

    ``spec``: the model's spec (from :func:`unf.spec_from_module`); it makes :meth:`permute` possible and tells
    buffers from parameters. Without it every tensor is treated as unpermuted.
    ``exclude``: which float tensors to leave out. ``"buffers"`` (default): buffers the spec marks (BatchNorm running
    statistics; without a spec, names ending in ``running_mean``/``running_var``); ``"none"``; a list of
    :mod:`fnmatch` patterns (``["*.bn*.weight"]``); or a callable ``(name, tensor) -> bool``. Integer buffers are always
    left out. :meth:`apply` copies excluded tensors from the state_dict it is applied to.
    """

    def __init__(self, base_state_dict: Optional[StateDict] = None, finetuned_state_dict: Optional[StateDict] = None,
                 spec: Optional[WeightSpaceSpec] = None, exclude: Exclude = "buffers", *,
                 _space: Optional[WeightSpace] = None):
        if _space is not None:
            self.space = _space
            return
        if base_state_dict is None or finetuned_state_dict is None:
            raise ValueError("TaskVector needs base_state_dict and finetuned_state_dict")
        check_compatible(base_state_dict, finetuned_state_dict, "base and finetuned state_dicts")
        if spec is not None:
            spec.validate(finetuned_state_dict)
        names = [k for k, t in finetuned_state_dict.items() if not _excluded(k, t, spec, exclude)]
        if not names:
            raise ValueError("TaskVector: every tensor is excluded; check the exclude argument")
        sub = spec.subset(names) if spec is not None else _unpermuted_spec(finetuned_state_dict, names)
        diffs = {}
        for k in names:
            ft = finetuned_state_dict[k].detach()
            diffs[k] = (ft - base_state_dict[k].detach().to(ft.device, ft.dtype))[None, None]
        self.space = WeightSpace(sub, diffs)

    # -- construction helpers ------------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], spec: Optional[WeightSpaceSpec] = None
                     ) -> "TaskVector":
        """A task vector given directly (name -> tensor); ``spec`` may be the full spec (it is subset)."""
        names = list(tensors)
        sub = spec.subset(names) if spec is not None else _unpermuted_spec(tensors, names)
        for k in names:
            if tuple(tensors[k].shape) != tuple(sub[k].shape):
                raise ValueError(f"tensor {k!r} has shape {tuple(tensors[k].shape)}; the spec expects {sub[k].shape}")
        return cls(_space=WeightSpace(sub, {k: tensors[k][None, None] for k in names}))

    def _new(self, space: WeightSpace) -> "TaskVector":
        return TaskVector(_space=space)

    # -- access ---------------------------------------------------------------------------------------------------
    @property
    def spec(self) -> WeightSpaceSpec:
        """The parameters-only spec of the tensors held."""
        return self.space.spec

    @property
    def names(self) -> list[str]:
        return self.space.names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.space[name][0, 0]

    def __iter__(self):
        return iter(self.space.names)

    def __len__(self) -> int:
        return len(self.space.names)

    def items(self):
        return ((k, self[k]) for k in self.names)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> tensor (the vector itself, not a model)."""
        return dict(self.items())

    def __repr__(self) -> str:
        return f"TaskVector(tensors={len(self)}, norm={self.norm():.4g})"

    # -- arithmetic -------------------------------------------------------------------------------------------------
    def _check(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"cannot combine a TaskVector with {type(other).__name__}")
        if self.names != other.names:
            a, b = set(self.names), set(other.names)
            raise ValueError(f"task vectors hold different tensors: only in the first {sorted(a - b)[:5]}, only in "
                             f"the second {sorted(b - a)[:5]}" if a != b else
                             "task vectors hold the same tensors in different orders")
        for k in self.names:
            if self[k].shape != other[k].shape:
                raise ValueError(f"task vectors differ in tensor {k!r}: shapes {tuple(self[k].shape)} and "
                                 f"{tuple(other[k].shape)}")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        self._check(other)
        return self._new(self.space + other.space)

    __radd__ = __add__

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self._check(other)
        return self._new(self.space - other.space)

    def __neg__(self) -> "TaskVector":
        return self._new(-self.space)

    def __mul__(self, scalar: float) -> "TaskVector":
        if not isinstance(scalar, (int, float)):
            raise TypeError("a TaskVector is multiplied by a scalar (int or float) only")
        return self._new(self.space * float(scalar))

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> "TaskVector":
        return self * (1.0 / scalar)

    def dot(self, other: "TaskVector") -> float:
        """Sum over tensors of the entrywise product."""
        self._check(other)
        return float(sum((self.space[k].double() * other.space[k].double()).sum() for k in self.names))

    def norm(self) -> float:
        """The L2 norm over all tensors."""
        return math.sqrt(self.dot(self))

    def cosine(self, other: "TaskVector") -> float:
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "TaskVector":
        """A new vector with ``fn(name, tensor)`` (same shape) for every tensor."""
        return TaskVector.from_tensors({k: fn(k, t) for k, t in self.items()}, self.spec)

    # -- use --------------------------------------------------------------------------------------------------------
    def apply(self, state_dict: StateDict, alpha: float = 1.0) -> dict[str, torch.Tensor]:
        """A new state_dict ``state_dict + alpha * self`` (tensors the vector lacks are copied)."""
        missing = [k for k in self.names if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks tensor(s) {missing[:5]} of the task vector; apply it to a "
                             "state_dict of the architecture it was made from")
        out = {}
        for k, t in state_dict.items():
            if k in self.space._tensors:
                v = self[k]
                if tuple(v.shape) != tuple(t.shape):
                    raise ValueError(f"state_dict tensor {k!r} has shape {tuple(t.shape)}; the task vector's is "
                                     f"{tuple(v.shape)}")
                out[k] = t.detach() + float(alpha) * v.to(t.device, t.dtype)
            else:
                out[k] = t.detach().clone()
        return out

    def permute(self, perm: Mapping[str, torch.Tensor]) -> "TaskVector":
        """The vector permuted by ``perm`` (a :class:`unf.Permutation` of the model's spec): the task vector of the
        permuted models, ``TaskVector(P(base), P(ft)) == TaskVector(base, ft).permute(P)``."""
        missing = sorted(set(self.spec.groups) - set(perm))
        if missing:
            raise ValueError(f"permutation has no entry for group(s) {missing}")
        return self._new(self.space.permute(perm))

    def random_like(self, seed: int = 0) -> "TaskVector":
        """A control: Gaussian random directions with the same per-tensor norms (seeded, device-independent)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for k, t in self.items():
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            n = r.norm()
            r = r * (t.double().norm() / n) if n > 0 else r
            out[k] = r.to(t.device, t.dtype)
        return TaskVector.from_tensors(out, self.spec)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TaskVector":
        return self._new(self.space.to(device, dtype))


def _unpermuted_spec(tensors: StateDict, names: Sequence[str]) -> WeightSpaceSpec:
    return WeightSpaceSpec.from_axes({k: [None] * tensors[k].dim() for k in names},
                                     {k: tuple(tensors[k].shape) for k in names})
