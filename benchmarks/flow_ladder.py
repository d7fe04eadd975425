"""The generator's diagnostic ladder (issue 28, item 1): zoos where the right answer is known.

    python benchmarks/flow_ladder.py run --rung orbit --velocity unf --steps 2000 [--seed 0] \
        [--set KEY=VALUE ...] [--vset KEY=VALUE ...] [--runs runs/ladder]
    python benchmarks/flow_ladder.py table
    python benchmarks/flow_ladder.py units --rung orbit --data wine --widths 16,16 RUN_NAME ...
    python benchmarks/flow_ladder.py samplers --data wine --widths 16,16 --num 1000 \
        --sampler heun:20:0 --sampler euler:20:2 RUN_NAME

Rungs (digits MLP 64-32-32-10, ReLU; base networks trained with Adam on the digits training split):
- ``orbit``: ONE base network and ``--copies`` (300) random members of its permutation orbit, each plus Gaussian
  noise of 1 % of each tensor's std (``unf.zoo.synthetic.orbit_zoo``). One function in many permutations.
- ``two``: two independently trained base networks, half the zoo each.

Each run trains a flow (``unf.flow.train_flow``, resumable: its checkpoint lives in ``--runs``), samples ``--num``
networks at 20 NFE (Heun), and appends one JSON line to ``benchmarks/results/flow_ladder.jsonl``: the loss at the
end, sample test accuracy (digits test split; evaluation only, no choice is made on it), agreement of the samples
with each other, each sample's aligned L2 distance to the nearest base (weight matching, ``unf.align``), its raw L2
distance to the nearest training copy, and the reference scales: the copies' own noise norm and the aligned distance
between two independently trained networks. A sample "hits" when its aligned distance to a base is below a quarter of
that distance between independent networks; it is "new" when its raw distance to every training copy exceeds half
the median distance from a copy to its nearest other copy (the orbit members differ by their permutation, noise alone is 1 % of it).
"Distinct units" (orbit rung): how many different base units the first hidden layer of a sample holds, each of its
units taken as the base unit nearest by incoming weights and bias; a sample that writes two units from one base unit
(a collision) and loses another has fewer than the layer's width. ``units`` computes it for runs already in the
results (their flows are read from ``--runs``; it needs the same ``--rung --data --widths``).
``--set``: FlowConfig fields (JSON values); ``--vset``: velocity_config overrides.
``samplers`` (orbit rung): one trained run sampled by several samplers (``SOLVER:NFE:CHURN``; churn > 0 is the
stochastic sampler of ``unf.flow.solvers``), the same noise seed for each, ``--num`` networks in batches of 200; one
JSON line per sampler in ``benchmarks/results/flow_samplers.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl, load_jsonl  # noqa: E402
from timing import code_version, provenance  # noqa: E402

RESULTS = Path("benchmarks/results/flow_ladder.jsonl")


def base_networks(k: int, data: str = "digits", widths=(32, 32), epochs: int = 40):
    """``k`` MLPs (ReLU, ``widths``) trained independently on ``data`` (seeds 0..k-1) and one more (seed 1000) for
    the distance scale. Returns the spec, the networks ``[k + 1, 1]``, their test accuracies, the data and a
    constructor of the architecture."""
    from unf.data import load
    from unf.optim.tasks import mlp
    from unf.spec import spec_from_module
    from unf.training import evaluate, train_classifier
    from unf.weights import WeightSpace

    split = load(data)
    d = argparse.Namespace(x_train=split.x_train.flatten(1), y_train=split.y_train, x_test=split.x_test.flatten(1),
                           y_test=split.y_test)  # the MLP reads flattened inputs (digits: 8x8)
    classes = int(d.y_train.max()) + 1
    make = lambda: mlp(d.x_train.shape[1], list(widths), classes)  # noqa: E731
    mu, sd = d.x_train.mean(0), d.x_train.std(0).clamp_min(1e-6)
    if data != "digits":  # tabular features on very different scales
        d.x_train, d.x_test = (d.x_train - mu) / sd, (d.x_test - mu) / sd
    nets, accs = [], []
    for seed in list(range(k)) + [1000]:
        torch.manual_seed(seed)
        net = train_classifier(make(), d.x_train, d.y_train, epochs=epochs, seed=seed)
        nets.append(net)
        accs.append(evaluate(net, d.x_test, d.y_test)[1])
    spec = spec_from_module(make(), d.x_train[:2])
    ws = WeightSpace.from_module(spec, nets)
    return spec, ws, accs, d, make


@torch.no_grad()
def distinct_units(spec, samples, base) -> torch.Tensor:
    """``[N]``: distinct base units among the first hidden layer's units of each sample (orbit rung: ``base`` is
    one network); each unit is matched to the base unit nearest by its incoming weights and bias."""
    w, b = spec.float_names[:2]  # the first Linear's weight [n, in] and bias [n]
    rows = torch.cat([samples[w][:, 0], samples[b][:, 0, :, None]], -1).double()
    ref = torch.cat([base[w][0, 0], base[b][0, 0, :, None]], -1).double()
    near = torch.cdist(rows, ref.expand(len(rows), -1, -1)).argmin(-1)  # [N, n]
    return torch.tensor([float(len(set(r.tolist()))) for r in near])


@torch.no_grad()
def data_error_by_t(flow, zoo, ts=(0.1, 0.3, 0.5, 0.7, 0.9), n: int = 256, seed: int = 0) -> dict:
    """Per time ``t``: the field's mean squared error of its clean-weights estimate ``x_t + (1 - t) v`` against the
    target (standardised coordinates, independent noise), over that of the zoo's mean (what a collapsed field
    predicts). Below 1: the field knows more than the mean at that noise level."""
    from unf.weights import WeightSpace

    g = torch.Generator().manual_seed(seed)
    flat = flow.standardizer.to_std(zoo).flatten()
    x1 = flat[torch.randint(len(flat), (n,), generator=g)]
    mean = flat.mean(0)
    out = {}
    flow.velocity.eval()
    for t in ts:
        x0 = flow.source.draw(torch.randn(x1.shape, generator=g))
        xt = (1 - t) * x0 + t * x1
        tt = torch.full((n,), t)
        v = flow.velocity(WeightSpace.from_flat(zoo.spec, xt), tt, None).flatten()
        est = xt + (1 - t) * v
        out[str(t)] = float((est - x1).square().mean() / (mean - x1).square().mean())
    return out


def run(args) -> None:
    from unf.flow import FlowConfig, train_flow
    from unf.flow.novelty import agreement, aligned_l2, stacked_logits
    from unf.weights import WeightSpace
    from unf.zoo.synthetic import nearest_base, orbit_zoo

    torch.set_num_threads(args.threads)
    k = {"orbit": 1, "two": 2}[args.rung]
    from unf.cli.common import parse_kwargs

    cfg_over, v_over = parse_kwargs(args.set), parse_kwargs(args.vset)
    arch = [] if (args.data, args.widths) == ("digits", "32,32") else [f"{args.data}{args.widths.replace(',', 'x')}"]
    name = "-".join([args.rung] + arch + [args.velocity, f"s{args.seed}", f"n{args.steps}"]
                    + [f"{a}={b}" for a, b in sorted({**cfg_over, **{"v." + x: y for x, y in v_over.items()}}.items())])
    run_name = name  # the training run; the sampler, when not the default, names the results row only
    sampler = (args.solver, args.nfe, args.churn)
    if sampler != ("heun", 20, 0.0):
        name += f"-sample={args.solver}{args.nfe}" + (f"c{args.churn:g}" if args.churn else "")
    results = Path(args.results)
    done = {r["name"] for r in load_jsonl(results, key=lambda r: r["name"])}
    if name in done and not args.force:
        print(f"{name}: already in {results}")
        return
    widths = [int(w) for w in args.widths.split(",")]
    spec, all_base, base_acc, d, mlp = base_networks(k, args.data, widths, args.base_epochs)
    base = WeightSpace(spec, {n: t[:k] for n, t in all_base.items()})
    other = WeightSpace(spec, {n: t[k:] for n, t in all_base.items()})
    zoo, labels = orbit_zoo(base, args.copies // k, noise=args.noise, seed=args.seed)
    cfg = FlowConfig(velocity=args.velocity, steps=args.steps, seed=args.seed, velocity_config=v_over, **cfg_over)
    out = Path(args.runs) / run_name
    t0 = time.time()
    flow, history = train_flow(zoo, cfg=cfg, out=out, progress=True, compile=args.compile)
    # cumulative over resumes (a resampled run trains no further)
    train_s = history[-1].get("seconds", time.time() - t0) if history else time.time() - t0
    s0 = time.time()
    gen, _ = flow.sample(args.num, nfe=args.nfe, solver=args.solver, seed=args.seed + 1, batch_size=args.num,
                         churn=args.churn)
    sample_s = time.time() - s0
    gen = gen.to(dtype=torch.float32)
    pred = stacked_logits(mlp(), spec, gen, d.x_test).argmax(-1)
    acc = (pred == d.y_test).float().mean(1)
    classes = int(d.y_train.max()) + 1
    zoo_pred = stacked_logits(mlp(), spec, zoo, d.x_test).argmax(-1)
    dist, near = nearest_base(spec, gen, base)
    scale = float(aligned_l2(spec, other, base, candidates=1).min())  # independent networks, aligned
    noise_norm = float(aligned_l2(spec, zoo, base, candidates=1).median()) if k == 1 else \
        float(torch.stack([aligned_l2(spec, WeightSpace(spec, {n: t[labels == j] for n, t in zoo.items()}),
                                      WeightSpace(spec, {n: t[j:j + 1] for n, t in base.items()}), candidates=1)
                           for j in range(k)]).median())
    # canonical data is not at hand; an aligned coupling's targets are not the zoo's own coordinates
    plain = cfg.canonicalize == "none" and not cfg.align_target and not cfg.align_source
    by_t = data_error_by_t(flow, zoo) if plain else None
    raw = torch.cdist(gen.flatten().double(), zoo.flatten().double())  # [num, copies]
    zraw = torch.cdist(zoo.flatten().double(), zoo.flatten().double())
    zraw.fill_diagonal_(float("inf"))
    copy_scale = float(zraw.min(1).values.median())
    best = dist.min(1).values
    hit = best < 0.25 * scale
    new = raw.min(1).values > 0.5 * copy_scale
    row = {"name": name, "rung": args.rung, "data": args.data, "widths": widths, "velocity": args.velocity, "seed": args.seed, "steps": args.steps,
           "config": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in vars(cfg).items()},
           "parameters": sum(p.numel() for p in flow.velocity.parameters()),
           "train_seconds": round(train_s, 1), "compiled": args.compile, "solver": args.solver, "nfe": args.nfe,
           "churn": args.churn, "sample_seconds": round(sample_s, 2),
           "compile_seconds": sum(h.get("compile_seconds", 0.0) for h in history), "final_loss": history[-1].get("loss") if history else None,
           "loss_last100": float(torch.tensor([h["loss"] for h in history[-100:]]).mean()) if history else None,
           "base_test_acc": base_acc[:k], "zoo_test_acc_mean": float((zoo_pred == d.y_test).float().mean()),
           "sample_test_acc_mean": float(acc.mean()), "sample_test_acc_median": float(acc.median()),
           "sample_agreement_median": float(agreement(pred, classes).median()),
           "zoo_agreement_median": float(agreement(zoo_pred, classes).median()),
           "aligned_l2_median": float(best.median()), "aligned_l2_q90": float(best.quantile(0.9)),
           "independent_aligned_l2": scale, "copy_noise_aligned_l2": noise_norm,
           "hit_fraction": float(hit.float().mean()), "new_fraction": float(new.float().mean()),
           "hit_and_new_fraction": float((hit & new).float().mean()),
           "raw_l2_nearest_copy_median": float(raw.min(1).values.median()), "copy_raw_l2_median": copy_scale,
           "share_per_base": [float((near == j).float().mean()) for j in range(k)],
           "distinct_units_mean": float(distinct_units(spec, gen, base).mean()) if k == 1 else None,
           "acc_per_base": [float(acc[near == j].mean()) if (near == j).any() else None for j in range(k)],
           "data_error_vs_mean_by_t": by_t, "num_samples": args.num, **provenance(), "code": code_version(), "threads": torch.get_num_threads(),
           "loadavg_start": list(os.getloadavg())}
    append_jsonl(results, row)
    print(json.dumps({x: row[x] for x in ("name", "sample_test_acc_mean", "sample_agreement_median",
                                           "aligned_l2_median", "independent_aligned_l2", "hit_fraction",
                                           "new_fraction", "share_per_base", "final_loss", "train_seconds",
                                           "data_error_vs_mean_by_t")}))


def units(args) -> None:
    """Distinct base units per sample for runs already in the results, from their saved flows."""
    from unf.flow import WeightFlow
    from unf.weights import WeightSpace

    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    spec, all_base, _, _, _ = base_networks(1, args.data, widths, args.base_epochs)
    base = WeightSpace(spec, {n: t[:1] for n, t in all_base.items()})
    rows = {r["name"]: r for r in load_jsonl(Path(args.results), key=lambda r: r["name"])}
    for name in args.names:
        if name not in rows:
            raise SystemExit(f"{name}: not in {args.results}; run it first")
        flow = WeightFlow.load(Path(args.runs) / name / "flow.safetensors")
        # the same samples as the run's row: same count, seed, solver and NFE
        gen, _ = flow.sample(rows[name]["num_samples"], nfe=20, solver="heun", seed=rows[name]["seed"] + 1,
                             batch_size=rows[name]["num_samples"])
        d = distinct_units(spec, gen.to(dtype=torch.float32), base)
        print(f"| {name} | {d.mean():.2f} of {widths[0]} | {d.min():.0f} |")


def samplers(args) -> None:
    """Hit rate, aligned distance and distinct units of one orbit-rung run under several samplers."""
    from unf.flow import WeightFlow
    from unf.flow.novelty import aligned_l2
    from unf.weights import WeightSpace
    from unf.zoo.synthetic import nearest_base

    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    spec, all_base, _, _, _ = base_networks(1, args.data, widths, args.base_epochs)
    base = WeightSpace(spec, {n: t[:1] for n, t in all_base.items()})
    other = WeightSpace(spec, {n: t[1:] for n, t in all_base.items()})
    scale = float(aligned_l2(spec, other, base, candidates=1).min())
    flow = WeightFlow.load(Path(args.runs) / args.name / "flow.safetensors")
    print("| sampler | NFE | churn | samples | hit | aligned L2 median | distinct units (all distinct) | seconds |")
    for item in args.sampler:
        solver, nfe, churn = item.split(":")
        t0 = time.time()
        gen, spent = flow.sample(args.num, nfe=int(nfe), solver=solver, seed=args.seed, batch_size=200,
                                 churn=float(churn))
        seconds = time.time() - t0
        gen = gen.to(dtype=torch.float32)
        best = nearest_base(spec, gen, base)[0].min(1).values
        du = distinct_units(spec, gen, base)
        row = {"name": args.name, "data": args.data, "widths": widths, "solver": solver, "nfe": spent,
               "churn": float(churn), "num_samples": args.num, "seed": args.seed,
               "hit_fraction": float((best < 0.25 * scale).float().mean()), "aligned_l2_median": float(best.median()),
               "independent_aligned_l2": scale, "distinct_units_mean": float(du.mean()),
               "all_units_distinct": float((du == widths[0]).float().mean()), "sample_seconds": round(seconds, 2),
               **provenance(), "code": code_version(), "threads": torch.get_num_threads()}
        append_jsonl(Path(args.results), row)
        print(f"| {solver} | {spent} | {float(churn):g} | {args.num} | {row['hit_fraction']:.1%} | "
              f"{row['aligned_l2_median']:.2f} | {row['distinct_units_mean']:.2f} ({row['all_units_distinct']:.1%}) | "
              f"{seconds:.1f} |", flush=True)


def table(args) -> None:
    rows = load_jsonl(Path(args.results), key=lambda r: r["name"])
    print("| run | params | steps | loss (last 100) | sample acc mean / median | base acc | agreement samples / zoo "
          "| aligned L2 median (independent nets) | hit | new | share per base | data error / mean's at t=0.5, 0.9 "
          "| train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['parameters']:,} | {r['steps']} | {r['loss_last100']:.4f} | "
              f"{r['sample_test_acc_mean']:.3f} / {r['sample_test_acc_median']:.3f} | "
              f"{', '.join(f'{a:.3f}' for a in r['base_test_acc'])} | "
              f"{r['sample_agreement_median']:.3f} / {r['zoo_agreement_median']:.3f} | "
              f"{r['aligned_l2_median']:.2f} ({r['independent_aligned_l2']:.2f}) | {r['hit_fraction']:.2f} | "
              f"{r['new_fraction']:.2f} | {', '.join(f'{s:.2f}' for s in r['share_per_base'])} | "
              f"{_by_t(r)} | {r['train_seconds']:.0f} |")


def _by_t(r) -> str:
    e = r.get("data_error_vs_mean_by_t")
    return "-" if not e else f"{e['0.5']:.2f}, {e['0.9']:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--rung", choices=("orbit", "two"), required=True)
    p.add_argument("--velocity", choices=("unf", "mlp"), default="unf")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("digits", "iris", "wine", "breast_cancer"), default="digits")
    p.add_argument("--widths", default="32,32", help="hidden widths of the MLPs (default 32,32)")
    p.add_argument("--base-epochs", type=int, default=40)
    p.add_argument("--copies", type=int, default=300)
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--num", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--vset", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs", default="runs/ladder")
    p.add_argument("--force", action="store_true", help="run again even if the results file has this run")
    p.add_argument("--compile", action="store_true", help="train_flow(compile=True): not part of the run's name")
    p.add_argument("--solver", choices=("euler", "midpoint", "heun", "rk4"), default="heun")
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--churn", type=float, default=0.0,
                   help="stochastic sampling (WeightFlow.sample(churn=...)); a sampler other than heun-20 without "
                        "churn names the results row '...-sample=SOLVERNFE[cCHURN]' and reuses the trained run")
    p.add_argument("--results", default=str(RESULTS))
    p.set_defaults(fn=run)
    p = sub.add_parser("units", help="distinct base units per sample of runs already in the results")
    p.add_argument("names", nargs="+")
    p.add_argument("--rung", choices=("orbit",), default="orbit")
    p.add_argument("--data", choices=("digits", "iris", "wine", "breast_cancer"), default="digits")
    p.add_argument("--widths", default="32,32")
    p.add_argument("--base-epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="runs/ladder")
    p.add_argument("--results", default=str(RESULTS))
    p.set_defaults(fn=units)
    p = sub.add_parser("samplers", help="one orbit-rung run under several samplers")
    p.add_argument("name")
    p.add_argument("--sampler", action="append", required=True, metavar="SOLVER:NFE:CHURN")
    p.add_argument("--data", choices=("digits", "iris", "wine", "breast_cancer"), default="digits")
    p.add_argument("--widths", default="32,32")
    p.add_argument("--base-epochs", type=int, default=40)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="runs/ladder")
    p.add_argument("--results", default="benchmarks/results/flow_samplers.jsonl")
    p.set_defaults(fn=samplers)
    p = sub.add_parser("table")
    p.add_argument("--results", default=str(RESULTS))
    p.set_defaults(fn=table)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
