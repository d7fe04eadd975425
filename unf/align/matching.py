"""Weight matching (Git Re-Basin, Ainsworth et al. 2023) for any ``WeightSpaceSpec``, batched over many models.

Find permutations ``P`` maximising ``sum_t <reference_t, P(other)_t>`` over every float tensor of the spec. Coordinate
descent: for one group at a time, with every other permutation held, the objective is linear in that group's
permutation, so it is a linear assignment problem (``scipy.optimize.linear_sum_assignment``). By default the descent
starts from an assignment of sorted unit slices, which no other permutation changes, so an exact permuted copy of
generic weights is recovered at once. Groups are visited in a seeded random order, and the descent stops after a sweep
in which no permutation changes (or after ``max_iter`` sweeps). :func:`match_batched` is the one implementation: every
weight matching in unf calls it.

A group may act on many places: whole axes, factors of product axes (conv channels before a flatten, heads and
within-head units), segments of concatenated axes (Q, K and V), several axes of one tensor (a recurrent weight). Each
place contributes ``reference_slices @ other_slices^T`` to the group's ``[n, n]`` similarity, computed for all models
at once with batched matmuls; a group appearing twice in one tensor is linearised at the current permutation.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..spec import Permutation, WeightSpaceSpec
from ..spec.axes import _factors, _segments
from .heads import head_groups, match_heads
from .assignment import Place, places, solve_assignment

StateDict = Mapping[str, torch.Tensor]


def _axis_index(spec: WeightSpaceSpec, name: str, axis: int, perms: Mapping[str, torch.Tensor], n_models: int,
                skip: Optional[Place] = None) -> Optional[torch.Tensor]:
    """``[N, axis size]`` indices permuting ``axis`` of tensor ``name`` for each model; ``skip``: leave that place as is."""
    entry = spec[name].axes[axis]
    if entry is None:
        return None
    pieces, offset = [], 0
    device = next(iter(perms.values())).device if perms else None
    for k, seg in enumerate(_segments(entry)):
        idx = torch.zeros(n_models, 1, dtype=torch.long, device=device)
        for j, f in enumerate(_factors(seg)):
            n = spec.groups[f] if isinstance(f, str) else f
            if isinstance(f, str) and not (skip is not None and skip.axis == axis and skip.segment == k
                                           and skip.j == j):
                sub = perms[f]
            else:
                sub = torch.arange(n, device=device).expand(n_models, n)
            idx = (idx[:, :, None] * n + sub[:, None, :]).reshape(n_models, -1)
        pieces.append(idx + offset)
        offset += idx.shape[1]
    return torch.cat(pieces, dim=1)


def permute_batched(spec: WeightSpaceSpec, name: str, x: torch.Tensor, perms: Mapping[str, torch.Tensor],
                    skip: Optional[Place] = None) -> torch.Tensor:
    """Permute ``x`` (``[N, *shape]``, one tensor of N models) by per-model permutations ``perms[g]: [N, n]``."""
    n_models = x.shape[0]
    for axis in range(x.dim() - 1):
        idx = _axis_index(spec, name, axis, perms, n_models, skip)
        if idx is not None:
            x = _take(x, axis, idx)
    return x


def _take(x: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, *shape]`` with axis ``axis`` of model ``m`` reordered by ``idx[m]`` (``idx``: ``[N, size]``).

    One model (a pair's matching) indexes that axis directly: on a ResNet-20 x4 conv weight this was 13x faster
    for the output axis (no ``movedim`` and copy back) and 2x for the input axis than per-model advanced indexing."""
    if x.shape[0] == 1:
        return x[(slice(None),) * (axis + 1) + (idx[0],)]
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x.movedim(axis + 1, 1)[rows, idx].movedim(1, axis + 1)


def _slices(x: torch.Tensor, p: Place) -> torch.Tensor:
    """``[N, *shape]`` -> ``[N, n, rest]``: the place's factor first, everything else flattened."""
    seg = x.narrow(p.axis + 1, p.start, p.length)
    shape = list(seg.shape)
    seg = seg.reshape(*shape[:p.axis + 1], *p.factors, *shape[p.axis + 2:])
    return seg.movedim(p.axis + 1 + p.j, 1).reshape(x.shape[0], p.factors[p.j], -1)


