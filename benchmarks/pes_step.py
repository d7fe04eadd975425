"""Meta-training throughput (issue 27): one PES outer step on the digits-MLP family of issue 29, in s/step.

    OMP_NUM_THREADS=1 python benchmarks/pes_step.py [--steps 6] [--rounds 2] [--against /tmp/old] [--profile]

One outer step: 8 antithetic pairs plus the unperturbed member (17 inner networks, a ``Population``), an unroll of 10
inner steps (forward and backward of the 17 MLPs 64-128-128-10 ReLU at batch 64, then the UNF rule on all of them with
stacked meta-parameters), the antithetic estimate and the outer Adam step. The shipped rule's configuration (variant
``unf``, hidden 8, depth 2). Each measurement is a fresh process running ``meta_train`` for ``--steps`` outer steps on
one task; the first step (it builds the task, the plans and the caches) is the warm-up, the rest are timed from the
run's own per-step log. Wall seconds and the process's CPU seconds per step (``time.process_time``, less sensitive to
other load on the cores) are both reported: median, min, max.

``--compile``: this tree meta-trains with ``meta_train(compile=True)`` (the rule's network through
``torch.compile``; the compile falls in each process's warm-up step); ``--compile-against``: so does the other tree.

``--against DIR``: a second source tree (e.g. ``git worktree add /tmp/old d9720ec``), measured in the same run,
alternating with this one (round by round), and the ratio old/new printed. A tree without task families (before
issue 29) runs the equivalent fixed MLP task (digits, widths 128,128, ReLU, batch 64, initialisation scale 1, horizon
1,000) through the task sampler. ``--profile``: where one outer step's time goes: the phases (inner forward+backward,
the rule's step, noise and the rest) and the ten ATen ops of most self CPU time.

One JSON line per tree and run is appended to ``benchmarks/results/pes_step.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _config(steps: int):
    from unf.optim.meta import MetaConfig

    # max_horizon/min_horizon only keep the config valid: the task is fixed (the family, or the patched sampler)
    return MetaConfig(steps=steps, pairs=8, unroll=10, min_horizon=10, max_horizon=1000, estimator="pes",
                      rule=dict(variant="unf"), seed=0)


def _run(steps: int, phases: dict | None = None, compile: bool = False) -> list[dict]:
    """``meta_train`` on the digits-MLP family (or the equivalent task) for ``steps`` outer steps; its log."""
    import torch

    from unf.optim import meta

    cfg = _config(steps)
    cpu = []
    last = [time.process_time()]

    def log(h):
        now = time.process_time()
        cpu.append(now - last[0])
        last[0] = now

    try:
        from unf.optim.tasks import FAMILIES
        family = FAMILIES["digits-mlp"]
    except ImportError:  # the code before issue 29: the same MLP task through the task sampler
        family = None
        fixed = meta.Task("digits-flat", (128, 128), "relu", 64, 1.0, 1000, 12345)
        meta.sample_task = lambda gen, cfg: fixed
    torch.manual_seed(0)
    kw = {"compile": True} if compile else {}
    _, history = meta.meta_train(cfg, family, log=log, **kw) if family is not None else meta.meta_train(cfg, log=log)
    return [{"seconds": h["seconds"], "cpu_seconds": c, "meta_loss": h["meta_loss"]} for h, c in zip(history, cpu)]


def _profile(compile: bool = False) -> None:
    """Phases of one outer step (after one warm-up step) and the top ATen ops by self CPU time."""
    sys.path.insert(0, str(ROOT))  # this tree's unf, not an installed one
    import torch
    from torch.profiler import ProfilerActivity, profile

    from unf.optim import meta
    from unf.zoo import population

    spent = {"inner forward+backward (member_grads)": 0.0, "rule step (flat_step)": 0.0, "noise (_noise)": 0.0}
    active = [False]

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if active[0]:
                    spent[name] += time.perf_counter() - t0
        return wrapper

    population.member_grads = timed("inner forward+backward (member_grads)", population.member_grads)
    meta.flat_step = timed("rule step (flat_step)", meta.flat_step)
    meta._noise = timed("noise (_noise)", meta._noise)
    prof = profile(activities=[ProfilerActivity.CPU])
    steps = {"n": 0, "total": 0.0}

    def log(h):
        steps["n"] += 1
        if steps["n"] == 1:  # warm-up done: record the second step
            active[0] = True
            prof.start()
        elif steps["n"] == 2:
            prof.stop()
            active[0] = False
            steps["total"] = h["seconds"]

    cfg = _config(2)
    try:
        from unf.optim.tasks import FAMILIES
        family = FAMILIES["digits-mlp"]
    except ImportError:
        family = None
        fixed = meta.Task("digits-flat", (128, 128), "relu", 64, 1.0, 1000, 12345)
        meta.sample_task = lambda gen, cfg: fixed
    torch.manual_seed(0)
    kw = {"compile": True} if compile else {}
    meta.meta_train(cfg, family, log=log, **kw) if family is not None else meta.meta_train(cfg, log=log)
    total = steps["total"]
    print(f"one outer step (profiled, so slower than the timed runs): {total:.3f} s")
    rest = total - sum(spent.values())
    for name, s in [*spent.items(), ("the rest (stacking, estimate, outer Adam, loss bookkeeping)", rest)]:
        print(f"  {name:<62} {s:7.3f} s  {100 * s / total:5.1f} %")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))


def _worker(args) -> None:
    rows = _run(args.steps, compile=args.compile)
    print(json.dumps(rows))


def _measure(tree: Path, steps: int, compile: bool = False) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    flags = ["--compile"] if compile else []
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(steps), *flags],
                         env=env, capture_output=True, text=True, cwd=str(tree))
    if out.returncode:
        raise SystemExit(f"{tree}: the worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _code(tree: Path) -> str:
    """The commit a source tree is at (``+dirty`` with changes under ``unf/``)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "unf") else "")


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="outer steps per process (the first is the warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per tree, alternating between the trees")
    ap.add_argument("--against", type=Path, default=None, help="another source tree to measure beside this one")
    ap.add_argument("--profile", action="store_true", help="where one outer step's time goes (this tree)")
    ap.add_argument("--compile", action="store_true",
                    help="this tree meta-trains with compile=True (its compile falls in the warm-up step)")
    ap.add_argument("--compile-against", action="store_true", help="so does the --against tree")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first is the warm-up)")
    if args.profile:
        return _profile(args.compile)
    sys.path.insert(0, str(HERE))
    from results_io import append_jsonl
    from timing import provenance

    trees = {"this": ROOT, **({"against": args.against.resolve()} if args.against else {})}
    timed = {k: [] for k in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            compiled = args.compile if name == "this" else args.compile_against
            timed[name] += _measure(tree, args.steps, compiled)[1:]  # the first step is the warm-up
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"one PES outer step, digits-MLP family (17 MLPs 64-128-128-10, unroll 10), OMP_NUM_THREADS={threads}, "
          f"{args.rounds} x {args.steps - 1} timed steps per tree")
    stats = {}
    for name, tree in trees.items():
        wall = _stats([r["seconds"] for r in timed[name]])
        cpu = _stats([r["cpu_seconds"] for r in timed[name]])
        stats[name] = (wall, cpu)
        print(f"  {name:>8} ({tree}, {_code(tree)}): {wall['median']:.3f} s/step wall (min {wall['min']:.3f}, max "
              f"{wall['max']:.3f}); {cpu['median']:.3f} s/step CPU (min {cpu['min']:.3f}, max {cpu['max']:.3f})")
        append_jsonl(HERE / "results" / "pes_step.jsonl",
                     {**provenance(), "tree": str(tree), "code": _code(tree), "role": name, "omp_threads": threads,
                      "compile": bool(args.compile if name == "this" else args.compile_against),
                      "rounds": args.rounds, "steps": args.steps, "wall_s": wall, "cpu_s": cpu})
    if "against" in stats:
        w = stats["against"][0]["median"] / stats["this"][0]["median"]
        c = stats["against"][1]["median"] / stats["this"][1]["median"]
        print(f"  speed-up of this tree over the other: {w:.2f}x wall, {c:.2f}x CPU (medians)")


if __name__ == "__main__":
    main()
