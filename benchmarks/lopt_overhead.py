"""Overhead of the learned optimizers against Adam, side by side in one run.

    python benchmarks/lopt_overhead.py [--repeats 30] [--device cpu|cuda] [--compile]

For an MLP 64-300-300-10 (~112k parameters) at batch 128 and the digits CNN at batch 64: the time of a full training
step (forward, backward, optimizer step) and of the optimizer step alone, for Adam and the three learned rules (UNF,
DeepSets, per-parameter MLP) with their shipped weights; with ``--compile`` also each rule with
``UNFOptimizer(compile=True)`` (its compile time, the first step, reported on its own). Medians over ``--repeats``
(after a warm-up), min and max beside them, the ATen calls of one optimizer step (a load-independent measure of
dispatch overhead), the rule's matmul FLOPs with the GFLOP/s achieved, and the optimizer step's minimum traffic (read
parameters, gradients and state once, write parameters and state once) with the GB/s that step time implies, beside
this machine's square-matmul peak and copy bandwidth measured in the same run; one JSON line per run appended to
``benchmarks/results/lopt_overhead.jsonl``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lopt_eval import LEARNED  # noqa: E402
from timing import aten_calls, code_version, machine_peaks, matmul_flops, wall_times  # noqa: E402

from unf.optim import LearnedRule, UNFOptimizer  # noqa: E402
from unf.optim.tasks import mlp  # noqa: E402
from unf.zoo.builtin import cnn  # noqa: E402


def _times(fn, repeats, sync):
    fn()  # one more warm-up call: the first builds the plans
    out = wall_times(fn, repeats, sync=sync)
    return statistics.median(out) * 1e3, min(out) * 1e3, max(out) * 1e3


def min_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes any optimizer step must move: parameters, gradients and state tensors read once, parameters and state
    written once (the state as ``opt.state`` holds it: Adam's two moments, the learned rule's momenta and ``v``)."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    params = [p for group in opt.param_groups for p in group["params"]]
    state = sum(size(v) for p in params for v in opt.state[p].values() if torch.is_tensor(v) and v.dim() > 0)
    return 2 * (sum(size(p) for p in params) + state) + sum(size(p.grad) for p in params if p.grad is not None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time each rule with UNFOptimizer(compile=True)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cases = {"mlp-112k (batch 128)": (lambda: mlp(64, [300, 300], 10), (128, 64)),
             "digits-cnn (batch 64)": (cnn, (64, 64))}
    rows = []
    for case, (make, shape) in cases.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g).to(dev)
        y = torch.randint(10, (shape[0],), generator=g).to(dev)
        names = ["adam", *LEARNED] + ([f"{n}+compile" for n in LEARNED] if args.compile else [])
        for name in names:
            torch.manual_seed(0)
            model = make().to(dev)
            if name == "adam":
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            else:
                opt = UNFOptimizer.for_model(model, x[:1], weights=LearnedRule.load(LEARNED[name.split("+")[0]]),
                                             compile=name.endswith("+compile"))

            def full():
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

            sync()
            t0 = time.perf_counter()
            full()  # the first step builds the plans (and compiles, with +compile)
            sync()
            first_s = time.perf_counter() - t0
            full_t = _times(full, args.repeats, sync)
            step_t = _times(opt.step, args.repeats, sync)  # gradients of the last full step stay in place
            flops, nbytes = matmul_flops(opt.step), min_bytes(opt)
            rows.append({"case": case, "optimizer": name, "params": sum(p.numel() for p in model.parameters()),
                         "full_ms": full_t, "step_ms": step_t, "first_step_s": first_s,
                         "aten_calls_per_step": aten_calls(opt.step), "step_matmul_flops": flops,
                         "step_gflops": flops / (step_t[0] / 1e3) / 1e9, "step_min_bytes": nbytes,
                         "step_gbs": nbytes / (step_t[0] / 1e3) / 1e9})
    base = {r["case"]: r["full_ms"][0] for r in rows if r["optimizer"] == "adam"}
    stamp = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
             "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(dev),
             "loadavg_1m": os.getloadavg()[0], "code": code_version(),
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "(OpenMP default)", **machine_peaks(dev, sync)}
    print(f"{stamp}")
    print("| case | optimizer | full step ms (median, min-max) | x Adam | optimizer step ms | ATen calls per step "
          "| first step s | step GFLOP/s (matmul) | step GB/s (minimum traffic) |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = Path(__file__).resolve().parent / "results" / "lopt_overhead.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            ratio = r["full_ms"][0] / base[r["case"]]
            print(f"| {r['case']} | {r['optimizer']} | {r['full_ms'][0]:.2f} ({r['full_ms'][1]:.2f}-"
                  f"{r['full_ms'][2]:.2f}) | {ratio:.2f} | {r['step_ms'][0]:.2f} | {r['aten_calls_per_step']} | "
                  f"{r['first_step_s']:.1f} | {r['step_gflops']:.2f} | {r['step_gbs']:.2f} |")
            f.write(json.dumps({**stamp, **r, "ratio_vs_adam": ratio}) + "\n")


if __name__ == "__main__":
    main()