def unit_signatures(spec: WeightSpaceSpec, group: str, tensors: Mapping[str, torch.Tensor],
                    where: Optional[list[Place]] = None) -> torch.Tensor:
    """``[N, n, features]``: per unit of ``group``, its slices in every place, each sorted -- unchanged by any
    permutation of the other axes, so comparable before anything else is aligned."""
    where = places(spec, list(tensors))[group] if where is None else where
    return torch.cat([_sorted_rows(_slices(tensors[p.name], p)) for p in where], dim=2)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, n, k]`` sorted along its last axis (values only).

    On the CPU numpy's sort (vectorised, x86-simd-sort on AVX-512) was 16-20x faster than ``torch.sort`` on the slices
    of a ResNet-20 x4 (``[1, 256, 2304]``: 2.8 against 46 ms), where sorting took 60 % of ``weight_matching``. The
    sorted values are the same either way, so the result is too."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.requires_grad:
        return x.sort(dim=2).values
    out = x.contiguous().numpy().copy()  # sort a copy: the slices may be the caller's tensor
    out.sort(axis=2)
    return torch.from_numpy(out)


def signature_init(spec: WeightSpaceSpec, reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                   groups: Sequence[str]) -> dict[str, torch.Tensor]:
    """A starting point for coordinate descent: each group assigned by distances between unit signatures."""
    where = places(spec, list(reference))
    out = {}
    for g in groups:
        if not where[g]:
            continue
        ref, oth = unit_signatures(spec, g, reference, where[g]), unit_signatures(spec, g, other, where[g])
        out[g] = solve_assignment(-torch.cdist(ref.expand(oth.shape[0], *ref.shape[1:]), oth).square())
    return out


def _stack(spec: WeightSpaceSpec, models: Union[StateDict, Sequence[StateDict]], dtype,
           buffers: bool = False) -> dict[str, torch.Tensor]:
    """name -> ``[N, *shape]`` for the tensors matching looks at: parameters (and, with ``buffers``, buffers)."""
    models = [models] if isinstance(models, Mapping) else list(models)
    for i, sd in enumerate(models):
        try:
            spec.validate(sd)
        except ValueError as e:
            raise ValueError(f"model #{i}: {e}") from None
    names = spec.float_names if buffers else spec.parameter_names
    return {n: torch.stack([sd[n].detach().to(dtype) for sd in models]) for n in names}


