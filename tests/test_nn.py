"""Universal neural functionals: equivariance, invariance, completeness, gradients, term counts, the NFN-NP reduction."""
import copy
import importlib.util
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import unf
from unf.nn import (DeepSets, DeepSetsEncoder, InvariantPool, Layout, PositionalEncoding, StatNN, UNFEncoder,
                    UNFLinear, UNFNet, WSNorm, bell, tensor_statistics)

sys.path.insert(0, os.path.dirname(__file__))
from architectures import ARCHITECTURES, require_plugins  # noqa: E402
from brute_force import equivariance_defect, equivariant_dim, span_dim  # noqa: E402

TOL = 1e-10
_SPECS = {}


def arch_spec(name):
    require_plugins(name)
    if name not in _SPECS:
        model, x = ARCHITECTURES[name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SPECS[name] = unf.spec_from_module(model, x)
    return _SPECS[name]


def random_ws(spec, batch=2, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return unf.WeightSpace(spec, {n: torch.randn(batch, channels, *spec[n].shape, generator=g, dtype=torch.float64)
                                  for n in spec.float_names})


def ws_err(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1)).item() for n in a.names)


# -- equivariance and invariance on every architecture of the spec suite ---------------------------------------------
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_unf_linear_and_pool_on_inferred_specs(name):
    spec = arch_spec(name)
    torch.manual_seed(0)
    layout = Layout(spec)
    layer, pool = UNFLinear(layout, 2, 3).double(), InvariantPool(layout)
    ws = random_ws(spec)
    out = layer(ws)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        p = spec.sample_permutation(gen)
        assert ws_err(layer(ws.permute(p)), out.permute(p)) <= TOL
        assert (pool(ws.permute(p)) - pool(ws)).abs().max() <= TOL * pool(ws).abs().max().clamp_min(1)


@pytest.mark.parametrize("name", ["mlp", "cnn_flatten", "resnet_basic", "transformer_hand_attention"])
@pytest.mark.parametrize("grad", [True, False])
def test_unf_linear_residual_is_added_in_place_of_a_sum(name, grad):
    """``layer(ws, residual=r)`` is ``r + layer(ws)`` (values and gradients) and leaves ``r`` and ``ws`` intact."""
    spec = arch_spec(name)
    torch.manual_seed(0)
    layer = UNFLinear(spec, 2, 3).double()
    ws, r = random_ws(spec), random_ws(spec, channels=3, seed=1)
    keep = {n: (ws[n].clone(), r[n].clone()) for n in ws.names}
    with torch.set_grad_enabled(grad):
        fused, plain = layer(ws, residual=r), r + layer(ws)
    assert ws_err(fused, plain) <= 1e-12
    assert all(torch.equal(ws[n], keep[n][0]) and torch.equal(r[n], keep[n][1]) for n in ws.names)
    if grad:
        g1 = torch.autograd.grad(sum((t * t).sum() for t in fused.values()), list(layer.parameters()))
        g2 = torch.autograd.grad(sum((t * t).sum() for t in plain.values()), list(layer.parameters()))
        assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) <= 1e-10
    with pytest.raises(ValueError, match="residual has"):
        layer(ws, residual=ws)


@pytest.mark.parametrize("name", ["mlp", "cnn_flatten", "resnet_basic", "transformer_hand_attention",
                                  "transformer_mha", "lstm_2layer", "gru", "lm_tied_head", "grouped_conv"])
def test_networks_are_equivariant_and_invariant(name):
    spec = arch_spec(name)
    torch.manual_seed(0)
    ws = random_ws(spec, channels=1)
    net = UNFNet(spec, 1, 4, 2, depth=2).double()
    enc = UNFEncoder(spec, 1, 4, 3, depth=1, head_hidden=8).double()
    out, feat = net(ws), enc(ws)
    p = spec.sample_permutation(torch.Generator().manual_seed(2))
    assert ws_err(net(ws.permute(p)), out.permute(p)) <= TOL
    assert (enc(ws.permute(p)) - feat).abs().max() <= TOL * feat.abs().max().clamp_min(1)
    stats = UNFEncoder(spec, 1, 4, 3, depth=1, head_hidden=8, readout="stats").double()
    feat = stats(ws)
    assert (stats(ws.permute(p)) - feat).abs().max() <= TOL * feat.abs().max().clamp_min(1)


