"""Flow-matching training rate, eager against ``torch.compile`` (``train_flow(compile=True)``), side by side.

    python benchmarks/flow_train_rate.py [--cases wine-sinkhorn digits-unf digits-sinkhorn digits-mlp-field]
                                         [--steps 30] [--threads 1] [--quick]

One training step as ``train_flow`` takes it (the flow-matching loss, backward, gradient clipping, AdamW) at batch
``--batch``, on random networks of the case's architecture (the cost does not depend on their values). Per case, in
one process: the eager step (median over ``--steps`` after warm-up), then the compiled one (its first call, the
compile included, reported apart; then the median as before), and the ATen calls of one eager step. Cases:

- ``wine-sinkhorn``: wine 13-16-16-3 MLP, the UNF field of the orbit rung (hidden 16, depth 2, Sinkhorn unit memory of
  64 prototypes, rank-8 pair tables; BENCHMARKS.md "Why the samples were not the base");
- ``digits-unf``: the digits MLP 64-32-32-10 of ``unf.zoo.builtin``, the UNF field as shipped (hidden 16, depth 2);
- ``digits-sinkhorn``: the same with the Sinkhorn unit memory (64 prototypes);
- ``digits-mlp-field``: the same zoo, DeepWeightFlow's MLP field (4.1M parameters).

One JSON line per case is appended to ``--out``; the table is printed.
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
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl  # noqa: E402
from timing import aten_calls, code_version, provenance, wall_times  # noqa: E402

SINKHORN = dict(unit_hidden=64, unit_activation="sinkhorn")
CASES = {
    "wine-sinkhorn": ("wine", "unf", dict(**SINKHORN, unit_rank=8)),
    "digits-unf": ("digits", "unf", {}),
    "digits-sinkhorn": ("digits", "unf", SINKHORN),
    "digits-mlp-field": ("digits", "mlp", {}),
}


def architecture(data: str, quick: bool):
    from unf.zoo.builtin import mlp

    if data == "digits" and not quick:
        return mlp, torch.randn(2, 64)
    widths = (13, 16, 16, 3) if not quick else (5, 4, 3)

    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))

    return make, torch.randn(2, widths[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--out", default="benchmarks/results/flow_train_rate.jsonl")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 4, 2

    import torch._dynamo as dynamo

    from unf.flow.train import DEFAULT_VELOCITY, _Objective
    from unf.nn.compiled import Compiled
    from unf.flow.velocity import build_velocity, num_parameters
    from unf.spec import spec_from_module
    from unf.weights import WeightSpace

    torch.set_num_threads(args.threads)
    meta = {**provenance(), "code": code_version(), "threads": torch.get_num_threads(), "batch": args.batch}
    rows = []
    for name in args.cases:
        data, kind, extra = CASES[name]
        make, x = architecture(data, args.quick)
        torch.manual_seed(0)
        spec = spec_from_module(make(), x)
        cfg = {**DEFAULT_VELOCITY[kind], **extra}
        if args.quick:
            cfg = {**cfg, "hidden": 8, **({"unit_hidden": 4} if "unit_hidden" in cfg else {})}
        xb = WeightSpace.from_module(spec, [make() for _ in range(args.batch)])
        t, target = torch.rand(args.batch), xb * 0.5
        row = {**meta, "case": name, "field": kind, "velocity_config": cfg, "loadavg_start": list(os.getloadavg())}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            velocity = build_velocity(kind, spec, **cfg)
            row["parameters"] = num_parameters(velocity)
            objective = _Objective(velocity)
            if mode == "compiled":
                dynamo.reset()
                objective = Compiled(objective, "flow_train_rate")
            opt = torch.optim.AdamW(velocity.parameters(), lr=1e-4)

            def step():
                loss = objective(xb, t, None, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(velocity.parameters(), 1.0)
                opt.step()

            t0 = time.perf_counter()
            step()  # eager: warm-up; compiled: the compile
            row[f"{mode}_first_s"] = time.perf_counter() - t0
            times = wall_times(step, args.steps)
            row[f"{mode}_step_ms"] = 1e3 * statistics.median(times)
            row[f"{mode}_step_ms_min_max"] = [1e3 * min(times), 1e3 * max(times)]
            if mode == "eager":
                row["aten_calls_eager"] = aten_calls(step)
            elif objective.compiled is None:
                row["compile_failed"] = True
        row["speedup"] = row["eager_step_ms"] / row["compiled_step_ms"]
        row["loadavg_end"] = list(os.getloadavg())
        append_jsonl(Path(args.out), row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| case | field params | eager ms/step (min-max) | compiled ms/step (min-max) | speed-up | steps/s eager "
          f"-> compiled | compile (first step) | ATen calls per eager step |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, c = r["eager_step_ms"], r["compiled_step_ms"]
        print(f"| {r['case']} | {r['parameters'] / 1e3:.0f}k | {e:.1f} ({r['eager_step_ms_min_max'][0]:.1f}-"
              f"{r['eager_step_ms_min_max'][1]:.1f}) | {c:.1f} ({r['compiled_step_ms_min_max'][0]:.1f}-"
              f"{r['compiled_step_ms_min_max'][1]:.1f}) | {r['speedup']:.2f}x | {1e3 / e:.1f} -> {1e3 / c:.1f} | "
              f"{r['compiled_first_s']:.0f} s | {r['aten_calls_eager']:,} |")


if __name__ == "__main__":
    main()
