"""Specs of torchvision models: groups, fully fixed tensors, warnings, soundness and time, one row per model.

    python benchmarks/torchvision_specs.py [--image-size 64] [--models efficientnet_b0,convnext_tiny]

Random weights from each constructor, float64, eval mode. ``sound`` is the worst relative output change over three
sampled permutations. Install ``plugins/unf-torchvision`` (``make install``) for its rules; without it the numbers
are the core's alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

import unf
from unf.spec.registry import load_plugins

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed_spec  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v3_small", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "efficientnet_b0",
          "efficientnet_v2_s", "convnext_tiny", "maxvit_t", "swin_t", "swin_v2_t", "vit_b_16"]
# group counts derived by hand (plugins/unf-torchvision/tests, tests/test_spec_unproven.py; the first three and
# vit_b_16 here): resnet18: stem + 2 per stage + 3 new streams; resnet50: stem + per bottleneck 2 inner widths
# (3 + 4 + 6 + 3 blocks) + 4 new streams; mobilenet_v3_small: stem, 10 expanded widths, 9 squeeze widths, 5 new
# streams, last conv, classifier hidden; vit_b_16: stream + 12 x (heads, Q/K, V, MLP)
HAND = {"resnet18": 12, "resnet50": 1 + 2 * 16 + 4, "mobilenet_v3_small": 1 + 10 + 9 + 5 + 2,
        "shufflenet_v2_x0_5": 30, "shufflenet_v2_x1_0": 31, "efficientnet_b0": 40, "efficientnet_v2_s": 75,
        "convnext_tiny": 22, "maxvit_t": 117, "swin_t": 52, "swin_v2_t": 76, "vit_b_16": 49}


def build(name: str, image_size: int = 64) -> tuple:
    """``(model, input)``: random weights from torchvision's constructor, float64, eval mode; input 1x3xSxS."""
    size = 224 if name in ("maxvit_t", "vit_b_16") else image_size  # their default; MaxViT's partitions need it
    model = getattr(torchvision.models, name)().double().eval()
    return model, torch.randn(1, 3, size, size, dtype=torch.float64)


def soundness(model, spec, x, n=3) -> float:
    return unf.spec.symmetry_error(model, spec, x, num_permutations=n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    plugins = load_plugins()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, plugins {plugins or 'none'}, "
          f"input 1x3x{args.image_size}x{args.image_size}, float64, eval")
    print(f"{'model':<20} {'hand':>5} {'groups':>6} {'fixed tensors':>13} {'warnings':>8} {'sound':>9} {'time s':>6}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, x = build(name, args.image_size)
        spec, elapsed, n_warn, fixed = timed_spec(model, x)
        print(f"{name:<20} {HAND.get(name, '-'):>5} {len(spec.groups):>6} {f'{fixed}/{len(spec)}':>13} {n_warn:>8} "
              f"{soundness(model, spec, x):>9.1e} {elapsed:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
