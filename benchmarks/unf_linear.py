"""UNFLinear against nfn's NPLinear on one MLP weight space, and UNF term counts/timings on larger specs.

    python benchmarks/unf_linear.py [--repeats 10] [--compile]

1. Forward+backward time of ``UNFLinear`` (every fixed axis a pseudo-group: the NFN-NP setting) and ``nfn.NPLinear``
   on the weights of 64 MLPs 64-128-128-10, 16 -> 16 channels, float32, measured in one run; and the memory-bound
   floor: one element-wise pass (``w * 2 + 1``) over the same tensors, forward+backward.
2. Peak memory of UNFLinear (forward without grad; forward+backward), in fresh processes, against input + output.
3. Term counts, parameters and forward+backward time for a 2-block transformer spec and a ResNet-20 spec.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import models  # noqa: E402

import unf  # noqa: E402
from unf.nn import UNFLinear  # noqa: E402
from timing import median_time  # noqa: E402


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    return median_time(fn, repeats, sync=_sync)


def mlp_spec():
    return unf.spec_from_module(models.mlp(64, (128, 128), 10), torch.randn(1, 64))


NAMES = ("0.weight", "2.weight", "4.weight", "0.bias", "2.bias", "4.bias")  # part 1's MLP, nfn's order


def nfn_features(ws):
    """Part 1's weight space as nfn's ``WeightSpaceFeatures`` (weights, then biases)."""
    from nfn.common import WeightSpaceFeatures

    return WeightSpaceFeatures([ws[n] for n in NAMES[:3]], [ws[n] for n in NAMES[3:]])


def random_ws(spec, batch, channels, requires_grad=False):
    return unf.WeightSpace(spec, {n: torch.randn(batch, channels, *spec[n].shape, device=DEVICE,
                                                 requires_grad=requires_grad) for n in spec.float_names})


def versus_nfn(repeats: int, batch: int = 64, compile: bool = False) -> None:
    rows = _mlp_case(batch)
    if "nfn NPLinear" not in rows:
        raise SystemExit("part 1 compares with nfn's NPLinear: pip install nfn")
    if compile:  # the same layer and input through torch.compile (compiled here, before the timing)
        fn, layer = rows["unf UNFLinear (fold_max=0)"]
        compiled = torch.compile(layer)
        ws = fn.ws

        def run_compiled():
            sum(t.square().sum() for t in compiled(ws).values()).backward()

        t0 = time.perf_counter()
        run_compiled()
        print(f"torch.compile of UNFLinear: {time.perf_counter() - t0:.1f} s (first call)")
        rows = {**rows, "unf UNFLinear, compiled": (run_compiled, layer)}
    res = {name: timed(fn, repeats) for name, (fn, _) in rows.items()}
    print(f"\n1. MLP 64-128-128-10 weight space, {batch} networks, 16 -> 16 channels, float32, forward+backward, "
          f"{DEVICE.type}")
    print(f"{'layer':<28} {'params':>8} {'median ms':>10} {'vs nfn':>7} {'vs floor':>9}")
    for name, (_, mod) in rows.items():
        n = sum(p.numel() for p in mod.parameters()) if mod is not None else 0
        print(f"{name:<28} {n:>8} {res[name] * 1e3:>10.1f} {res[name] / res['nfn NPLinear']:>7.2f} "
              f"{res[name] / res['floor: w*2+1']:>9.2f}")
    # the roofline of the UNF layer: what its plan needs (UNFLinear.cost) against this machine's peaks, measured now
    from timing import machine_peaks

    peaks = machine_peaks(DEVICE, _sync)
    plan = rows["unf UNFLinear (fold_max=0)"][1].cost(batch, backward=True)
    for name in [k for k in res if k.startswith("unf")]:
        print(f"{name}: the plan's {plan['flops'] / 1e9:.2f} GFLOP and {plan['bytes'] / 1e6:.0f} MB per forward+"
              f"backward -> {plan['flops'] / res[name] / 1e9:.1f} GFLOP/s (square matmul "
              f"{peaks['matmul_gflops']:.0f}), {plan['bytes'] / res[name] / 1e9:.2f} GB/s (copy "
              f"{peaks['copy_gbs']:.1f})")


def _mlp_case(batch: int) -> dict:
    """Part 1's weight space and its forward+backward calls: ``{name: (fn, module or None)}`` (nfn when installed)."""
    torch.manual_seed(0)
    spec = mlp_spec()
    ws = random_ws(spec, batch, 16, requires_grad=True)
    ours = UNFLinear(spec, 16, 16, fold_max=0).to(DEVICE)
    def run_ours():
        sum(t.square().sum() for t in ours(ws).values()).backward()

    run_ours.ws = ws  # the input, for a compiled copy of the same call
    rows = {"unf UNFLinear (fold_max=0)": (run_ours, ours),
            "floor: w*2+1": (lambda: sum((ws[n] * 2 + 1).square().sum() for n in NAMES).backward(), None)}
    try:
        from nfn.common import network_spec_from_wsfeat
        from nfn.layers import NPLinear
    except ImportError:
        return rows
    feats = nfn_features(ws)
    theirs = NPLinear(network_spec_from_wsfeat(feats), 16, 16).to(DEVICE)

    def run_theirs():
        out = theirs(feats)
        (sum(t.square().sum() for t in out.weights) + sum(t.square().sum() for t in out.biases)).backward()

    rows["nfn NPLinear"] = (run_theirs, theirs)
    return rows


