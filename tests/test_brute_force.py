"""The brute-force equivariant-map reference (tests/brute_force.py) against known answers, independent of any layer.

Known answers used below: for S_n acting on k input and l output copies of [n], the equivariant maps are indexed by
the set partitions of the k + l indices into at most n blocks (Bell(k + l) once n >= k + l); a fixed axis of size m
multiplies the count by m on each side; a concatenation is a direct sum, so dimensions add over pairs of blocks;
and dim Hom_G(V, W) = (1/|G|) sum_g tr P_V(g) tr P_W(g) (characters of real permutation representations).
"""
from __future__ import annotations

import itertools
import math
import os
import sys

import pytest
import torch

import unf

sys.path.insert(0, os.path.dirname(__file__))
from brute_force import (commutant_dim, equivariance_defect, equivariant_basis, equivariant_dim,  # noqa: E402
                         generators, invariant_dim, layer_matrices, layer_span_dim, permutation_matrix, span_dim,
                         tensor_size)

G = torch.Generator().manual_seed(0)


def spec_of(axes, shapes):
    return unf.WeightSpaceSpec.from_axes(axes, shapes)


# -- combinatorics, computed here rather than hard-coded ------------------------------------------------------------
def set_partitions(k):
    """All set partitions of range(k) as restricted-growth strings (block label of each element)."""
    def rec(prefix, m):
        if len(prefix) == k:
            yield tuple(prefix)
            return
        for b in range(m + 1):
            yield from rec(prefix + [b], max(m, b + 1))
    yield from rec([], 0)


def bell(k):
    return sum(1 for _ in set_partitions(k))


def partitions_at_most(k, n):
    """Number of set partitions of k points into at most n blocks."""
    return sum(1 for p in set_partitions(k) if (max(p) + 1 if p else 0) <= n)


def orbits_burnside(n, k):
    """Number of orbits of S_n on [n]^k by Burnside: average over sigma of (#fixed points of sigma)^k."""
    total = sum(sum(1 for i, s in enumerate(sigma) if i == s) ** k for sigma in itertools.permutations(range(n)))
    return total // math.factorial(n)


def orbits_enumerated(n, k):
    """Number of orbits of S_n on [n]^k by explicit enumeration: the orbit of a tuple is the set of its images."""
    seen, count = set(), 0
    for t in itertools.product(range(n), repeat=k):
        if t in seen:
            continue
        count += 1
        seen.update(tuple(sigma[i] for i in t) for sigma in itertools.permutations(range(n)))
    return count


def test_combinatorics_helpers():
    assert [bell(k) for k in range(6)] == [1, 1, 2, 5, 15, 52]
    for n in (1, 2, 3, 4):
        for k in (1, 2, 3, 4):
            assert orbits_burnside(n, k) == orbits_enumerated(n, k) == partitions_at_most(k, n)


# -- permutation matrices and generators ------------------------------------------------------------------------------
def mixed_spec():
    axes = {"w": (("g", 2), ["a", "b"]), "v": ("a", None), "c": ([("g", "a"), 3],), "s": (None,)}
    shapes = {"w": (6, 5), "v": (2, 2), "c": (9,), "s": (2,)}
    return spec_of(axes, shapes)


