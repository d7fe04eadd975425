"""Population training (unf.zoo) against a plain sequential loop: networks trained per second, same work per network.

    python benchmarks/population_speed.py [--population 256] [--loop 8] [--epochs 2] [--repeats 3]
        [--archs mlp cnn] [--out benchmarks/results/population_speed.jsonl]

Both sides train on the embedded digits (1,437 training images), Adam, batch 64, for the same number of epochs;
the loop trains ``--loop`` networks one after another with torch.optim.Adam, the population trains
``--population`` networks at once with torch.func.vmap (in blocks of members whose activations stay under 8 MB).
Each side first runs one untimed epoch, so both are compared warm (one-time oneDNN and allocator set-up excluded).
Then the two sides alternate, ``--repeats`` times each, so that a change of load on a shared machine hits both; the
speed-up is the ratio of networks per second within each pair (median, min, max over the pairs), in wall time and
in CPU time of this process (``time.process_time``, less sensitive to other processes on the cores). One JSON line
per architecture is appended to ``--out``. Beside each: the product FLOPs of one network's training (forward and
backward of every batch, ``torch.utils.flop_counter``) and the GFLOP/s both sides achieve, against this machine's
square-matmul peak and copy bandwidth measured in the same run. About 1 minute for the default MLP and digits-CNN cases on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unf  # noqa: E402
from results_io import append_jsonl  # noqa: E402
from timing import code_version, machine_peaks, matmul_flops, provenance  # noqa: E402
from unf.training import train_classifier  # noqa: E402
from unf.zoo import Member, MixedActivation, builtin, make_population, train_population  # noqa: E402


def unstrided_cnn(population: bool = False) -> nn.Module:
    """3 conv layers of 8 channels at full 8x8 resolution (one 2x2 max-pool), global average pooling: about 3x the
    multiply-adds of the zoo's strided CNN."""
    a = MixedActivation if population else nn.ReLU
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), a(), nn.Conv2d(8, 8, 3, padding=1),
                         a(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), a(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


ARCHITECTURES = {"mlp": ("MLP 64-32-32-10 (digits-mlp zoo)", builtin.mlp),
                 "cnn": ("strided CNN (digits-cnn zoo)", builtin.cnn),
                 "unstrided": ("unstrided CNN", unstrided_cnn)}


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def training_flops(make, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 64) -> int:
    """Product FLOPs (matmuls and convolutions, forward and backward) of training one network of ``make()``."""
    model = make()

    def step():
        nn.functional.cross_entropy(model(x[:batch]), y[:batch]).backward()

    full, rest = divmod(len(x), batch)
    per_batch = matmul_flops(step)
    return epochs * (full * per_batch + (per_batch * rest // batch))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--population", type=int, default=256)
    ap.add_argument("--loop", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--archs", nargs="+", default=["mlp", "cnn"], choices=list(ARCHITECTURES))
    ap.add_argument("--out", default="benchmarks/results/population_speed.jsonl")
    args = ap.parse_args()
    split = unf.data.load("digits-flat")
    x, y = split.x_train, split.y_train
    meta = {**provenance(), "code": code_version(), "threads": torch.get_num_threads(), **machine_peaks("cpu")}
    print(f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, code {meta['code']}; digits "
          f"({len(x)} images), Adam, batch 64, {args.epochs} epochs per network, {args.repeats} alternating pairs; "
          f"square matmul {meta['matmul_gflops']:.0f} GFLOP/s, copy {meta['copy_gbs']:.1f} GB/s")
    print(f"{'architecture':<34} {'loop nets/s':>11} {'population nets/s':>18} {'speed-up wall (min-max)':>24} "
          f"{'speed-up CPU time':>18} {'GFLOP/s loop / population':>26}")
    for key in args.archs:
        name, make = ARCHITECTURES[key]
        members = [Member(seed=s) for s in range(args.population)]

        def loop():
            for seed in range(args.loop):
                torch.manual_seed(seed)
                train_classifier(make(), x, y, epochs=args.epochs, seed=seed)

        def population() -> tuple[float, float]:  # as before: the population is built outside the timer
            pop = make_population(lambda: make(population=True), members)
            return _timed(lambda: train_population(pop, x, y, epochs=args.epochs))

        train_classifier(make(), x, y, epochs=1)  # warm-up
        train_population(make_population(lambda: make(population=True), members), x, y, epochs=1)  # warm-up
        loop_rates, pop_rates, ratios, cpu_ratios = [], [], [], []
        for _ in range(args.repeats):
            lw, lc = _timed(loop)
            pw, pc = population()
            loop_rates.append(args.loop / lw)
            pop_rates.append(args.population / pw)
            ratios.append((args.population / pw) / (args.loop / lw))
            cpu_ratios.append((args.population / pc) / (args.loop / lc))
        r, rc = _stats(ratios), _stats(cpu_ratios)
        flops = training_flops(make, x, y, args.epochs)
        gf_loop, gf_pop = (flops * statistics.median(v) / 1e9 for v in (loop_rates, pop_rates))
        print(f"{name:<34} {statistics.median(loop_rates):>11.1f} {statistics.median(pop_rates):>18.1f} "
              f"{r['median']:>8.1f}x ({r['min']:.1f}-{r['max']:.1f}) {rc['median']:>17.1f}x "
              f"{gf_loop:>12.2f} / {gf_pop:.2f}", flush=True)
        fused = len(getattr(make_population(lambda: make(population=True), members[:1]), "fused", []))
        append_jsonl(Path(args.out), {
            **meta, "architecture": key, "population": args.population, "loop": args.loop, "epochs": args.epochs,
            "repeats": args.repeats, "fused_convolutions": fused, "loop_nets_per_s": loop_rates,
            "population_nets_per_s": pop_rates, "speedup_wall": r, "speedup_cpu": rc, "flops_per_network": flops,
            "gflops_loop": gf_loop, "gflops_population": gf_pop})


if __name__ == "__main__":
    main()
