"""WeightSpaceSpec, Permutation and axis entries: construction, validation, permutation algebra, JSON."""
import json

import pytest
import torch

import unf
from unf.spec.axes import axis_index

G = torch.Generator().manual_seed(0)


def mlp_spec():
    shapes = {"w1": (5, 3), "b1": (5,), "w2": (4, 5), "b2": (4,), "w3": (2, 4)}
    axes = {"w1": ("h1", None), "b1": ("h1",), "w2": ("h2", "h1"), "b2": ("h2",), "w3": (None, "h2")}
    return unf.WeightSpaceSpec.from_axes(axes, shapes), shapes


def random_sd(shapes, dtype=torch.float64):
    return {k: torch.randn(s, dtype=dtype, generator=G) for k, s in shapes.items()}


def test_from_axes_infers_group_sizes():
    spec, _ = mlp_spec()
    assert spec.groups == {"h1": 5, "h2": 4}
    assert spec["w2"].axes == ("h2", "h1") and spec["w3"].groups == ["h2"]


def test_permute_matches_hand_indexing_and_leaves_input():
    spec, shapes = mlp_spec()
    sd = random_sd(shapes)
    before = {k: v.clone() for k, v in sd.items()}
    p = spec.sample_permutation(G)
    out = spec.permute(sd, p)
    h1, h2 = p["h1"], p["h2"]
    assert torch.equal(out["w1"], sd["w1"][h1]) and torch.equal(out["b1"], sd["b1"][h1])
    assert torch.equal(out["w2"], sd["w2"][h2][:, h1]) and torch.equal(out["w3"], sd["w3"][:, h2])
    assert all(torch.equal(sd[k], before[k]) for k in sd)


def test_mlp_function_invariance_by_hand():
    spec, shapes = mlp_spec()
    sd = random_sd(shapes)

    def f(w, x):
        h = torch.tanh(x @ w["w1"].T + w["b1"])
        h = torch.tanh(h @ w["w2"].T + w["b2"])
        return h @ w["w3"].T

    x = torch.randn(7, 3, dtype=torch.float64, generator=G)
    for _ in range(20):
        out = f(spec.permute(sd, spec.sample_permutation(G)), x)
        assert torch.allclose(out, f(sd, x), rtol=0, atol=1e-12)


def test_permutation_algebra():
    spec, shapes = mlp_spec()
    sd = random_sd(shapes)
    p, q = spec.sample_permutation(G), spec.sample_permutation(G)
    # compose: q first, then p
    two_steps = spec.permute(spec.permute(sd, q), p)
    one_step = spec.permute(sd, p.compose(q))
    assert all(torch.equal(two_steps[k], one_step[k]) for k in sd)
    assert p @ q == p.compose(q)
    back = spec.permute(spec.permute(sd, p), p.inverse())
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert p.compose(p.inverse()) == spec.identity()
    ident = spec.permute(sd, spec.identity())
    assert all(torch.equal(ident[k], sd[k]) for k in sd)


def test_permutation_rejects_non_permutations():
    with pytest.raises(ValueError, match="group 'h'"):
        unf.Permutation({"h": torch.tensor([0, 0, 1])})


def test_sample_permutation_is_seeded():
    spec, _ = mlp_spec()
    a = spec.sample_permutation(torch.Generator().manual_seed(3))
    b = spec.sample_permutation(torch.Generator().manual_seed(3))
    assert a == b


def test_product_axis_index_is_row_major():
    # a Linear after flattening a (c=3) x (HW=2) map: in-axis ("c", 2)
    perm = {"c": torch.tensor([2, 0, 1])}
    idx = axis_index(("c", 2), perm, {"c": 3})
    assert idx.tolist() == [4, 5, 0, 1, 2, 3]
    x = torch.arange(6.0).view(3, 2)  # [c, hw]
    assert torch.equal(x.flatten()[idx], x[perm["c"]].flatten())


def test_concat_and_nested_product_index():
    groups = {"heads": 2, "qk": 2, "v": 3}
    perm = {"heads": torch.tensor([1, 0]), "qk": torch.tensor([1, 0]), "v": torch.tensor([2, 0, 1])}
    entry = [("heads", "qk"), ("heads", "qk"), ("heads", "v")]
    idx = axis_index(entry, perm, groups)
    q = torch.arange(4).view(2, 2)[perm["heads"]][:, perm["qk"]].flatten()
    v = torch.arange(6).view(2, 3)[perm["heads"]][:, perm["v"]].flatten()
    assert idx.tolist() == q.tolist() + (q + 4).tolist() + (v + 8).tolist()
    # concatenation with a fixed block
    idx = axis_index(["v", 2], perm, groups)
    assert idx.tolist() == [2, 0, 1, 3, 4]


