"""The UNF velocity field's cost, against its own channel-mixing GEMMs and the MLP field, side by side in one run.

    python benchmarks/flow_field.py [--widths 16 64] [--batch 1000] [--repeats 3] [--threads 1] [--compile] [--quick]

For the digits-mlp architecture and the shipped field configuration (``DEFAULT_VELOCITY["unf"]``, hidden width
varied), with random weights (the cost does not depend on them):

- one evaluation at ``--batch`` networks (no gradients, as in sampling), wall and process CPU time;
- its matrix products alone: every ``bmm``/``baddbmm``/``mm``/``addmm`` the evaluation calls, replayed with the same
  shapes on fresh operands (the GEMM floor), and the evaluation's ratio to it;
- FLOPs (``torch.utils.flop_counter``) and bytes touched by all non-view ATen ops (each operand once per op), with
  the GFLOP/s and GB/s achieved beside this machine's square-matmul peak and copy bandwidth, measured in the run;
- with ``--compile``, the same evaluation through ``torch.compile`` (``compile_inference``, as ``unf flow sample
  --compile`` runs it: blocks of ``COMPILED_CHUNK_ENTRIES``), its compile apart, and its ratio to the same GEMM floor
  (inductor calls the products as extern kernels of the same sizes, in smaller chunks);
- sampling ``--batch`` networks at ``--nfe`` Euler steps with the UNF field (first width) and the MLP field;
- training steps per second at batch ``--train-batch`` (forward, backward, AdamW step of the flow-matching loss).

One JSON line per width (and one for the MLP field) is appended to ``--out``; the table is printed.
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
from timing import code_version, machine_peaks, matmul_flops, op_log, provenance, wall_times  # noqa: E402

GEMMS = ("aten.bmm", "aten.baddbmm", "aten.mm", "aten.addmm")


def cpu_times(fn, repeats: int) -> list[float]:
    """Process CPU seconds of ``fn()`` per call (after a warm-up): less sensitive to other jobs than wall time."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return out


