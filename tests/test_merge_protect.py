"""Merge protection: function preserved (MLP, CNN, transformers), homogeneity reported only where provable, the
anchor-guided attack recovers permutations and rescalings exactly and leaves head mixing in place."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

import unf
from unf.merge import canonical_scales, mixable_groups, protect, unprotect
from unf.spec import homogeneous_groups

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import models  # noqa: E402

CASES = {
    "mlp": (lambda: models.mlp(16, (24, 20), 5), lambda: torch.randn(8, 16)),
    "cnn": (lambda: models.small_cnn(1, 8, 5), lambda: torch.randn(8, 1, 8, 8)),
    "transformer": (lambda: models.vit(16, patch=4, dim=16, depth=2, heads=4), lambda: torch.randn(8, 3, 16, 16)),
    "transformer_mha": (lambda: models.vit(16, patch=4, dim=16, depth=2, heads=4, torch_attention=True),
                        lambda: torch.randn(8, 3, 16, 16)),
}


def build(name, dtype, seed=0):
    torch.manual_seed(seed)
    make_model, make_x = CASES[name]
    return make_model().to(dtype).eval(), make_x().to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", list(CASES))
def test_protect_preserves_the_function_and_moves_the_weights(name, dtype, tol):
    model, x = build(name, dtype)
    spec = unf.spec_from_module(model, x)
    sd = protect(model, x, seed=1, spec=spec)
    other = copy.deepcopy(model)
    other.load_state_dict(sd)
    with torch.no_grad():
        ref, out = model(x), other(x)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        orig = model.state_dict()
        keys = [k for k in orig if orig[k].is_floating_point()]
        dist = sum(float((sd[k] - orig[k]).square().sum()) for k in keys) ** 0.5
        size = sum(float(orig[k].square().sum()) for k in keys) ** 0.5
        assert dist > 0.5 * size  # far from the original...
        mid = copy.deepcopy(model)
        mid.load_state_dict(unf.align.interpolate(orig, sd, [0.5])[0])
        assert float((mid(x) - ref).abs().max()) > 10 * tol  # ...and not linearly connected to it


def test_homogeneous_groups_are_reported_only_where_provable():
    x = torch.randn(2, 6)
    relu = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.LeakyReLU(0.1), nn.Linear(4, 3))
    assert homogeneous_groups(relu, x, unf.spec_from_module(relu, x)) == ["0", "2"]
    gelu = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    assert homogeneous_groups(gelu, x, unf.spec_from_module(gelu, x)) == []
    bn = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    assert homogeneous_groups(bn, x, unf.spec_from_module(bn, x)) == []

    class Residual(nn.Module):  # the ReLU units also feed a residual sum: rescaling them would change it
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head(h + self.b(h))

    res = Residual()
    assert homogeneous_groups(res, x, unf.spec_from_module(res, x)) == []
    cnn, xc = build("cnn", torch.float32)
    assert homogeneous_groups(cnn, xc, unf.spec_from_module(cnn, xc)) == ["0", "2", "5"]


def test_mixable_groups_are_the_attention_projections():
    model, x = build("transformer_mha", torch.float64)
    kinds = {g: k for g, (k, _, _) in mixable_groups(unf.spec_from_module(model, x)).items()}
    assert kinds == {"blocks.0.attn.qk": "qk", "blocks.0.attn.v": "vo", "blocks.1.attn.qk": "qk",
                     "blocks.1.attn.v": "vo"}
    mlp, xm = build("mlp", torch.float64)
    assert mixable_groups(unf.spec_from_module(mlp, xm)) == {}


def _expert(model, spec, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if k in spec.parameter_names else v
          for k, v in model.state_dict().items()}
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_attack_recovers_a_pure_permutation_protection_exactly(name):
    anchor, x = build(name, torch.float64)
    spec = unf.spec_from_module(anchor, x)
    expert = _expert(anchor, spec)
    prot = protect(expert, x, seed=3, spec=spec, scale=None, mix=None)
    rec = unprotect(prot, anchor.state_dict(), spec)
    for k, v in expert.state_dict().items():
        assert torch.equal(rec[k], v), k


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_attack_with_scale_recovery_undoes_rescalings(name):
    anchor, x = build(name, torch.float64)
    spec = unf.spec_from_module(anchor, x)
    hom = homogeneous_groups(anchor, x, spec)
    base = anchor.state_dict()
    # the anchor itself, permuted and rescaled, comes back exactly
    rec = unprotect(protect(anchor, x, seed=3, spec=spec), base, spec, homogeneous=hom)
    for k, v in base.items():
        torch.testing.assert_close(rec[k], v, rtol=1e-10, atol=1e-12)
    # a fine-tuned expert comes back up to per-unit positive scales: the same canonical form
    expert = _expert(anchor, spec)
    rec = unprotect(protect(expert, x, seed=3, spec=spec), base, spec, homogeneous=hom)
    want, _ = canonical_scales(expert.state_dict(), spec, hom)
    got, _ = canonical_scales(rec, spec, hom)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    # without scale recovery, the same attack fails on rescaled units
    plain = unprotect(protect(expert, x, seed=3, spec=spec), base, spec)
    assert max(float((plain[k] - expert.state_dict()[k]).abs().max()) for k in want) > 0.5


def test_head_mixing_survives_the_attack():
    anchor, x = build("transformer_mha", torch.float64)
    with torch.no_grad():  # non-zero biases, so that every mixed tensor carries signal
        for p in anchor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    spec = unf.spec_from_module(anchor, x)
    base = anchor.state_dict()
    rec = unprotect(protect(anchor, x, seed=3, spec=spec, scale=None), base, spec)
    mixed = {p.name for _, first, second in mixable_groups(spec).values() for p in first + second}
    for k, v in base.items():
        if k in mixed:
            assert float((rec[k] - v).abs().max()) > 0.1, k  # not a permutation: matching cannot undo it
        else:
            torch.testing.assert_close(rec[k], v, rtol=0, atol=1e-12)  # the permutations elsewhere are undone
    other = copy.deepcopy(anchor)
    other.load_state_dict(rec)
    with torch.no_grad():
        torch.testing.assert_close(other(x), anchor(x), rtol=1e-10, atol=1e-10)
