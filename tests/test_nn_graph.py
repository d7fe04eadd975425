"""Neural graphs and the graph metanetwork (``unf.nn.graph``)."""
import os
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("torch_geometric")

import unf  # noqa: E402
from unf import WeightSpace, WeightSpaceSpec  # noqa: E402
from unf.nn.graph import GraphMetanetwork, graph_batch, neural_graph  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from examples import models  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The graphs here are tiny: one intra-op thread avoids thread-pool overhead dominating the scatters."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spec_ws(model, x, batch=3, seed=0):
    """Spec of ``model`` and a float64 weight space of ``batch`` random re-draws of its parameters."""
    spec = unf.spec_from_module(model, x)
    g = torch.Generator().manual_seed(seed)
    sds = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) if v.is_floating_point() else v
            for k, v in model.state_dict().items()} for _ in range(batch)]
    return spec, WeightSpace.from_state_dicts(spec, sds)


def _mlp():
    return _spec_ws(models.mlp(in_features=5, hidden=(7, 6), num_classes=3), torch.randn(2, 5))


def _cnn():
    return _spec_ws(models.small_cnn(in_channels=2, width=4, num_classes=3), torch.randn(2, 2, 8, 8))


def _cnn_flatten_bn():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    return _spec_ws(m, torch.randn(2, 1, 8, 8))


# ----------------------------------------------------------------------------------------------------------------------
# (a) the graph itself
# ----------------------------------------------------------------------------------------------------------------------
def test_tiny_mlp_graph_nodes_edges_and_features():
    spec, ws = _spec_ws(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3), batch=2)
    g = neural_graph(spec)
    assert [s.size for s in g.node_sets] == [3, 4, 2]
    assert [s.layer for s in g.node_sets] == [0, 1, 2]
    assert [s.group is None for s in g.node_sets] == [True, False, True]
    assert g.num_nodes == 9 and g.num_edges == 3 * 4 + 4 * 2
    assert g.edge_dim == 1 and g.node_dim == 1
    # node types: 3 positional input neurons, one type for the hidden layer, 2 positional outputs
    assert g.num_node_types == 3 + 3 + 2 and len(set(g.node_type[3:7].tolist())) == 1

    b = g.batch(ws)
    assert b.num_graphs == 2 and b.x.shape == (18, 1) and b.edge_attr.shape == (40, 1)
    for k, sd in enumerate(ws.to_state_dicts()):
        data = b.get_example(k)
        src, dst = data.edge_index
        e = data.edge_attr[:, 0]
        for name, (i_set, o_set) in {"0.weight": (0, 1), "2.weight": (1, 2)}.items():
            i0, o0 = g.node_sets[i_set].offset, g.node_sets[o_set].offset
            w = sd[name]
            mask = (src >= i0) & (src < i0 + w.shape[1]) & (dst >= o0) & (dst < o0 + w.shape[0])
            assert int(mask.sum()) == w.numel()
            assert torch.equal(e[mask], w[dst[mask] - o0, src[mask] - i0])
        # biases on the written neurons, zeros on the inputs
        assert torch.equal(data.x[:3, 0], torch.zeros(3, dtype=torch.float64))
        assert torch.equal(data.x[3:7, 0], sd["0.bias"]) and torch.equal(data.x[7:, 0], sd["2.bias"])


def test_vectorised_batch_matches_per_member_data():
    for spec, ws in (_mlp(), _cnn(), _cnn_flatten_bn()):
        g = neural_graph(spec)
        b = graph_batch(ws, g)
        assert b.num_graphs == ws.batch_size
        assert b.x.shape == (ws.batch_size * g.num_nodes, g.node_dim)
        for k, d in enumerate(b.to_data_list()):
            ref = g.data(ws, k)
            for key in ("x", "edge_index", "edge_attr", "edge_type", "node_type", "node_layer"):
                assert torch.equal(d[key], ref[key]), key


def test_cnn_edge_features_kernels_flatten_and_batchnorm_slots():
    spec, ws = _cnn_flatten_bn()
    g = neural_graph(spec)
    assert [s.size for s in g.node_sets] == [1, 4, 5, 3]
    assert g.edge_dim == 16 and g.node_dim == 5  # flatten head: 4 * 4 per channel; conv bias + 4 BatchNorm vectors
    sd = ws.to_state_dicts()[1]
    d = g.data(ws, 1)
    src, dst = d.edge_index
    off = [s.offset for s in g.node_sets]
    # 3x3 kernel of conv 0, edge (in 0 -> out 2): the flattened kernel, padded with zeros
    e = d.edge_attr[(src == off[0]) & (dst == off[1] + 2)]
    assert torch.equal(e[0, :9], sd["0.weight"][2, 0].flatten()) and not e[0, 9:].any()
    # 1x1 kernel of conv 2 is centred in the 3x3 grid (index 4)
    e = d.edge_attr[(src == off[1] + 3) & (dst == off[2] + 1)][0]
    assert e[4] == sd["2.weight"][1, 3, 0, 0] and int((e != 0).sum()) <= 1
    # flatten head: channel c -> output o carries W[o, c*16:(c+1)*16]
    e = d.edge_attr[(src == off[2] + 3) & (dst == off[3] + 2)][0]
    assert torch.equal(e, sd["7.weight"][2, 3 * 16:4 * 16])
    # node slots of the BatchNorm'd layer: bias, then weight, bias, running mean / var in spec order
    x = d.x[off[2]:off[2] + 5]
    for j, name in enumerate(["2.bias", "3.weight", "3.bias", "3.running_mean", "3.running_var"]):
        assert torch.equal(x[:, j], sd[name])
    assert not d.x[off[1]:off[1] + 4, 1:].any()  # conv 0 has only its bias


