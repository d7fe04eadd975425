"""Brute-force reference for equivariant linear maps between (sums of) weight-space tensors.

Independent of any layer code: the group action is read off ``WeightSpaceSpec.permute`` applied to basis vectors,
and dimensions are null-space dimensions of dense float64 linear systems. Only for tiny sizes (a few thousand
unknowns at most).

API
---
* ``permutation_matrix(spec, perm, names)`` -- (N x N) float64 matrix P with ``P @ flat(x) == flat(spec.permute(x))``
  on the direct sum of the tensors ``names`` (flattened row-major, concatenated in the order of ``names``).
* ``generators(spec)`` -- Permutations generating the whole group (per group: transposition (0 1) and the n-cycle).
* ``equivariant_dim(spec, in_names, out_names)`` -- dim {M : P_out(g) M = M P_in(g) for all g}.
* ``equivariant_basis(spec, in_names, out_names)`` -- an orthonormal basis of those maps (N_out x N_in matrices).
* ``invariant_dim(spec, in_names)`` -- dim of the invariant linear functionals (maps to the trivial 1-dim rep).
* ``equivariance_defect(spec, in_names, out_names, M)`` -- max |P_out(g) M - M P_in(g)| over the generators.
* ``span_dim(maps)`` -- rank of a list of matrices viewed as vectors.
* ``layer_matrices(layer_fn, num_params, in_size)`` / ``layer_span_dim(...)`` -- the matrices x -> f(e_k, x) of a
  layer ``f(theta, x)`` linear in theta and in x, and the dimension of their span.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from unf import Permutation, WeightSpaceSpec

Names = Union[str, Sequence[str], None]

__all__ = ["permutation_matrix", "generators", "equivariant_dim", "equivariant_basis", "invariant_dim",
           "equivariance_defect", "commutant_dim", "commutant_basis", "span_dim", "layer_matrices", "layer_span_dim", "tensor_size"]


def _names(spec: WeightSpaceSpec, names: Names) -> list[str]:
    if names is None:
        return spec.names
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in spec]
    if unknown:
        raise KeyError(f"tensors {unknown} are not in the spec (it has {spec.names})")
    return names


def tensor_size(spec: WeightSpaceSpec, names: Names = None) -> int:
    """Dimension of the direct sum of the tensors ``names`` (all tensors if ``None``)."""
    total = 0
    for n in _names(spec, names):
        size = 1
        for s in spec[n].shape:
            size *= s
        total += size
    return total


def permutation_matrix(spec: WeightSpaceSpec, perm, names: Names = None) -> torch.Tensor:
    """The (N x N) float64 matrix of ``x -> spec.permute(x, perm)`` on the direct sum of ``names``.

    Column ``j`` is ``spec.permute`` applied to the ``j``-th basis vector (all other tensors of the spec are zero),
    flattened row-major and concatenated in the order of ``names``.
    """
    names = _names(spec, names)
    numels = [tensor_size(spec, [n]) for n in names]
    offsets = [sum(numels[:i]) for i in range(len(names))]
    N = sum(numels)
    P = torch.zeros(N, N, dtype=torch.float64)
    zero = {k: torch.zeros(spec[k].shape, dtype=torch.float64) for k in spec}
    for name, off, numel in zip(names, offsets, numels):
        for local in range(numel):
            basis = torch.zeros(numel, dtype=torch.float64)
            basis[local] = 1.0
            sd = dict(zero)
            sd[name] = basis.reshape(spec[name].shape)
            out = spec.permute(sd, perm)
            P[:, off + local] = torch.cat([out[n].reshape(-1) for n in names])
    return P


def generators(spec: WeightSpaceSpec) -> list[Permutation]:
    """Permutations generating the whole group prod_g S_{n_g}: for each group ``g`` (the others identity), the
    transposition (0 1) and the n-cycle ``[1, 2, ..., n-1, 0]``. Groups of size 1 contribute nothing."""
    gens = []
    for g, n in spec.groups.items():
        if n < 2:
            continue
        transposition = torch.arange(n)
        transposition[0], transposition[1] = 1, 0
        cycle = torch.roll(torch.arange(n), -1)  # [1, 2, ..., n-1, 0]
        for p in ([transposition] if n == 2 else [transposition, cycle]):  # for n = 2 they coincide
            perms = {h: torch.arange(m) for h, m in spec.groups.items()}
            perms[g] = p
            gens.append(Permutation(perms))
    return gens


def _gram_eigh(pairs, n_out: int, n_in: int):
    """Eigen-decomposition of sum_g K_g^T K_g with K_g = A kron I_in - I_out kron B^T (see ``commutant_dim``)."""
    U = n_out * n_in
    gram = torch.zeros(U, U, dtype=torch.float64)
    eye_in = torch.eye(n_in, dtype=torch.float64)
    eye_out = torch.eye(n_out, dtype=torch.float64)
    for A, B in pairs:
        A = A.to(torch.float64)
        B = B.to(torch.float64)
        assert A.shape == (n_out, n_out) and B.shape == (n_in, n_in), (A.shape, B.shape)
        K = torch.kron(A, eye_in) - torch.kron(eye_out, B.T.contiguous())
        gram += K.T @ K
    return torch.linalg.eigh(gram)


def _null_mask(eig: torch.Tensor, tol: float) -> torch.Tensor:
    scale = max(1.0, float(eig.abs().max())) if eig.numel() else 1.0
    return eig <= tol * scale


def commutant_dim(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], n_out: int, n_in: int,
                  tol: float = 1e-9) -> int:
    """dim {M (n_out x n_in) : A M = M B for every (A, B) in ``pairs``}, A = P_out(g), B = P_in(g).

    With row-major ``m = M.reshape(-1)``: vec(A M) = (A kron I) m and vec(M B) = (I kron B^T) m, so the constraint
    is K_g m = 0 with K_g = A kron I_in - I_out kron B^T. The null space of the stacked system equals that of the
    Gram matrix sum_g K_g^T K_g, whose eigenvalues are counted against ``tol`` (relative to the largest one, at
    least 1). For permutation matrices the Gram matrix is a graph Laplacian on the n_out*n_in unknowns, whose
    smallest non-zero eigenvalue is >= 4 / U^2 (U unknowns), far above ``tol`` for U <= a few thousand.
    """
    if n_out * n_in == 0:
        return 0
    eig, _ = _gram_eigh(pairs, n_out, n_in)
    return int(_null_mask(eig, tol).sum())


def commutant_basis(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], n_out: int, n_in: int,
                    tol: float = 1e-9) -> list[torch.Tensor]:
    """An orthonormal basis (as n_out x n_in matrices, row-major) of the space counted by ``commutant_dim``."""
    if n_out * n_in == 0:
        return []
    eig, vecs = _gram_eigh(pairs, n_out, n_in)
    return [v.reshape(n_out, n_in) for v in vecs[:, _null_mask(eig, tol)].T]


def _generator_pairs(spec, in_names, out_names):
    return [(permutation_matrix(spec, p, out_names), permutation_matrix(spec, p, in_names)) for p in generators(spec)]


def equivariant_dim(spec: WeightSpaceSpec, in_names: Names = None, out_names: Names = None,
                    tol: float = 1e-9) -> int:
    """Dimension of the space of linear maps M from the direct sum of ``in_names`` to that of ``out_names``
    (``None``: all tensors) with ``P_out(g) M = M P_in(g)`` for every group element g."""
    return commutant_dim(_generator_pairs(spec, in_names, out_names), tensor_size(spec, out_names),
                         tensor_size(spec, in_names), tol)


def equivariant_basis(spec: WeightSpaceSpec, in_names: Names = None, out_names: Names = None,
                      tol: float = 1e-9) -> list[torch.Tensor]:
    """An orthonormal basis (N_out x N_in float64 matrices) of the maps counted by ``equivariant_dim``."""
    return commutant_basis(_generator_pairs(spec, in_names, out_names), tensor_size(spec, out_names),
                           tensor_size(spec, in_names), tol)


def invariant_dim(spec: WeightSpaceSpec, in_names: Names = None, tol: float = 1e-9) -> int:
    """Number of linearly independent invariant linear functionals on the direct sum of ``in_names``
    (equivariant maps to the trivial 1-dim representation)."""
    n_in = tensor_size(spec, in_names)
    one = torch.ones(1, 1, dtype=torch.float64)
    pairs = [(one, permutation_matrix(spec, p, in_names)) for p in generators(spec)]
    return commutant_dim(pairs, 1, n_in, tol)


def equivariance_defect(spec: WeightSpaceSpec, in_names: Names, out_names: Names, M: torch.Tensor) -> float:
    """max_g max |P_out(g) M - M P_in(g)| over the generators (0 for an equivariant M of shape N_out x N_in)."""
    M = M.to(torch.float64)
    assert M.shape == (tensor_size(spec, out_names), tensor_size(spec, in_names)), M.shape
    worst = 0.0
    for p in generators(spec):
        P_out, P_in = permutation_matrix(spec, p, out_names), permutation_matrix(spec, p, in_names)
        worst = max(worst, float((P_out @ M - M @ P_in).abs().max()) if M.numel() else 0.0)
    return worst


def span_dim(maps: Sequence[torch.Tensor], rtol: float = 1e-9) -> int:
    """Rank of the matrices ``maps`` (all of one shape) viewed as vectors; singular values <= rtol * the largest
    one count as zero."""
    maps = list(maps)
    if not maps:
        return 0
    shape = maps[0].shape
    assert all(m.shape == shape for m in maps), "span_dim: maps of different shapes"
    stacked = torch.stack([m.to(torch.float64).reshape(-1) for m in maps])
    if stacked.numel() == 0:
        return 0
    s = torch.linalg.svdvals(stacked)
    if float(s.max()) == 0.0:
        return 0
    return int((s > rtol * s.max()).sum())


def layer_matrices(layer_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_params: int,
                   in_size: int, method: str = "auto") -> list[torch.Tensor]:
    """For a function ``f(theta, x)`` linear in ``theta`` (flat, length ``num_params``) and in ``x`` (flat, length
    ``in_size``) returning a flat vector: the (N_out x in_size) matrices of ``x -> f(e_k, x)``, one per
    coefficient basis vector ``e_k``.

    ``method``: ``"jacrev"`` (``torch.func.jacrev`` in x), ``"loop"`` (evaluate on the basis vectors of x, always
    right for a linear f) or ``"auto"``: jacrev, checked against ``f`` at a random x, else the loop (jacrev can
    silently drop paths it cannot trace, e.g. through ``.tolist()``).
    """
    if method not in ("auto", "jacrev", "loop"):
        raise ValueError(f"method must be 'auto', 'jacrev' or 'loop', not {method!r}")
    x0 = torch.zeros(in_size, dtype=torch.float64)
    eye = torch.eye(in_size, dtype=torch.float64)
    probe = torch.randn(in_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))

    def by_loop(theta):
        if in_size == 0:
            return torch.zeros(layer_fn(theta, x0).numel(), 0, dtype=torch.float64)
        return torch.stack([layer_fn(theta, eye[j]).reshape(-1).to(torch.float64) for j in range(in_size)], dim=1)

    mats = []
    for k in range(num_params):
        theta = torch.zeros(num_params, dtype=torch.float64)
        theta[k] = 1.0
        J = None
        if method != "loop":
            try:
                J = torch.func.jacrev(lambda x: layer_fn(theta, x).reshape(-1).to(torch.float64))(x0)
                J = J.reshape(-1, in_size)
            except Exception:
                if method == "jacrev":
                    raise
                J = None
            if J is not None and method == "auto":
                y = layer_fn(theta, probe).reshape(-1).to(torch.float64)
                if not torch.allclose(J @ probe, y, rtol=1e-9, atol=1e-9 * (1.0 + (float(y.abs().max()) if y.numel() else 0.0))):
                    J = None
        if J is None:
            J = by_loop(theta)
        mats.append(J.reshape(-1, in_size))
    return mats


def layer_span_dim(layer_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_params: int, in_size: int,
                   rtol: float = 1e-9, method: str = "auto") -> int:
    """``span_dim`` of ``layer_matrices(layer_fn, num_params, in_size, method)``: how many independent linear maps
    the layer's coefficients reach."""
    return span_dim(layer_matrices(layer_fn, num_params, in_size, method), rtol)
