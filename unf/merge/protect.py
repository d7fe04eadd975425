"""Merge protection: a function-preserving reparameterisation that breaks linear mode connectivity with homologous
models (the MergeBarrier / MergeLock / PaRaMS family), and the anchor-guided re-basin attack on it.

:func:`protect` composes, on a model's state_dict:

1. a random permutation of every group of the spec;
2. positive per-unit rescalings ``s`` (log-uniform in ``[1/scale, scale]``) of the groups that
   :func:`unf.spec.homogeneous_groups` proves to pass through ReLU/LeakyReLU only: the producing layer's rows and
   bias times ``s``, every weight reading the units times ``1/s``;
3. per-head invertible mixing in attention (MergeLock): where the spec has head groups, a within-head group with
   two places on output axes (Q and K) gets ``A`` on the first and ``A^-T`` on the second, so ``q^T k`` is kept; a
   within-head group with output and input places (V and the output projection) gets ``B`` on the outputs and
   ``B^-T`` on the inputs. ``A = Q diag(d)`` (random orthogonal times a positive diagonal in ``[1/mix, mix]``).

Every part is exact in exact arithmetic; :func:`protect` checks the outputs on ``example_inputs`` and refuses to
return a model whose function changed. :func:`unprotect` is the attack: weight matching to the shared pretrained
anchor with :mod:`unf.align`, after bringing the rescaled units of both models to a canonical scale (unit-norm
incoming weights), then the anchor's scales put back. It undoes parts 1 and 2; part 3 is not a permutation and
survives it.
"""
from __future__ import annotations

import copy
import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..align import weight_matching
from ..align.heads import head_groups
from ..align.assignment import Place, places
from ..spec import WeightSpaceSpec, spec_from_module
from ..spec.axes import _factors, _segments
from ..spec.homogeneous import homogeneous_groups

StateDict = Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------------------------- linear maps per place

def _along(x: torch.Tensor, p: Place, fn, head: bool = False) -> torch.Tensor:
    """``x`` with ``fn`` applied to the place's unit factor, moved last (``[..., n]``; with ``head``, the head factor
    just outside it comes along: ``[..., heads, n]``). Returns a new tensor."""
    seg = x.narrow(p.axis, p.start, p.length)
    shape = list(seg.shape)
    y = seg.reshape(*shape[:p.axis], *p.factors, *shape[p.axis + 1:])
    d = p.axis + p.j
    dims = [d - 1, d] if head else [d]
    y = y.movedim(dims, list(range(y.dim() - len(dims), y.dim())))
    moved_shape = y.shape
    y = fn(y)
    y = y.reshape(moved_shape).movedim(list(range(y.dim() - len(dims), y.dim())), dims)
    out = x.clone()
    out.narrow(p.axis, p.start, p.length).copy_(y.reshape(seg.shape))
    return out


def _scale_unit(sd: dict, where: Sequence[Place], s: torch.Tensor) -> dict:
    """Units of one group times ``s`` on output axes (rows, biases) and times ``1 / s`` on input axes."""
    out = dict(sd)
    for p in where:
        f = s if p.axis == 0 else 1 / s
        out[p.name] = _along(out[p.name], p, lambda y, f=f: y * f.to(y))
    return out


def _mix(sd: dict, p: Place, m: torch.Tensor) -> dict:
    """Per head ``h``, the place's within-head units mapped by ``m[h]`` (``[heads, n, n]``)."""
    out = dict(sd)
    out[p.name] = _along(out[p.name], p, lambda y: torch.einsum("...hn,hmn->...hm", y, m.to(y)), head=True)
    return out


def _unit_norms(sd: StateDict, where: Sequence[Place]) -> torch.Tensor:
    """``[n]``: per unit, the norm of its incoming weights and bias (its slices on output axes)."""
    total = 0
    for p in where:
        if p.axis == 0:
            x = sd[p.name].detach().double()
            sq = _along(x, p, lambda y: y.square())
            seg = sq.narrow(p.axis, p.start, p.length)
            seg = seg.reshape(*seg.shape[:p.axis], *p.factors, *seg.shape[p.axis + 1:])
            total = total + seg.movedim(p.axis + p.j, 0).reshape(p.factors[p.j], -1).sum(1)
    return torch.as_tensor(total).sqrt()


# ------------------------------------------------------------------------------------------------- attention heads

def mixable_groups(spec: WeightSpaceSpec) -> dict[str, tuple[str, list[Place], list[Place]]]:
    """Within-head groups that admit per-head invertible mixing: group -> (kind, places getting ``A``, places getting
    ``A^-T``), kind ``"qk"`` or ``"vo"``. A group qualifies when every place of it sits directly inside a head group
    (see :func:`unf.align.head_groups`)."""
    heads = set(head_groups(spec))
    out = {}
    for g, where in places(spec).items():
        if g in heads or not where:
            continue
        names = [_factors(_segments(spec[p.name].axes[p.axis])[p.segment]) for p in where]
        if not all(p.j >= 1 and f[p.j - 1] in heads for p, f in zip(where, names)):
            continue
        if any(spec[p.name].buffer for p in where):
            continue
        outputs, inputs = [p for p in where if p.axis == 0], [p for p in where if p.axis > 0]
        if outputs and inputs:
            out[g] = ("vo", outputs, inputs)
        elif outputs:
            segs = sorted({p.segment for p in outputs})
            if len(segs) == 2:
                out[g] = ("qk", [p for p in outputs if p.segment == segs[0]],
                          [p for p in outputs if p.segment == segs[1]])
    return out


