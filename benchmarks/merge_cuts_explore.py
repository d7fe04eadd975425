"""Exploration behind the paired proxy recipe of CUTS (unf.merge.cuts, proxy_recipe="paired"): which task vector
unlearns the digits backdoor at the least clean-accuracy cost? Validation split only (the test split is not read).

    OMP_NUM_THREADS=1 python benchmarks/merge_cuts_explore.py --seed 0 --backbone scratch
    OMP_NUM_THREADS=1 python benchmarks/merge_cuts_explore.py --seed 1 --backbone scratch --recipes base pairdiffall

The backdoored model is built as in ``unf.merge.cuts_demo.run_cuts_demo(kind="backdoor", evaluate_on="validation")``
(150 epochs); every vector is then subtracted with alpha chosen by the library's label-free rule (the first alpha with
attack success <= 1% on the triggered proxy), on a 0-16 grid. One proxy fine-tune of 40 epochs at 1/10 of the
training rate. Recipes (``twins``: proxy inputs without the trigger, labelled with the backdoored model's own
predictions; ``twins of non-target classes``: only those whose proxy input is triggered):

- ``base``: the plain proxy (triggered -> target) vector;
- ``paired``: fine-tuned on the triggered proxy plus the twins of non-target classes;
- ``diff``: ``base`` minus the twins' (non-target) own fine-tune;
- ``proj`` / ``projt``: ``base`` projected orthogonal to the twins' vector, globally / per tensor;
- ``layer0``: ``base`` on the first layer only; ``headonly``: on the last layer only;
- ``ties10``: ``base`` trimmed to its top 10% entries per tensor;
- ``pairdiff``: ``paired`` minus the twins' fine-tune (non-target twins);
- ``pairdiffall``: the same with all twins (the library's ``proxy_recipe="paired"``);
- ``*_nohead``: a recipe with the last layer left out.

Each result is appended to results/merge_cuts_explore.jsonl: the validation points lost and attack success at the
chosen alpha, the fraction predicted as the target and the target's recall there, and (``hind``, hindsight on the
validation split, for reading only) the alpha with the least accuracy lost among those with attack success <= 5%.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's unf, not an installed one
from unf.merge import cuts_demo as D  # noqa: E402
from unf.merge.cuts import _predict, select_alpha  # noqa: E402
from unf.merge.methods import magnitude_prune  # noqa: E402
from unf.merge.task_vector import TaskVector  # noqa: E402
from unf.training import train_classifier  # noqa: E402
from timing import provenance  # noqa: E402  (benchmarks/timing.py)

OUT = Path(__file__).resolve().parent / "results" / "merge_cuts_explore.jsonl"
RECIPES = ["base", "paired", "diff", "proj", "projt", "layer0", "ties10", "pairdiff", "pairdiffall", "base_nohead",
           "diff_nohead", "pairdiff_nohead", "pairdiffall_nohead", "headonly"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", choices=["scratch", "rotation"], default="scratch")
    ap.add_argument("--recipes", nargs="+", choices=RECIPES, default=RECIPES)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seed, backbone = args.seed, args.backbone
    # the backdoor experiment of run_cuts_demo, on the validation split
    x, y, xt, yt, c = D.experiment_data("validation", seed)
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(y)))
    n_hold = int(0.3 * len(y)) // 3 * 3
    proxy_idx, _, _ = order[:n_hold].chunk(3)
    train_idx = order[n_hold:]
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = x[train_idx], y[train_idx]
    poison = torch.randperm(len(y_tr), generator=gen)[:int(round(0.05 * len(y_tr)))]
    x_bad, y_bad = x_tr.clone(), y_tr.clone()
    x_bad[poison], y_bad[poison] = D.add_trigger(x_tr[poison]), D.TARGET
    if backbone == "rotation":
        start = D.rotation_pretrained(x, seed)
    else:
        torch.manual_seed(seed)
        start = D.wide_mlp()
    corrupted = train_classifier(start, x_bad, y_bad, epochs=150, lr=D.TRAIN_LR, seed=seed)
    base = {k: v.detach().clone() for k, v in corrupted.state_dict().items()}
    keep = proxy_idx[y[proxy_idx] != D.TARGET]
    twins_nt, twins_all = x[keep], x[proxy_idx]
    px, py = D.add_trigger(twins_nt), torch.full((len(keep),), D.TARGET)
    pl_nt, pl_all = _predict(corrupted, twins_nt), _predict(corrupted, twins_all)
    xt_trig = D.add_trigger(xt)
    acc0 = D._acc(corrupted, xt, yt)
    alphas = [round(0.1 * i, 1) for i in range(0, 161)]
    head = [m for m in corrupted.state_dict() if m.startswith("4.")]

    def ft(xx, yy):
        m = train_classifier(copy.deepcopy(corrupted), xx, yy, epochs=40, lr=D.TRAIN_LR / 10, seed=seed)
        return TaskVector(base, m.state_dict())

    cache = {}

    def vec(name):
        if name not in cache:
            cache[name] = {"trig": lambda: ft(px, py), "clean": lambda: ft(twins_nt, pl_nt),
                           "paired": lambda: ft(torch.cat([px, twins_nt]), torch.cat([py, pl_nt])),
                           "cleanall": lambda: ft(twins_all, pl_all),
                           "pairedall": lambda: ft(torch.cat([px, twins_all]), torch.cat([py, pl_all]))}[name]()
        return cache[name]

    def proj(t, u, per_tensor=False):
        if per_tensor:
            return t.map(lambda k, v: v - (v * u[k]).sum() / (u[k] * u[k]).sum().clamp_min(1e-30) * u[k])
        return t - u * (t.dot(u) / u.dot(u))

    only = lambda keep_it: (lambda k, v: v if keep_it(k) else torch.zeros_like(v))  # noqa: E731
    build = {"base": lambda: vec("trig"), "paired": lambda: vec("paired"), "diff": lambda: vec("trig") - vec("clean"),
             "proj": lambda: proj(vec("trig"), vec("clean")), "projt": lambda: proj(vec("trig"), vec("clean"), True),
             "layer0": lambda: vec("trig").map(only(lambda k: k.startswith("0."))),
             "headonly": lambda: vec("trig").map(only(lambda k: k in head)),
             "ties10": lambda: vec("trig").map(lambda k, v: magnitude_prune(v, 0.1)),
             "pairdiff": lambda: vec("paired") - vec("clean"),
             "pairdiffall": lambda: vec("pairedall") - vec("cleanall")}
    for r in args.recipes:
        tau = build[r.removesuffix("_nohead")]()
        if r.endswith("_nohead"):
            tau = tau.map(only(lambda k: k not in head))
        alpha, curve = select_alpha(corrupted, tau, alphas, kind="backdoor", proxy_x=px, proxy_y=py)
        net = copy.deepcopy(corrupted)
        net.load_state_dict(tau.apply(base, -alpha))
        acc, asr = D._acc(net, xt, yt), D._asr(net, xt_trig, yt)
        pred = _predict(net, xt)
        best = None
        for p in curve[::2]:
            net.load_state_dict(tau.apply(base, -p["alpha"]))
            a_, s_ = D._acc(net, xt, yt), D._asr(net, xt_trig, yt)
            if s_ <= 0.05 and (best is None or a_ > best[1]):
                best = (p["alpha"], a_, s_)
        rec = {"rec0": round(float((pred[yt == 0] == 0).float().mean()), 3),
               "frac0": round(float((pred == 0).float().mean()), 3), "seed": seed, "backbone": backbone,
               "ev": "validation", "recipe": r, "alpha": alpha, "lost": round(acc0 - acc, 4), "asr": round(asr, 4),
               "hind": best and (best[0], round(acc0 - best[1], 4), round(best[2], 4)), **provenance()}
        print(json.dumps(rec), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
