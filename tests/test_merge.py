"""unf.merge: task-vector algebra, TIES/DARE on hand-computed tensors, permutation commuting, errors, alignment."""
import os
import sys

import pytest
import torch
import torch.nn as nn

import unf
from unf.merge import TaskVector, align_then_merge, merge

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import models  # noqa: E402


def _sd(seed, model_fn=lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))):
    torch.manual_seed(seed)
    m = model_fn().double()
    with torch.no_grad():
        for k, t in m.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t).abs() + 0.5 if "running_var" in k else torch.randn_like(t))
    return m, m.state_dict()


@pytest.fixture
def three():
    m, base = _sd(0)
    spec = unf.spec_from_module(m, torch.randn(4, 6, dtype=torch.float64))
    return spec, base, _sd(1)[1], _sd(2)[1]


def test_buffers_excluded_by_default_and_apply_roundtrip(three):
    spec, base, a, _ = three
    tv = TaskVector(base, a, spec)
    assert "1.running_mean" not in tv.names and "1.num_batches_tracked" not in tv.names
    assert "1.weight" in tv.names  # BatchNorm's affine parameters are parameters
    out = tv.apply(base, 1.0)
    for k in tv.names:
        torch.testing.assert_close(out[k], a[k], rtol=0, atol=1e-12)
    torch.testing.assert_close(out["1.running_mean"], base["1.running_mean"])  # copied from the target
    everything = TaskVector(base, a, spec, exclude="none")
    assert "1.running_var" in everything.names and "1.num_batches_tracked" not in everything.names
    by_pattern = TaskVector(base, a, exclude=["*.bias"])  # no spec: BN statistics recognised by name too
    assert "0.bias" not in by_pattern.names and "1.running_var" in by_pattern.names
    assert "1.running_var" not in TaskVector(base, a).names


def test_algebra_identities(three):
    spec, base, a, b = three
    ta, tb = TaskVector(base, a, spec), TaskVector(base, b, spec)
    for k in ta.names:
        torch.testing.assert_close((ta + tb)[k], (tb + ta)[k])
        torch.testing.assert_close((ta - ta)[k], torch.zeros_like(ta[k]))
        torch.testing.assert_close((-ta)[k], (-1 * ta)[k])
        torch.testing.assert_close((2 * ta - ta)[k], ta[k])
        torch.testing.assert_close(sum([ta, tb])[k], (ta + tb)[k])
    # b - a as a task vector is the difference of the two task vectors
    tab = TaskVector(a, b, spec)
    for k in ta.names:
        torch.testing.assert_close(tab[k], (tb - ta)[k])
    flat = lambda tv: torch.cat([tv[k].flatten() for k in tv.names])  # noqa: E731
    assert ta.dot(tb) == pytest.approx(float(flat(ta) @ flat(tb)), rel=1e-12)
    assert ta.norm() == pytest.approx(float(flat(ta).norm()), rel=1e-12)
    assert (3 * ta).norm() == pytest.approx(3 * ta.norm(), rel=1e-12)
    assert ta.cosine(2.5 * ta) == pytest.approx(1.0) and ta.cosine(-ta) == pytest.approx(-1.0)
    # apply(alpha) is linear: base + alpha * tau
    half = ta.apply(base, 0.5)
    for k in ta.names:
        torch.testing.assert_close(half[k], base[k] + 0.5 * (a[k] - base[k]))


def test_random_like_keeps_per_tensor_norms_and_is_seeded(three):
    spec, base, a, _ = three
    ta = TaskVector(base, a, spec)
    r, r2, r3 = ta.random_like(0), ta.random_like(0), ta.random_like(1)
    for k in ta.names:
        assert float(r[k].norm()) == pytest.approx(float(ta[k].norm()), rel=1e-10)
        assert torch.equal(r[k], r2[k]) and not torch.equal(r[k], r3[k])
    assert abs(r.cosine(ta)) < 0.3 and abs(r3.cosine(ta)) < 0.3  # independent of ta (63 entries)


def test_permute_commutes_with_arithmetic(three):
    spec, base, a, b = three
    perm = spec.sample_permutation(torch.Generator().manual_seed(3))
    ta, tb = TaskVector(base, a, spec), TaskVector(base, b, spec)
    pa = TaskVector(spec.permute(base, perm), spec.permute(a, perm), spec)
    for k in ta.names:
        torch.testing.assert_close(ta.permute(perm)[k], pa[k])
        torch.testing.assert_close((ta + 2 * tb).permute(perm)[k], (ta.permute(perm) + 2 * tb.permute(perm))[k])
    # the norm and dot products are permutation invariant
    assert ta.permute(perm).dot(tb.permute(perm)) == pytest.approx(ta.dot(tb), rel=1e-12)
    # applying a permuted vector to the permuted base gives the permuted fine-tuned model
    out = ta.permute(perm).apply(spec.permute(base, perm))
    pa_full = spec.permute(a, perm)
    for k in ta.names:
        torch.testing.assert_close(out[k], pa_full[k])


