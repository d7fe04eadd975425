"""The unf-torchvision plugin: torchvision models keep their groups (counts derived by hand) and stay sound.

Random weights from each constructor, float64, eval mode; three sampled permutations must leave the output unchanged.
"""
import copy
import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn

tv = pytest.importorskip("torchvision")
import unf  # noqa: E402
from unf.spec import registry  # noqa: E402


def _max_error(model, spec, x, n=3):
    return unf.spec.symmetry_error(model, spec, x, num_permutations=n)


def _spec(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", unf.UnprovenSymmetryWarning)
        return unf.spec_from_module(model, x)


def test_plugin_is_registered_by_entry_point():
    names = [ep.name for ep in entry_points(group=registry.ENTRY_POINT_GROUP)]
    assert "torchvision" in names, "install the plugin: pip install -e plugins/unf-torchvision"
    assert registry.function_rule(tv.ops.stochastic_depth) is not None


def test_plugins_load_before_tracing_so_wrapped_functions_are_the_originals():
    """torch.fx swaps ``torch.fx.wrap`` functions for patched ones while it traces; a plugin loaded then would key its
    rules on those."""
    script = ("import torch, torchvision, unf; from unf.spec import registry; "
              "unf.spec_from_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2)); "
              "import torchvision.models.swin_transformer as s; "
              "assert registry.function_rule(s.shifted_window_attention) is not None")
    subprocess.run([sys.executable, "-c", script], check=True)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.branch, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.drop = tv.ops.StochasticDepth(0.5, "row")

    def forward(self, x):
        h = self.embed(x)
        h = h + self.drop(self.branch(h))
        return self.head(h + tv.ops.stochastic_depth(torch.relu(h), 0.5, "batch", self.training))


def test_stochastic_depth_keeps_the_residual_stream_in_train_mode_too():
    model = Residual().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    spec = _spec(model, x)
    assert list(spec.groups.values()) == [6]
    perm = spec.sample_permutation(torch.Generator().manual_seed(0))
    other = copy.deepcopy(model)
    other.load_state_dict(spec.permute(model.state_dict(), perm))
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)  # the same draws: noise does not depend on the weights
    assert torch.allclose(other(x), y, rtol=1e-12, atol=1e-12)


# name, constructor, input size, hand-derived group count
MODELS = [
    # stem; per MBConv the expanded width (not when expand=1) and the squeeze-excitation width; one stream per stage
    # that changes width (7) + head conv: 1 + (16 blocks: 15 expanded + 16 SE) + 7 + 1
    ("efficientnet_b0", tv.models.efficientnet_b0, 32, 1 + 15 + 16 + 7 + 1),
    # stem; stage 1 (fused, expand 1, residual) none; fused stages 2-3: per block the expanded width, plus a new
    # stream (5 each); MBConv stages 4-6: per block expanded and SE widths, plus a new stream (13, 19, 31); head conv
    ("efficientnet_v2_s", tv.models.efficientnet_v2_s, 32, 1 + 5 + 5 + 13 + 19 + 31 + 1),
    # per block the MLP width (3 + 3 + 9 + 3), one stream per stage
    ("convnext_tiny", tv.models.convnext_tiny, 32, 18 + 4),
    # per block heads, Q/K, V and MLP width (2 + 2 + 6 + 2 blocks), one stream per stage
    ("swin_t", tv.models.swin_t, 32, 4 * 12 + 4),
    # as swin_t, plus per block the continuous-position-bias MLP width and the 2 coordinates of its (persistent)
    # coordinate-table buffer
    ("swin_v2_t", tv.models.swin_v2_t, 32, 6 * 12 + 4),
]


@pytest.mark.parametrize("name, build, size, groups", MODELS, ids=[m[0] for m in MODELS])
def test_model_is_sound_and_maximal(name, build, size, groups):
    torch.manual_seed(0)
    model = build(num_classes=10).double().eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    spec = _spec(model, x)
    assert len(spec.groups) == groups
    assert _max_error(model, spec, x) <= 1e-10


def test_maxvit_is_sound_and_maximal():
    """maxvit_t's layout at 64x64 (partitions of 2 instead of 7, so that every stage divides)."""
    torch.manual_seed(0)
    model = tv.models.maxvit.MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2,
                                    block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2], head_dim=32,
                                    stochastic_depth_prob=0.2, num_classes=10).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    spec = _spec(model, x)
    # per layer (11): MBConv expanded and squeeze widths, and per attention (window, grid) heads, Q/K, V and MLP
    # width; stem conv, stem output, one stream per block (4), classifier hidden
    assert len(spec.groups) == 11 * (2 + 2 * 4) + 2 + 4 + 1
    assert _max_error(model, spec, x) <= 1e-10


def _small_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def _small_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.1, num_classes=10)


def _small_swin():
    from torchvision.models.swin_transformer import SwinTransformer
    # two blocks per stage, so that the second one shifts its windows
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[2, 2],
                           stochastic_depth_prob=0.1, num_classes=10)


@pytest.mark.parametrize("build", [_small_resnet, _small_convnext, _small_swin], ids=["resnet", "convnext", "swin"])
def test_weight_matching_recovers_a_permuted_copy_exactly(build):
    """Alignment on the inferred spec undoes a random permutation of every group (BatchNorm statistics, depthwise
    convolutions, heads and within-head groups included), exactly."""
    from unf.align import weight_matching

    torch.manual_seed(0)
    model = build().eval()
    spec = _spec(model, torch.randn(1, 3, 32, 32))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    permuted = spec.permute(sd, spec.sample_permutation(torch.Generator().manual_seed(1)))
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    back = spec.permute(permuted, weight_matching(spec, sd, permuted))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
