"""Ablations of the generator's recipe, scored on the TRAINING split: one line per ``unf flow train`` run.

    python benchmarks/flow_ablations.py --run runs/p-mlp-s0 --run runs/abl-velpred-s0 --run runs/abl-nocanon-s0 \
        --out benchmarks/results/flow_ablations.jsonl

Each run must have been trained with ``--select-every K``: its ``history.json`` then holds, every K steps, the mean
accuracy of 100 sampled networks on the zoo's training split (``unf.flow.evaluate.train_split_scorer``; 20 NFE
Heun). No test data enters these numbers, so they may choose the recipe. Writes the JSON lines and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="run directory of `unf flow train`")
    ap.add_argument("--out", default="benchmarks/results/flow_ablations.jsonl")
    args = ap.parse_args()

    import torch

    from unf.flow import WeightFlow
    from unf.io import atomic_write

    lines = []
    for run in map(Path, args.run):
        history = json.loads((run / "history.json").read_text())
        scores = {h["step"]: h["select"] for h in history if "select" in h}
        if not scores:
            raise SystemExit(f"{run}: no selection scores in history.json (train with --select-every K)")
        flow = WeightFlow.load(run / "flow.safetensors")
        info, cfg = flow.info, flow.info["config"]
        best = max(scores, key=lambda k: (scores[k], -k))
        lines.append({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                      "split": "train", "run": run.name, "seed": cfg["seed"], "velocity": cfg["velocity"],
                      "prediction": flow.velocity.prediction,
                      "canonicalize": cfg["canonicalize"], "lr": cfg["lr"], "steps": cfg["steps"],
                      "train_seconds": info.get("seconds"), "scores": scores, "best_step": best,
                      "best_score": scores[best]})
    text = "".join(json.dumps(x) + "\n" for x in lines)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)\n")
    print("| run | prediction | canonicalised | lr | steps | best training-split accuracy (step) | by step |")
    print("|---|---|---|---|---|---|---|")
    for x in lines:
        curve = ", ".join(f"{k}: {v:.3f}" for k, v in x["scores"].items() if int(k) in (50, 100, 200, 300, 500, 1000))
        print(f"| {x['run']} | {x['prediction']} | {x['canonicalize']} | {x['lr']:g} | {x['steps']} | "
              f"{x['best_score']:.3f} ({x['best_step']}) | {curve} |")


if __name__ == "__main__":
    main()