def _load_child(batch: int) -> None:
    """The competing process of :func:`contention`: UNFLinear forward+backward in a loop, 2 threads, until killed."""
    torch.set_num_threads(2)
    run = _mlp_case(batch)["unf UNFLinear (fold_max=0)"][0]
    run()
    print("ready", flush=True)
    while True:
        run()


def contention(repeats: int, batch: int) -> list[dict]:
    """Part 1's calls alone, then while a second process runs UNFLinear with 2 threads, for 1 and 2 threads here."""
    from timing import provenance

    rows = []
    for phase in ("alone", "contended"):
        child = None
        if phase == "contended":
            child = subprocess.Popen([sys.executable, __file__, "--load-child", str(batch)], stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            assert child.stdout.readline().strip() == "ready"
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for name, (fn, _) in _mlp_case(batch).items():
                    rows.append({"phase": phase, "threads": threads, "layer": name, "ms": timed(fn, repeats) * 1e3,
                                 "loadavg_1m": os.getloadavg()[0]})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if child is not None:
                child.kill()
                child.wait()
    meta = {**provenance(), "batch": batch, "repeats": repeats,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "(OpenMP default)"}
    print(f"\n4. Under contention: {batch} MLPs 64-128-128-10, 16 -> 16 channels, forward+backward, median of "
          f"{repeats}, alone and while a second process runs UNFLinear forward+backward with 2 threads; "
          f"OMP_WAIT_POLICY {meta['omp_wait_policy']}")
    print("| layer | threads here | alone ms | contended ms | contended / alone |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["phase"] == "alone":
            c = next(x for x in rows if x["phase"] == "contended" and x["threads"] == r["threads"]
                     and x["layer"] == r["layer"])
            print(f"| {r['layer']} | {r['threads']} | {r['ms']:.1f} | {c['ms']:.1f} | {c['ms'] / r['ms']:.2f} |")
    return [{**meta, **r} for r in rows]


def _memory_child(batch: int, train: bool, nfn: bool = False) -> None:
    spec = mlp_spec()
    if nfn:
        from nfn.common import network_spec_from_wsfeat
        from nfn.layers import NPLinear

        layer = NPLinear(network_spec_from_wsfeat(nfn_features(random_ws(spec, 1, 16))), 16, 16)

        def call(ws):
            out = layer(nfn_features(ws))
            return list(out.weights) + list(out.biases)
    else:
        layer = UNFLinear(spec, 16, 16, fold_max=0)

        def call(ws):
            return list(layer(ws).values())
    with torch.set_grad_enabled(train):
        call(random_ws(spec, 1, 16))  # one-time set-up (threads, kernels) at a negligible size
        ws = random_ws(spec, batch, 16, requires_grad=train)
        nbytes = sum(t.numel() * t.element_size() for t in ws.values())
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = call(ws)
        if train:
            sum(t.sum() for t in out).backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"in_bytes": nbytes, "out_bytes": sum(t.numel() * t.element_size() for t in out),
                      "growth": peak - base}))


