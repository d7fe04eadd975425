"""The unf-timm plugin: timm models keep their groups (counts derived by hand) and stay sound.

Random weights (``pretrained=False``: nothing is downloaded), float64, eval mode unless a test says otherwise; three
sampled permutations must leave the output unchanged.
"""
import copy
import warnings
from importlib.metadata import entry_points

import pytest
import torch

timm = pytest.importorskip("timm")
import unf  # noqa: E402
from unf.spec import registry  # noqa: E402
from timm.models.levit import Levit  # noqa: E402


def _spec(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", unf.UnprovenSymmetryWarning)
        return unf.spec_from_module(model, x)


def test_plugin_is_registered_by_entry_point():
    names = [ep.name for ep in entry_points(group=registry.ENTRY_POINT_GROUP)]
    assert "timm" in names, "install the plugin: pip install -e plugins/unf-timm"
    assert registry.module_rule(timm.layers.DropPath(0.1)) is not None


@torch.no_grad()
def _nonzero(model):
    """Parameters their constructor sets to zero (LeViT's BatchNorm scale after each attention and MLP, heads) get
    random values: with them at zero the branches add nothing and a soundness check could not see them."""
    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 1 and not p.any():
            p.normal_(0, 0.5)
    return model


def _levit(use_conv: bool, drop_path_rate: float = 0.0) -> Levit:
    # stages of width 32 and 48, key_dim 8, 2 and 3 heads, one block each; the downsampling attention between them
    # has 32 // 8 = 4 heads
    return _nonzero(Levit(img_size=64, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 3), num_classes=5,
                          use_conv=use_conv, drop_path_rate=drop_path_rate))


# stem convolutions 4; per attention 2 groups per head (q/k and v within that head): 2 * (2 + 4 + 3); per block and
# per downsampling the MLP width: 3; the downsampling attention's output starts a new stream: 1
LEVIT_GROUPS = 4 + 2 * (2 + 4 + 3) + 3 + 1


@pytest.mark.parametrize("use_conv", [False, True], ids=["linear", "conv"])
def test_levit_is_sound_and_maximal(use_conv):
    torch.manual_seed(0)
    model = _levit(use_conv).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    spec = _spec(model, x)
    assert len(spec.groups) == LEVIT_GROUPS
    assert unf.spec.symmetry_error(model, spec, x) <= 1e-10
    # per head [q_i | k_i | v_i]: q_i and k_i share a group, v_i has its own, and no two heads share one
    qkv = spec["stages.0.blocks.0.attn.qkv.linear.weight"].axes[0]
    assert len(qkv) == 6 and qkv[0] == qkv[1] and len({qkv[0], qkv[2], qkv[3], qkv[5]}) == 4
    assert spec["stages.0.blocks.0.attn.proj.ln.linear.weight"].axes[1] == [qkv[2], qkv[5]]
    assert not spec["stages.0.blocks.0.attn.attention_biases"].permuted


def test_levit_drop_path_keeps_the_residual_stream_in_train_mode():
    """DropPath multiplies by per-sample noise that does not depend on the weights: with the same random draws the
    permuted model gives the same output, BatchNorm on batch statistics included."""
    torch.manual_seed(0)
    model = _levit(False, drop_path_rate=0.5).double().train()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    spec = _spec(model, x)
    assert len(spec.groups) == LEVIT_GROUPS
    other = copy.deepcopy(model)
    other.load_state_dict(spec.permute(model.state_dict(), spec.sample_permutation(torch.Generator().manual_seed(0))))
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    assert torch.allclose(other(x), y, rtol=1e-10, atol=1e-10)


