"""Orbit zoos (the generator's diagnostic ladder): copies compute their base's function; nearest_base finds it."""
import pytest
import torch
import torch.nn as nn

from unf.flow.novelty import stacked_logits
from unf.spec import spec_from_module
from unf.weights import WeightSpace
from unf.zoo.synthetic import nearest_base, orbit_zoo


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))


def _base(k):
    torch.manual_seed(0)
    nets = [_mlp().double() for _ in range(k)]
    spec = spec_from_module(_mlp().double(), torch.randn(2, 5, dtype=torch.float64))
    return spec, WeightSpace.from_module(spec, nets)


def test_noiseless_copies_are_the_base_function_in_new_coordinates():
    spec, base = _base(2)
    zoo, labels = orbit_zoo(base, copies=4, noise=0.0, seed=3)
    assert zoo.batch_size == 8 and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    x = torch.randn(11, 5, dtype=torch.float64)
    out = stacked_logits(_mlp().double(), spec, zoo, x)
    ref = stacked_logits(_mlp().double(), spec, base, x)
    torch.testing.assert_close(out, ref[labels], rtol=1e-12, atol=1e-12)
    # the copies are permuted (not the base's own coordinates), each with its own permutation
    flat = zoo.flatten()
    assert (flat[0] - base.flatten()[0]).abs().max() > 1e-3
    assert torch.cdist(flat[:4], flat[:4]).fill_diagonal_(1.0).min() > 1e-3


def test_noise_scale_is_relative_to_each_tensor():
    spec, base = _base(1)
    zoo, _ = orbit_zoo(base, copies=1, noise=0.05, seed=0, identity_first=True)
    for n in spec.float_names:
        if base[n].numel() < 30:  # too few entries for a std estimate
            continue
        diff = (zoo[n] - base[n]).std() / base[n].std()
        assert 0.02 < float(diff) < 0.1, n


def test_nearest_base_recovers_the_label_of_every_copy():
    spec, base = _base(3)
    zoo, labels = orbit_zoo(base, copies=3, noise=0.01, seed=1)
    dist, near = nearest_base(spec, zoo, base)
    assert near.tolist() == labels.tolist()
    own = dist.gather(1, labels[:, None])[:, 0]
    assert float(own.max()) < 0.1 * float(dist.max())


@pytest.mark.parametrize("kw,msg", [(dict(copies=0), "copies"), (dict(copies=2, noise=-1.0), "noise")])
def test_bad_arguments_are_named(kw, msg):
    _, base = _base(1)
    with pytest.raises(ValueError, match=msg):
        orbit_zoo(base, **kw)
