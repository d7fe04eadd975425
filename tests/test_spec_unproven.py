"""No silent fixing: axes fixed because no rule proves their symmetry warn (strict raises); fixes on purpose do not.

Channel shuffle (ShuffleNet): a view of a concatenation into ``(groups, per_group)``, a transpose, a view back and a
chunk keep the symmetry that survives: one permutation shared by both halves, halved again by each chunk.
"""
import logging
import warnings

import pytest
import torch
import torch.nn as nn

import unf


def _max_error(model, spec, x, n=3):
    """Worst relative output change over ``n`` sampled permutations (eval mode, the model's own output)."""
    return unf.spec.symmetry_error(model.eval(), spec, x, num_permutations=n)


def _infer_without_warnings(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", unf.UnprovenSymmetryWarning)
        return unf.spec_from_module(model, x)


class Refactor(nn.Module):
    """A 6-wide axis viewed as (2, 3), then as (3, 2): no rule follows that, so the axis is fixed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x).view(-1, 2, 3)
        return self.b(h.view(-1, 3, 2).flatten(1))


def test_reshape_that_inference_falls_through_warns_naming_the_node():
    model = Refactor().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    message = r"node 'view_1' \(method \.view\(\)\): no rule proves this symmetry: an axis factored as \[2, 3\] " \
              r"reshaped into \[3, 2\]"
    with pytest.warns(unf.UnprovenSymmetryWarning, match=message):
        spec = unf.spec_from_module(model, x)
    assert spec.groups == {}
    with pytest.raises(unf.SpecInferenceError, match=r"node 'view_1'.*strict=True"):
        unf.spec_from_module(model, x, strict=True)


def test_fixes_on_purpose_do_not_warn_and_log_their_reason(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    with caplog.at_level(logging.DEBUG, logger="unf.spec"):
        spec = _infer_without_warnings(model, torch.randn(1, 3, 8, 8))
    assert sorted(spec.groups.values()) == [4]
    assert "node '_0' fixes axes on purpose: spatial positions and kernel taps" in caplog.text


class Shuffle(nn.Module):
    """Two ShuffleNetV2 units in miniature: split, branch, concatenate, shuffle (view/transpose/view), split."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x1, x2 = self.a(x).chunk(2, dim=1)
        x = torch.cat([x1, torch.relu(self.b(x2))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, torch.relu(self.c(x2))], 1)
        return self.head(x.mean((2, 3)))


def test_channel_shuffle_keeps_the_surviving_groups():
    model = Shuffle().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    spec = _infer_without_warnings(model, x)
    # a's out-axis is [x1 | x2]; the shuffle ties x1 to b's output (4), which the second chunk halves (2 + 2);
    # x2 (4) and c's output (4) stay whole
    assert sorted(spec.groups.values()) == [2, 2, 4, 4]
    assert _max_error(model, spec, x) <= 1e-10


# hand counts: conv1 and conv5 (2); per block the branch's hidden width (4 + 8 + 4); each stage's first block ties its
# two branches into one group (width m), and each later block's chunk splits what is left of it: the second half
# becomes a group, the first half goes on. x0.5 (m = 24, 48, 96): 12 6 3 3 | 24 12 6 3, the last 3 lost in a block
# that the cut splits | 48 24 12 12. x1.0 (m = 58, 116, 232): blocks of 4, 8, 16 ... channels no longer align with
# the cut, and the block a cut falls in stays fixed: 29 14 6 7 | 58 29 14 6 3 | 116 58 29 29.
SHUFFLENETS = [("shufflenet_v2_x0_5", 2 + 16 + 4 + 4 + 4, [3, 3, 3, 6, 6, 12, 12, 12, 12]),
               ("shufflenet_v2_x1_0", 2 + 16 + 4 + 5 + 4, [3, 6, 6, 7, 14, 14, 24, 29, 29, 29, 29])]


@pytest.mark.parametrize("name, groups, small", SHUFFLENETS, ids=[s[0] for s in SHUFFLENETS])
def test_shufflenet_v2_is_sound_maximal_and_warns_about_nothing(name, groups, small):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=10).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    spec = _infer_without_warnings(model, x)
    assert len(spec.groups) == groups
    assert sorted(n for n in spec.groups.values() if n < small[-1] + 1) == small
    assert _max_error(model, spec, x) <= 1e-10


