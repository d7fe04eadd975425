"""An equivariant UNF layer inside your own network: a classifier that reads other networks' weights.

Trains a small invariant model to tell apart MLPs trained on digits from MLPs at their random initialisation, then
checks that a permuted input network gets the same output.

    python examples/equivariant_layer.py [--quick]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import unf
from unf.nn import InvariantPool, Pointwise, UNFLinear
from unf.training import train_classifier


class WeightClassifier(nn.Module):
    """UNFLinear -> ReLU -> UNFLinear -> invariant pooling -> linear head: invariant to every permutation in the spec."""

    def __init__(self, spec, hidden: int = 8):
        super().__init__()
        self.l1, self.l2 = UNFLinear(spec, 1, hidden), UNFLinear(spec, hidden, hidden)
        self.act = Pointwise("relu")
        self.pool = InvariantPool(spec)
        self.head = nn.Linear(self.pool.num_features(hidden), 2)

    def forward(self, ws):
        return self.head(self.pool(self.act(self.l2(self.act(self.l1(ws))))))


def main(quick: bool = False) -> None:
    split = unf.data.load("digits-flat")
    n, epochs = (6, 1) if quick else (30, 3)
    make = lambda: nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))  # noqa: E731
    nets, labels = [], []
    for i in range(n):
        torch.manual_seed(i)
        net = make()
        if i % 2:
            train_classifier(net, split.x_train, split.y_train, epochs=epochs, seed=i)
        nets.append(net)
        labels.append(i % 2)
    spec = unf.spec_from_module(nets[0], split.x_train[:1])
    ws = unf.WeightSpace.from_module(spec, nets)
    y = torch.tensor(labels)
    model = WeightClassifier(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10 if quick else 100):
        opt.zero_grad()
        F.cross_entropy(model(ws), y).backward()
        opt.step()
    acc = (model(ws).argmax(1) == y).float().mean()
    perm = spec.sample_permutation(torch.Generator().manual_seed(0))
    change = (model(ws.permute(perm)) - model(ws)).abs().max()
    print(f"training accuracy (trained vs untrained networks): {acc:.2f}; output change under a permutation of the "
          f"input networks' hidden units: {change:.1e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke test)")
    main(p.parse_args().quick)
