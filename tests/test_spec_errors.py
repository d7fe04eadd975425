"""Spec inference on bad input and on corner cases of the engine: clear errors, nothing half-built, still sound."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import unf


def _max_error(model, spec, x, n=20):
    return unf.spec.symmetry_error(model, spec, x, num_permutations=n, seed=1)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 4), DataDependent())

    def forward(self, x):
        return self.inner(x)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_data_dependent_control_flow_names_the_submodule():
    with pytest.raises(unf.SpecInferenceError, match=r"(?s)could not trace Branchy inside submodule 'inner.1'.*from_axes"):
        unf.spec_from_module(Branchy(), torch.randn(2, 3))


def test_wrong_example_input_names_the_node():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(unf.SpecInferenceError, match=r"failed at node '_0'.*Pass example inputs"):
        unf.spec_from_module(model, torch.randn(2, 5))


def test_inference_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = copy.deepcopy(model.state_dict())
    unf.spec_from_module(model, torch.randn(8, 3))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_state_dict_that_does_not_fit():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = unf.spec_from_module(model, torch.randn(2, 3))
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['0.weight'\] has shape \(5, 3\); the spec expects \(4, 3\)"):
        spec.permute(other, spec.sample_permutation())


def test_forward_hooks_are_reported():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.warns(unf.UnprovenSymmetryWarning, match="module '1': has forward hooks"):
        unf.spec_from_module(model, torch.randn(2, 3))
    with pytest.raises(unf.SpecInferenceError, match="forward hooks"):
        unf.spec_from_module(model, torch.randn(2, 3), strict=True)


def test_unused_parameters_are_fixed_with_a_warning():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.spare = nn.Linear(3, 4), nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.warns(unf.UnprovenSymmetryWarning, match=r"\['spare.weight', 'spare.bias'\] are not used"):
        spec = unf.spec_from_module(Unused(), torch.randn(2, 3))
    assert spec["spare.weight"].axes == (None, None)


class SlotsMixedUse(nn.Module):
    """A QKV tensor reshaped into slots, unbound into q/k/v and ALSO used as a whole."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.other = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(24, 8)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(y) + self.other(qkv.permute(1, 3, 0, 2, 4).reshape(b, n, 24))


class SlotsCollapsed(nn.Module):
    """A reshape into (3, heads, d) used only as a whole: the slot axis may permute (product form)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.a, self.b = nn.Linear(8, 24), nn.Linear(24, 8), nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        t = self.qkv(x).reshape(b, n, 3, 2, 4)
        return self.a(torch.relu(t).reshape(b, n, 24)) + self.b(t.sum(2).reshape(b, n, 8))


@pytest.mark.parametrize("cls, groups", [(SlotsMixedUse, [2, 4]), (SlotsCollapsed, [2, 3, 4])])
def test_slots_are_sound_in_every_use(cls, groups):
    model = cls().double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", unf.UnprovenSymmetryWarning)
        spec = unf.spec_from_module(model, x)
    assert sorted(spec.groups.values()) == groups
    assert _max_error(model, spec, x) <= 1e-10


def test_lstm_last_layer_state_keeps_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(3, 5, num_layers=2, batch_first=True), nn.Linear(5, 2)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.head(h[-1])

    model = Net().double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    spec = unf.spec_from_module(model, x, strict=True)
    assert sorted(spec.groups.values()) == [5, 5]
    assert _max_error(model, spec, x) <= 1e-10

    class AllStates(Net):  # the whole stack of states is used: every layer's group must go
        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return self.head(h.sum(0))

    spec = unf.spec_from_module(AllStates().double(), x)
    assert spec.groups == {}


def test_symmetry_error_separates_a_sound_spec_from_a_wrong_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    spec = unf.spec_from_module(model, x)
    assert unf.spec.symmetry_error(model, spec, x) <= 1e-12
    axes = {k: list(spec[k].axes) for k in spec}
    axes["2.weight"][0] = axes["2.bias"][0] = "out"  # claims the outputs can be permuted: they cannot
    wrong = unf.WeightSpaceSpec.from_axes(axes, model.state_dict())
    assert unf.spec.symmetry_error(model, wrong, x) > 1e-2

    class AsDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"logits": self.net(x)}

    with pytest.raises(TypeError, match="output is a tensor"):
        unf.spec.symmetry_error(AsDict(), spec, x)