class PadToEven(nn.Module):
    """Pads the token axis to an even length by an amount computed from the shape while tracing (as timm's Swin
    does), so the rule cannot see it; the channel axis is padded by a literal 0."""

    def __init__(self, permuted_tokens: bool):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.tokens = nn.Linear(5, 5) if permuted_tokens else None

    def forward(self, x):  # x: [B, 5, 3]
        h = self.a(x)
        if self.tokens is not None:  # mix tokens, so that the token axis is a group until the pad
            h = self.tokens(h.transpose(1, 2)).transpose(1, 2)
        pad = h.shape[1] % 2
        return self.b(torch.nn.functional.pad(h, (0, 0, 0, pad)))


def test_pad_by_a_traced_amount_keeps_channels_and_fixes_the_padded_axis():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    spec = _infer_without_warnings(PadToEven(False).double(), x)  # the padded axis was fixed already: no warning
    assert list(spec.groups.values()) == [4]
    model = PadToEven(True).double()
    with pytest.warns(unf.UnprovenSymmetryWarning, match="padding by an amount computed at run time"):
        spec = unf.spec_from_module(model, x)
    assert list(spec.groups.values()) == [4]
    assert _max_error(model, spec, x) <= 1e-12


class Roll(nn.Module):
    """Swin's cyclic shift (``torch.roll`` over positions): channels keep their group, the positions axis is fixed
    on purpose."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):  # x: [B, 5, 3]
        h = torch.roll(self.a(x), shifts=2, dims=1)
        return self.b(h + h.roll(-1, 1))


def test_roll_fixes_positions_on_purpose():
    model = Roll().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    spec = _infer_without_warnings(model, x)
    assert list(spec.groups.values()) == [4]
    assert _max_error(model, spec, x) <= 1e-12


class CachingScale(nn.Module):
    """Scales by a buffer it caches in a Python dict on the first call, as timm's LeViT caches its attention biases
    in eval mode; a leaf (it has a rule), so its forward runs only during shape propagation."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(4))
        self.cache = {}

    def forward(self, x):
        if "s" not in self.cache:
            self.cache["s"] = self.scale * 2
        return x * self.cache["s"]


@unf.register_module_rule(CachingScale)
def _caching_scale(ctx, x):
    ctx.unify(x.axes[-1], ctx.param("scale").axes[0])
    return ctx.output(list(x.axes))


def test_shape_propagation_leaves_the_model_as_it_was():
    """Shapes are propagated on meta tensors swapped into the model; afterwards its parameters, buffers and Python
    attributes are the very objects they were, and it still runs."""
    model = nn.Sequential(nn.Linear(3, 4), CachingScale(), nn.Linear(4, 2)).double()
    params = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    cache, hooks = model[1].cache, model[1]._forward_hooks
    handle = model[1].register_forward_hook(lambda mod, args, out: None)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(unf.UnprovenSymmetryWarning, match="has forward hooks"):
        spec = unf.spec_from_module(model, x)
    assert list(spec.groups.values()) == [4]
    assert model[1].cache is cache and cache == {} and model[1]._forward_hooks is hooks
    handle.remove()  # from the dict the module still holds
    assert not model[1]._forward_hooks
    assert all(v is params[k] for k, v in model.state_dict(keep_vars=True).items())
    assert all(v.device.type == "cpu" for v in params.values())
    assert _max_error(model, spec, x) <= 1e-12


class RepeatPerSample(nn.Module):
    """A learned vector repeated once per sample by a count computed while tracing (``pos.repeat(B, 1)``, as timm's
    XCiT repeats its position encoding)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.pos = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        return self.b(torch.relu(self.a(x) + self.pos.repeat(x.shape[0], 1)))


def test_repeat_by_a_traced_count_keeps_the_groups():
    model = RepeatPerSample().double()
    x = torch.randn(3, 3, dtype=torch.float64)
    spec = _infer_without_warnings(model, x)
    assert list(spec.groups.values()) == [4] and spec["pos"].axes[1] == spec["a.bias"].axes[0]
    assert _max_error(model, spec, x) <= 1e-12