def gemm_floor(log: list, repeats: int) -> float:
    """Seconds to run the logged matrix products alone, same shapes, fresh operands (median of ``repeats``)."""
    calls = []
    for name, _, shapes in log:
        if name in GEMMS:
            args = [torch.randn(s) for s in shapes]
            op = {"aten.bmm": torch.bmm, "aten.baddbmm": torch.baddbmm, "aten.mm": torch.mm,
                  "aten.addmm": torch.addmm}[name]
            calls.append((op, args))

    def run():
        for op, args in calls:
            op(*args)

    return statistics.median(wall_times(run, repeats))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true", help="also time the evaluation through torch.compile")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--out", default="benchmarks/results/flow_field.jsonl")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.batch, args.nfe, args.train_batch, args.repeats = [8], 16, 2, 8, 1

    from unf.flow import Conditioning, Source, Standardizer, WeightFlow, build_velocity
    from unf.flow.train import DEFAULT_VELOCITY, _Objective
    from unf.spec import spec_from_module
    from unf.weights import WeightSpace
    from unf.zoo.builtin import mlp
    from flow_sampling import field

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = spec_from_module(mlp(), torch.randn(2, 64))
    x = WeightSpace.from_module(spec, [mlp() for _ in range(args.batch)])
    t = torch.rand(args.batch)
    meta = {**provenance(), "code": code_version(), "threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg()),
            "batch": args.batch, **machine_peaks("cpu")}
    lines = []

    def train_rate(velocity) -> float:
        xb = WeightSpace.from_module(spec, [mlp() for _ in range(args.train_batch)])
        tb, target = torch.rand(args.train_batch), xb * 0.5
        obj = _Objective(velocity)
        opt = torch.optim.AdamW(velocity.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            obj(xb, tb, None, target).backward()
            opt.step()

        return 1.0 / statistics.median(wall_times(step, args.repeats + 2))

    for width in args.widths:
        velocity = build_velocity("unf", spec, **{**DEFAULT_VELOCITY["unf"], "hidden": width})
        with torch.no_grad():
            for p in velocity.parameters():
                p.normal_(0, 0.2)  # the output layer starts at zero: give every layer work to do
            evaluate = lambda: velocity(x, t)  # noqa: E731
            wall = wall_times(evaluate, args.repeats)
            cpu = cpu_times(evaluate, args.repeats)
            log = op_log(evaluate)
            flops = matmul_flops(evaluate)
            floor = gemm_floor(log, args.repeats)
        row = {**meta, "field": "unf", "width": width, "eval_s": statistics.median(wall), "eval_s_all": wall,
               "eval_cpu_s": statistics.median(cpu), "gemm_floor_s": floor,
               "ratio_to_gemms": statistics.median(wall) / floor, "aten_calls": len(log),
               "gemm_calls": sum(n in GEMMS for n, _, _ in log), "matmul_flops": flops,
               "bytes": sum(b for _, b, _ in log)}
        row["gflops"] = flops / row["eval_s"] / 1e9
        row["gbs"] = row["bytes"] / row["eval_s"] / 1e9
        if args.compile:
            velocity.compile_inference()
            with torch.no_grad():
                t0 = time.perf_counter()
                evaluate()  # compiles
                row["compile_s"] = time.perf_counter() - t0
                wall_c = wall_times(evaluate, args.repeats)
            velocity.compile_inference(False)
            row.update(eval_compiled_s=statistics.median(wall_c), eval_compiled_s_all=wall_c,
                       ratio_to_gemms_compiled=statistics.median(wall_c) / floor,
                       gflops_compiled=flops / statistics.median(wall_c) / 1e9)
        if width == args.widths[0]:
            flow = WeightFlow(spec, velocity, Standardizer.fit(x), Conditioning.fit([{}] * x.batch_size, []), {},
                              Source())
            row["sample_s"] = statistics.median(wall_times(lambda: flow.sample(args.batch, args.nfe, "euler"),
                                                           max(1, args.repeats - 1)))
            row["nfe"] = args.nfe
        row["train_steps_per_s"] = train_rate(velocity)
        row["loadavg_end"] = list(os.getloadavg())
        lines.append(row)
        print(json.dumps(row), flush=True)
    flow, _ = field("mlp", spec, x)
    with torch.no_grad():
        wall = wall_times(lambda: flow.velocity(x, t), args.repeats)
        sample = statistics.median(wall_times(lambda: flow.sample(args.batch, args.nfe, "euler"),
                                              max(1, args.repeats - 1)))
    lines.append({**meta, "field": "mlp", "eval_s": statistics.median(wall), "eval_s_all": wall, "sample_s": sample,
                  "nfe": args.nfe, "train_steps_per_s": train_rate(flow.velocity),
                  "loadavg_end": list(os.getloadavg())})
    print(json.dumps(lines[-1]), flush=True)
    if not args.quick:
        for r in lines:
            append_jsonl(Path(args.out), r)
    print(f"\nmachine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s); square matmul "
          f"{meta['matmul_gflops']:.1f} GFLOP/s, copy {meta['copy_gbs']:.1f} GB/s; load average "
          f"{meta['loadavg_start'][0]:.2f} at the start")
    print(f"\n| field | width | one evaluation, {args.batch:,} networks (CPU s) | GEMMs alone | x GEMMs | GFLOP/s | "
          f"GB/s touched | compiled evaluation (x GEMMs, GFLOP/s) | {args.batch:,} networks at {args.nfe} NFE | "
          f"training steps/s (batch {args.train_batch}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in lines:
        if r["field"] == "unf":
            comp = (f"{r['eval_compiled_s']:.3f} s ({r['ratio_to_gemms_compiled']:.2f}, {r['gflops_compiled']:.1f})"
                    if "eval_compiled_s" in r else "")
            print(f"| unf | {r['width']} | {r['eval_s']:.3f} s ({r['eval_cpu_s']:.3f}) | {r['gemm_floor_s']:.3f} s | "
                  f"{r['ratio_to_gemms']:.2f} | {r['gflops']:.1f} | {r['gbs']:.1f} | {comp} | "
                  f"{r.get('sample_s', float('nan')):.1f} s | {r['train_steps_per_s']:.1f} |")
        else:
            print(f"| mlp | 512 | {r['eval_s']:.3f} s | | | | | | {r['sample_s']:.1f} s | "
                  f"{r['train_steps_per_s']:.1f} |")


if __name__ == "__main__":
    main()