def test_mismatched_state_dicts_name_the_tensor(three):
    spec, base, a, _ = three
    bad = dict(a)
    bad["0.weight"] = torch.zeros(7, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'0.weight'"):
        TaskVector(base, bad)
    missing = {k: v for k, v in a.items() if k != "3.bias"}
    with pytest.raises(ValueError, match=r"3.bias"):
        TaskVector(base, missing)
    ta = TaskVector(base, a, spec)
    with pytest.raises(ValueError, match=r"'0.weight'"):
        ta.apply(bad)
    other = TaskVector(base, a, spec, exclude=["3.*"])
    with pytest.raises(ValueError, match=r"3.bias|3.weight"):
        ta + other
    with pytest.raises(ValueError, match=r"3.bias|3.weight"):
        merge([ta, other])


def test_ties_on_hand_computed_tensors():
    t1 = TaskVector.from_tensors({"w": torch.tensor([3.0, -1.0, 0.5, -4.0])})
    t2 = TaskVector.from_tensors({"w": torch.tensor([-2.0, 2.0, 1.0, 0.1])})
    t3 = TaskVector.from_tensors({"w": torch.tensor([1.0, -3.0, -0.2, -0.3])})
    # density 0.5: keep 2 of 4 -> t1 [3, 0, 0, -4], t2 [-2, 2, 0, 0], t3 [1, -3, 0, 0]
    # weighted sums (w=1): [2, -1, 0, -4] -> signs [+, -, + (tie), -]
    # agreeing entries: [3, 1], [-3], none, [-4] -> means [2, -3, 0, -4]
    out = merge([t1, t2, t3], "ties", density=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -3.0, 0.0, -4.0]))
    # weights enter both the election and the mean: w = (1, 2, 1) -> weighted t2 [-4, 4, 0, 0]
    # sums [0, 1, 0, -4] -> signs [+ (tie), +, +, -]: means [(3 + 1) / 2, 4, 0, -4]
    out = merge([t1, t2, t3], "ties", weights=[1, 2, 1], density=0.5, lam=0.5)
    torch.testing.assert_close(out["w"], 0.5 * torch.tensor([2.0, 4.0, 0.0, -4.0]))
    # density 1 keeps everything: sums [2, -2, 1.3, -4.2] -> means [2, -2, 0.75, -2.15]
    out = merge([t1, t2, t3], "ties", density=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -2.0, 0.75, -2.15]))


def test_task_arithmetic_is_scaled_weighted_sum():
    t1 = TaskVector.from_tensors({"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([1.0])})
    t2 = TaskVector.from_tensors({"w": torch.tensor([[3.0, -1.0]]), "b": torch.tensor([-2.0])})
    out = merge([t1, t2], "task_arithmetic", weights=[0.5, 2.0], lam=0.3)
    torch.testing.assert_close(out["w"], 0.3 * torch.tensor([[6.5, -1.0]]))
    torch.testing.assert_close(out["b"], 0.3 * torch.tensor([-3.5]))


def test_dare_keeps_with_bernoulli_and_rescales():
    x = torch.arange(1.0, 2001.0)
    t = TaskVector.from_tensors({"w": x})
    out = merge([t], "dare_linear", density=0.25, seed=7)["w"]
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.25)  # rescaled by 1/density
    assert 0.2 < kept.float().mean() < 0.3  # Bernoulli(0.25)
    assert torch.equal(out, merge([t], "dare_linear", density=0.25, seed=7)["w"])  # seeded
    # the expectation is preserved: mean over many seeds -> x
    mean = torch.stack([merge([t], "dare_linear", density=0.5, seed=s)["w"] for s in range(400)]).mean(0)
    assert (mean - x).abs().div(x).mean() < 0.05
    # dare_ties = the same drop, then sign election: with one task it equals dare_linear
    torch.testing.assert_close(merge([t], "dare_ties", density=0.25, seed=7)["w"], out)
    # two opposite tasks: the disjoint mean keeps only the elected sign's entries
    a = TaskVector.from_tensors({"w": torch.tensor([2.0, 1.0])})
    b = TaskVector.from_tensors({"w": torch.tensor([-1.0, -3.0])})
    torch.testing.assert_close(merge([a, b], "dare_ties", density=1.0)["w"], torch.tensor([2.0, -3.0]))


def test_bad_arguments():
    t = TaskVector.from_tensors({"w": torch.ones(3)})
    with pytest.raises(ValueError, match="method"):
        merge([t], "slerp")
    with pytest.raises(ValueError, match="density"):
        merge([t], "ties", density=0.0)
    with pytest.raises(ValueError, match="weights"):
        merge([t], weights=[1, 2])


def _finetune(sd, spec, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if k in spec.parameter_names else v
            for k, v in sd.items()}


def test_align_then_merge_identity_in_basin_and_undoes_permutation():
    torch.manual_seed(0)
    m = models.mlp(8, (16, 12), 4).double()
    spec = unf.spec_from_module(m, torch.randn(2, 8, dtype=torch.float64))
    base = m.state_dict()
    e1, e2 = _finetune(base, spec, 1), _finetune(base, spec, 2)
    merged, perms = align_then_merge([e1, e2], base, spec, "task_arithmetic", lam=0.5)
    assert all(p == spec.identity() for p in perms)  # same basin: nothing to move
    plain = merge([TaskVector(base, e1, spec), TaskVector(base, e2, spec)], lam=0.5).apply(base)
    for k in plain:
        torch.testing.assert_close(merged[k], plain[k])
    # a permuted expert (same function) is moved back before merging
    p = spec.sample_permutation(torch.Generator().manual_seed(5))
    merged2, perms2 = align_then_merge([e1, spec.permute(e2, p)], base, spec, "task_arithmetic", lam=0.5)
    assert perms2[1] == p.inverse()
    for k in plain:
        torch.testing.assert_close(merged2[k], plain[k])
    unaligned, _ = align_then_merge([e1, spec.permute(e2, p)], base, spec, lam=0.5, align=False)
    assert max(float((unaligned[k] - plain[k]).abs().max()) for k in plain) > 0.1


def test_no_top_level_merge_function():
    assert unf.merge.merge is merge and not callable(unf.merge)