class _Matcher:
    """Coordinate-descent state: ``other`` kept permuted by the current permutations (only tensors a changed group
    touches are redone), reference slices cached. A place's own permutation is undone by indexing rows."""

    def __init__(self, spec: WeightSpaceSpec, reference: Mapping[str, torch.Tensor],
                 other: Mapping[str, torch.Tensor], perms: dict[str, torch.Tensor]):
        self.spec, self.other, self.perms = spec, other, perms
        self.where = places(spec, list(other))
        self.ref_slices = {p: _slices(reference[p.name], p) for ps in self.where.values() for p in ps}
        self.ref_full = reference
        self.current = {n: permute_batched(spec, n, x, perms) for n, x in other.items()}

    def similarity(self, group: str) -> torch.Tensor:
        """``[N, n, n]``: entry ``[i, j]`` = how well unit ``j`` of ``other`` fits unit ``i`` of the reference, all
        other permutations held."""
        inv = torch.argsort(self.perms[group], dim=1)
        sim = None
        for p in self.where[group]:
            term = torch.matmul(self.ref_slices[p], _slices(self.current[p.name], p).transpose(1, 2))
            sim = term if sim is None else sim + term
        n_models, n = self.perms[group].shape
        # place p un-permuted: unit j of ``other`` is row inv[j] of ``current``, so its column is inv[j] of the
        # product (gathering the [n, n] product rather than the [n, rest] slices before it)
        return sim.expand(n_models, n, n).gather(2, inv[:, None, :].expand(n_models, n, n))

    def update(self, group: str, new: torch.Tensor) -> None:
        """Set ``group``'s permutation; the tensors it acts on are re-permuted along its axes only, from their
        current order (a composed index per axis: the same values as permuting ``other`` anew, fewer gathers)."""
        old = dict(self.perms)
        self.perms[group] = new
        n_models = new.shape[0]
        for name in {p.name for p in self.where[group]}:
            x = self.current[name]
            for axis in sorted({p.axis for p in self.where[group] if p.name == name}):
                was = _axis_index(self.spec, name, axis, old, n_models)
                now = _axis_index(self.spec, name, axis, self.perms, n_models)
                x = _take(x, axis, torch.argsort(was, dim=1).gather(1, now))
            self.current[name] = x

    def repeated(self, group: str) -> bool:
        """Does the group act more than once on some tensor (then its similarity is only a linearisation)?"""
        names = [p.name for p in self.where[group]]
        return len(names) != len(set(names))

    def objective(self, group: str, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N]``: the exact objective restricted to the tensors ``group`` touches, under ``perms``."""
        total = 0
        for name in {p.name for p in self.where[group]}:
            cur = permute_batched(self.spec, name, self.other[name], perms)
            ref = self.ref_full[name]
            total = total + (ref * cur).flatten(1).sum(1)
        return total


def match_batched(spec: WeightSpaceSpec, reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                  max_iter: int = 100, seed: int = 0, init: Optional[Mapping[str, torch.Tensor]] = None,
                  frozen: Sequence[str] = (), start: str = "signature",
                  heads: Union[bool, str] = "auto") -> tuple[dict[str, torch.Tensor], int]:
    """Weight matching on stacked tensors (name -> ``[N or 1, *shape]``): the one implementation behind
    :func:`weight_matching`, :func:`align_many`, :func:`merge_many` and the generator's coupling. Returns per-group
    ``[N, n]`` permutations and the number of sweeps of coordinate descent.

    Groups given in ``init`` start there (``frozen`` ones keep it). Head groups (``heads``: ``"auto"`` or ``True``;
    see :mod:`unf.align.heads`) are assigned by head signatures and held. Every other group starts from ``start``:
    ``"signature"``, an assignment of sorted unit slices (:func:`signature_init`; it finds an exact permuted copy
    before any descent), or ``"identity"``, as in Ainsworth et al."""
    if start not in ("signature", "identity"):
        raise ValueError(f"init={start!r}: choose 'signature' or 'identity'")
    init = dict(init or {})
    use_heads = [g for g in head_groups(spec) if g not in init] if heads in (True, "auto") else []
    if heads is True and not use_heads:
        raise ValueError("heads=True but the spec has no head groups (groups acting only as the outer factor of "
                         "a product with other groups)")
    rest = [g for g in spec.groups if g not in init and g not in use_heads]
    if start == "signature":
        init.update(signature_init(spec, reference, other, rest))
    if use_heads:
        init.update(match_heads(spec, reference, other, use_heads))
    frozen = [*frozen, *use_heads]
    n_models = next(iter(other.values())).shape[0]
    device = next(iter(other.values())).device
    perms = {g: (init[g].to(device) if g in init else torch.arange(n, device=device).expand(n_models, n).clone())
             for g, n in spec.groups.items()}
    state = _Matcher(spec, reference, other, perms)
    free = [g for g in spec.groups if g not in frozen and state.where[g]]
    # A group's similarity depends only on the permutations of the groups sharing a tensor with it (its own included
    # where it acts twice on a tensor). When none of them changed since its last visit, the assignment would come out
    # the same and be rejected again: skip it (on ResNet-20 x4 this is the whole last sweep, and most of the late ones).
    touches = {g: {h for h, ps in state.where.items() if {p.name for p in ps} & {p.name for p in state.where[g]}}
               for g in free}
    version = dict.fromkeys(spec.groups, 0)
    seen: dict[str, tuple] = {}
    rng = np.random.default_rng(seed)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        changed = False
        for g in rng.permutation(free):
            inputs = tuple(version[h] for h in sorted(touches[g]))
            if seen.get(g) == inputs:
                continue
            seen[g] = inputs
            sim = state.similarity(g)
            new = solve_assignment(sim)
            if state.repeated(g):  # the similarity is a linearisation: judge the step by the exact objective
                old_score, new_score = state.objective(g, perms), state.objective(g, {**perms, g: new})
            else:
                old_score = sim.gather(2, perms[g][:, :, None]).sum((1, 2))
                new_score = sim.gather(2, new[:, :, None]).sum((1, 2))
            better = new_score > old_score + 1e-6 * old_score.abs().clamp_min(1e-6)
            if better.any():
                state.update(g, torch.where(better[:, None], new, perms[g]))
                version[g] += 1
                if not state.repeated(g):  # its similarity ignores its own permutation: the same next time
                    seen[g] = tuple(version[h] for h in sorted(touches[g]))
                changed = True
        if not changed:
            break
    return perms, sweeps


def weight_matching(spec: WeightSpaceSpec, reference: StateDict, other: StateDict, max_iter: int = 100,
                    seed: int = 0, heads: Union[bool, str] = "auto", init: str = "signature",
                    include_buffers: bool = False) -> Permutation:
    """The permutation that aligns ``other`` to ``reference``: ``spec.permute(other, perm)`` is the aligned model.

    Deterministic for a ``seed``. ``heads``: match attention heads first by a permutation-invariant signature
    (TransFusion; see :mod:`unf.align.heads`) and hold them; ``"auto"`` does so whenever the spec has head groups.
    ``init``: ``"signature"`` starts the descent from an assignment of sorted unit slices (invariant to all other
    permutations); ``"identity"`` starts from no permutation, as in Ainsworth et al.
    The objective covers parameters only unless ``include_buffers``: BatchNorm running statistics live on another
    scale and, included, can outweigh the weights (on a BatchNorm ResNet-20 they made the aligned barrier worse than
    the naive one). Buffers are permuted with everything else all the same.
    """
    return align_many(spec, reference, [other], max_iter, seed, heads, init, include_buffers=include_buffers)[0]


def align_many(spec: WeightSpaceSpec, reference: StateDict, others: Sequence[StateDict], max_iter: int = 100,
               seed: int = 0, heads: Union[bool, str] = "auto", init: str = "signature",
               dtype: torch.dtype = torch.float32, include_buffers: bool = False) -> list[Permutation]:
    """Align many models to one reference at once (batched similarities, one LAP per model and group)."""
    ref = _stack(spec, reference, dtype, include_buffers)
    oth = _stack(spec, others, dtype, include_buffers)
    perms, _ = match_batched(spec, ref, oth, max_iter, seed, start=init, heads=heads)
    return [Permutation({g: p[m] for g, p in perms.items()}) for m in range(len(others))]


def merge_many(spec: WeightSpaceSpec, models: Sequence[StateDict], max_iter: int = 100, seed: int = 0,
               dtype: torch.dtype = torch.float32, include_buffers: bool = False
               ) -> tuple[list[Permutation], dict[str, torch.Tensor]]:
    """MergeMany (Ainsworth et al.): align the models to a common barycentre.

    Starts from every model aligned to the first one; then, model by model in a seeded random order, aligns it to the
    mean of the others (held). Each step can only bring the models closer to each other, and the rounds stop when one
    changes nothing (or after ``max_iter`` rounds). Returns the permutations (for ``spec.permute``) and the barycentre
    of the tensors matched (parameters; buffers too with ``include_buffers``).
    """
    if len(models) < 2:
        raise ValueError("merge_many needs at least two models")
    w = _stack(spec, models, dtype, include_buffers)
    n_models = len(models)
    first = align_many(spec, models[0], models, max_iter, seed, dtype=dtype, include_buffers=include_buffers)
    perms = {g: torch.stack([p[g] for p in first]) for g in spec.groups}
    aligned = {k: permute_batched(spec, k, v, perms) for k, v in w.items()}
    total = {k: v.sum(0) for k, v in aligned.items()}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for i in rng.permutation(n_models):
            others_mean = {k: ((total[k] - aligned[k][i]) / (n_models - 1))[None] for k in w}
            mine = {k: v[i:i + 1] for k, v in w.items()}
            new, _ = match_batched(spec, others_mean, mine, max_iter, int(rng.integers(1 << 31)),
                                   init={g: p[i:i + 1] for g, p in perms.items()})
            if any(not torch.equal(new[g][0], perms[g][i]) for g in perms):
                changed = True
                for g in perms:
                    perms[g][i] = new[g][0]
                for k in w:
                    moved = permute_batched(spec, k, mine[k], new)[0]
                    total[k] += moved - aligned[k][i]
                    aligned[k][i] = moved
        if not changed:
            break
    barycentre = {k: v / n_models for k, v in total.items()}
    return [Permutation({g: p[m] for g, p in perms.items()}) for m in range(n_models)], barycentre
