"""A property predictor's training step (forward, backward, AdamW) against StatNN's, side by side in one run.

    python benchmarks/predictor_step.py [--batch 64] [--repeats 7] [--threads 1] [--quick]

For the shipped predictors of ``unf.zoo.predict.PREDICTORS`` (hidden 16, as in ``unf predict fit``) on a batch of
digits-mlp and digits-cnn weights (random networks from the zoos' constructors: a step costs the same whatever the
weights hold): median wall and process CPU time per step, the ratio to StatNN, ATen calls per step and the matmul
FLOPs with the GFLOP/s achieved beside this machine's matmul peak and copy bandwidth. The fit time of ``unf predict
fit`` is this step times the number of steps plus data handling that every predictor shares, so the step ratio bounds
the fit ratio from above. One JSON line per (zoo, predictor) is appended to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl  # noqa: E402
from timing import aten_calls, code_version, machine_peaks, matmul_flops, provenance, wall_times  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--predictors", nargs="+", default=["unf", "statnn", "deepsets"])
    ap.add_argument("--quick", action="store_true", help="batch 4, 1 repeat, nothing written: a smoke test")
    ap.add_argument("--out", default="benchmarks/results/predictor_step.jsonl")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 1

    from unf.spec import spec_from_module
    from unf.weights import WeightSpace
    from unf.zoo.builtin import cnn, mlp
    from unf.zoo.predict import PREDICTORS

    torch.set_num_threads(args.threads)
    meta = {**provenance(), "code": code_version(), "threads": torch.get_num_threads(),
            "loadavg_start": list(os.getloadavg()), "batch": args.batch, **machine_peaks("cpu")}
    rows = []
    for zoo, make, example in (("digits-mlp", mlp, torch.randn(2, 64)), ("digits-cnn", cnn, torch.randn(2, 64))):
        torch.manual_seed(0)
        spec = spec_from_module(make(), example)
        ws = WeightSpace.from_module(spec, [make() for _ in range(args.batch)])
        y = torch.randn(args.batch, 1)
        for name in args.predictors:
            model = PREDICTORS[name](spec, 16)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step():
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(ws), y).backward()
                opt.step()

            wall = wall_times(step, args.repeats)
            cpu = []
            for _ in range(args.repeats):
                t0 = time.process_time()
                step()
                cpu.append(time.process_time() - t0)
            flops = matmul_flops(step)
            rows.append({**meta, "zoo": zoo, "predictor": name, "step_s": statistics.median(wall), "step_s_all": wall,
                         "step_cpu_s": statistics.median(cpu), "aten_calls": aten_calls(step), "matmul_flops": flops,
                         "gflops": flops / statistics.median(wall) / 1e9, "loadavg_end": list(os.getloadavg())})
            print(json.dumps(rows[-1]), flush=True)
    if not args.quick:
        for r in rows:
            append_jsonl(Path(args.out), r)
    print(f"\nmachine: {meta['machine']}, torch {meta['torch']}, code {meta['code']}, {meta['threads']} thread(s); "
          f"square matmul {meta['matmul_gflops']:.1f} GFLOP/s, copy {meta['copy_gbs']:.1f} GB/s")
    print("\n| zoo | predictor | step ms (CPU ms) | x StatNN | ATen calls | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["zoo"] == r["zoo"] and x["predictor"] == "statnn")
        print(f"| {r['zoo']} | {r['predictor']} | {r['step_s'] * 1e3:.1f} ({r['step_cpu_s'] * 1e3:.1f}) | "
              f"{r['step_s'] / base['step_s']:.1f} | {r['aten_calls']} | {r['gflops']:.2f} |")


if __name__ == "__main__":
    main()
