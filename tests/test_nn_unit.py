"""UnitMLP: a per-unit MLP over everything a unit touches; equivariant on every architecture of the spec suite."""
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import unf
from unf.nn import Layout
from unf.nn.unit import UnitMLP

sys.path.insert(0, os.path.dirname(__file__))
from architectures import ARCHITECTURES, require_plugins  # noqa: E402

TOL = 1e-10


def _spec(name):
    require_plugins(name)
    model, x = ARCHITECTURES[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unf.spec_from_module(model, x)


def _ws(spec, batch=2, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return unf.WeightSpace(spec, {n: torch.randn(batch, channels, *spec[n].shape, generator=g, dtype=torch.float64)
                                  for n in spec.float_names})


def _randomised(module):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)  # the last layer starts at zero: give it weights so that the test can fail
    return module.double()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("fold_max,rank,activation,hidden,attention", [
    (0, 0, "silu", 8, 0), (4, 0, "silu", 8, 0), (4, 3, "silu", 8, 0), (4, 3, "softmax", 8, 0),
    (4, 3, "sinkhorn", 8, 0), (4, 3, "sinkhorn", "units", 0), (4, 3, "sinkhorn", "units", 1), (0, 0, "silu", 6, 2)])
def test_unit_mlp_is_equivariant(name, fold_max, rank, activation, hidden, attention):
    spec = _spec(name)
    layer = _randomised(UnitMLP(Layout(spec, fold_max), 2, hidden=hidden, max_features=10 ** 6, rank=rank,
                                activation=activation, attention=attention))
    assert len(layer.mix) == (len(spec.groups) if attention else 0)
    assert len(layer.inp) == len(spec.groups)  # every group has its MLP: the check below can fail
    ws = _ws(spec)
    out = layer(ws)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        p = spec.sample_permutation(gen)
        moved = layer(ws.permute(p))
        ref = out.permute(p)
        for n in spec.float_names:
            assert (moved[n] - ref[n]).abs().max() <= TOL * ref[n].abs().max().clamp_min(1), n


def test_units_width_gives_each_group_one_prototype_per_unit():
    """``hidden="units"``: the memory of each group has as many prototypes as the group has units (MLP 5-4-3-2: 4
    and 3), so a Sinkhorn memory's capacity is one unit per prototype; a bad width is named."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    spec = unf.spec_from_module(model, torch.randn(2, 5))
    layer = UnitMLP(Layout(spec, 0), 1, hidden="units", rank=2, activation="sinkhorn")
    assert sorted(m.out_features for m in layer.inp.values()) == [3, 4]
    assert all(layer.pair[k].in_features == layer.inp[k].out_features for k in layer.pair)
    for bad in (0, "wide", True):
        with pytest.raises(ValueError, match="UnitMLP hidden"):
            UnitMLP(Layout(spec, 0), 1, hidden=bad)


def test_a_unit_sees_and_writes_its_whole_row_of_fixed_weights():
    """MLP 5-4-3: hidden unit i's output at input position j depends on its input weight at another position j'
    (a mean over the fixed axis could not tell positions apart), and not on another unit's."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    spec = unf.spec_from_module(model, torch.randn(2, 5))
    layout = Layout(spec, 0)
    layer = _randomised(UnitMLP(layout, 1, hidden=16))
    w1 = next(n for n in spec.float_names if spec[n].shape == (4, 5))
    ws = _ws(spec, batch=1, channels=1)
    base = layer(ws)[w1]
    bumped = unf.WeightSpace(spec, {n: t.clone() for n, t in ws.items()})
    bumped[w1][0, 0, 2, 4] += 1.0  # unit 2, input 4
    diff = (layer(bumped)[w1] - base).abs()[0, 0]
    assert diff[2, 0] > 1e-6  # the same unit, another input position: changed
    # other units change only through the means over units that the last layer's unit axis is averaged by
    assert diff[2, 0] > 10 * diff[0, 0]


def test_attention_lets_a_unit_depend_on_the_other_units_of_its_layer():
    """MLP 5-4-3 (one hidden group, its other axes fixed): without attention hidden unit 0's output does not depend
    on unit 2's weights at all (each unit decides alone); with one attention layer it does."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    spec = unf.spec_from_module(model, torch.randn(2, 5))
    w1 = next(n for n in spec.float_names if spec[n].shape == (4, 5))
    ws = _ws(spec, batch=1, channels=1)
    bumped = unf.WeightSpace(spec, {n: t.clone() for n, t in ws.items()})
    bumped[w1][0, 0, 2, 4] += 1.0  # unit 2, input 4
    for attention in (0, 1):
        layer = _randomised(UnitMLP(Layout(spec, 0), 1, hidden=16, attention=attention))
        diff = (layer(bumped)[w1] - layer(ws)[w1]).abs()[0, 0]
        assert diff[2].max() > 1e-3  # the bumped unit itself
        if attention:
            assert diff[0].max() > 1e-4
        else:
            assert diff[0].max() == 0.0 and diff[1].max() == 0.0


def test_a_sharp_softmax_memory_writes_one_prototype_exactly():
    """MLP 5-4-3 with ``activation="softmax"``: when the keys make prototype 1 win for every unit, each hidden unit
    writes exactly prototype 1's values (its 5 input weights, its bias and its 3 output weights), whatever its input."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    spec = unf.spec_from_module(model, torch.randn(2, 5))
    layer = _randomised(UnitMLP(Layout(spec, 0), 1, hidden=3, activation="softmax"))
    (key,) = layer.inp.keys()
    with torch.no_grad():
        layer.inp[key].weight.zero_()
        layer.inp[key].bias.copy_(torch.tensor([0.0, 80.0, 0.0], dtype=torch.float64))
    prototype = (layer.out[key].weight[:, 1] + layer.out[key].bias).detach()
    with torch.no_grad():
        out = layer(_ws(spec, batch=1, channels=1))
    w1, b1, w2 = (next(n for n in spec.float_names if spec[n].shape == s) for s in ((4, 5), (4,), (3, 4)))
    for i in range(4):
        written = torch.cat([out[w1][0, 0, i], out[b1][0, 0, i:i + 1], out[w2][0, 0, :, i]])
        assert torch.allclose(written.sort().values, prototype.sort().values, atol=1e-12)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        UnitMLP(Layout(spec, 0), 1, activation="tanh")


def test_sinkhorn_memory_shares_a_prototype_that_every_unit_wants():
    """``activation="sinkhorn"``: units that prefer distinct prototypes keep them (as a softmax would); when every
    unit of a network wants the same prototype, no prototype carries more than one unit's weight."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    spec = unf.spec_from_module(model, torch.randn(2, 5))
    layer = UnitMLP(Layout(spec, 0), 1, hidden=6, activation="sinkhorn").double()
    distinct = torch.full((1, 4, 6), -30.0, dtype=torch.float64)
    distinct[0, torch.arange(4), torch.tensor([5, 0, 3, 1])] = 30.0
    assert torch.allclose(layer._sinkhorn(distinct), distinct.softmax(-1), atol=1e-9)
    same = torch.randn(3, 4, 6, dtype=torch.float64)
    same[..., 2] += 12.0
    a = layer._sinkhorn(same)
    assert torch.allclose(a.sum(-1), torch.ones(3, 4, dtype=torch.float64), atol=1e-9)
    assert float(a.sum(-2).max()) <= 1.05  # a softmax would put all 4 units on prototype 2
    assert float(same.softmax(-1).sum(-2).max()) > 3.9


def test_pair_tables_write_weights_between_hidden_layers():
    """With ``rank``, W2[i, k] of an MLP 5-4-3-2 gets a product of unit i's and unit k's factors: a table of unit
    pairs that per-unit outputs (broadcast over the other axis, so of rank 1 per channel at most... plus means) cannot
    write. Check: the pair term alone has rank > 1 per channel, and it vanishes at initialisation."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    spec = unf.spec_from_module(model, torch.randn(2, 5))
    w2 = next(n for n in spec.float_names if spec[n].shape == (3, 4))
    ws = _ws(spec, batch=1, channels=1)
    fresh = UnitMLP(Layout(spec, 0), 1, hidden=16, rank=3).double()
    assert len(fresh.pairs) == 1
    with torch.no_grad():
        assert float(fresh(ws)[w2].abs().max()) == 0.0
    layer = _randomised(UnitMLP(Layout(spec, 0), 1, hidden=16, rank=3))
    plain = _randomised(UnitMLP(Layout(spec, 0), 1, hidden=16, rank=0))
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("pair.")})
    with torch.no_grad():
        table = layer(ws)[w2][0, 0] - plain(ws)[w2][0, 0]  # the pair term alone
    assert torch.linalg.matrix_rank(table).item() >= 2


def test_unit_mlp_starts_at_zero_and_names_bad_input():
    spec = _spec("mlp")
    layer = UnitMLP(Layout(spec), 2, rank=2).double()
    with torch.no_grad():
        out = layer(_ws(spec))
    assert all(float(out[n].abs().max()) == 0.0 for n in spec.float_names)
    with pytest.raises(ValueError, match="expects 2 channels"):
        layer(_ws(spec, channels=3))
    with pytest.raises(ValueError, match="attention -1"):
        UnitMLP(Layout(spec), 2, attention=-1)
