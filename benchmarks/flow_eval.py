"""Accuracy, novelty and sampling time of trained weight flows, beside memoriser and other baselines, in one run.

    python benchmarks/flow_eval.py --zoo /work/zoos/digits-mlp --run runs/unf --run runs/mlp \
        --num 1000 --nfe 20 --solver heun --sweep 1,2,4,8,16,32 --out benchmarks/results/flow_eval

Every run must come from ``unf flow train`` on ``--zoo`` with the same selection and holdout (its flow file names
them). Per run: time to sample ``--num`` networks on the CPU, their test accuracy (no fine-tuning) and novelty
against the flow's training networks, held-out networks as the reference level; an NFE sweep on ``--sweep-num``
networks, scored on the TRAINING split (it is there to choose a solver and NFE; ``--sweep-only`` runs just it).
Baselines on the same axes: memorisers (the k training networks best by their metadata's ``train_acc``, + noise,
sigma grid), interpolations of aligned pairs, a per-parameter Gaussian. Writes ``OUT.jsonl`` and ``OUT.png``
(accuracy vs novelty).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from timing import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--run", action="append", required=True)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--solver", default="heun")
    ap.add_argument("--sweep", default="1,2,4,8,16,32")
    ap.add_argument("--sweep-num", type=int, default=200)
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the NFE sweep (training split) and the setting it chooses, no evaluation")
    ap.add_argument("--tolerance", type=float, default=0.005,
                    help="the choice: the fewest NFE (then euler, heun, rk4) within this of the sweep's best mean "
                         "training-split accuracy (default 0.005)")
    ap.add_argument("--baseline-num", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/flow_eval")
    args = ap.parse_args()

    from unf import data as datasets
    from unf.flow import WeightFlow
    from unf.flow.baselines import dominated, gaussian, interpolations, memorisers, noise_frontier, train_split_accuracy
    from unf.flow.novelty import novelty_report, probe_set, stacked_logits
    from unf.flow.zoo import build_network, model_factory, select_rows
    from unf.io import atomic_write
    from unf.zoo import Zoo

    zoo = Zoo(args.zoo)
    flows = {Path(r).name: WeightFlow.load(Path(r) / "flow.safetensors") for r in args.run}
    first = next(iter(flows.values())).info
    picked = select_rows(zoo, first["where"], first["epoch"])
    train_ids, held_ids = set(first["train_ids"]), set(first["holdout"])
    train_rows = [i for i in picked if zoo.metadata[i]["model_id"] in train_ids]
    held_rows = [i for i in picked if zoo.metadata[i]["model_id"] in held_ids]
    split = datasets.load(first["data"], seed=first["split_seed"])
    factory = model_factory(zoo.manifest["info"])
    model = build_network(factory, zoo.metadata[picked[0]])
    train_ws, held_ws = zoo.weight_space(train_rows), zoo.weight_space(held_rows)
    x = probe_set(split.x_test, copies=2, seed=first["split_seed"])
    lines = []
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg()), "torch": torch.__version__,
            "zoo": args.zoo, "train": len(train_rows), "heldout": len(held_rows)}

    def acc_of(ws, inputs=split.x_test, labels=split.y_test):
        return (stacked_logits(model, zoo.spec, ws, inputs).argmax(2) == labels).double().mean(1)

    train_acc = acc_of(train_ws)  # reported only
    rank = train_split_accuracy([zoo.metadata[i] for i in train_rows])  # the memorisers' "best": never test data
    sets, times = {}, {}
    for name, flow in flows.items():
        for k in [int(v) for v in args.sweep.split(",") if v]:
            for solver in ("euler", "heun", "rk4"):
                if k < {"euler": 1, "heun": 2, "rk4": 4}[solver]:
                    continue
                sw, n = flow.sample(args.sweep_num, k, solver, seed=1)
                acc = acc_of(sw, split.x_train, split.y_train)
                lines.append({"kind": "sweep", "split": "train", "run": name, "solver": solver, "nfe": n,
                              "num": args.sweep_num, "acc_mean": float(acc.mean()), "acc_median": float(acc.median())})
                print(lines[-1], flush=True)
        if args.sweep_only:
            continue
        flow.sample(8, args.nfe, args.solver)  # warm-up
        start = time.perf_counter()
        ws, nfe = flow.sample(args.num, args.nfe, args.solver, seed=0)
        times[name] = {"seconds": time.perf_counter() - start, "nfe": nfe, "solver": args.solver,
                       "per_eval": (time.perf_counter() - start) / nfe,
                       "parameters": flow.info.get("velocity_parameters"),
                       "velocity": flow.velocity.kind, "canonicalize": flow.info["config"]["canonicalize"],
                       "train_seconds": flow.info.get("seconds"), "selected_step": flow.info.get("selected_step")}
        sets[name] = ws
    out = Path(args.out)
    if args.sweep_only:
        lines += choose(lines, args.tolerance)
        write_lines(out.with_suffix(".jsonl"), [{**meta, **line} for line in lines], atomic_write)
        return
    n = args.baseline_num
    for k in (1, 10, len(train_rows)):
        for sigma in (0.02, 0.05, 0.1, 0.2, 0.5):
            sets[f"memoriser k={k} sigma={sigma}"] = memorisers(train_ws, rank, k, sigma, n, seed=0)
    sets["interpolation"] = interpolations(zoo.spec, train_ws, n, seed=0)
    sets["gaussian"] = gaussian(train_ws, n, seed=0)
    sets["gaussian (aligned zoo)"] = gaussian(train_ws, n, seed=0, align=True)
    report = novelty_report(model, zoo.spec, sets, train_ws, held_ws, x, split.y_test)
    summary = {name: r["summary"] for name, r in report.items()}
    points = {name: (1 - s["derivedness"]["q50"], s["accuracy"]["mean"]) for name, s in summary.items()}
    frontier = noise_frontier(torch.tensor([p for nm, p in points.items() if nm.startswith("memoriser")]))
    for name, s in summary.items():
        line = {"kind": "set", "name": name, **s, **times.get(name, {}),
                "dominated_by_memorisers": bool(dominated(torch.tensor(points[name]), frontier))
                if not name.startswith("memoriser") else None}
        lines.append(line)
        print(name, f"acc {s['accuracy']['mean']:.4f} (median {s['accuracy']['q50']:.4f}) copies "
              f"{s['copy_fraction']:.3f} derived {s['derivedness']['q50']:.3f} l2 {s['l2']['q50']:.2f} "
              f"agreement {s.get('agreement', {}).get('q50', float('nan')):.3f}",
              times.get(name, ""), flush=True)
    lines.append({"kind": "train", "acc_mean": float(train_acc.mean()), "acc_median": float(train_acc.median()),
                  "acc_std": float(train_acc.std())})
    write_lines(out.with_suffix(".jsonl"), [{**meta, **line} for line in lines], atomic_write)
    plot(points, frontier, float(train_acc.mean()), out.with_suffix(".png"), atomic_write)


def choose(lines: list, tolerance: float) -> list:
    """Per run, the sweep's choice (a ``kind: "choice"`` line): the cheapest setting whose mean training-split
    accuracy is within ``tolerance`` of the best; prints the sweep as a table."""
    out = []
    for run in dict.fromkeys(x["run"] for x in lines if x["kind"] == "sweep"):
        sweep = [x for x in lines if x["kind"] == "sweep" and x["run"] == run]
        best = max(x["acc_mean"] for x in sweep)
        order = ("euler", "heun", "rk4")
        pick = min((x for x in sweep if x["acc_mean"] >= best - tolerance),
                   key=lambda x: (x["nfe"], order.index(x["solver"])))
        nfes = sorted({x["nfe"] for x in sweep})
        print(f"\n{run}: mean accuracy on the training split ({sweep[0]['num']} samples)\n| NFE | "
              + " | ".join(map(str, nfes)) + " |\n|---|" + "---|" * len(nfes))
        for solver in order:
            acc = {x["nfe"]: x["acc_mean"] for x in sweep if x["solver"] == solver}
            print(f"| {solver} | " + " | ".join(f"{acc[k]:.3f}" if k in acc else "" for k in nfes) + " |")
        print(f"choice: {pick['solver']} at {pick['nfe']} NFE ({pick['acc_mean']:.3f}; best {best:.3f}, "
              f"tolerance {tolerance})")
        out.append({"kind": "choice", "split": "train", "run": run, "solver": pick["solver"], "nfe": pick["nfe"],
                    "acc_mean": pick["acc_mean"], "best": best, "tolerance": tolerance})
    return out


def write_lines(path: Path, lines: list, atomic_write) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(line) + "\n" for line in lines)))


def plot(points: dict, frontier: torch.Tensor, train_acc: float, path: Path, atomic_write) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    mem = [p for n, p in points.items() if n.startswith("memoriser")]
    ax.scatter(*zip(*mem), s=12, c="0.6", label="memorisers (k best + noise)")
    if len(frontier):
        f = frontier[frontier[:, 0].argsort()]
        ax.step(f[:, 0], f[:, 1], where="post", c="0.3", lw=1, label="noise frontier")
    for name, (nov, acc) in points.items():
        if name.startswith("memoriser"):
            continue
        ax.scatter([nov], [acc], s=40, label=name)
    ax.axhline(train_acc, ls="--", c="k", lw=0.8, label="training zoo mean accuracy")
    ax.set_xlabel("novelty: 1 - median derived-ness (held-out networks: the level of a new network)")
    ax.set_ylabel("mean test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


if __name__ == "__main__":
    main()