def _random_invertible(heads: int, n: int, spread: float, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(heads, n, n, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-distributed orthogonal
    d = torch.exp((2 * torch.rand(heads, n, generator=gen, dtype=torch.float64) - 1) * math.log(spread))
    return q * d[:, None, :]


# ---------------------------------------------------------------------------------------------------- protect

def protect(model: nn.Module, example_inputs, seed: int = 0, spec: Optional[WeightSpaceSpec] = None, *,
            permute: bool = True, scale: Optional[float] = 4.0, mix: Optional[float] = 2.0,
            check: bool = True) -> dict[str, torch.Tensor]:
    """The state_dict of a reparameterisation of ``model`` that computes the same function but does not sit in
    the basin of models homologous to it (see the module docstring for the parts).

    ``scale``: per-unit scales are log-uniform in ``[1/scale, scale]`` (None: no rescaling). ``mix``: the spread of
    the diagonal of the head mixing matrices (None: no mixing). ``check``: compare the outputs on
    ``example_inputs`` (relative error at most 1e-4 in float32, 1e-9 in float64) and raise if they moved.
    """
    spec = spec_from_module(model, example_inputs) if spec is None else spec
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    if permute:
        sd = spec.permute(sd, spec.sample_permutation(gen))
    where = places(spec)
    if scale is not None and scale > 1:
        for g in homogeneous_groups(model, example_inputs, spec):
            s = torch.exp((2 * torch.rand(spec.groups[g], generator=gen, dtype=torch.float64) - 1) * math.log(scale))
            sd = _scale_unit(sd, where[g], s)
    if mix is not None:
        for g, (kind, first, second) in mixable_groups(spec).items():
            p0 = first[0]
            a = _random_invertible(p0.factors[p0.j - 1], spec.groups[g], max(mix, 1.0), gen)
            a_inv_t = torch.linalg.inv(a).transpose(-1, -2)
            for p in first:
                sd = _mix(sd, p, a)
            for p in second:
                sd = _mix(sd, p, a_inv_t)
    if check:
        _check_function(model, sd, example_inputs)
    return sd


@torch.no_grad()
def _check_function(model: nn.Module, sd: StateDict, example_inputs) -> None:
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    other = copy.deepcopy(model)
    other.load_state_dict(sd)
    was = model.training
    model.eval(), other.eval()
    try:
        ref, out = model(*inputs), other(*inputs)
    finally:
        model.train(was)
    ref, out = (ref[0], out[0]) if isinstance(ref, (tuple, list)) else (ref, out)
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    tol = 1e-9 if ref.dtype == torch.float64 else 1e-4
    if not err <= tol:
        raise ValueError(f"protect: the reparameterisation changed the model's outputs (relative error {err:.2e} > "
                         f"{tol:g}); a head group of the spec is probably not plain attention: pass mix=None (or "
                         "scale=None)")


# -------------------------------------------------------------------------------------------------- the attack

def canonical_scales(state_dict: StateDict, spec: WeightSpaceSpec, groups: Sequence[str]
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Rescale every unit of ``groups`` to unit-norm incoming weights (function-preserving for homogeneous
    groups). Returns the new state_dict and the norms divided out (group -> ``[n]``), in spec order."""
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    where, norms = places(spec), {}
    for g in [g for g in spec.groups if g in set(groups)]:
        n = _unit_norms(sd, where[g]).clamp_min(1e-30)
        sd = _scale_unit(sd, where[g], 1 / n)
        norms[g] = n
    return sd, norms


def unprotect(protected_state_dict: StateDict, anchor_state_dict: StateDict, spec: WeightSpaceSpec,
              homogeneous: Optional[Sequence[str]] = None, seed: int = 0, **align_kwargs) -> dict:
    """The anchor-guided re-basin attack: align a protected expert back to the pretrained ``anchor`` it was
    fine-tuned from, so that it merges again.

    Without ``homogeneous`` (the attacker assumes a pure permutation): ``unf.align.weight_matching`` to the anchor.
    With ``homogeneous`` (the groups :func:`unf.spec.homogeneous_groups` reports for the architecture): both models
    are first brought to unit-norm incoming weights per unit, which removes any positive rescaling; they are
    matched there, and the anchor's per-unit norms are put back (the closed-form scale recovery). The result
    computes the protected model's function. Head mixing is not undone.
    """
    groups = list(homogeneous or [])
    prot, anchor = dict(protected_state_dict), dict(anchor_state_dict)
    if groups:
        prot, _ = canonical_scales(prot, spec, groups)
        anchor, anchor_norms = canonical_scales(anchor, spec, groups)
    perm = weight_matching(spec, anchor, prot, seed=seed, **align_kwargs)
    out = spec.permute(prot, perm)
    if groups:
        where = places(spec)
        for g, n in anchor_norms.items():
            out = _scale_unit(out, where[g], n)
    return {k: v.to(protected_state_dict[k].dtype) for k, v in out.items()}
