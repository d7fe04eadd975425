"""The generator's ladder at tiny scale: an orbit zoo (one trained wine MLP 13-8-3 in 100 permutations, 1 % noise)
where the answer is known. The equivariant field with a Sinkhorn unit memory must write the base network back, in
permutations that are not training copies. Measured when this test was written (600 steps): its samples' median
aligned distance to the base is 0.41 of two independent networks' (accuracy 0.978, base 1.0); the same field with a
SiLU unit MLP stays at 0.63 (0.969), above this test's line of 0.5 (BENCHMARKS.md, "the diagnostic ladder").
CPU, float32, about 40 s on one thread."""
import pytest
import torch

from unf.data import load
from unf.flow import FlowConfig, train_flow
from unf.flow.novelty import aligned_l2, stacked_logits
from unf.optim.tasks import mlp
from unf.spec import spec_from_module
from unf.training import evaluate, train_classifier
from unf.weights import WeightSpace
from unf.zoo.synthetic import nearest_base, orbit_zoo

STEPS = 600


@pytest.fixture(scope="module")
def rung():
    split = load("wine")
    mu, sd = split.x_train.mean(0), split.x_train.std(0)
    x_tr, x_te = (split.x_train - mu) / sd, (split.x_test - mu) / sd
    make = lambda: mlp(13, [8], 3)  # noqa: E731
    nets = []
    for seed in (0, 1000):  # the base, and an independent network for the distance scale
        torch.manual_seed(seed)
        nets.append(train_classifier(make(), x_tr, split.y_train, epochs=100, seed=seed))
    base_acc = evaluate(nets[0], x_te, split.y_test)[1]
    spec = spec_from_module(make(), x_tr[:2])
    both = WeightSpace.from_module(spec, nets)
    base, other = (WeightSpace(spec, {n: t[i:i + 1] for n, t in both.items()}) for i in (0, 1))
    zoo, _ = orbit_zoo(base, 100, noise=0.01, seed=0)
    scale = float(aligned_l2(spec, other, base, candidates=1).min())
    return dict(spec=spec, base=base, zoo=zoo, scale=scale, make=make, x_te=x_te, y_te=split.y_test,
                base_acc=base_acc)


def _samples(rung, velocity_config, tmp_path):
    torch.manual_seed(0)
    cfg = FlowConfig(velocity="unf", steps=STEPS, batch_size=32, seed=0, velocity_config=velocity_config)
    flow, _ = train_flow(rung["zoo"], cfg=cfg, out=tmp_path)
    gen, _ = flow.sample(100, nfe=20, solver="heun", seed=1)
    acc = (stacked_logits(rung["make"](), rung["spec"], gen, rung["x_te"]).argmax(-1) == rung["y_te"]).float().mean(1)
    dist = nearest_base(rung["spec"], gen, rung["base"])[0][:, 0]
    raw = torch.cdist(gen.flatten().double(), rung["zoo"].flatten().double()).min(1).values
    return acc, dist, raw


def test_sinkhorn_unit_memory_writes_the_base_network_in_new_permutations(rung, tmp_path):
    assert rung["base_acc"] >= 0.9  # the rung is only a test if the base network is good
    acc, dist, raw = _samples(rung, dict(hidden=8, depth=2, unit_hidden=16, unit_activation="sinkhorn"),
                              tmp_path / "sink")
    copies = torch.cdist(rung["zoo"].flatten().double(), rung["zoo"].flatten().double())
    copies.fill_diagonal_(float("inf"))
    spacing = float(copies.min(1).values.median())  # raw distance between neighbouring training copies
    assert float(acc.mean()) >= rung["base_acc"] - 0.05
    assert float(dist.median()) < 0.5 * rung["scale"]  # near the base after alignment: its function, written back
    assert float((raw > 0.5 * spacing).float().mean()) >= 0.9  # and not a training copy
