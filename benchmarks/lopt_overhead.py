"""Overhead of the learned optimizers against Adam, side by side in one run.

    python benchmarks/lopt_overhead.py [--repeats 30] [--device cpu|cuda]

For an MLP 64-300-300-10 (~112k parameters) at batch 128 and the digits CNN at batch 64: the time of a full training
step (forward, backward, optimizer step) and of the optimizer step alone, for Adam and the three learned rules (UNF,
DeepSets, per-parameter MLP) with their shipped weights. Medians over ``--repeats`` (after a warm-up), min and max
beside them; one JSON line per run appended to ``benchmarks/results/lopt_overhead.jsonl``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lopt_eval import LEARNED  # noqa: E402
from timing import wall_times  # noqa: E402

from unf.optim import LearnedRule, UNFOptimizer  # noqa: E402
from unf.optim.tasks import mlp  # noqa: E402
from unf.zoo.builtin import cnn  # noqa: E402


def _times(fn, repeats, sync):
    fn()  # one more warm-up call: the first builds the plans
    out = wall_times(fn, repeats, sync=sync)
    return statistics.median(out) * 1e3, min(out) * 1e3, max(out) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
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
        for name in ("adam", *LEARNED):
            torch.manual_seed(0)
            model = make().to(dev)
            if name == "adam":
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            else:
                opt = UNFOptimizer.for_model(model, x[:1], weights=LearnedRule.load(LEARNED[name]))

            def full():
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

            full_t = _times(full, args.repeats, sync)
            step_t = _times(opt.step, args.repeats, sync)  # gradients of the last full step stay in place
            rows.append({"case": case, "optimizer": name, "params": sum(p.numel() for p in model.parameters()),
                         "full_ms": full_t, "step_ms": step_t})
    base = {r["case"]: r["full_ms"][0] for r in rows if r["optimizer"] == "adam"}
    stamp = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
             "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(dev)}
    print(f"{stamp}")
    print("| case | optimizer | full step ms (median, min-max) | x Adam | optimizer step ms |")
    print("|---|---|---|---|---|")
    out = Path(__file__).resolve().parent / "results" / "lopt_overhead.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            ratio = r["full_ms"][0] / base[r["case"]]
            print(f"| {r['case']} | {r['optimizer']} | {r['full_ms'][0]:.2f} ({r['full_ms'][1]:.2f}-"
                  f"{r['full_ms'][2]:.2f}) | {ratio:.2f} | {r['step_ms'][0]:.2f} |")
            f.write(json.dumps({**stamp, **r, "ratio_vs_adam": ratio}) + "\n")


if __name__ == "__main__":
    main()