def test_flatten_with_group_inside_the_product():
    """An in-axis ``(k, "c")`` (channels last) gathers the ``k`` entries of each channel."""
    spec = WeightSpaceSpec.from_axes({"a.weight": ["c", None], "a.bias": ["c"], "h.weight": [None, (2, "c")]},
                                     {"a.weight": (3, 4), "a.bias": (3,), "h.weight": (5, 6)})
    ws = WeightSpace.from_state_dicts(spec, [{k: torch.randn(*spec[k].shape) for k in spec}])
    g = neural_graph(spec)
    d = g.data(ws)
    src, dst = d.edge_index
    w = ws["h.weight"][0, 0]
    e = d.edge_attr[(src == g.node_sets[1].offset + 1) & (dst == g.node_sets[2].offset + 4)][0]
    assert torch.equal(e, w[4, [1, 4]])


def test_multichannel_features():
    spec, ws = _cnn()
    ws2 = WeightSpace(spec, {n: torch.cat([t, 2 * t], 1) for n, t in ws.items()})
    g = neural_graph(spec)
    e1, e2 = g.edge_features(ws), g.edge_features(ws2)
    assert e2.shape[-1] == 2 * g.edge_dim
    assert torch.equal(e2[..., :g.edge_dim], e1) and torch.equal(e2[..., g.edge_dim:], 2 * e1)
    net = GraphMetanetwork(spec, hidden=8, layers=1, in_channels=2).double()
    assert net(ws2).shape == (ws.batch_size, 1)


# ----------------------------------------------------------------------------------------------------------------------
# (b) invariance, (c) gradients
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_mlp, _cnn, _cnn_flatten_bn], ids=["mlp", "small_cnn", "cnn_flatten_bn"])
@pytest.mark.parametrize("readout", ["mean", "mean_max"])
def test_invariance(make, readout):
    torch.manual_seed(0)
    spec, ws = make()
    net = GraphMetanetwork(spec, hidden=16, layers=3, out_features=2, readout=readout).double()
    y = net(ws)
    assert y.shape == (ws.batch_size, 2)
    for seed in range(3):
        perm = spec.sample_permutation(torch.Generator().manual_seed(seed))
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
        torch.testing.assert_close(net(ws.permute(perm)), y, rtol=0, atol=1e-8)
    # not invariant to everything: moving weights between members changes the output
    assert not torch.allclose(y[0], y[1])


def test_positional_io_sees_input_order():
    """Input neurons are not exchangeable; with positional embeddings the model can tell them apart."""
    torch.manual_seed(0)
    spec, ws = _mlp()
    swapped = WeightSpace(spec, {n: (t.flip(3) if n == "0.weight" else t) for n, t in ws.items()})
    net = GraphMetanetwork(spec, hidden=16, layers=2).double()
    assert not torch.allclose(net(ws), net(swapped))
    plain = GraphMetanetwork(spec, hidden=16, layers=2, positional_io=False).double()
    torch.testing.assert_close(plain(ws), plain(swapped), rtol=0, atol=1e-8)


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_gradients_reach_all_parameters(make, bidirectional):
    torch.manual_seed(0)
    spec, ws = make()
    net = GraphMetanetwork(spec, hidden=16, layers=2, out_features=3, readout="mean_max",
                           bidirectional=bidirectional).double()
    net(ws).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_input_gradients_flow_to_every_weight():
    spec, ws = _cnn()
    ws = ws.map(lambda t: t.clone().requires_grad_(True))
    net = GraphMetanetwork(spec, hidden=8, layers=2).double()
    net(ws).sum().backward()
    for n, t in ws.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, n


# ----------------------------------------------------------------------------------------------------------------------
# (d) unsupported layouts
# ----------------------------------------------------------------------------------------------------------------------
def test_transformer_is_rejected_naming_a_tensor():
    import warnings
    m = models.vit(image_size=8, patch=4, dim=8, depth=1, heads=2, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = unf.spec_from_module(m, torch.randn(2, 3, 8, 8))
    with pytest.raises(NotImplementedError, match=r"tensor '(cls|pos)'"):
        neural_graph(spec)
    with pytest.raises(NotImplementedError, match="Only MLPs and plain CNNs"):
        GraphMetanetwork(spec)


def test_residual_and_fused_layouts_are_rejected():
    spec = unf.spec_from_module(models.resnet20(width=4), torch.randn(2, 3, 8, 8))
    with pytest.raises(NotImplementedError, match=r"tensor 'blocks\.0\.conv2\.weight'.*residual"):
        neural_graph(spec)
    qkv = WeightSpaceSpec.from_axes({"qkv.weight": [["a", "a"], None], "o.weight": [None, "a"]},
                                    {"qkv.weight": (8, 3), "o.weight": (2, 4)})
    with pytest.raises(NotImplementedError, match=r"tensor 'qkv\.weight'.*concatenated"):
        neural_graph(qkv)
    rnn = WeightSpaceSpec.from_axes({"ih": ["h", None], "hh": ["h", "h"]}, {"ih": (4, 3), "hh": (4, 4)})
    with pytest.raises(NotImplementedError, match=r"tensor 'hh'"):
        neural_graph(rnn)


def test_wrong_spec_or_channels():
    spec, ws = _mlp()
    _, ws_other = _cnn()
    net = GraphMetanetwork(spec, hidden=8, layers=1).double()
    with pytest.raises(ValueError, match="spec"):
        net(ws_other)
    with pytest.raises(ValueError, match="channel"):
        net(WeightSpace(spec, {n: t.repeat(1, 2, *[1] * (t.dim() - 2)) for n, t in ws.items()}))