# timm name, constructor overrides (small sizes), input size, hand-derived group count
MODELS = [
    # stem conv; per basic block its inner width (2 per stage); stages 2-4 start a new stream (downsample)
    ("resnet18", {}, 32, 1 + 4 * 2 + 3),
    # per block the MLP width (2 + 2 + 6 + 2), one stream per stage
    ("convnext_atto", {}, 32, 12 + 4),
    # stream; per block heads, Q/K, V and MLP width
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, 1 + 2 * 4),
    # grouped convolutions of group width 8: per block the groups, and the within-group input and output widths;
    # stages of 1, 1, 4, 7 blocks; each stage's first block starts a new stream; stem conv
    ("regnetx_002", {}, 32, 1 + 13 * 3 + 4),
    # per block (2 per stage; every second one shifts its windows with torch.roll) heads, Q/K, V and MLP width;
    # one stream per stage
    ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, depths=(2, 2, 2, 2)), 32, 8 * 4 + 4),
]


@pytest.mark.parametrize("name, kwargs, size, groups", MODELS, ids=[m[0] for m in MODELS])
def test_timm_model_is_sound_and_maximal(name, kwargs, size, groups):
    torch.manual_seed(0)
    model = _nonzero(timm.create_model(name, pretrained=False, num_classes=5, **kwargs)).double().eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    spec = _spec(model, x)
    assert len(spec.groups) == groups
    assert unf.spec.symmetry_error(model, spec, x) <= 1e-10


@pytest.mark.parametrize("name", ["levit", "convnext_atto", "swin_tiny_patch4_window7_224"])
def test_weight_matching_recovers_a_permuted_copy_exactly(name):
    """Alignment on the inferred spec undoes a random permutation exactly (LeViT: one Q/K and one V group per head,
    interleaved in one projection)."""
    from unf.align import weight_matching

    torch.manual_seed(0)
    if name == "levit":
        model, size = _levit(False).eval(), 64
    else:
        kwargs = next(m[1] for m in MODELS if m[0] == name)
        model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
        size = 32
    spec = _spec(model, torch.randn(1, 3, size, size))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    permuted = spec.permute(sd, spec.sample_permutation(torch.Generator().manual_seed(1)))
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    back = spec.permute(permuted, weight_matching(spec, sd, permuted))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_loading_the_plugin_does_not_import_timm():
    """Rules are registered by class name: a user of unf without a timm model does not pay for importing timm."""
    import subprocess
    import sys
    script = ("import sys, torch, unf; from unf.spec import registry; "
              "unf.spec_from_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2)); "
              "assert 'timm.models.levit.Attention' in registry._named_module_rules, 'plugin not loaded'; "
              "assert 'timm' not in sys.modules, 'timm was imported'")
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize("name, kwargs, size", [("mobilevit_xxs", {}, 64), ("efficientvit_m0", dict(img_size=64), 64)])
def test_models_torch_fx_cannot_trace_go_through_the_aten_front_end(name, kwargs, size):
    """MobileViT and EfficientViT (MSRA) branch on traced values; the ATen front end of unf-transformers runs their
    forward for real. Sound, no warnings, and the model works as before afterwards."""
    pytest.importorskip("unf_transformers")
    torch.manual_seed(0)
    model = _nonzero(timm.create_model(name, pretrained=False, num_classes=5, **kwargs)).double().eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    y = model(x)
    spec = _spec(model, x)
    assert len(spec.groups) > 10
    assert unf.spec.symmetry_error(model, spec, x) <= 1e-10
    assert torch.equal(model(x), y)


def test_unf_linear_is_equivariant_on_the_levit_spec():
    """The per-head groups (q/k and v of each head interleaved in one projection) work downstream: UNFLinear builds
    on the spec and commutes with its permutations."""
    from unf.nn import UNFLinear

    torch.manual_seed(0)
    model = _levit(False).eval()
    spec = _spec(model, torch.randn(1, 3, 64, 64))
    layer, ws = UNFLinear(spec, 1, 1), unf.WeightSpace.from_module(spec, [model])
    p = spec.sample_permutation(torch.Generator().manual_seed(2))
    a, b = layer(ws.permute(p)), layer(ws).permute(p)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
