"""Spec inference time with shapes on meta tensors (the default) against ShapeProp's fake copy of the module (the way
before, kept as the second fallback), side by side in one process, alternating calls (issue 14, item 3).

    python benchmarks/spec_shapes.py [--models efficientnet_v2_s,maxvit_t,swin_v2_t,shufflenet_v2_x1_0] [--repeats 3]

CPU seconds (``time.process_time``) of whole ``unf.spec_from_module`` calls, median (min, max) of ``--repeats`` after
one untimed call of each; torchvision models as in ``torchvision_specs.py`` (random weights, float64, eval). The
groups found must be equal both ways. Rows are appended to ``benchmarks/results/spec_shapes.jsonl``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

import unf
from unf.spec import infer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl  # noqa: E402
from timing import code_version, provenance  # noqa: E402
import torchvision_specs as tv  # noqa: E402


def fake_copy(gm, inputs) -> None:
    """Shape propagation as before: ShapeProp deep-copies the module to fake tensors (real tensors if that fails)."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
        except Exception:
            ShapeProp(gm).propagate(*inputs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_v2_s,maxvit_t,swin_v2_t,shufflenet_v2_x1_0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "spec_shapes.jsonl"))
    args = ap.parse_args()
    warnings.simplefilter("ignore", unf.UnprovenSymmetryWarning)
    ways = {"meta (now)": infer._propagate_shapes, "fake copy (before)": fake_copy}
    stamp = {**provenance(), "code": code_version()}
    print(f"{stamp['date']}, {stamp['machine']}, torch {stamp['torch']}, {torch.get_num_threads()} thread(s)")
    unf.spec_from_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2))  # one-time set-up
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, x = tv.build(name)
        times, groups = {k: [] for k in ways}, {}
        for rep in range(args.repeats + 1):
            for way, fn in ways.items():
                infer._propagate_shapes = fn
                try:
                    t = time.process_time()
                    spec = unf.spec_from_module(model, x)
                    t = time.process_time() - t
                finally:
                    infer._propagate_shapes = ways["meta (now)"]
                groups[way] = len(spec.groups)
                if rep:  # the first call of each is untimed
                    times[way].append(t)
        assert len(set(groups.values())) == 1, f"{name}: groups differ {groups}"
        med = {k: statistics.median(v) for k, v in times.items()}
        before, now = med["fake copy (before)"], med["meta (now)"]
        print(f"{name}: {groups['meta (now)']} groups; CPU s median (min, max): now {now:.2f} "
              f"({min(times['meta (now)']):.2f}, {max(times['meta (now)']):.2f}), before {before:.2f} "
              f"({min(times['fake copy (before)']):.2f}, {max(times['fake copy (before)']):.2f}); "
              f"before / now {before / now:.2f}x", flush=True)
        append_jsonl(Path(args.out), dict(stamp, model=name, groups=groups["meta (now)"], cpu_s_now=times["meta (now)"],
                                          cpu_s_before=times["fake copy (before)"], ratio=before / now))


if __name__ == "__main__":
    main()
