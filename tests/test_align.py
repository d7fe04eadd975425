"""Re-basin: exact recovery of known permutations, function preservation, known optima, batching, MergeMany, LMC."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

import unf
from unf.align import (align_many, head_groups, head_signatures, interpolate, loss_barrier, merge_many,
                       reset_bn_stats, weight_matching)
from unf.align.matching import _stack

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import models  # noqa: E402

CASES = {
    "mlp": (lambda: models.mlp(16, (24, 20), 5), lambda: torch.randn(4, 16)),
    "cnn": (lambda: models.small_cnn(1, 8, 5), lambda: torch.randn(4, 1, 8, 8)),
    "resnet": (lambda: models.resnet20(5, width=4), lambda: torch.randn(4, 3, 8, 8)),
    "transformer": (lambda: models.vit(16, patch=4, dim=16, depth=2, heads=4), lambda: torch.randn(4, 3, 16, 16)),
    "transformer_mha": (lambda: models.vit(16, patch=4, dim=16, depth=2, heads=4, torch_attention=True),
                        lambda: torch.randn(4, 3, 16, 16)),
    "lstm": (lambda: models.lstm(vocab=7, dim=6, hidden=10, layers=2), lambda: torch.randint(0, 7, (4, 5))),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    make_model, make_x = CASES[name]
    model, x = make_model().double(), make_x()
    x = x.double() if x.is_floating_point() else x
    for k, p in model.state_dict().items():  # non-trivial norms and biases, so every tensor carries signal
        if p.is_floating_point():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
            if k.endswith("running_var"):
                p.abs_().add_(0.5)
    return model, x, unf.spec_from_module(model, x)


@pytest.mark.parametrize("name", list(CASES))
def test_recovers_a_random_permutation_exactly(name):
    model, x, spec = build(name)
    sd = model.state_dict()
    for seed in range(3):
        p = spec.sample_permutation(torch.Generator().manual_seed(seed))
        q = weight_matching(spec, sd, spec.permute(sd, p))
        assert q == p.inverse(), name


@pytest.mark.parametrize("name", list(CASES))
def test_aligned_model_computes_the_same_function(name):
    a, x, spec = build(name, 0)
    b, _, _ = build(name, 1)
    perm = weight_matching(spec, a.state_dict(), b.state_dict())
    aligned = copy.deepcopy(b)
    aligned.load_state_dict(spec.permute(b.state_dict(), perm))
    b.eval(), aligned.eval()
    assert torch.allclose(aligned(x), b(x), rtol=1e-10, atol=1e-10)
    # and it is closer to the reference than before
    dist = lambda s: sum((s[k] - a.state_dict()[k]).square().sum() for k in spec.float_names)  # noqa: E731
    assert dist(aligned.state_dict()) < dist(b.state_dict())


def test_known_optimum_by_the_rearrangement_inequality():
    # one group acting on a vector: <r, P o> is largest when P sorts o like r
    spec = unf.WeightSpaceSpec.from_axes({"v": ("g",)}, {"v": (6,)})
    r = torch.tensor([3.0, -1.0, 7.0, 0.0, 5.0, 2.0])
    o = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    perm = weight_matching(spec, {"v": r}, {"v": o})
    assert spec.permute({"v": o}, perm)["v"].argsort().tolist() == r.argsort().tolist()


def test_two_layer_known_optimum():
    # W2 = W1^T coupling: other = reference with hidden units swapped and scaled noise-free -> exact inverse
    spec = unf.WeightSpaceSpec.from_axes({"w1": ("h", None), "w2": (None, "h")}, {"w1": (5, 3), "w2": (2, 5)})
    g = torch.Generator().manual_seed(0)
    ref = {"w1": torch.randn(5, 3, generator=g), "w2": torch.randn(2, 5, generator=g)}
    swap = unf.Permutation({"h": torch.tensor([4, 3, 2, 1, 0])})
    got = weight_matching(spec, ref, spec.permute(ref, swap), init="identity")
    assert got == swap.inverse()


def test_deterministic_for_a_seed_and_batched_equals_single():
    a, _, spec = build("mlp", 0)
    others = [build("mlp", s)[0].state_dict() for s in (1, 2, 3)]
    ref = a.state_dict()
    single = [weight_matching(spec, ref, o, seed=5) for o in others]
    assert single == [weight_matching(spec, ref, o, seed=5) for o in others]
    assert align_many(spec, ref, others, seed=5) == single


def test_head_aware_matching_finds_heads_first():
    model, _, spec = build("transformer_mha")
    heads = head_groups(spec)
    assert sorted(spec.groups[g] for g in heads) == [4, 4]
    sd = model.state_dict()
    p = spec.sample_permutation(torch.Generator().manual_seed(7))
    ref, oth = _stack(spec, sd, torch.float64), _stack(spec, spec.permute(sd, p), torch.float64)
    for g in heads:  # signatures are invariant to everything but the head order
        s_ref, s_oth = head_signatures(spec, g, ref), head_signatures(spec, g, oth)
        assert torch.allclose(s_oth[0], s_ref[0][p[g]])
    assert weight_matching(spec, sd, spec.permute(sd, p), heads=True) == p.inverse()
    with pytest.raises(ValueError, match="no head groups"):
        weight_matching(*[build("mlp")[2]] + [build("mlp")[0].state_dict()] * 2, heads=True)


def test_merge_many_aligns_permuted_copies():
    model, _, spec = build("cnn")
    sd = model.state_dict()
    copies = [spec.permute(sd, spec.sample_permutation(torch.Generator().manual_seed(s))) for s in range(4)]
    perms, centre = merge_many(spec, copies)
    aligned = [spec.permute(c, p) for c, p in zip(copies, perms)]
    for a in aligned[1:]:
        assert all(torch.equal(a[k], aligned[0][k]) for k in spec.float_names)
    assert all(torch.allclose(centre[k].double(), aligned[0][k]) for k in spec.float_names)


def test_bad_state_dict_names_the_model():
    model, _, spec = build("mlp")
    bad = dict(model.state_dict())
    bad.pop("0.bias")
    with pytest.raises(ValueError, match=r"model #1: .*missing keys \['0.bias'\]"):
        align_many(spec, model.state_dict(), [model.state_dict(), bad])


def test_interpolate_and_barrier():
    a, x, spec = build("mlp", 0)
    b, _, _ = build("mlp", 1)
    mid = interpolate(a.state_dict(), b.state_dict(), [0.0, 0.5, 1.0])
    assert torch.equal(mid[0]["0.weight"], a.state_dict()["0.weight"])
    assert torch.allclose(mid[1]["0.weight"], (a.state_dict()["0.weight"] + b.state_dict()["0.weight"]) / 2)
    y = torch.randn(4, 5, dtype=torch.float64)
    res = loss_barrier(a, a.state_dict(), b.state_dict(), lambda m: float((m(x) - y).square().mean()), ts=[0, .5, 1])
    v = res["values"]
    assert res["barrier"] == pytest.approx(max(v[1] - (v[0] + v[2]) / 2, 0.0))
    # a path from a network to itself has no barrier
    assert loss_barrier(a, a.state_dict(), a.state_dict(), lambda m: float(m(x).sum()))["barrier"] == pytest.approx(0)


def test_reset_bn_stats_uses_the_given_batches():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [torch.randn(16, 3) * 3 + 1 for _ in range(4)]
    reset_bn_stats(net, data)
    h = torch.cat([net[0](d) for d in data])
    assert torch.allclose(net[1].running_mean, h.mean(0).detach(), atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "transformer_mha"])
def test_activation_matching_recovers_permutations(name):
    model, x, spec = build(name)
    p = spec.sample_permutation(torch.Generator().manual_seed(3))
    other = copy.deepcopy(model)
    other.load_state_dict(spec.permute(model.state_dict(), p))
    data = [torch.randn(32, *x.shape[1:], dtype=torch.float64) for _ in range(2)]
    q = unf.align.activation_matching(model, other, spec, data)
    assert q == p.inverse()


# -- regressions found in review --------------------------------------------------------------------------------------
def test_descent_converges_when_a_group_acts_twice_on_a_tensor():
    from unf.align.matching import _Matcher, match_batched, signature_init

    a, _, spec = build("lstm", 0)
    b, _, _ = build("lstm", 1)
    ref, oth = _stack(spec, a.state_dict(), torch.float32), _stack(spec, [b.state_dict()], torch.float32)
    start = signature_init(spec, ref, oth, list(spec.groups))
    perms, sweeps = match_batched(spec, ref, oth, 100, 0, dict(start))
    assert sweeps < 100

    def total(p):
        m = _Matcher(spec, ref, oth, dict(p))
        return sum((ref[k] * m.current[k]).sum() for k in ref).item()

    assert total(perms) >= total({g: start.get(g, torch.arange(n)[None]) for g, n in spec.groups.items()}) - 1e-4


def test_merge_many_converges_on_independent_models():
    nets = [build("mlp", s)[0].state_dict() for s in range(5)]
    spec = build("mlp")[2]
    perms, centre = merge_many(spec, nets, max_iter=50)
    aligned = [spec.permute(n, p) for n, p in zip(nets, perms)]
    spread = lambda sds: sum((sd[k] - sum(s[k] for s in sds) / len(sds)).square().sum()  # noqa: E731
                             for sd in sds for k in spec.float_names)
    assert spread(aligned) < spread(nets)
    for k in spec.float_names:
        assert torch.allclose(centre[k].double(), sum(sd[k] for sd in aligned) / len(aligned), atol=1e-5)


def test_loss_barrier_needs_endpoints():
    a, x, _ = build("mlp")
    with pytest.raises(ValueError, match="increase from 0 to 1"):
        loss_barrier(a, a.state_dict(), a.state_dict(), lambda m: 0.0, ts=[0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="increase from 0 to 1"):
        loss_barrier(a, a.state_dict(), a.state_dict(), lambda m: 0.0, ts=[1, 0.5, 0])


def test_activation_matching_skips_modules_that_never_run():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)  # out_proj registered before emb
            self.emb, self.head = nn.Linear(5, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.emb(x)
            return self.head((h + self.attn(h, h, h)[0]).mean(1))

    torch.manual_seed(0)
    a, x = Net().double(), torch.randn(8, 4, 5, dtype=torch.float64)
    spec = unf.spec_from_module(a, x)
    p = spec.sample_permutation(torch.Generator().manual_seed(0))
    b = copy.deepcopy(a)
    b.load_state_dict(spec.permute(a.state_dict(), p))
    q = unf.align.activation_matching(a, b, spec, [(x, None)])
    assert q == p.inverse()


def test_reset_bn_stats_restores_momentum_and_takes_labelled_batches():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reset_bn_stats(net, [(torch.randn(8, 3), torch.zeros(8))])
    assert net[1].momentum == 0.1


def test_signature_sort_matches_torch_sort_and_leaves_its_input():
    """The signature start sorts slices with numpy on the CPU (much faster there): same values as torch.sort, for
    non-contiguous input with ties, in both float dtypes, and the input is not sorted in place."""
    from unf.align.matching import _sorted_rows

    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 5, 7, dtype=dtype).round(decimals=1).transpose(1, 2)  # [2, 7, 5], ties, not contiguous
        before = x.clone()
        assert torch.equal(_sorted_rows(x), x.sort(dim=2).values)
        assert torch.equal(x, before)


@pytest.mark.parametrize("name", ["resnet", "transformer", "mlp"])
def test_descent_stops_at_a_fixed_point_of_every_group(name):
    """The descent skips a group none of whose neighbours changed since its visit; that is only sound if, at the
    end, no group's own assignment (all others held) improves the objective. Checked from the identity start, which
    needs several sweeps, for two models at once."""
    from unf.align.assignment import solve_assignment
    from unf.align.matching import _Matcher, match_batched

    a, _, spec = build(name, 0)
    ref = _stack(spec, a.state_dict(), torch.float64)
    oth = _stack(spec, [build(name, s)[0].state_dict() for s in (1, 2)], torch.float64)
    perms, sweeps = match_batched(spec, ref, oth, 100, 0, start="identity", heads=False)
    assert 1 < sweeps < 100
    state = _Matcher(spec, ref, oth, dict(perms))
    for g in spec.groups:
        if not state.where[g] or state.repeated(g):
            continue
        sim = state.similarity(g)
        best = sim.gather(2, solve_assignment(sim)[:, :, None]).sum((1, 2))
        held = sim.gather(2, perms[g][:, :, None]).sum((1, 2))
        assert torch.all(best <= held + 1e-6 * held.abs().clamp_min(1e-6)), (name, g)
