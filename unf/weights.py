"""``WeightSpace``: a batch of weight sets laid out for weight-space models.

Each float entry of a :class:`~unf.spec.WeightSpaceSpec` becomes one tensor ``[batch, channels, *shape]``.
Integer buffers (``num_batches_tracked``) are not features: they are carried along unchanged for
:meth:`WeightSpace.to_state_dicts` and never enter arithmetic.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .spec import Permutation, WeightSpaceSpec

Number = Union[int, float]


class WeightSpace:
    """``ws[name]``: ``[batch, channels, *spec[name].shape]`` for every float entry of ``spec``."""

    def __init__(self, spec: WeightSpaceSpec, tensors: Mapping[str, torch.Tensor],
                 extras: Optional[list[dict]] = None):
        names = spec.float_names
        missing, extra = [n for n in names if n not in tensors], [n for n in tensors if n not in names]
        if missing or extra:
            raise ValueError(f"WeightSpace tensors do not fit the spec: missing {missing}, unexpected {extra}")
        first = tensors[names[0]] if names else None
        for n in names:
            t = tensors[n]
            want = tuple(spec[n].shape)
            if t.dim() != 2 + len(want) or tuple(t.shape[2:]) != want or t.shape[:2] != first.shape[:2]:
                raise ValueError(f"WeightSpace tensor {n!r} has shape {tuple(t.shape)}; expected "
                                 f"[batch={first.shape[0]}, channels={first.shape[1]}, *{want}]")
        self.spec = spec
        self._tensors = {n: tensors[n] for n in names}
        self.extras = extras  # per batch member: the non-float state_dict entries

    # -- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dicts(cls, spec: WeightSpaceSpec, state_dicts: Sequence[Mapping[str, torch.Tensor]],
                         dtype: Optional[torch.dtype] = None, device=None) -> "WeightSpace":
        """Stack ``B`` state_dicts into a weight space with one channel."""
        if not state_dicts:
            raise ValueError("from_state_dicts needs at least one state_dict")
        for i, sd in enumerate(state_dicts):
            try:
                spec.validate(sd)
            except ValueError as e:
                raise ValueError(f"state_dict #{i}: {e}") from None
        tensors = {n: torch.stack([sd[n].detach().to(device=device, dtype=dtype) for sd in state_dicts])[:, None]
                   for n in spec.float_names}
        extras = [{k: v.detach().clone() for k, v in sd.items() if not spec[k].floating} for sd in state_dicts]
        return cls(spec, tensors, extras)

    @classmethod
    def from_module(cls, spec: WeightSpaceSpec, modules: Union[nn.Module, Sequence[nn.Module]],
                    dtype: Optional[torch.dtype] = None, device=None) -> "WeightSpace":
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        return cls.from_state_dicts(spec, [m.state_dict() for m in modules], dtype, device)

    @classmethod
    def from_flat(cls, spec: WeightSpaceSpec, flat: torch.Tensor, channels: int = 1) -> "WeightSpace":
        """Inverse of :meth:`flatten`: ``flat`` is ``[batch, channels * numel]``."""
        sizes = [channels * _numel(spec[n].shape) for n in spec.float_names]
        if flat.dim() != 2 or flat.shape[1] != sum(sizes):
            raise ValueError(f"flat tensor has shape {tuple(flat.shape)}; expected [batch, {sum(sizes)}]")
        parts = flat.split(sizes, dim=1)
        return cls(spec, {n: p.reshape(flat.shape[0], channels, *spec[n].shape)
                          for n, p in zip(spec.float_names, parts)})

    @classmethod
    def from_channels(cls, spec: WeightSpaceSpec, x: torch.Tensor) -> "WeightSpace":
        """Views of ``x`` ``[batch, channels, numel]`` (tensors flattened one after another in spec order, the same
        order in every channel): the layout of :meth:`channels_last_flat` and of a population's flat parameters."""
        sizes = segment_sizes(spec)
        if x.dim() != 3 or x.shape[2] != sum(sizes):
            raise ValueError(f"flat tensor has shape {tuple(x.shape)}; expected [batch, channels, {sum(sizes)}]")
        b, c = x.shape[:2]
        return cls(spec, {n: part.view(b, c, *spec[n].shape)
                          for n, part in zip(spec.float_names, x.split(sizes, dim=2))})

    @classmethod
    def zeros(cls, spec: WeightSpaceSpec, batch: int, channels: int = 1, **kw) -> "WeightSpace":
        return cls(spec, {n: torch.zeros(batch, channels, *spec[n].shape, **kw) for n in spec.float_names})

    # -- access ------------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def items(self):
        return self._tensors.items()

    def values(self):
        return self._tensors.values()

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    @property
    def batch_size(self) -> int:
        return next(iter(self._tensors.values())).shape[0]

    @property
    def channels(self) -> int:
        return next(iter(self._tensors.values())).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._tensors.values())).device

    def __repr__(self) -> str:
        return (f"WeightSpace(batch={self.batch_size}, channels={self.channels}, tensors={len(self._tensors)}, "
                f"dtype={self.dtype})")

    # -- conversion --------------------------------------------------------------------------------------------------
    def to_state_dicts(self) -> list[dict]:
        """One state_dict per batch member (channels must be 1), integer buffers restored."""
        if self.channels != 1:
            raise ValueError(f"to_state_dicts needs 1 channel, this weight space has {self.channels}")
        out = []
        for b in range(self.batch_size):
            sd = {}
            for name in self.spec:  # spec order, like a state_dict
                if name in self._tensors:
                    sd[name] = self._tensors[name][b, 0]
                elif self.extras is not None:
                    sd[name] = self.extras[b][name]
            out.append(sd)
        return out

    def flatten(self) -> torch.Tensor:
        """``[batch, channels * numel]``: every tensor flattened (channel-major within a tensor), in spec order."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in self._tensors.values()], dim=1)

    def channels_flat(self) -> torch.Tensor:
        """``[batch, channels, numel]``: inverse of :meth:`from_channels` (one copy)."""
        return torch.cat([t.reshape(*t.shape[:2], -1) for t in self._tensors.values()], dim=2)

    def split(self, size: int) -> list["WeightSpace"]:
        """Consecutive batch chunks of at most ``size`` members (views; extras split alike)."""
        if size < 1:
            raise ValueError(f"split size {size} must be >= 1")
        out = []
        for a in range(0, self.batch_size, size):
            extras = self.extras[a:a + size] if self.extras is not None else None
            out.append(WeightSpace(self.spec, {n: t[a:a + size] for n, t in self._tensors.items()}, extras))
        return out

    @staticmethod
    def cat(parts: Sequence["WeightSpace"]) -> "WeightSpace":
        """Concatenate weight spaces of one spec along the batch (inverse of :meth:`split`)."""
        if not parts:
            raise ValueError("WeightSpace.cat needs at least one weight space")
        spec = parts[0].spec
        extras = None if any(p.extras is None for p in parts) else [e for p in parts for e in p.extras]
        return WeightSpace(spec, {n: torch.cat([p[n] for p in parts]) for n in spec.float_names}, extras)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "WeightSpace":
        """Apply ``fn`` to every tensor (it must keep ``[batch, channels, *shape]``, channels may change)."""
        return WeightSpace(self.spec, {n: fn(t) for n, t in self._tensors.items()}, self.extras)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "WeightSpace":
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> "WeightSpace":
        return self.map(torch.Tensor.detach)

    def permute(self, perm: Mapping[str, torch.Tensor]) -> "WeightSpace":
        """Apply one permutation (e.g. ``spec.sample_permutation()``) to every batch member."""
        out = {}
        for n, t in self._tensors.items():
            for axis in range(t.dim() - 2):
                idx = self.spec.axis_index(n, axis, perm, t.device)
                if idx is not None:
                    t = t.index_select(axis + 2, idx)
            out[n] = t
        return WeightSpace(self.spec, out, self.extras)

    # -- statistics --------------------------------------------------------------------------------------------------
    def tensor_stats(self, eps: float = 1e-8, robust: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per tensor and channel: a centre and a scale over the batch and all entries, each shaped ``[channels]``.

        ``robust=False``: mean and std. ``robust=True``: median and IQR / 1.349 (the std for Gaussian entries), which
        a few diverged networks in a zoo (weights of 1e6 beside typical 0.5) cannot inflate. Both are
        permutation-invariant, so normalising by them keeps a weight-space model equivariant.
        """
        stats = {}
        for n, t in self._tensors.items():
            flat = t.transpose(0, 1).reshape(t.shape[1], -1)
            eps = max(eps, torch.finfo(t.dtype).tiny) if t.is_floating_point() else eps  # 1e-8 is 0 in half
            if robust:
                q25, q50, q75 = (_quantile(flat, q) for q in (0.25, 0.5, 0.75))
                stats[n] = (q50, ((q75 - q25) / 1.349).clamp_min(eps))
            else:
                stats[n] = (flat.mean(1), flat.std(1, unbiased=False).clamp_min(eps))
        return stats

    def normalize(self, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  clip: Optional[float] = None) -> "WeightSpace":
        """``(t - centre) / scale`` per tensor and channel; with ``clip``, clamped to ``[-clip, clip]`` afterwards
        (element-wise, so equivariance is kept; not undone by :meth:`denormalize`)."""
        out = {n: (t - _bc(stats[n][0], t)) / _bc(stats[n][1], t) for n, t in self._tensors.items()}
        if clip is not None:
            out = {n: t.clamp(-clip, clip) for n, t in out.items()}
        return WeightSpace(self.spec, out, self.extras)

    def denormalize(self, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> "WeightSpace":
        return WeightSpace(self.spec, {n: t * _bc(stats[n][1], t) + _bc(stats[n][0], t)
                                       for n, t in self._tensors.items()}, self.extras)

    # -- arithmetic --------------------------------------------------------------------------------------------------
    def _binary(self, other, op) -> "WeightSpace":
        if isinstance(other, WeightSpace):
            if other.spec is not self.spec and other.spec != self.spec:
                raise ValueError("weight spaces of different specs cannot be combined")
            return WeightSpace(self.spec, {n: op(t, other[n]) for n, t in self._tensors.items()}, self.extras)
        return self.map(lambda t: op(t, other))

    def __add__(self, other):
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._binary(other, torch.sub)

    def __rsub__(self, other):
        return self._binary(other, lambda a, b: b - a)

    def __mul__(self, other):
        return self._binary(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._binary(other, torch.div)

    def __neg__(self):
        return self.map(torch.neg)


def segment_sizes(spec: WeightSpaceSpec) -> list[int]:
    """Number of entries of every float tensor of ``spec``, in spec order (the segments of a flat buffer)."""
    return [_numel(spec[n].shape) for n in spec.float_names]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bc(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Channel vector ``[C]`` broadcast against ``[B, C, *shape]``."""
    return v.view(1, -1, *([1] * (t.dim() - 2)))


def _quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise ``q``-quantile of ``[C, N]`` (nearest rank); ``kthvalue`` has no size limit, unlike
    ``torch.quantile``."""
    k = min(flat.shape[1], max(1, round(q * (flat.shape[1] - 1)) + 1))
    return flat.kthvalue(k, dim=1).values