def memory(batch: int) -> None:
    print(f"\n2. Peak memory, {batch} MLPs 64-128-128-10, 16 -> 16 channels, float32 "
          "(growth of the process's peak RSS: output, gradients and every intermediate), worst of 3 processes")
    # a fixed mmap threshold makes glibc return every large block at once, so peak RSS measures live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    try:
        import nfn  # noqa: F401
        layers = ("unf UNFLinear", "nfn NPLinear")
    except ImportError:
        layers = ("unf UNFLinear",)
    for name in layers:
        for train in (False, True):
            cmd = [sys.executable, __file__, "--memory-child", str(batch)] + (["--train"] if train else []) + \
                (["--memory-nfn"] if name.startswith("nfn") else [])
            runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                               .split("\n")[-2]) for _ in range(3)]
            r = max(runs, key=lambda run: run["growth"])  # RSS readings vary a little: the worst of 3 processes
            io = r["in_bytes"] + r["out_bytes"]
            print(f"{name:<14} {'forward+backward' if train else 'forward, no grad':<17} input "
                  f"{r['in_bytes'] / 2**20:.0f} MiB, output {r['out_bytes'] / 2**20:.0f} MiB, growth "
                  f"{r['growth'] / 2**20:.0f} MiB: peak / (input + output) = {(r['in_bytes'] + r['growth']) / io:.2f}")


def larger_specs(repeats: int) -> None:
    print("\n3. Larger specs: one UNFLinear 8 -> 8 channels, batch 8, fold_max=4 (default), float32")
    print(f"{'spec':<34} {'tensors':>7} {'pieces':>6} {'terms':>7} {'params':>8} {'build s':>8} {'fwd+bwd ms':>10}")
    cases = [("transformer, 2 blocks, d=64, 4 heads", models.vit(depth=2, dim=64, heads=4), torch.randn(1, 3, 32, 32)),
             ("ResNet-20 (x1, BatchNorm)", models.resnet20(), torch.randn(1, 3, 32, 32))]
    for name, model, x in cases:
        spec = unf.spec_from_module(model, x)
        t0 = time.perf_counter()
        layer = UNFLinear(spec, 8, 8).to(DEVICE)
        build = time.perf_counter() - t0
        ws = random_ws(spec, 8, 8, requires_grad=True)

        def run():
            sum(t.square().sum() for t in layer(ws).values()).backward()

        t = timed(run, max(1, repeats // 3))
        n = sum(p.numel() for p in layer.parameters())
        print(f"{name:<34} {len(spec.float_names):>7} {len(layer.layout.pieces):>6} "
              f"{sum(layer.num_terms().values()):>7} {n:>8} {build:>8.2f} {t * 1e3:>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--memory-batch", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the memory part runs on the CPU only)")
    ap.add_argument("--batch", type=int, nargs="+", default=[64], help="networks per batch in part 1")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-nfn", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help="only part 2 (peak memory; any load)")
    ap.add_argument("--contention", action="store_true",
                    help="only part 4: part 1's layers alone and beside a second process (JSON lines to --out)")
    ap.add_argument("--out", default="benchmarks/results/unf_linear_contention.jsonl")
    ap.add_argument("--load-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help="part 1 also times UNFLinear through torch.compile")
    args = ap.parse_args()
    if args.memory_child is not None:
        _memory_child(args.memory_child, args.train, args.memory_nfn)
        return
    if args.load_child is not None:
        _load_child(args.load_child)
        return
    if args.contention:
        from results_io import append_jsonl

        for r in contention(args.repeats, args.batch[0]):
            append_jsonl(Path(args.out), r)
        return
    global DEVICE
    DEVICE = torch.device(args.device)
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {platform.machine()}, median of {args.repeats}")
    if args.memory_only:
        memory(args.memory_batch)
        return
    for batch in args.batch:
        versus_nfn(args.repeats, batch, args.compile)
    if DEVICE.type == "cpu":
        memory(args.memory_batch)
    larger_specs(args.repeats)


if __name__ == "__main__":
    main()