def test_lstm_gate_factor():
    spec = unf.WeightSpaceSpec.from_axes({"w_ih": ((4, "h"), None)}, {"w_ih": (12, 5)})
    assert spec.groups == {"h": 3}
    sd = {"w_ih": torch.arange(12.0)[:, None].expand(12, 5).clone()}
    p = unf.Permutation({"h": torch.tensor([1, 2, 0])})
    out = spec.permute(sd, p)["w_ih"][:, 0].tolist()
    assert out == [1, 2, 0, 4, 5, 3, 7, 8, 6, 10, 11, 9]


@pytest.mark.parametrize("axes, shapes, match", [
    ({"a": ("h",), "b": ("h",)}, {"a": (3,), "b": (4,)}, r"tensor 'b' axis 0: entry h has size 3"),
    ({"a": (("c", 5),)}, {"a": (12,)}, r"tensor 'a' axis 0: size 12 cannot be split as \(c x 5\)"),
    ({"a": (("c", "d"),)}, {"a": (12,)}, r"tensor 'a' axis 0: cannot determine the size of group\(s\) \['c', 'd'\]"),
    ({"a": ("h", None)}, {"a": (3,)}, r"tensor 'a': 2 axis entries for a 1-d shape"),
    ({"a": ("h",)}, {"b": (3,)}, r"no axes for \['b'\], no shape for \['a'\]"),
    ({"a": ([None, "h"],)}, {"a": (3,)}, r"tensor 'a' axis 0: segment None"),
    ({"a": ((),)}, {"a": (3,)}, r"tensor 'a' axis 0: an empty product"),
    ({"a": (3.5,)}, {"a": (3,)}, r"tensor 'a' axis 0: axis entry 3.5"),
])
def test_from_axes_errors_name_tensor_and_axis(axes, shapes, match):
    with pytest.raises(ValueError, match=match):
        unf.WeightSpaceSpec.from_axes(axes, shapes)


def test_from_axes_explicit_group_sizes():
    spec = unf.WeightSpaceSpec.from_axes({"a": (("c", "d"),)}, {"a": (12,)}, groups={"c": 3, "d": 4})
    assert spec.groups == {"c": 3, "d": 4}
    with pytest.raises(ValueError, match="act on no axis"):
        unf.WeightSpaceSpec.from_axes({"a": ("h",)}, {"a": (3,)}, groups={"h": 3, "zz": 2})


def test_validate_errors():
    spec, shapes = mlp_spec()
    sd = random_sd(shapes)
    with pytest.raises(ValueError, match=r"missing keys \['b2'\]"):
        spec.validate({k: v for k, v in sd.items() if k != "b2"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        spec.validate({**sd, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"state_dict\['w2'\] has shape \(4, 6\)"):
        spec.validate({**sd, "w2": torch.zeros(4, 6)})
    with pytest.raises(ValueError, match="no entry for group"):
        spec.permute(sd, {"h1": torch.arange(5)})


def test_json_round_trip():
    shapes = {"qkv": (18, 4), "out": (4, 6), "lin": (3, 8)}
    axes = {"qkv": ([("heads", "qk"), ("heads", "qk"), ("heads", "v")], "d"), "out": ("d", ("heads", "v")),
            "lin": (None, ["a", 5])}
    spec = unf.WeightSpaceSpec.from_axes(axes, shapes, groups={"heads": 2})
    text = spec.to_json()
    back = unf.WeightSpaceSpec.from_json(text)
    assert back == spec and list(back.groups) == list(spec.groups)
    assert json.loads(text)["tensors"]["qkv"]["axes"][0]["concat"][2] == {"product": ["heads", "v"]}


def test_from_json_errors():
    with pytest.raises(ValueError, match="not valid JSON"):
        unf.WeightSpaceSpec.from_json("{oops")
    with pytest.raises(ValueError, match="not a unf.WeightSpaceSpec"):
        unf.WeightSpaceSpec.from_json(json.dumps({"groups": {}}))


def test_str_is_a_table():
    spec, _ = mlp_spec()
    text = str(spec)
    assert "2 groups, 5 tensors" in text and "h1=5" in text
    assert any(line.startswith("w2") and line.rstrip().endswith("h2, h1") for line in text.splitlines())


def test_integer_buffers_pass_through():
    spec = unf.spec_from_module(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                                    torch.nn.Linear(4, 2)), torch.randn(5, 3))
    assert spec["1.num_batches_tracked"].axes == ()
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).state_dict()
    out = spec.permute(sd, spec.sample_permutation(G))
    assert torch.equal(out["1.num_batches_tracked"], sd["1.num_batches_tracked"])


def test_buffers_are_marked_and_round_trip():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    spec = unf.spec_from_module(net, torch.randn(5, 3))
    assert spec["1.running_mean"].buffer and spec["1.running_var"].buffer and not spec["1.weight"].buffer
    assert "1.running_var" not in spec.parameter_names and "1.running_var" in spec.float_names
    assert "1.num_batches_tracked" not in spec.float_names
    back = unf.WeightSpaceSpec.from_json(spec.to_json())
    assert back == spec and back["1.running_mean"].buffer
