"""Spec inference (unf.spec_from_module) on a zoo of small architectures: soundness, maximality, edge cases.

Soundness: permuting a state_dict by any permutation sampled from the inferred spec must leave the network function
unchanged (float64, relative error <= 1e-10), in eval mode and in train mode (BatchNorm/InstanceNorm then use batch /
instance statistics). Dropout: in train mode every dropout probability (modules, nn.MultiheadAttention and nn.LSTM
inter-layer dropout) is set to 0 before the comparison; in eval mode the models are compared as they are.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import unf

sys.path.insert(0, os.path.dirname(__file__))
from architectures import ARCHITECTURES, EXPECTED_GROUPS, B, finalize, require_plugins  # noqa: E402

N_PERMS = 20
RTOL = 1e-10

_SPECS: dict = {}


def build(name):
    """(model, example_input, spec); spec inference is run once per architecture (the model is rebuilt each time)."""
    require_plugins(name)
    model, x = ARCHITECTURES[name]()
    if name not in _SPECS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", unf.UnprovenSymmetryWarning)  # the zoo uses only ops with rules
            _SPECS[name] = unf.spec_from_module(model, x)
    return model, x, _SPECS[name]


def _inputs(x):
    return x if isinstance(x, tuple) else (x,)


def _outputs(model, x):
    with torch.no_grad():
        out = model(*_inputs(x))
    return out if isinstance(out, tuple) else (out,)


def _close(a, b):
    return (a - b).abs().max() <= RTOL * a.abs().max().clamp_min(1)


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
            m.dropout = 0.0


def _check_sound(model, x, spec, mode, n_perms=N_PERMS, seed=0):
    train = mode == "train"
    model = copy.deepcopy(model)
    if train:
        _no_dropout(model)
    model.train(train)
    sd = model.state_dict()
    ref = _outputs(copy.deepcopy(model), x)  # a copy: train-mode forward updates BatchNorm running stats
    gen = torch.Generator().manual_seed(seed)
    changed = False
    for i in range(n_perms):
        perm = spec.sample_permutation(gen)
        psd = spec.permute(sd, perm)
        changed |= any(not torch.equal(psd[k], sd[k]) for k in sd)
        other = copy.deepcopy(model)
        other.load_state_dict(psd)
        got = _outputs(other, x)
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            err = ((a - b).abs().max() / a.abs().max().clamp_min(1)).item()
            assert _close(a, b), f"{mode} mode, permutation #{i} {perm}: relative error {err:.3g}\n{spec}"
    return changed


# ------------------------------------------------------------------------------------------------------------------
# soundness
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_soundness(name, mode):
    model, x, spec = build(name)
    changed = _check_sound(model, x, spec, mode)
    if spec.groups:
        assert changed, f"{name}: no sampled permutation changed the state_dict\n{spec}"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_spec_is_nontrivial(name):
    _, _, spec = build(name)
    assert len(spec.groups) >= 1, f"{name}: trivial spec\n{spec}"


def test_harness_detects_a_wrong_spec():
    """The soundness check must fail for a spec that also permutes the network output (sanity check of the test)."""
    model, x, spec = build("mlp")
    axes = {k: list(spec[k].axes) for k in spec}
    axes["6.weight"][0] = axes["6.bias"][0] = "out"
    wrong = unf.WeightSpaceSpec.from_axes(axes, model.state_dict())
    with pytest.raises(AssertionError, match="relative error"):
        _check_sound(model, x, wrong, "eval")
    # ... and for a spec that permutes a hidden layer's rows without its columns downstream
    axes = {k: list(spec[k].axes) for k in spec}
    axes["4.weight"][1] = "other"
    wrong = unf.WeightSpaceSpec.from_axes(axes, model.state_dict())
    with pytest.raises(AssertionError, match="relative error"):
        _check_sound(model, x, wrong, "train")


def test_zoo_is_float64_and_small():
    for name, factory in ARCHITECTURES.items():
        model, x = factory()
        n = sum(p.numel() for p in model.parameters())
        assert n < 50_000, (name, n)
        assert all(p.dtype == torch.float64 for p in model.parameters()), name
        assert _inputs(x)[0].shape[0] >= 4, name


# ------------------------------------------------------------------------------------------------------------------
# maximality
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EXPECTED_GROUPS))
def test_maximality(name):
    _, _, spec = build(name)
    assert sorted(spec.groups.values()) == EXPECTED_GROUPS[name], str(spec)


def test_mlp_one_group_per_hidden_layer():
    _, _, spec = build("mlp")
    assert spec["0.weight"].axes == (spec["0.bias"].axes[0], None)
    assert spec["2.weight"].axes == (spec["2.bias"].axes[0], spec["0.bias"].axes[0])
    assert spec["4.weight"].axes == (spec["4.bias"].axes[0], spec["2.bias"].axes[0])
    assert spec["6.weight"].axes == (None, spec["4.bias"].axes[0])
    assert spec["6.bias"].axes == (None,)
    assert len({spec["0.bias"].axes[0], spec["2.bias"].axes[0], spec["4.bias"].axes[0]}) == 3


def test_cnn_flatten_axis_is_product():
    _, _, spec = build("cnn_flatten")
    c = spec["2.bias"].axes[0]
    assert isinstance(c, str)
    assert spec["6.weight"].axes[1] == (c, 9)


def test_resnet_streams():
    _, _, spec = build("resnet_basic")
    stream1 = spec["stem.1.weight"].axes[0]
    # identity shortcut: block 0's output lives in the stem's stream
    assert spec["layers.0.bn2.weight"].axes[0] == stream1
    assert spec["layers.0.conv1.weight"].axes[1] == stream1
    assert spec["layers.0.bn1.weight"].axes[0] != stream1
    # projection shortcut: a new stream
    stream2 = spec["layers.1.bn2.weight"].axes[0]
    assert spec["layers.1.shortcut.1.weight"].axes[0] == stream2
    assert spec["layers.1.shortcut.0.weight"].axes[:2] == (stream2, stream1)
    assert spec["fc.weight"].axes == (None, stream2)


def test_transformer_attention_structure():
    for name, qkv_key in (("transformer_mha", "blocks.0.attn.in_proj_weight"),
                          ("transformer_hand_attention", "blocks.0.attn.qkv.weight")):
        _, _, spec = build(name)
        rows = spec[qkv_key].axes[0]
        assert isinstance(rows, list) and len(rows) == 3, (name, rows)
        q, k, v = rows
        assert q == k and q != v, (name, rows)
        assert q[0] == v[0], (name, rows)  # heads permute q, k, v alike
        stream = spec["ln_f.weight"].axes[0]
        assert spec[qkv_key].axes[1] == stream
        assert spec["head.weight"].axes == (None, stream)


def test_rnn_hidden_gates():
    _, _, spec = build("lstm_2layer")
    h0 = spec["rnn.weight_hh_l0"].axes[1]
    assert spec["rnn.weight_hh_l0"].axes[0] == (4, h0)
    assert spec["rnn.weight_ih_l0"].axes == ((4, h0), None)
    h1 = spec["rnn.weight_hh_l1"].axes[1]
    assert spec["rnn.weight_ih_l1"].axes == ((4, h1), h0)
    assert spec["head.weight"].axes == (None, h1)
    _, _, spec = build("bilstm")
    f, r = spec["rnn.weight_hh_l0"].axes[1], spec["rnn.weight_hh_l0_reverse"].axes[1]
    assert f != r and spec["head.weight"].axes == (None, [f, r])


# ------------------------------------------------------------------------------------------------------------------
# inputs/outputs, weight tying
# ------------------------------------------------------------------------------------------------------------------
IO_AXES = {  # name -> [(key, axis)] that touch the network input or output and must never be permuted
    "mlp": [("0.weight", 1), ("6.weight", 0), ("6.bias", 0)],
    "cnn_flatten": [("0.weight", 1), ("8.weight", 0), ("8.bias", 0)],
    "conv3d_net": [("0.weight", 1), ("6.weight", 0)],
    "resnet_basic": [("stem.0.weight", 1), ("fc.weight", 0), ("fc.bias", 0)],
    "transformer_mha": [("inp.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "lm_tied_head": [("emb.weight", 0), ("head.weight", 0)],
    "lm_functional_head": [("emb.weight", 0)],
    "rnn": [("rnn.weight_ih_l0", 1), ("head.weight", 0)],
    "conv_transpose_net": [("0.weight", 1), ("6.weight", 0), ("6.bias", 0)],
    "conv1d_net": [("0.weight", 1), ("7.weight", 0), ("7.bias", 0)],
    "functional_mlp": [("w1", 1), ("w3", 0)],
    "transformer_hand_attention": [("inp.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "lstm_2layer": [("rnn.weight_ih_l0", 1), ("head.weight", 0), ("head.bias", 0)],
    "bilstm": [("rnn.weight_ih_l0", 1), ("rnn.weight_ih_l0_reverse", 1), ("head.weight", 0)],
    "vit": [("patch.weight", 1), ("head.weight", 0), ("head.bias", 0)],
    "unet": [("e1.weight", 1), ("out.weight", 0), ("out.bias", 0)],
}


@pytest.mark.parametrize("name", list(IO_AXES))
def test_inputs_and_outputs_not_permuted(name):
    _, _, spec = build(name)
    for key, axis in IO_AXES[name]:
        assert spec[key].axes[axis] is None, (key, axis, spec[key].axes)


def test_weight_tying_same_axes():
    model, _, spec = build("lm_tied_head")
    assert model.head.weight is model.emb.weight
    assert spec["emb.weight"].axes == spec["head.weight"].axes
    assert spec["emb.weight"].axes[0] is None and isinstance(spec["emb.weight"].axes[1], str)
    assert spec["emb.weight"].axes[1] == spec["ln_f.weight"].axes[0] == spec["pos"].axes[1]
    _, _, spec2 = build("lm_functional_head")
    assert spec2["emb.weight"].axes[0] is None and spec2["emb.weight"].axes[1] == spec2["ln_f.weight"].axes[0]


# ------------------------------------------------------------------------------------------------------------------
# ops without a rule
# ------------------------------------------------------------------------------------------------------------------
class CumsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.cumsum(self.b(h), dim=-1)  # not permutation-equivariant over the hidden axis
        return self.c(h)


def _cumsum_net():
    return finalize(CumsumNet()), torch.randn(B, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_strict_raises_naming_the_node():
    model, x = _cumsum_net()
    with pytest.raises(unf.SpecInferenceError, match=r"node 'cumsum' \(function torch\.cumsum\)"):
        unf.spec_from_module(model, x, strict=True)


def test_non_strict_warns_and_is_sound():
    model, x = _cumsum_net()
    with pytest.warns(unf.UnprovenSymmetryWarning, match=r"node 'cumsum'"):
        spec = unf.spec_from_module(model, x, strict=False)
    assert list(spec.groups.values()) == [8]
    assert spec["b.weight"].axes == (None, spec["a.weight"].axes[0])
    assert spec["c.weight"].axes == (None, None)
    for mode in ("eval", "train"):
        _check_sound(model, x, spec, mode)


class TimmIndexedQKV(nn.Module):
    """Older timm attention: ``q, k, v = qkv[0], qkv[1], qkv[2]`` after reshape/permute (all ops have rules)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(y)


def test_strict_accepts_indexed_qkv():
    model, x = finalize(TimmIndexedQKV()), torch.randn(B, 6, 8, dtype=torch.float64)
    spec = unf.spec_from_module(model, x, strict=True)
    _check_sound(model, x, spec, "eval")


class HandLeakyReLU(nn.Module):
    """``torch.where(h > 0, h, 0.1 * h)``: a comparison is element-wise, hence permutation-equivariant."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.where(h > 0, h, 0.1 * h))


def test_comparison_is_elementwise():
    model, x = finalize(HandLeakyReLU()), torch.randn(B, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", unf.UnprovenSymmetryWarning)
        spec = unf.spec_from_module(model, x)
    assert sorted(spec.groups.values()) == [8]
    _check_sound(model, x, spec, "eval")