def test_permutation_matrix_matches_permute():
    spec = mixed_spec()
    assert spec.groups == {"g": 3, "a": 2, "b": 3}
    sd = {k: torch.randn(spec[k].shape, dtype=torch.float64, generator=G) for k in spec}
    for names in (None, ["c", "w"], "v", ["s"]):
        order = spec.names if names is None else ([names] if isinstance(names, str) else names)
        for _ in range(5):
            perm = spec.sample_permutation(G)
            P = permutation_matrix(spec, perm, names)
            N = tensor_size(spec, names)
            assert P.shape == (N, N) and P.dtype == torch.float64
            # a permutation matrix: 0/1 entries, one 1 per row and column
            assert set(P.unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(P.sum(0), torch.ones(N, dtype=torch.float64))
            assert torch.equal(P.sum(1), torch.ones(N, dtype=torch.float64))
            x = torch.cat([sd[k].reshape(-1) for k in order])
            px = spec.permute(sd, perm)
            assert torch.equal(P @ x, torch.cat([px[k].reshape(-1) for k in order]))


def test_permutation_matrix_is_a_homomorphism():
    spec = mixed_spec()
    for _ in range(5):
        a, b = spec.sample_permutation(G), spec.sample_permutation(G)
        # a @ b is "b first, then a"
        assert torch.equal(permutation_matrix(spec, a @ b), permutation_matrix(spec, a) @ permutation_matrix(spec, b))
        assert torch.equal(permutation_matrix(spec, a.inverse()), permutation_matrix(spec, a).T)


def group_closure(spec):
    """All elements reached from the identity by the generators (as tuples of per-group index tuples)."""
    gens = generators(spec)
    key = lambda p: tuple(tuple(p[g].tolist()) for g in spec.groups)  # noqa: E731
    start = spec.identity()
    seen, frontier = {key(start)}, [start]
    while frontier:
        nxt = []
        for p in frontier:
            for s in gens:
                q = s @ p
                if key(q) not in seen:
                    seen.add(key(q))
                    nxt.append(q)
        frontier = nxt
    return seen


@pytest.mark.parametrize("sizes", [{"g": 1}, {"g": 2}, {"g": 3}, {"g": 5}, {"g": 3, "a": 2, "b": 3}])
def test_generators_generate_the_whole_group(sizes):
    axes = {f"t_{g}": (g,) for g in sizes}
    spec = spec_of(axes, {f"t_{g}": (n,) for g, n in sizes.items()})
    gens = generators(spec)
    assert all(set(p) == set(sizes) for p in gens)
    assert len(group_closure(spec)) == math.prod(math.factorial(n) for n in sizes.values())


# -- the solver itself ----------------------------------------------------------------------------------------------------
def test_commutant_dim_matches_stacked_kronecker_rank_and_null_vectors_are_equivariant():
    """The Gram/eigvalsh count equals matrix_rank of the stacked row-major Kronecker system, and the null vectors of
    that system, reshaped row-major, are equivariant (catches a row-/column-major mix-up on rectangular maps)."""
    spec = spec_of({"w1": ("h", None), "b1": ("h",), "w2": (None, "h")}, {"w1": (3, 2), "b1": (3,), "w2": (4, 3)})
    for ins, outs in [("w1", "b1"), ("b1", "w2"), (["w1", "b1"], "w2"), ("w2", ["b1", "w1"])]:
        n_in, n_out = tensor_size(spec, ins), tensor_size(spec, outs)
        blocks = []
        for p in generators(spec):
            A, B = permutation_matrix(spec, p, outs), permutation_matrix(spec, p, ins)
            blocks.append(torch.kron(A, torch.eye(n_in, dtype=torch.float64))
                          - torch.kron(torch.eye(n_out, dtype=torch.float64), B.T.contiguous()))
        K = torch.cat(blocks)
        nullity = n_in * n_out - int(torch.linalg.matrix_rank(K))
        assert equivariant_dim(spec, ins, outs) == nullity
        _, S, Vh = torch.linalg.svd(K)
        null = Vh[int((S > 1e-9 * S.max()).sum()):]
        assert null.shape[0] == nullity > 0
        for v in null:
            assert equivariance_defect(spec, ins, outs, v.reshape(n_out, n_in)) < 1e-10
        # a random non-equivariant map is caught
        assert equivariance_defect(spec, ins, outs, torch.randn(n_out, n_in, dtype=torch.float64, generator=G)) > 1e-3


@pytest.mark.parametrize("ins,outs", [("w", "c"), (["c", "v"], ["w", "s"]), ("v", "v")])
def test_equivariant_basis_is_equivariant_under_the_whole_group(ins, outs):
    """The basis is orthonormal, equivariant under random group elements (not just the generators; this also catches
    a B vs B^T mix-up in the Kronecker form, which with these generators happens to leave the dimension unchanged)."""
    spec = mixed_spec()
    basis = equivariant_basis(spec, ins, outs)
    assert len(basis) == equivariant_dim(spec, ins, outs) > 0
    flat = torch.stack([b.reshape(-1) for b in basis])
    assert torch.allclose(flat @ flat.T, torch.eye(len(basis), dtype=torch.float64), atol=1e-10)
    for _ in range(10):
        p = spec.sample_permutation(G)
        P_out, P_in = permutation_matrix(spec, p, outs), permutation_matrix(spec, p, ins)
        for M in basis:
            assert (P_out @ M - M @ P_in).abs().max() < 1e-10


def test_no_groups_every_map_is_equivariant():
    spec = spec_of({"x": (None,), "y": (None, None)}, {"x": (3,), "y": (2, 2)})
    assert generators(spec) == []
    assert equivariant_dim(spec, "x", "y") == 12
    assert invariant_dim(spec, "x") == 3
    assert commutant_dim([], 0, 5) == 0


def character_dim(spec, in_names, out_names):
    """dim Hom_G(in, out) = (1/|G|) sum_g tr P_in(g) tr P_out(g), enumerating the whole group; traces are counted
    as fixed coordinates of spec.permute on labelled tensors (no permutation_matrix involved). ``out_names=None``:
    the trivial 1-dim representation (trace 1)."""
    labels, start = {}, 1
    for k in spec:
        n = math.prod(spec[k].shape)
        labels[k] = torch.arange(start, start + n, dtype=torch.float64).reshape(spec[k].shape)
        start += n

    def trace(perm, names):
        if names is None:
            return 1
        out = spec.permute(labels, perm)
        return sum(int((out[k] == labels[k]).sum()) for k in names)

    groups = list(spec.groups.items())
    total, order = 0, 0
    for combo in itertools.product(*[itertools.permutations(range(n)) for _, n in groups]):
        perm = unf.Permutation({g: torch.tensor(p) for (g, _), p in zip(groups, combo)})
        total += trace(perm, in_names) * trace(perm, out_names)
        order += 1
    assert total % order == 0
    return total // order


# -- known answers -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_vector_to_vector(n):
    spec = spec_of({"x": ("g",)}, {"x": (n,)})
    # identity and all-ones (they coincide for n = 1)
    assert equivariant_dim(spec, "x", "x") == (2 if n >= 2 else 1)
    assert invariant_dim(spec, "x") == 1


@pytest.mark.parametrize("n", [4, 5])
def test_matrix_to_matrix_is_bell_4(n):
    spec = spec_of({"w": ("g", "g")}, {"w": (n, n)})
    assert equivariant_dim(spec, "w", "w") == bell(4) == 15
    assert invariant_dim(spec, "w") == bell(2) == 2


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matrix_to_matrix_small_n_counts_orbits(n):
    """For n < 4 some of the 15 partition maps vanish: the dimension is the number of orbits of S_n on [n]^4."""
    spec = spec_of({"w": ("g", "g")}, {"w": (n, n)})
    expected = orbits_burnside(n, 4)
    assert expected == orbits_enumerated(n, 4)
    assert equivariant_dim(spec, "w", "w") == expected
    assert expected == {1: 1, 2: 8, 3: 14, 4: 15}[n]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("k_in,k_out", [(1, 0), (2, 0), (1, 2), (3, 0), (3, 1)])
def test_tensor_orders_count_partitions(n, k_in, k_out):
    """g^k_in -> g^k_out (k_out = 0: a fixed scalar-like tensor of size 1): partitions of k_in + k_out points into at
    most n blocks."""
    axes = {"x": ("g",) * k_in, "y": ("g",) * k_out if k_out else (None,)}
    shapes = {"x": (n,) * k_in, "y": (n,) * k_out if k_out else (1,)}
    spec = spec_of(axes, shapes)
    assert equivariant_dim(spec, "x", "y") == partitions_at_most(k_in + k_out, n) == orbits_burnside(n, k_in + k_out)


def mlp(h=3):
    axes = {"W1": ("h", None), "b1": ("h",), "W2": (None, "h"), "b2": (None,)}
    shapes = {"W1": (h, 3), "b1": (h,), "W2": (2, h), "b2": (2,)}
    return spec_of(axes, shapes)


# per tensor: (fixed multiplicity, number of h-axes)
MLP_TENSORS = {"W1": (3, 1), "b1": (1, 1), "W2": (2, 1), "b2": (2, 0)}


@pytest.mark.parametrize("h", [2, 3])
def test_mlp_pairs_and_total(h):
    spec = mlp(h)
    total = 0
    for src, (m_in, k_in) in MLP_TENSORS.items():
        for dst, (m_out, k_out) in MLP_TENSORS.items():
            # fixed axes fold into multiplicities; the h-part is a partition count (Bell(k) for h >= k)
            expected = m_in * m_out * partitions_at_most(k_in + k_out, h)
            assert equivariant_dim(spec, src, dst) == expected, (src, dst)
            total += expected
    assert equivariant_dim(spec, "W2", "W2") == 2 * 2 * bell(2) == 8
    assert equivariant_dim(spec, "b1", "b1") == bell(2) == 2
    assert equivariant_dim(spec, "W1", "b1") == 3 * bell(2) == 6
    assert equivariant_dim(spec, "b2", "W1") == 2 * 3 * bell(1) == 6
    assert equivariant_dim(spec, "b2", "b2") == 4
    # the whole weight space: 6 copies of the permutation rep U and 2 trivial: 36 * 2 + 2 * (6 * 2) * 1 + 4
    assert total == 36 * 2 + 2 * 12 + 4 == 100
    assert equivariant_dim(spec) == total
    assert equivariant_dim(spec, ["W1", "b1"], ["W2", "b2"]) == sum(
        MLP_TENSORS[a][0] * MLP_TENSORS[b][0] * partitions_at_most(MLP_TENSORS[a][1] + MLP_TENSORS[b][1], h)
        for a in ("W1", "b1") for b in ("W2", "b2"))
    # invariants: one per copy of U (its sum) plus every trivial coordinate
    assert invariant_dim(spec) == 6 + 2
    assert invariant_dim(spec, "W1") == 3


@pytest.mark.parametrize("n", [4])
def test_product_axis(n):
    # ("g", 2): U (x) R^2 = 2 copies of U, so 2 * 2 * dim Hom(U, U) = 8; the factor order does not matter
    for entry in [("g", 2), (2, "g")]:
        spec = spec_of({"x": (entry,)}, {"x": (2 * n,)})
        assert equivariant_dim(spec, "x", "x") == 2 * 2 * 2 == 8
        assert invariant_dim(spec, "x") == 2
    # ("g", "g") flattened into one axis is the (g, g) matrix: Bell(4)
    spec = unf.WeightSpaceSpec.from_axes({"x": (("g", "g"),)}, {"x": (n * n,)}, groups={"g": n})
    assert equivariant_dim(spec, "x", "x") == 15
    # a product axis next to a plain one at n = 3: ("g", 2) x g = 2 copies of U (x) U -> 2 * 2 * 14 (not Bell(4))
    spec = spec_of({"x": (("g", 2), "g")}, {"x": (2 * 3, 3)})
    assert equivariant_dim(spec, "x", "x") == 4 * partitions_at_most(4, 3) == 4 * 14


@pytest.mark.parametrize("n", [4])
def test_concatenation_axis(n):
    # [a | b] = U_a + U_b: Hom(U_a,U_a) + Hom(U_b,U_b) + Hom(U_a,U_b) + Hom(U_b,U_a) = 2 + 2 + 1 + 1
    spec = unf.WeightSpaceSpec.from_axes({"x": (["a", "b"],)}, {"x": (2 * n,)}, groups={"a": n})
    assert equivariant_dim(spec, "x", "x") == 2 + 2 + 1 + 1 == 6
    assert invariant_dim(spec, "x") == 2
    # [a | 3] = U_a + 3 trivial: 2 + 3 * 1 + 1 * 3 + 3 * 3
    spec = spec_of({"x": (["a", 3],)}, {"x": (n + 3,)})
    assert equivariant_dim(spec, "x", "x") == 2 + 3 + 3 + 9 == 17
    # [a | a] = 2 copies of U_a: 4 * 2
    spec = spec_of({"x": (["a", "a"],)}, {"x": (2 * n,)})
    assert equivariant_dim(spec, "x", "x") == 8
    # maps between two differently-laid-out tensors: [a | b] -> b: Hom(U_a, U_b) + Hom(U_b, U_b) = 1 + 2
    spec = spec_of({"x": (["a", "b"],), "y": ("b",)}, {"x": (n + 3,), "y": (3,)})
    assert spec.groups == {"a": n, "b": 3}
    assert equivariant_dim(spec, "x", "y") == 3
    assert equivariant_dim(spec, "y", "x") == 3


def test_product_times_concatenation():
    # (g, 2) x [a | b] = 2 (U_g U_a) + 2 (U_g U_b); Hom(U_g U_a, U_g U_a) = 2 * 2, Hom(U_g U_a, U_g U_b) = 2 * 1 * 1
    spec = unf.WeightSpaceSpec.from_axes({"w": (("g", 2), ["a", "b"])}, {"w": (4, 5)}, groups={"a": 2})
    assert spec.groups == {"g": 2, "a": 2, "b": 3}
    expected = 2 * 2 * (4 + 2 + 2 + 4)
    assert equivariant_dim(spec, "w", "w") == expected == 48 == character_dim(spec, ["w"], ["w"])
    assert invariant_dim(spec, "w") == 2 * 2 == character_dim(spec, ["w"], None)


@pytest.mark.parametrize("ins,outs", [(["w"], ["c"]), (["c", "v"], ["w", "s"]), (None, None), (["v"], ["w"])])
def test_against_character_formula(ins, outs):
    spec = mixed_spec()
    in_list = spec.names if ins is None else ins
    out_list = spec.names if outs is None else outs
    assert equivariant_dim(spec, ins, outs) == character_dim(spec, in_list, out_list)


def test_invariant_dims():
    assert invariant_dim(spec_of({"w": ("g", "g")}, {"w": (4, 4)})) == 2
    assert invariant_dim(spec_of({"x": ("g",)}, {"x": (4,)})) == 1
    assert invariant_dim(spec_of({"x": (None,)}, {"x": (3,)})) == 3
    assert invariant_dim(spec_of({"t": ("g", "g", "g")}, {"t": (3, 3, 3)})) == bell(3) == 5
    # invariants = equivariant maps to a trivial 1-dim tensor
    spec = mixed_spec()
    with_one = spec_of({**{k: spec[k].axes for k in spec}, "one": (None,)},
                       {**{k: spec[k].shape for k in spec}, "one": (1,)})
    for names in (None, ["w"], ["c", "v"]):
        expected = equivariant_dim(with_one, names if names else spec.names, "one")
        assert invariant_dim(spec, names) == expected


# -- span helpers --------------------------------------------------------------------------------------------------------
def test_span_dim():
    a = torch.randn(3, 4, dtype=torch.float64, generator=G)
    b = torch.randn(3, 4, dtype=torch.float64, generator=G)
    assert span_dim([]) == 0
    assert span_dim([torch.zeros(3, 4)]) == 0
    assert span_dim([a]) == 1
    assert span_dim([a, b, 2 * a - 3 * b]) == 2
    assert span_dim([a, b, torch.randn(3, 4, dtype=torch.float64, generator=G)]) == 3


def test_layer_span_dim_deepsets():
    n = 5
    spec = spec_of({"x": ("g",)}, {"x": (n,)})

    def deepsets(theta, x):
        return theta[0] * x + theta[1] * x.sum() * torch.ones_like(x)

    def degenerate(theta, x):
        return theta[0] * x + theta[1] * x

    assert layer_span_dim(deepsets, 2, n) == equivariant_dim(spec, "x", "x") == 2
    assert layer_span_dim(degenerate, 2, n) == 1
    for M in layer_matrices(deepsets, 2, n):
        assert M.shape == (n, n) and equivariance_defect(spec, "x", "x", M) == 0


def test_layer_span_dim_fallback_without_functorch():
    """A layer that functorch cannot trace (.tolist()) still works through basis-vector evaluation."""
    n = 4

    def untraceable(theta, x):
        s = sum(x.tolist())
        return theta[0] * x + theta[1] * s * torch.ones(n, dtype=torch.float64) + theta[2] * x.flip(0)

    mats = layer_matrices(untraceable, 3, n)
    assert torch.equal(mats[1], torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(mats[2], torch.eye(n, dtype=torch.float64).flip(0))
    assert layer_span_dim(untraceable, 3, n) == 3
    assert layer_span_dim(untraceable, 3, n, method="loop") == 3
    # jacrev alone silently loses the .tolist() path: the check in "auto" is what catches it
    assert torch.equal(layer_matrices(untraceable, 3, n, method="jacrev")[1], torch.zeros(n, n, dtype=torch.float64))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_partition_basis_of_matrix_maps_is_complete_and_degenerates(n):
    """The 15 set-partition maps (g,g) -> (g,g) (out i, out j, in k, in l) span the commutant: 15 at n >= 4, and
    at n < 4 they stay equivariant but become dependent (partitions into > n blocks give 0)."""
    spec = spec_of({"w": ("g", "g")}, {"w": (n, n)})
    parts = list(set_partitions(4))
    assert len(parts) == 15
    N = n * n

    basis = torch.zeros(len(parts), N, N, dtype=torch.float64)
    for c, p in enumerate(parts):
        # E_p[(i, j), (k, l)] = 1 iff (i, j, k, l) are equal exactly on the blocks of p
        for idx in itertools.product(range(n), repeat=4):
            if all((idx[a] == idx[b]) == (p[a] == p[b]) for a in range(4) for b in range(a + 1, 4)):
                basis[c, idx[0] * n + idx[1], idx[2] * n + idx[3]] = 1.0

    def layer(theta, x):
        return torch.einsum("c,cij,j->i", theta, basis, x)

    mats = layer_matrices(layer, len(parts), N)
    for M in mats:
        assert equivariance_defect(spec, "w", "w", M) == 0
    assert span_dim(mats) == equivariant_dim(spec, "w", "w") == partitions_at_most(4, n)
    # same span as the brute-force basis: adding one to the other does not grow the span
    assert span_dim(mats + equivariant_basis(spec, "w", "w")) == span_dim(mats)
