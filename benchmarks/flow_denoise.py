"""Does a trained flow denoise real networks? (issue 28: where a field's samples lose accuracy)

    python benchmarks/flow_denoise.py RUN_DIR [--zoo Z] [--num 100] [--steps 20] [--churn 0]

Takes ``--num`` networks of the flow's zoo (held-out ones, then training ones; the flow file names both), noises each
along the flow's own path to time ``t0`` (``x_t0 = t0 x1 + (1 - t0) x0``, ``x0`` from the flow's source) and
integrates the flow from ``t0`` to 1 (Euler, ``--steps`` over the whole interval, so ``steps * (1 - t0)`` of them;
``--churn`` > 0: the stochastic sampler). Reported per ``t0``: the test accuracy of the results, and their distance
to the network they started from, over that network's norm (standardised coordinates), beside the same distance of
the noised start (a field that removes noise ends nearer than it started; one that passes it through, as far).
``t0 = 0`` is plain sampling. A field that knows the data returns near-equal accuracy from a late ``t0``; the ``t0``
where accuracy falls away says at which noise level the field stops knowing the networks. One JSON line per (set, t0) in
``benchmarks/results/flow_denoise.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl  # noqa: E402
from timing import code_version, provenance  # noqa: E402

RESULTS = Path("benchmarks/results/flow_denoise.jsonl")


def main(argv=None) -> None:
    from unf import data as datasets
    from unf.flow import WeightFlow
    from unf.flow.novelty import stacked_logits
    from unf.flow.solvers import integrate
    from unf.flow.zoo import build_network, model_factory, select_rows
    from unf.weights import WeightSpace
    from unf.zoo import Zoo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--zoo", default=None, help="the flow's zoo (default: the path its flow file records)")
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--churn", type=float, default=0.0)
    ap.add_argument("--t0", default="0,0.3,0.5,0.7,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.run)
    flow = WeightFlow.load(path / "flow.safetensors" if path.is_dir() else path)
    info = flow.info
    zoo = Zoo(args.zoo or info["zoo"])
    picked = select_rows(zoo, info.get("where"), info.get("epoch"))
    held = set(info["holdout"])
    factory = model_factory(zoo.manifest["info"])
    model = build_network(factory, zoo.metadata[picked[0]])
    split = datasets.load(info["data"], seed=info["split_seed"])
    flow.velocity.eval()

    def accuracy(ws: WeightSpace) -> torch.Tensor:
        return (stacked_logits(model, zoo.spec, ws, split.x_test).argmax(2) == split.y_test).double().mean(1)

    for name, in_held in (("held-out", True), ("training", False)):
        rows = [i for i in picked if (zoo.metadata[i]["model_id"] in held) == in_held][:args.num]
        ws = zoo.weight_space(rows)
        x1 = flow.standardizer.to_std(ws).flatten()
        base = accuracy(ws)
        print(f"{name}: {len(rows)} networks, test accuracy {base.mean():.3f}")
        g = torch.Generator().manual_seed(args.seed)
        for t0 in (float(t) for t in args.t0.split(",")):
            start = time.time()
            noise = torch.randn(x1.shape, generator=g)
            x = t0 * x1 + (1 - t0) * flow.source.draw(noise)
            start_rel = (x - x1).norm(dim=1) / x1.norm(dim=1)  # the noise the field is given
            n = max(1, round(args.steps * (1 - t0)))
            with torch.no_grad():
                x = integrate(lambda xs, t: flow.velocity(xs, t, None), WeightSpace.from_flat(flow.spec, x), n,
                              "euler", args.churn, flow.source.mean, flow.source.std, g, t0=t0)[0].flatten()
            acc = accuracy(flow.standardizer.from_std(WeightSpace.from_flat(flow.spec, x)))
            rel = (x - x1).norm(dim=1) / x1.norm(dim=1)
            row = {"run": str(path), "set": name, "t0": t0, "num": len(rows), "steps": n, "churn": args.churn,
                   "start_acc_mean": float(base.mean()), "acc_mean": float(acc.mean()),
                   "acc_median": float(acc.median()), "rel_distance_median": float(rel.median()),
                   "start_rel_distance_median": float(start_rel.median()),
                   "seconds": round(time.time() - start, 2), **provenance(), "code": code_version()}
            append_jsonl(Path(args.results), row)
            print(json.dumps({k: row[k] for k in ("set", "t0", "acc_mean", "start_rel_distance_median",
                                                  "rel_distance_median")}), flush=True)


if __name__ == "__main__":
    main()
