"""The shipped learned optimizer in a plain training loop, and with a learning-rate scheduler (lr multiplies the
learned step), on digits.

    python examples/learned_optimizer.py [--quick]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import unf
from unf.optim import UNFOptimizer
from unf.training import evaluate


def train(steps: int, schedule: bool) -> float:
    split = unf.data.load("digits-flat")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = UNFOptimizer.for_model(model, split.x_train[:1])  # infers the spec; the shipped weights
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if schedule else None
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(split.x_train), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return evaluate(model, split.x_test, split.y_test)[1]


def main(quick: bool = False) -> None:
    steps = 10 if quick else 300
    print(f"test accuracy after {steps} steps: plain loop {train(steps, False):.3f}, "
          f"cosine-annealed lr {train(steps, True):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke test)")
    main(p.parse_args().quick)
