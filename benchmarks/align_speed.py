"""Speed of unf.align on a 2-core CPU: ResNet-20 x4 weight matching, 1,000 small MLPs, MergeMany.

    python benchmarks/align_speed.py

(The side-by-side comparison with the `rebasin` package is benchmarks/rebasin_peer.py.)
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402

import unf  # noqa: E402
from unf.align import align_many, merge_many, weight_matching  # noqa: E402
from unf.align.matching import _stack, match_batched  # noqa: E402
from timing import median_time  # noqa: E402


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; median of 3 after a "
          "warm-up")
    for width, label in ((16, "ResNet-20 x1"), (64, "ResNet-20 x4")):
        torch.manual_seed(0)
        a, b = models.resnet20(width=width), models.resnet20(width=width)
        spec = unf.spec_from_module(a, torch.randn(1, 3, 32, 32))
        ref, oth = _stack(spec, a.state_dict(), torch.float32), _stack(spec, [b.state_dict()], torch.float32)
        sweep = median_time(lambda: match_batched(spec, ref, oth, max_iter=1), 3)
        full = median_time(lambda: weight_matching(spec, a.state_dict(), b.state_dict()), 3)
        _, sweeps = match_batched(spec, ref, oth)
        print(f"{label}: {sum(p.numel() for p in a.parameters()) / 1e6:.2f}M params, {len(spec.groups)} groups; "
              f"one sweep {sweep:.2f} s; full weight_matching {full:.2f} s")

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 10))

    torch.manual_seed(0)
    ref = mlp()
    spec = unf.spec_from_module(ref, torch.randn(1, 64))
    others = [mlp().state_dict() for _ in range(1000)]
    t = median_time(lambda: align_many(spec, ref.state_dict(), others), repeats=1)
    print(f"align_many: 1,000 MLPs 64-32-32-10 to one reference {t:.2f} s")
    t = median_time(lambda: merge_many(spec, others[:100]), repeats=1)
    print(f"merge_many: 100 MLPs 64-32-32-10 {t:.2f} s")


if __name__ == "__main__":
    main()