def test_stats_readout_sees_the_input_statistics():
    spec = arch_spec("cnn_flatten")
    torch.manual_seed(0)
    ws = random_ws(spec, batch=3, channels=1)
    enc = UNFEncoder(spec, 1, 4, 1, depth=1, head_hidden=8, readout="stats", fold_max=0).double()
    seen = []
    enc.head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    enc(ws)
    stats = tensor_statistics(ws)
    assert seen[0].shape[1] == enc.pool.num_features(4) + 7 * 5 * len(spec.float_names)
    assert torch.equal(seen[0][:, -stats.shape[1]:], stats)  # StatNN's features, verbatim
    with pytest.raises(ValueError, match="readout 'max'"):
        UNFEncoder(spec, 1, 4, 1, readout="max")


def test_tensor_statistics_match_torch_quantile_in_any_size_and_precision():
    spec = arch_spec("mlp")
    ws = random_ws(spec, batch=3, channels=2)
    got = tensor_statistics(ws).view(3, 2, -1, 7).transpose(1, 2)  # [B, tensors, C, 7]
    for i, t in enumerate(ws.values()):
        flat = t.flatten(2)
        q = torch.quantile(flat, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=flat.dtype), dim=2).permute(1, 2, 0)
        assert torch.allclose(got[:, i, :, 2:], q, atol=1e-12)
        assert torch.allclose(got[:, i, :, 1], flat.var(2, unbiased=False), atol=1e-12)
    # the gradient is torch.quantile's too (the order statistics are gathered after a sort without autograd)
    leaves = {n: t.detach().requires_grad_() for n, t in ws.items()}
    probe = torch.randn(3, 7 * 2 * len(leaves), dtype=torch.float64)
    ours = torch.autograd.grad((tensor_statistics(unf.WeightSpace(spec, leaves)) * probe).sum(), list(leaves.values()))
    ref = []
    for t in leaves.values():
        flat = t.flatten(2)
        q = torch.quantile(flat, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=flat.dtype), dim=2).permute(1, 2, 0)
        ref += [flat.mean(2, keepdim=True), flat.var(2, unbiased=False, keepdim=True), q]
    theirs = torch.autograd.grad((torch.cat(ref, 2).flatten(1) * probe).sum(), list(leaves.values()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    half = tensor_statistics(ws.to(dtype=torch.float16))
    assert half.dtype == torch.float32 and torch.allclose(half, tensor_statistics(ws).float(), atol=2e-2)
    # torch.quantile refuses inputs over 2^24 entries; a 4096x4097 layer must still work
    lin = torch.nn.Linear(4097, 4096)
    big = unf.WeightSpace.from_module(unf.spec_from_module(lin, torch.randn(1, 4097)), [lin])
    w = big["weight"].flatten()
    stats = tensor_statistics(big.detach())[0, :7]  # the weight tensor: mean, var, 5 quantiles
    assert stats[2].item() == w.min().item() and stats[6].item() == w.max().item()
    assert abs(stats[4].item() - w.median().item()) < 1e-6


def test_baselines_share_the_interface():
    spec = arch_spec("mlp")
    ws = random_ws(spec)
    p = spec.sample_permutation(torch.Generator().manual_seed(3))
    ds = DeepSets(spec, 2, 8, 3).double()
    assert ws_err(ds(ws.permute(p)), ds(ws).permute(p)) <= TOL and ds(ws).channels == 3
    for model in (DeepSetsEncoder(spec, 2, 8, 5).double(), StatNN(spec, 2, 5).double()):
        y = model(ws)
        assert y.shape == (2, 5) and (model(ws.permute(p)) - y).abs().max() <= TOL


def test_hand_written_spec_with_products_and_concatenations():
    shapes = {"qkv": (12, 3), "out": (3, 4), "flat": (5, 8), "gates": (6, 2), "rec": (3, 3)}
    axes = {"qkv": ([("h", "q"), ("h", "q"), ("h", "v")], "d"), "out": ("d", ("h", "v")),
            "flat": (None, ("c", 4)), "gates": ((2, "r"), "c"), "rec": ("r", "r")}
    spec = unf.WeightSpaceSpec.from_axes(axes, shapes, groups={"h": 2})
    ws = random_ws(spec)
    for fold_max in (0, 4, 100):
        layer = UNFLinear(spec, 2, 2, fold_max=fold_max).double()
        p = spec.sample_permutation(torch.Generator().manual_seed(fold_max))
        assert ws_err(layer(ws.permute(p)), layer(ws).permute(p)) <= TOL


# -- completeness against a brute-force null space -------------------------------------------------------------------
def layer_maps(layer, spec):
    """The N x N matrix of the layer for each coefficient set to one (all others zero)."""
    names = spec.float_names
    params = dict(layer.named_parameters())
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    sizes = [p.numel() for p in params.values()]

    def apply(theta, x):
        chunks = dict(zip(params, [c.view_as(p) for c, p in zip(theta.split(sizes), params.values())]))
        return functional_call(layer, chunks, (unf.WeightSpace.from_flat(spec, x[None]),)).flatten()[0]

    n = sum(torch.Size(spec[k].shape).numel() for k in names)
    eye = torch.eye(n, dtype=torch.float64)
    maps = []
    for k in range(flat.numel()):
        theta = torch.zeros_like(flat)
        theta[k] = 1
        maps.append(torch.stack([apply(theta, eye[j]) for j in range(n)], dim=1))
    return maps


def _tiny_specs():
    mlp = unf.WeightSpaceSpec.from_axes({"w1": ("h", None), "b1": ("h",), "w2": (None, "h"), "b2": (None,)},
                                        {"w1": (3, 2), "b1": (3,), "w2": (2, 3), "b2": (2,)})
    rec = unf.WeightSpaceSpec.from_axes({"w": ("g", "g"), "b": ("g",)}, {"w": (4, 4), "b": (4,)})
    attn = unf.WeightSpaceSpec.from_axes({"qkv": ([("h", "q"), ("h", "q"), ("h", "v")], None),
                                          "o": (None, ("h", "v"))}, {"qkv": (12, 1), "o": (1, 4)}, groups={"h": 2})
    prod = unf.WeightSpaceSpec.from_axes({"a": (("g", 2),), "b": ("g", "k")}, {"a": (6,), "b": (3, 2)})
    return {"mlp": mlp, "recurrent": rec, "attention": attn, "product": prod}


@pytest.mark.parametrize("name", list(_tiny_specs()))
def test_unf_linear_spans_all_equivariant_maps(name):
    spec = _tiny_specs()[name]
    layer = UNFLinear(spec, 1, 1, bias=False, fold_max=100).double()  # every fixed axis folded: exact
    maps = layer_maps(layer, spec)
    names = spec.float_names
    assert max(equivariance_defect(spec, names, names, m) for m in maps) <= 1e-12
    assert span_dim(maps) == equivariant_dim(spec, names, names)


@pytest.mark.parametrize("name", ["mlp", "cnn_flatten", "resnet_basic", "transformer_hand_attention"])
def test_unf_linear_plan_cost_counts_the_products_it_runs(name):
    """``UNFLinear.cost``: the plan's FLOPs equal what torch's FLOP counter sees the layer compute, forward and
    forward+backward (folded pieces, pseudo-groups, diagonal terms and biases included), and its bytes are the
    input, output and coefficients."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = arch_spec(name)
    layer = UNFLinear(Layout(spec), 3, 2)
    ws = random_ws(spec, batch=4, channels=3).map(lambda t: t.float().requires_grad_())
    with FlopCounterMode(display=False) as fwd:
        out = layer(ws)
    with FlopCounterMode(display=False) as both:
        sum(t.sum() for t in layer(ws).values()).backward()
    assert layer.cost(4)["flops"] == fwd.get_total_flops() > 0
    assert layer.cost(4, backward=True)["flops"] == both.get_total_flops()
    n = sum(t[0, 0].numel() for t in out.values())
    params = sum(p.numel() for p in layer.parameters())
    assert layer.cost(4)["bytes"] == 4 * (4 * n * (3 + 2) + params)


def test_recurrent_term_counts():
    spec = _tiny_specs()["recurrent"]
    terms = UNFLinear(spec, 1, 1, bias=False).num_terms()
    assert terms[("w", "w")] == 15 == bell(4)
    assert terms[("w", "b")] == bell(3) and terms[("b", "b")] == bell(2)


def test_term_counts_are_products_of_bell_numbers():
    spec = arch_spec("transformer_mha")
    layer = UNFLinear(spec, 1, 1, bias=False, fold_max=0)
    layout = layer.layout
    for (out_name, in_name), n in layer.num_terms().items():
        want = 0
        for q in layout.by_tensor[out_name]:
            for s in layout.by_tensor[in_name]:
                labels = layout.pieces[q].kept_labels + layout.pieces[s].kept_labels
                count = 1
                for g in set(labels):
                    count *= bell(labels.count(g))
                want += count
        assert n == want, (out_name, in_name)


# -- training signal, devices ----------------------------------------------------------------------------------------
def test_gradients_reach_every_coefficient():
    spec = arch_spec("transformer_hand_attention")
    torch.manual_seed(0)
    net = UNFEncoder(spec, 1, 4, 2, depth=1, head_hidden=8).double()
    loss = net(random_ws(spec, channels=1)).square().sum()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activations_keep_their_scale_through_depth():
    spec = arch_spec("mlp")
    ws = random_ws(spec, batch=8, channels=1)
    stds = []
    for depth in (1, 8):
        torch.manual_seed(0)
        h = UNFNet(spec, 1, 16, 1, depth=depth).double().features(ws)
        stds.append(torch.cat([h[n].flatten() for n in h.names]).std().item())
    assert 0.3 < stds[0] < 3 and 0.5 < stds[1] / stds[0] < 2


def test_positional_encoding_breaks_only_pseudo_groups():
    spec = arch_spec("mlp")
    layout = Layout(spec, fold_max=0)
    assert layout.pseudo_groups()  # network input and output axes
    pe = PositionalEncoding(layout, 3).double()
    ws = random_ws(spec, channels=1)
    p = spec.sample_permutation()
    assert ws_err(pe(ws.permute(p)), pe(ws).permute(p)) == 0 and pe(ws).channels == 4
    # output units of the last layer are one pseudo-group shared by its weight rows and bias
    last_w, last_b = spec.float_names[-2:]
    w_piece, b_piece = (layout.pieces[layout.by_tensor[n][0]] for n in (last_w, last_b))
    assert w_piece.kept_labels[0] == b_piece.kept_labels[0]


def test_norm_is_equivariant():
    spec = arch_spec("resnet_basic")
    ws = random_ws(spec)
    norm = WSNorm(spec, 2).double()
    p = spec.sample_permutation()
    assert ws_err(norm(ws.permute(p)), norm(ws).permute(p)) <= TOL


@pytest.mark.parametrize("grad", [True, False])
def test_norm_matches_its_formula_with_and_without_film(grad):
    """The fused one-pass affine (in place without gradients) equals mean/var normalisation, affine, then FiLM."""
    spec = arch_spec("resnet_basic")
    torch.manual_seed(0)
    ws = random_ws(spec) * 3.0 + 5.0  # a large mean: a one-pass E[x^2] - E[x]^2 would lose digits here
    norm = WSNorm(spec, 2).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    b, t = ws.batch_size, len(spec.float_names)
    scale, shift = torch.randn(b, t, 2, dtype=torch.float64), torch.randn(b, t, 2, dtype=torch.float64)
    before = {n: ws[n].clone() for n in ws.names}
    with torch.set_grad_enabled(grad):
        plain, film = norm(ws), norm(ws, scale, shift)
    for i, n in enumerate(spec.float_names):
        x = ws[n]
        dims = tuple(range(2, x.dim()))
        y = (x - x.mean(dims, keepdim=True)) / (x.var(dims, unbiased=False, keepdim=True) + norm.eps).sqrt() \
            if dims else x
        shape = (1, -1) + (1,) * len(dims)
        y = y * norm.weight[i].view(shape) + norm.bias[i].view(shape)
        assert (plain[n] - y).abs().max().item() <= 1e-12, n
        y = y * (1 + scale[:, i].view((b, -1) + (1,) * len(dims))) + shift[:, i].view((b, -1) + (1,) * len(dims))
        assert (film[n] - y).abs().max().item() <= 1e-12, n
        assert torch.equal(ws[n], before[n]), f"{n}: the input was modified"
    assert plain[spec.float_names[0]].requires_grad == grad
    with pytest.raises(ValueError, match="both FiLM scale and shift"):
        norm(ws, scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    spec = arch_spec("transformer_hand_attention")
    torch.manual_seed(0)
    layer = UNFLinear(spec, 2, 2).double()
    ws = random_ws(spec)
    want = layer(ws)
    got = copy.deepcopy(layer).cuda()(ws.to("cuda"))
    assert ws_err(got.to("cpu"), want) <= 1e-10


# -- the NFN-NP layer is the UNF layer of an MLP with every axis permuted ---------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("nfn") is None, reason="the nfn package is not installed")
def test_unf_linear_reduces_to_nfn_np_layer():
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    from nfn.layers import NPLinear

    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    spec = unf.spec_from_module(model, torch.randn(1, 2))
    layer = UNFLinear(spec, 1, 1, bias=False, fold_max=0).double()
    unf_maps = layer_maps(layer, spec)
    names = spec.float_names
    n = sum(torch.Size(spec[k].shape).numel() for k in names)
    weights, biases = ["0.weight", "2.weight"], ["0.bias", "2.bias"]

    def np_apply(np_layer, x):
        ws = unf.WeightSpace.from_flat(spec, x[None])
        feat = np_layer(WeightSpaceFeatures([ws[k] for k in weights], [ws[k] for k in biases]))
        out = dict(zip(weights, feat.weights)) | dict(zip(biases, feat.biases))
        return torch.cat([out[k].flatten() for k in names])

    probe = WeightSpaceFeatures([torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 2, 3)],
                                [torch.zeros(1, 1, 3), torch.zeros(1, 1, 2)])
    np_layer = NPLinear(network_spec_from_wsfeat(probe), 1, 1).double()
    params = [p for p in np_layer.parameters()]
    np_maps = []
    eye = torch.eye(n, dtype=torch.float64)
    with torch.no_grad():
        for p in params:
            for k in range(p.numel()):
                for q in params:
                    q.zero_()
                p.view(-1)[k] = 1
                m = torch.stack([np_apply(np_layer, eye[j]) for j in range(n)], dim=1)
                m -= torch.stack([np_apply(np_layer, torch.zeros(n, dtype=torch.float64))] * n, dim=1)  # drop biases
                np_maps.append(m)
    # same span: each is contained in the other
    assert span_dim(unf_maps) == span_dim(np_maps) == span_dim(unf_maps + np_maps)


def test_positional_encoding_keys_do_not_collide():
    spec = unf.WeightSpaceSpec.from_axes({"fc.1.weight": (None, "h"), "fc_1.weight": (None, "h")},
                                         {"fc.1.weight": (5, 8), "fc_1.weight": (6, 8)})
    pe = PositionalEncoding(spec, 2, fold_max=0).double()
    assert len(pe.tables) == 2  # one pseudo-group per output axis: keys must not merge them
    out = pe(random_ws(spec, channels=1))
    assert out["fc.1.weight"].shape == (2, 3, 5, 8) and out["fc_1.weight"].shape == (2, 3, 6, 8)
