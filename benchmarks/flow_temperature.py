"""Sampling temperature of a trained flow, chosen on the training split (issue 28).

    python benchmarks/flow_temperature.py RUN [--temperatures 1,0.9,0.8,0.7] [--num 1000] [--select-num 300]
        [--nfe 20] [--compile] [--out benchmarks/results/flow_temperature.jsonl]

For each temperature (the scale of the source noise, ``WeightFlow.sample(temperature=...)``): ``--select-num``
networks scored as checkpoint selection scores them (``train_split_scorer``: accuracy on the TRAINING split of the
zoo's data and the samples' agreement with each other there, against the flow's own training networks' agreement;
sample seed 1, so not the networks reported below), then ``--num`` networks (seed 0) with their test accuracy and
agreement on the probe inputs, as ``unf flow eval`` reports them. The temperature to use is the one with the best
training-split accuracy among the eligible ones (agreement at most the training networks' + 0.03); the test columns
are printed for every row so that the choice can be checked, never used to make it. One JSON line per temperature.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl  # noqa: E402
from timing import code_version, provenance  # noqa: E402

from unf.flow import WeightFlow  # noqa: E402
from unf.flow.evaluate import evaluate_networks, train_split_scorer  # noqa: E402
from unf.flow.novelty import agreement, probe_set, stacked_logits  # noqa: E402
from unf.data import load as load_data  # noqa: E402
from unf.flow.zoo import build_network, model_factory  # noqa: E402
from unf.zoo import Zoo  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory of `unf flow train`")
    ap.add_argument("--temperatures", default="1,0.9,0.8,0.7")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--select-num", type=int, default=300)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--solver", default="heun")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/flow_temperature.jsonl")
    args = ap.parse_args(argv)
    flow = WeightFlow.load(Path(args.run) / "flow.safetensors")
    info = flow.info
    zoo = Zoo(info["zoo"])
    train_ids, epoch = set(info["train_ids"]), str(info["epoch"])
    rows = [r for r in zoo.metadata if r["model_id"] in train_ids and str(r["epoch"]) == epoch]
    ws = zoo.weight_space([zoo.metadata.index(r) for r in rows])
    factory = model_factory(zoo.manifest.get("info", {}))
    row = {"activation": info["where"].get("activation", rows[0].get("activation"))}
    split = load_data(info["data"], seed=info["split_seed"])
    probes = probe_set(split.x_test)
    meta = {**provenance(), "code": code_version(), "run": str(args.run), "nfe": args.nfe, "solver": args.solver,
            "num": args.num, "select_num": args.select_num, "selected_step": info.get("selected_step")}
    print(f"{args.run}: {len(rows)} training networks; {args.num} samples at {args.nfe} NFE ({args.solver})")
    print("| temperature | training split: accuracy | agreement (training networks') | eligible | test accuracy "
          "mean / median | agreement on probes |")
    print("|---|---|---|---|---|---|")
    for temp in (float(t) for t in args.temperatures.split(",")):
        score = train_split_scorer(factory, row, info["data"], info["split_seed"], num=args.select_num,
                                   nfe=args.nfe, solver=args.solver, seed=1, reference=ws, temperature=temp)(flow)
        gen, _ = flow.sample(args.num, nfe=args.nfe, solver=args.solver, seed=0, temperature=temp,
                             compile=args.compile)
        gen_rows = [dict(row) for _ in range(args.num)]
        gen, metrics = evaluate_networks(factory, gen, gen_rows, info["data"], info["split_seed"])
        acc = torch.tensor([m["test_acc"] for m in metrics])
        pred = stacked_logits(build_network(factory, row), gen.spec, gen, probes).argmax(2)
        agree = float(agreement(pred).median())
        r = {**meta, "temperature": temp, "train_split_accuracy": score["score"],
             "train_split_agreement": score["agreement"], "reference_agreement": score["reference_agreement"],
             "eligible": score["eligible"], "test_acc_mean": float(acc.mean()), "test_acc_median": float(acc.median()),
             "probe_agreement": agree}
        print(f"| {temp:g} | {r['train_split_accuracy']:.4f} | {r['train_split_agreement']:.3f} "
              f"({r['reference_agreement']:.3f}) | {'yes' if r['eligible'] else 'no'} | {r['test_acc_mean']:.4f} / "
              f"{r['test_acc_median']:.4f} | {agree:.3f} |", flush=True)
        append_jsonl(Path(args.out), r)


if __name__ == "__main__":
    main()
