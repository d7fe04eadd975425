"""Time sampling from the generator's two velocity fields: 1,000 digits-mlp networks at a fixed NFE.

    python benchmarks/flow_sampling.py --threads 1 --repeats 3 --out benchmarks/results/flow_sampling.jsonl [--compile]

The fields have the shipped configurations (``unf flow train --velocity mlp`` and ``--velocity unf``) for the
digits-mlp architecture, with fresh (untrained) weights: sampling runs the same operations whatever the weights hold,
so its time does not depend on training. Appends one JSON line per field and solver (date, machine, torch version,
threads, load average at the start, since other jobs may share the cores) to ``--out`` and prints the table.
``--compile``: each field and solver is also timed with ``sample(compile=True)``; its first call, which compiles
every block shape, is reported on its own (``first_call_s``) and not in the median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_name, wall_times  # noqa: E402


def field(kind: str, spec, ws):
    """A WeightFlow with the shipped velocity configuration of ``kind`` and fresh weights."""
    from unf.flow import Conditioning, FlowConfig, Source, Standardizer, WeightFlow, build_velocity, num_parameters

    cfg = FlowConfig(velocity=kind)
    velocity = build_velocity(kind, spec, **cfg.velocity_kwargs([]))
    flow = WeightFlow(spec, velocity, Standardizer.fit(ws), Conditioning.fit([{}] * ws.batch_size, []), {}, Source())
    return flow, num_parameters(velocity)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=1000, help="networks per sample call (default 1000)")
    ap.add_argument("--nfe", type=int, default=20, help="velocity evaluations (default 20)")
    ap.add_argument("--solver", action="append", default=None, help="solvers to time (default: heun and euler)")
    ap.add_argument("--field", action="append", default=None, help="mlp and/or unf (default: both)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per field and solver (after a warm-up on 8)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--out", default="benchmarks/results/flow_sampling.jsonl")
    ap.add_argument("--compile", action="store_true", help="also time sample(compile=True)")
    ap.add_argument("--compiled-chunk", type=int, default=None, metavar="FLOATS",
                    help="hidden-state floats per compiled block of the UNF field (default: the library's, "
                         "unf.flow.velocity.COMPILED_CHUNK_ENTRIES)")
    args = ap.parse_args()

    from unf.io import atomic_write
    from unf.spec import spec_from_module
    from unf.weights import WeightSpace
    from unf.zoo.builtin import mlp

    torch.set_num_threads(args.threads)
    if args.compiled_chunk is not None:
        import unf.flow.velocity as velocity

        velocity.COMPILED_CHUNK_ENTRIES = args.compiled_chunk
    load = os.getloadavg()
    torch.manual_seed(0)
    net = mlp()
    spec = spec_from_module(net, torch.randn(2, 64))
    ws = WeightSpace.from_module(spec, [mlp() for _ in range(16)])  # only sets the (irrelevant) standardisation
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_start": list(load),
            "weights": "untrained (timing does not depend on them)", "num": args.num,
            "compiled_chunk": args.compiled_chunk}
    lines = []
    for kind in args.field or ["mlp", "unf"]:
        flow, params = field(kind, spec, ws)
        for solver, compiled in [(s, c) for s in args.solver or ["heun", "euler"]
                                 for c in ([False, True] if args.compile else [False])]:
            nfe, first = {}, {}

            def run():
                nfe["done"] = flow.sample(args.num, args.nfe, solver, seed=0, compile=compiled)[1]

            with torch.no_grad():
                if compiled:  # the first call compiles every block shape of --num networks: timed on its own
                    t0 = time.perf_counter()
                    run()
                    first["first_call_s"] = time.perf_counter() - t0
                else:
                    flow.sample(8, args.nfe, solver)  # warm-up
                times = wall_times(run, repeats=args.repeats, warmup=False)
            lines.append({**meta, "field": kind, "parameters": params, "solver": solver, "nfe": nfe["done"],
                          "compile": compiled, **first,
                          "seconds_median": statistics.median(times), "seconds": times,
                          "per_eval": statistics.median(times) / nfe["done"], "loadavg_end": list(os.getloadavg())})
            print(json.dumps(lines[-1]), flush=True)
    out = Path(args.out)
    old = out.read_text() if out.is_file() else ""
    atomic_write(out, lambda tmp: Path(tmp).write_text(old + "".join(json.dumps(x) + "\n" for x in lines)))
    print(f"\n| field | parameters | solver | {args.num:,} networks, {args.nfe} NFE (median of {args.repeats}) "
          "| per evaluation | compiled: first call | load average at start |")
    print("|---|---|---|---|---|---|---|")
    for x in lines:
        first = f"{x['first_call_s']:.1f} s" if x["compile"] else "-"
        print(f"| {x['field']}{', compiled' if x['compile'] else ''} | {x['parameters']:,} | {x['solver']} | "
              f"{x['seconds_median']:.2f} s ({min(x['seconds']):.2f}-{max(x['seconds']):.2f}) | "
              f"{x['per_eval']:.3f} s | {first} | {x['loadavg_start'][0]:.2f} |")


if __name__ == "__main__":
    main()
