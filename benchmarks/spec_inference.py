"""Spec inference time for a ResNet-50 and a ViT-B/16 (12 blocks, width 768) on the CPU.

    python benchmarks/spec_inference.py [--repeats 5] [--image-size 224]

Prints one row per model: parameters, groups, the first call's time (a fresh process: includes torch's one-time
set-up), the median time of later calls of ``unf.spec_from_module`` (fx trace + fake-tensor shape propagation + term
propagation), and the part of it spent tracing and propagating shapes.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402

import unf  # noqa: E402
from unf.spec.infer import trace  # noqa: E402
from timing import median_time  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.image_size, args.image_size)
    cases = [("ResNet-50", models.resnet50()),
             ("ViT-B/16, hand-written attention", models.vit_base(args.image_size)),
             ("ViT-B/16, nn.MultiheadAttention", models.vit_base(args.image_size, torch_attention=True))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"input 1x3x{args.image_size}x{args.image_size}, median of {args.repeats}")
    print(f"{'model':<34} {'params':>8} {'groups':>6} {'first call':>11} {'spec_from_module':>17} "
          f"{'of which trace+shapes':>22}")
    for name, model in cases:
        t0 = time.perf_counter()
        spec = unf.spec_from_module(model, x)  # the first call in a process also pays one-time torch set-up
        first = time.perf_counter() - t0
        total = median_time(lambda: unf.spec_from_module(model, x), args.repeats, warmup=False)
        traced = median_time(lambda: trace(model, x), args.repeats, warmup=False)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<34} {n / 1e6:>7.1f}M {len(spec.groups):>6} {first:>10.3f}s {total:>16.3f}s {traced:>21.3f}s")


if __name__ == "__main__":
    main()
