"""WeightSpace: round trips, permutation, arithmetic, statistics, errors."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import unf


def make():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)) for _ in range(4)]
    spec = unf.spec_from_module(nets[0], torch.randn(2, 3))
    return spec, nets


def test_round_trip_state_dicts_with_integer_buffers():
    spec, nets = make()
    for n in nets:
        n.train()(torch.randn(4, 3))  # num_batches_tracked becomes 1
    ws = unf.WeightSpace.from_module(spec, nets)
    assert ws.batch_size == 4 and ws.channels == 1 and "1.num_batches_tracked" not in ws.names
    assert ws["0.weight"].shape == (4, 1, 5, 3)
    back = ws.to_state_dicts()
    for sd, net in zip(back, nets):
        assert list(sd) == list(net.state_dict())
        assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())


def test_permute_matches_spec_permute():
    spec, nets = make()
    ws = unf.WeightSpace.from_module(spec, nets)
    p = spec.sample_permutation(torch.Generator().manual_seed(1))
    got = ws.permute(p).to_state_dicts()
    for sd, net in zip(got, nets):
        want = spec.permute(net.state_dict(), p)
        assert all(torch.equal(sd[k], want[k]) for k in want)


def test_flatten_round_trip_and_arithmetic():
    spec, nets = make()
    ws = unf.WeightSpace.from_module(spec, nets)
    flat = ws.flatten()
    assert flat.shape == (4, sum(t[0].numel() for t in ws.values()))
    back = unf.WeightSpace.from_flat(spec, flat)
    assert all(torch.equal(back[n], ws[n]) for n in ws.names)
    two = ws + ws
    assert torch.equal((two - ws)["0.weight"], ws["0.weight"])
    assert torch.equal((2 * ws)["3.bias"], two["3.bias"]) and torch.equal((ws / 2 * 2)["0.bias"], ws["0.bias"])
    assert torch.equal((-ws)["0.bias"], -ws["0.bias"]) and torch.equal((1 - ws)["0.bias"], 1 - ws["0.bias"])
    with pytest.raises(ValueError, match=r"expected \[batch, "):
        unf.WeightSpace.from_flat(spec, flat[:, :-1])


def test_channels_flat_round_trip_and_views():
    spec, nets = make()
    ws = unf.WeightSpace.from_module(spec, nets).map(lambda t: torch.cat([t, 2 * t, -t], 1))  # 3 channels
    x = ws.channels_flat()
    assert x.shape == (4, 3, sum(t[0, 0].numel() for t in ws.values()))
    assert torch.equal(x[:, 1], 2 * x[:, 0])  # every channel holds the tensors in the same order
    back = unf.WeightSpace.from_channels(spec, x)
    assert all(torch.equal(back[n], ws[n]) for n in ws.names)
    x.zero_()  # views, not copies
    assert all(not back[n].any() for n in ws.names)
    with pytest.raises(ValueError, match=r"expected \[batch, channels, "):
        unf.WeightSpace.from_channels(spec, x[:, :, :-1])


def test_split_and_cat_round_trip_with_extras():
    spec, nets = make()
    ws = unf.WeightSpace.from_module(spec, nets)
    parts = ws.split(3)
    assert [p.batch_size for p in parts] == [3, 1] and len(parts[1].extras) == 1
    back = unf.WeightSpace.cat(parts)
    assert all(torch.equal(back[n], ws[n]) for n in ws.names)
    assert [list(e) for e in back.extras] == [list(e) for e in ws.extras]
    assert back.to_state_dicts()[3]["1.num_batches_tracked"] == nets[3].state_dict()["1.num_batches_tracked"]
    with pytest.raises(ValueError, match="split size 0"):
        ws.split(0)


def test_to_device_dtype():
    spec, nets = make()
    ws = unf.WeightSpace.from_module(spec, nets).to(dtype=torch.float64)
    assert ws.dtype == torch.float64 and ws.device.type == "cpu"


def test_stats_normalise_round_trip_and_invariance():
    spec, nets = make()
    ws = unf.WeightSpace.from_module(spec, nets, dtype=torch.float64)
    stats = ws.tensor_stats()
    norm = ws.normalize(stats)
    flat = norm["0.weight"].transpose(0, 1).reshape(1, -1)
    assert abs(flat.mean().item()) < 1e-12 and abs(flat.std(unbiased=False).item() - 1) < 1e-12
    back = norm.denormalize(stats)
    assert all(torch.allclose(back[n], ws[n], atol=1e-12) for n in ws.names)
    p = spec.sample_permutation()
    permuted = ws.permute(p).tensor_stats()
    assert all(torch.allclose(permuted[n][0], stats[n][0]) and torch.allclose(permuted[n][1], stats[n][1])
               for n in stats)


def test_robust_stats_ignore_diverged_networks_and_clip():
    spec, nets = make()
    ws = unf.WeightSpace.from_module(spec, nets, dtype=torch.float64)
    flat = ws["0.weight"].reshape(-1).numpy()
    centre, scale = ws.tensor_stats(robust=True)["0.weight"]
    q25, q50, q75 = np.quantile(flat, [0.25, 0.5, 0.75], method="nearest")
    assert centre.item() == pytest.approx(q50) and scale.item() == pytest.approx((q75 - q25) / 1.349)
    p = spec.sample_permutation()
    assert torch.equal(ws.permute(p).tensor_stats(robust=True)["0.weight"][1], scale)
    # one diverged weight: the std explodes, the robust scale barely moves
    bad = ws.map(lambda t: t.clone())
    bad["0.weight"][0, 0, 0, 0] = 1e6
    assert bad.tensor_stats()["0.weight"][1] > 1e4 * ws.tensor_stats()["0.weight"][1]
    assert bad.tensor_stats(robust=True)["0.weight"][1].item() == pytest.approx(scale.item(), rel=0.2)
    robust = bad.tensor_stats(robust=True)
    clipped, unclipped = bad.normalize(robust, clip=10.0)["0.weight"], bad.normalize(robust)["0.weight"]
    assert clipped[0, 0, 0, 0].item() == 10.0 and unclipped[0, 0, 0, 0].item() > 1e5
    assert unclipped[1:].abs().max() < 10 and torch.equal(clipped[1:], unclipped[1:])  # healthy networks untouched
    half = ws.to(dtype=torch.float16).map(lambda t: t * 0)  # constant tensors: the scale floor must not be 0 in half
    assert torch.isfinite(half.normalize(half.tensor_stats(robust=True))["0.weight"]).all()


def test_errors_name_the_tensor():
    spec, nets = make()
    bad = nets[0].state_dict()
    bad["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"state_dict #1: .*0.weight"):
        unf.WeightSpace.from_state_dicts(spec, [nets[0].state_dict(), bad])
    with pytest.raises(ValueError, match="missing"):
        unf.WeightSpace(spec, {"0.weight": torch.zeros(1, 1, 5, 3)})
    ws = unf.WeightSpace.from_module(spec, nets)
    tensors = {n: ws[n] for n in ws.names}
    tensors["3.bias"] = torch.zeros(4, 2, 2)
    with pytest.raises(ValueError, match=r"'3.bias' has shape \(4, 2, 2\); expected \[batch=4, channels=1"):
        unf.WeightSpace(spec, tensors)
    with pytest.raises(ValueError, match="needs 1 channel"):
        ws.map(lambda t: t.repeat(1, 2, *[1] * (t.dim() - 2))).to_state_dicts()


def test_arithmetic_refuses_other_specs():
    s1 = unf.WeightSpaceSpec.from_axes({"w": ("h", None)}, {"w": (4, 3)})
    s2 = unf.WeightSpaceSpec.from_axes({"w": ("h", None)}, {"w": (1, 3)}, groups={})
    with pytest.raises(ValueError, match="different specs"):
        unf.WeightSpace.zeros(s1, 2) + unf.WeightSpace.zeros(s2, 2)
