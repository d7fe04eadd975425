"""Population training (unf.zoo) against a plain sequential loop: networks trained per second, same work per network.

    python benchmarks/population_speed.py [--population 256] [--loop 8] [--epochs 3]

Both sides train on the embedded digits (1,437 training images), Adam, batch 64, for the same number of epochs;
the loop trains ``--loop`` networks one after another with torch.optim.Adam, the population trains
``--population`` networks at once with torch.func.vmap (in blocks of members whose activations stay under 8 MB).
Each side first runs one untimed epoch, so both are compared warm (one-time oneDNN and allocator set-up excluded).
Networks per second are compared.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unf  # noqa: E402
from unf.training import train_classifier  # noqa: E402
from unf.zoo import Member, MixedActivation, builtin, make_population, train_population  # noqa: E402


def unstrided_cnn(population: bool = False) -> nn.Module:
    """3 conv layers of 8 channels at full 8x8 resolution (one 2x2 max-pool), global average pooling: about 3x the
    multiply-adds of the zoo's strided CNN."""
    a = MixedActivation if population else nn.ReLU
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), a(), nn.Conv2d(8, 8, 3, padding=1),
                         a(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), a(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


ARCHITECTURES = (("MLP 64-32-32-10 (digits-mlp zoo)", builtin.mlp),
                 ("strided CNN (digits-cnn zoo)", builtin.cnn),
                 ("unstrided CNN", unstrided_cnn))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--population", type=int, default=256)
    ap.add_argument("--loop", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    split = unf.data.load("digits-flat")
    x, y = split.x_train, split.y_train
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; digits "
          f"({len(x)} images), Adam, batch 64, {args.epochs} epochs per network")
    print(f"{'architecture':<36} {'loop nets/s':>11} {'population nets/s':>18} {'speed-up':>9}")
    for name, make in ARCHITECTURES:
        train_classifier(make(), x, y, epochs=1)  # warm-up
        t0 = time.perf_counter()
        for seed in range(args.loop):
            torch.manual_seed(seed)
            train_classifier(make(), x, y, epochs=args.epochs, seed=seed)
        loop_rate = args.loop / (time.perf_counter() - t0)
        members = [Member(seed=s) for s in range(args.population)]
        train_population(make_population(lambda: make(population=True), members), x, y, epochs=1)  # warm-up
        pop = make_population(lambda: make(population=True), members)
        t0 = time.perf_counter()
        train_population(pop, x, y, epochs=args.epochs)
        pop_rate = args.population / (time.perf_counter() - t0)
        print(f"{name:<36} {loop_rate:>11.1f} {pop_rate:>18.1f} {pop_rate / loop_rate:>8.1f}x")


if __name__ == "__main__":
    main()
