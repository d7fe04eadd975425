"""Architecture-spec plugins: the registry, entry points, and the shipped unf-torch-transformer plugin."""
import copy
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn

import unf
from unf.spec import registry


def _invariance_error(model, spec, x, n=20):
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for mode in ("train", "eval"):
        model.train(mode == "train")
        y = model(x)
        for _ in range(n):
            other = copy.deepcopy(model)
            other.load_state_dict(spec.permute(model.state_dict(), spec.sample_permutation(gen)))
            worst = max(worst, ((other(x) - y).abs().max() / y.abs().max()).item())
    return worst


def test_transformer_plugin_is_registered_by_entry_point():
    names = [ep.name for ep in entry_points(group=registry.ENTRY_POINT_GROUP)]
    assert "torch_transformer" in names, "install the plugin: pip install -e plugins/unf-torch-transformer"
    assert registry.module_rule(nn.TransformerEncoderLayer(8, 2)) is not None


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_encoder_is_sound_and_maximal(norm_first):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)  # the residual stream must not be the (fixed) network input itself
            layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.enc(self.embed(x)).mean(1))

    model = Net().double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    spec = unf.spec_from_module(model, x, strict=True)
    # per layer: heads (4), qk (4), v (4), feed-forward hidden (24); plus one residual stream (16)
    assert sorted(spec.groups.values()) == sorted([4, 4, 4, 24] * 2 + [16])
    assert _invariance_error(model, spec, x) <= 1e-10


def test_user_rule_makes_a_custom_module_a_leaf():
    class Scale(nn.Module):  # per-feature scale; pretend it were untraceable
        def __init__(self, n):
            super().__init__()
            self.s = nn.Parameter(torch.rand(n) + 0.5)

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 6), Scale(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)

    def scale_rule(ctx, x):
        ctx.unify(x.axes[-1], ctx.param("s").axes[0])
        return ctx.output(list(x.axes))

    try:
        unf.register_module_rule(Scale)(scale_rule)
        spec = unf.spec_from_module(model, x, strict=True)
    finally:
        registry._module_rules.pop(Scale)
    assert spec["1.s"].axes == spec["0.bias"].axes and spec.groups == {"0": 6}
    assert _invariance_error(model, spec, x) <= 1e-10


class NamedScale(nn.Module):
    """A module a plugin registers by dotted name, without importing its library."""

    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.s


def test_module_rule_registered_by_dotted_class_name():
    model = nn.Sequential(nn.Linear(3, 6), NamedScale(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    name = f"{NamedScale.__module__}.{NamedScale.__qualname__}"

    def scale_rule(ctx, x):
        ctx.unify(x.axes[-1], ctx.param("s").axes[0])
        return ctx.output(list(x.axes))

    try:
        unf.register_module_rule(name)(scale_rule)
        assert registry.module_rule(model[1]) is scale_rule
        spec = unf.spec_from_module(model, x, strict=True)
    finally:
        registry._named_module_rules.pop(name)
    assert spec["1.s"].axes == spec["0.bias"].axes and spec.groups == {"0": 6}
    assert _invariance_error(model, spec, x) <= 1e-10


def test_subclass_overriding_forward_does_not_inherit_rule():
    class Weird(nn.Linear):
        def forward(self, x):
            return super().forward(x).cumsum(-1)

    assert registry.module_rule(Weird(3, 3)) is None
    assert registry.module_rule(nn.Linear(3, 3)) is not None


def test_a_frontend_builds_the_graph_for_its_model_class(monkeypatch):
    """``register_frontend``: a plugin supplies the graph for models torch.fx cannot trace (unf-transformers does
    this for Hugging Face models); its get_attr/submodule tensors are the model's own, so entries are recognised."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            if bool((x != 0).any()):  # data-dependent: torch.fx cannot trace this
                x = self.a(x)
            return self.b(torch.relu(x))

    class Plain(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.a, self.b = m.a, m.b

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = Branchy().double(), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(unf.SpecInferenceError):
        unf.spec_from_module(model, x)
    monkeypatch.setitem(registry._frontends, Branchy, lambda m, inputs: unf.spec.trace(Plain(m), inputs))
    assert registry.frontend(model) is not None
    spec = unf.spec_from_module(model, x, strict=True)
    assert list(spec.groups.values()) == [8] and spec["a.weight"].axes[0] == spec["b.weight"].axes[1]
    assert unf.spec.symmetry_error(model, spec, x) <= 1e-12
