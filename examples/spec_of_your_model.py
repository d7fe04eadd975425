"""The symmetry spec of your own model: which permutation acts on each axis of each tensor, checked by permuting.

    python examples/spec_of_your_model.py [--quick]
"""
import argparse

import torch
import torch.nn as nn

import unf


class MyNet(nn.Module):
    """A small residual network: the two sides of the add must share one permutation, which inference finds."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.block = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.norm(h + self.block(h)))


def main(quick: bool = False) -> None:
    model = MyNet(8 if quick else 32)
    spec = unf.spec_from_module(model, torch.randn(1, 64))
    print(spec)
    perm = spec.sample_permutation(torch.Generator().manual_seed(0))
    x = torch.randn(16, 64)
    before = model(x)
    model.load_state_dict(spec.permute(model.state_dict(), perm))
    print(f"largest output change after a random permutation: {(model(x) - before).abs().max():.2e}")
    print(spec.to_json()[:200], "...")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke test)")
    main(p.parse_args().quick)
