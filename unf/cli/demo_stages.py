"""The stages of ``unf demo``: each calls the library's own functions on embedded digits data and returns its numbers.

A stage is ``stage(run: DemoRun, tick) -> dict``: ``tick(text)`` advances the stage's progress bar, the dict holds
the stage's numbers, ``"line"`` (its one-line result) and ``"figure"`` (a PNG in the output folder, or absent).
Choices inside a stage use training or validation data only; test splits are for the numbers reported.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Callable

import torch

# Sizes of the default run and of --quick (tiny, for CI). Where a size is smaller than the library's default (the
# CUTS epochs, the flow steps), the stage says so in its numbers.
SIZES = {
    "default": dict(zoo_models=300, predict_epochs=6, predict_hidden=8, align_width=128, align_epochs=10,
                    flow_steps=300, flow_select_every=50, flow_select_num=50, generate_num=100, baseline_num=50,
                    adam_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), optimize_steps=200, expert_epochs=30,
                    cuts_epochs=50, cuts_proxy_epochs=20, cuts_proxies=3),
    "quick": dict(zoo_models=40, predict_epochs=2, predict_hidden=8, align_width=64, align_epochs=10,
                  flow_steps=100, flow_select_every=50, flow_select_num=20, generate_num=30, baseline_num=20,
                  adam_lrs=(1e-3, 1e-2, 1e-1), optimize_steps=60, expert_epochs=10,
                  cuts_epochs=20, cuts_proxy_epochs=10, cuts_proxies=1),
}
TASK = "breast-cancer-mlp"  # the optimize stage's task: a dataset the shipped rule was never meta-trained on


@dataclass
class DemoRun:
    """What the stages share: the output folder, seed, device, sizes, and the zoo once the zoo stage built it."""
    out: Path
    seed: int
    device: torch.device
    size: dict
    zoo: object = None
    seeds: dict = field(default_factory=dict)


def _digits_split():
    from .. import data

    return data.load("digits-flat")


# ------------------------------------------------------------------------------------------------------------ spec

def spec(run: DemoRun, tick) -> dict:
    import unf
    from unf.zoo.builtin import cnn, mlp

    x = _digits_split().x_train[:2]
    out = {}
    for name, factory in (("mlp", mlp), ("cnn", cnn)):
        s = unf.spec_from_module(factory(), x)
        fixed = sum(a is None for n in s for a in s[n].axes)
        axes = sum(len(s[n].axes) for n in s)
        out[name] = {"groups": dict(s.groups), "tensors": len(s), "axes": axes, "fixed_axes": fixed,
                     "parameters": sum(torch.Size(s[n].shape).numel() for n in s.parameter_names), "text": str(s)}
        tick(f"{name} spec")
    m, c = out["mlp"], out["cnn"]
    out["line"] = (f"digits MLP: {len(m['groups'])} permutation groups of sizes {list(m['groups'].values())} over "
                   f"{m['tensors']} tensors ({m['fixed_axes']} of {m['axes']} axes fixed); digits CNN: "
                   f"{len(c['groups'])} channel groups over {c['tensors']} tensors ({c['fixed_axes']} of {c['axes']} "
                   "axes fixed: input, output, kernel taps)")
    return out


# ------------------------------------------------------------------------------------------------------------- zoo

def zoo(run: DemoRun, tick) -> dict:
    import time

    from unf.zoo.builtin import build_builtin

    n = run.size["zoo_models"]
    path = run.out / f"zoo-digits-mlp-n{n}-seed{run.seed}"
    resumed = (path / "manifest.json").exists()
    start = time.perf_counter()
    run.zoo = build_builtin("digits-mlp", path, n, run.seed, progress=False, device=run.device)
    seconds = time.perf_counter() - start
    tick("zoo built")
    last = max(int(r["epoch"]) for r in run.zoo.metadata)
    accs = sorted(float(r["test_acc"]) for r in run.zoo.metadata if int(r["epoch"]) == last)
    out = {"networks": len(accs), "rows": len(run.zoo), "epochs_saved": sorted({int(r["epoch"]) for r in
                                                                                 run.zoo.metadata}),
           "dir": str(path), "build_seconds": seconds, "resumed": resumed,
           "test_acc_last_epoch": {"median": median(accs), "min": accs[0], "max": accs[-1]}}
    out["line"] = (f"{len(accs)} digits MLPs (64-32-32-10, sampled activation, lr, optimizer, init, weight decay, "
                   f"dropout) trained as one population in {seconds:.1f} s{' (resumed)' if resumed else ''}; test "
                   f"accuracy at epoch {last}: median {median(accs):.3f}, range {accs[0]:.3f}-{accs[-1]:.3f}")
    return out


# --------------------------------------------------------------------------------------------------------- predict

def predict(run: DemoRun, tick) -> dict:
    from unf.zoo.predict import fit_predictor

    from .demo_report import plot_predict

    out = {}
    for model in ("unf", "statnn"):
        r = fit_predictor(run.zoo, model, "test_acc", run.seed, epochs=run.size["predict_epochs"],
                          hidden=run.size["predict_hidden"], device=run.device, predictions=True)
        out[model] = r
        tick(f"{model} fitted")
    plot_predict(out, run.out / "predict.png")
    u, s = out["unf"], out["statnn"]
    out["figure"] = "predict.png"
    out["line"] = (f"test accuracy predicted from weights on {u['n_test']} held-out zoo rows: Kendall tau UNF "
                   f"{u['kendall_tau']:.3f}, StatNN {s['kendall_tau']:.3f} (R^2 {u['r2']:.3f} / {s['r2']:.3f}; "
                   f"epoch chosen on the validation split)")
    return out


# ----------------------------------------------------------------------------------------------------------- align

def align(run: DemoRun, tick) -> dict:
    import unf
    from unf import _demo_model
    from unf.io import save_state_dict
    from unf.training import evaluate, train_classifier

    from .align import align_and_report

    split = _digits_split()
    width, epochs = run.size["align_width"], run.size["align_epochs"]
    seeds = [run.seed, run.seed + 1]
    run.seeds["align_models"] = seeds
    paths, accs = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        net = train_classifier(_demo_model.mlp(width), split.x_train, split.y_train, epochs=epochs, seed=seed)
        accs.append(evaluate(net, split.x_test, split.y_test)[1])
        paths.append(run.out / f"mlp_seed{seed}.safetensors")
        save_state_dict(net.state_dict(), paths[-1])
        tick(f"MLP seed {seed} trained")
    result = align_and_report(argparse.Namespace(
        model="unf._demo_model:mlp", a=str(paths[0]), b=str(paths[1]), data="digits-flat", split_seed=0,
        method="weight", points=11, seed=run.seed, arg=[f"width={width}"],
        out=str(run.out / f"mlp_seed{seeds[1]}_aligned.safetensors"), plot=str(run.out / "align.png")),
        say=lambda _: None)
    tick("aligned")
    naive, al = result["naive"]["barrier"], result["aligned"]["barrier"]
    out = {"width": width, "epochs": epochs, "model_seeds": seeds, "test_acc": accs, "t": result["t"],
           "naive": result["naive"], "aligned": result["aligned"], "figure": "align.png",
           "spec": str(unf.spec_from_module(_demo_model.mlp(width), split.x_train[:1]))}
    out["line"] = (f"two MLPs 64-{width}-{width}-10 from seeds {seeds} (test accuracy {accs[0]:.3f}, {accs[1]:.3f}): "
                   f"test-loss barrier on the straight path {naive:.3f} before, {al:.3f} after weight matching")
    return out


# -------------------------------------------------------------------------------------------------------- generate

def generate(run: DemoRun, tick) -> dict:
    """The flow recipe that works (README): MLP field, canonicalised zoo, data prediction, checkpoints selected on
    the training split; then accuracy and novelty of samples against the zoo, with memorisers as the noise frontier."""
    import time

    from unf import data as datasets
    from unf.flow import FlowConfig, train_flow
    from unf.flow.baselines import dominated, memorisers, noise_frontier, train_split_accuracy
    from unf.flow.canonical import reference_index
    from unf.flow.evaluate import evaluate_networks, train_split_scorer
    from unf.flow.novelty import novelty_report, probe_set
    from unf.flow.zoo import build_network, holdout_split, model_factory, select_rows

    from .demo_report import plot_generate

    zoo, size = run.zoo, run.size
    picked = select_rows(zoo, {"activation": "relu"})
    rows = [zoo.metadata[i] for i in picked]
    train_ids, held_ids = holdout_split([r["model_id"] for r in rows], 0.2, run.seed)
    train_rows = [i for i, r in zip(picked, rows) if str(r["model_id"]) in set(train_ids)]
    held_rows = [i for i, r in zip(picked, rows) if str(r["model_id"]) in set(held_ids)]
    if len(train_rows) < 2 or not held_rows:
        raise RuntimeError(f"the zoo has {len(picked)} ReLU networks; too few to train and hold out")
    meta = [zoo.metadata[i] for i in train_rows]
    info_ = zoo.manifest["info"]
    factory = model_factory(info_)
    cfg = FlowConfig(velocity="mlp", steps=size["flow_steps"], batch_size=64, lr=5e-4, seed=run.seed,
                     canonicalize="reference", select_every=size["flow_select_every"])  # data prediction: the default
    # the most accurate snapshot among those whose samples are as diverse as the training networks
    select = train_split_scorer(factory, meta[0], "digits-flat", 0, num=size["flow_select_num"], seed=run.seed,
                                reference=zoo.weight_space(train_rows))
    start = time.perf_counter()
    flow, history = train_flow(zoo.weight_space(train_rows), meta, cfg, device=run.device,
                               reference=reference_index(meta), select=select)
    train_seconds = time.perf_counter() - start
    tick("flow trained")
    n = size["generate_num"]
    start = time.perf_counter()
    gen, nfe = flow.sample(n, 16, "euler", seed=run.seed, device=run.device)
    sample_seconds = time.perf_counter() - start
    gen, _ = evaluate_networks(factory, gen.to("cpu"), [{"activation": "relu"}] * n, "digits-flat", 0)
    tick("networks sampled")
    train_ws, held_ws = zoo.weight_space(train_rows), zoo.weight_space(held_rows)
    rank = train_split_accuracy(meta)  # the memorisers' "best" networks: by training-split accuracy
    sets = {"generated": gen}
    for k in sorted({1, min(10, len(train_rows))}):
        for sigma in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
            sets[f"memoriser k={k} sigma={sigma}"] = memorisers(train_ws, rank, k, sigma, size["baseline_num"],
                                                                seed=run.seed)
    split = datasets.load("digits-flat")
    report = novelty_report(build_network(factory, meta[0]), zoo.spec, sets, train_ws, held_ws,
                            probe_set(split.x_test, copies=2, seed=0), split.y_test, l2=False)
    tick("novelty measured")
    points = {name: (1 - r["summary"]["derivedness"]["q50"], r["summary"]["accuracy"]["mean"])
              for name, r in report.items()}
    frontier = noise_frontier(torch.tensor([p for k, p in points.items() if k.startswith("memoriser")]))
    if points["generated"][0] > max(p[0] for p in frontier.tolist()):
        versus = "more novel than every memoriser (the noise frontier does not reach it)"
    else:
        dom = dominated(torch.tensor(points["generated"]), frontier)
        versus = "dominated by the noise frontier" if dom else "above the noise frontier"
    train_acc = float(torch.tensor([float(r["test_acc"]) for r in meta]).mean())
    g, h = report["generated"]["summary"], report["heldout"]["summary"]
    plot_generate(points, frontier.tolist(), train_acc, run.out / "generate.png")
    out = {"velocity": "mlp", "steps": cfg.steps, "selected_step": flow.info.get("selected_step"),
           "selected_train_split_score": flow.info.get("selected_score"), "final_loss": history[-1]["loss"],
           "train_networks": len(train_rows), "heldout_networks": len(held_rows), "train_seconds": train_seconds,
           "sampled": n, "nfe": nfe, "sample_seconds": sample_seconds, "zoo_train_test_acc_mean": train_acc,
           "generated": g, "heldout": h, "points": {k: list(v) for k, v in points.items()},
           "frontier": frontier.tolist(), "versus_noise_frontier": versus, "figure": "generate.png"}
    out["line"] = (f"{n} networks sampled in {sample_seconds:.2f} s from a flow trained {train_seconds:.0f} s on "
                   f"{len(train_rows)} ReLU zoo MLPs: test accuracy {g['accuracy']['mean']:.3f} (zoo "
                   f"{train_acc:.3f}), novelty 1-derivedness {points['generated'][0]:.3f} (held-out zoo "
                   f"{points['heldout'][0]:.3f}), copies {g['copy_fraction']:.0%}; {versus}")
    return out


# -------------------------------------------------------------------------------------------------------- optimize

def optimize(run: DemoRun, tick) -> dict:
    from unf.optim import UNFOptimizer
    from unf.optim.tasks import TASKS, speedup, train_curve

    from .demo_report import plot_optimize

    task, steps = TASKS[TASK], run.size["optimize_steps"]
    adam = {}
    for lr in run.size["adam_lrs"]:
        adam[lr] = train_curve(task, lambda m, x: torch.optim.Adam(m.parameters(), lr=lr), run.seed, steps=steps,
                               device=run.device)
        tick(f"Adam lr={lr:g}")

    def final(r):  # the tuning criterion: the training loss reached (a diverged run never wins)
        return min((v for v in r["train"] if v is not None), default=float("inf"))

    best = min(adam, key=lambda lr: final(adam[lr]))
    learned = train_curve(task, lambda m, x: UNFOptimizer.for_model(m, x), run.seed, steps=steps, device=run.device)
    tick("learned optimizer")
    ref = adam[best]
    plot_optimize(adam, best, learned, run.out / "optimize.png", TASK)
    out = {"task": TASK, "steps": steps, "adam_lrs": list(adam), "best_adam_lr": best,
           "adam": {f"{lr:g}": r for lr, r in adam.items()}, "learned": learned,
           "final_train_loss": {"adam": ref["train"][-1], "learned": learned["train"][-1]},
           "test_acc": {"adam": ref["test_acc"], "learned": learned["test_acc"]},
           "speedup_train": speedup(ref["train"], learned["train"]),
           "step_time_ratio": learned["seconds"] / ref["seconds"], "figure": "optimize.png"}
    out["line"] = (f"{TASK} ({steps} steps, never meta-trained on): final training loss learned "
                   f"{learned['train'][-1]:.4f} vs Adam (lr {best:g}, best of {len(adam)} by training loss) "
                   f"{ref['train'][-1]:.4f}; test accuracy {learned['test_acc']:.3f} vs {ref['test_acc']:.3f}; "
                   f"a step takes {out['step_time_ratio']:.1f}x an Adam step (evaluations every 10 steps included)")
    return out


# ------------------------------------------------------------------------------------------------------------ edit

def _class_accuracy(model, x, y) -> dict:
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    a, b = y < 5, y >= 5
    return {"classes_0_4": float((pred[a] == y[a]).float().mean()),
            "classes_5_9": float((pred[b] == y[b]).float().mean()), "all": float((pred == y).float().mean())}


def _merge_experts(run: DemoRun, tick) -> dict:
    """A base MLP briefly trained on half the training split; experts fine-tuned from it on classes 0-4 and 5-9;
    their task vectors added to the base with the lambda best on a validation split (test split: reported)."""
    import numpy as np

    from unf import _demo_model
    from unf.merge import TaskVector, merge
    from unf.training import train_classifier

    split = _digits_split()
    x, y = split.x_train, split.y_train
    perm = torch.as_tensor(np.random.default_rng(run.seed).permutation(len(y)))
    n_pre, n_val = len(y) // 2, len(y) * 15 // 100
    pre, val, ft = perm[:n_pre], perm[n_pre:n_pre + n_val], perm[n_pre + n_val:]
    torch.manual_seed(run.seed)
    base = train_classifier(_demo_model.mlp(128), x[pre], y[pre], epochs=3, seed=run.seed)
    experts = {}
    for name, mask in (("a", y[ft] < 5), ("b", y[ft] >= 5)):
        experts[name] = train_classifier(copy.deepcopy(base), x[ft[mask]], y[ft[mask]],
                                         epochs=run.size["expert_epochs"], seed=run.seed + 1)
    tick("experts trained")
    base_sd = base.state_dict()
    vectors = [TaskVector(base_sd, e.state_dict()) for e in experts.values()]
    merged_tv = merge(vectors, "task_arithmetic")
    net = copy.deepcopy(base)
    lams = [round(0.1 * i, 1) for i in range(1, 16)]
    val_acc = {}
    for lam in lams:
        net.load_state_dict(merged_tv.apply(base_sd, lam))
        val_acc[lam] = _class_accuracy(net, x[val], y[val])["all"]
    lam = max(lams, key=lambda v: val_acc[v])
    net.load_state_dict(merged_tv.apply(base_sd, lam))
    xt, yt = split.x_test, split.y_test
    return {"lambda": lam, "base": _class_accuracy(base, xt, yt),
            "expert_0_4": _class_accuracy(experts["a"], xt, yt), "expert_5_9": _class_accuracy(experts["b"], xt, yt),
            "merged": _class_accuracy(net, xt, yt), "cosine": float(vectors[0].cosine(vectors[1]))}


def edit(run: DemoRun, tick) -> dict:
    from unf.merge.cuts_demo import run_cuts_demo

    from .demo_report import plot_edit

    merged = _merge_experts(run, tick)
    tick("merged")
    size = run.size
    cuts = run_cuts_demo("backdoor", seed=run.seed, epochs=size["cuts_epochs"], proxy_epochs=size["cuts_proxy_epochs"],
                         proxies=size["cuts_proxies"])
    tick("CUTS done")
    plot_edit(merged, cuts, run.out / "edit.png")
    m = merged
    out = {"merge": merged, "cuts": cuts, "figure": "edit.png"}
    out["line"] = (f"task-vector merge of a 0-4 and a 5-9 expert: test accuracy {m['merged']['all']:.3f} (experts "
                   f"{m['expert_0_4']['all']:.3f}, {m['expert_5_9']['all']:.3f}; lambda {m['lambda']} on validation); "
                   f"CUTS on a backdoor: attack success {cuts['corrupted_asr']:.3f} -> {cuts['cuts_asr']:.3f}, "
                   f"accuracy {cuts['corrupted_acc']:.3f} -> {cuts['cuts_acc']:.3f}")
    return out


STAGES: dict[str, Callable] = {"spec": spec, "zoo": zoo, "predict": predict, "align": align, "generate": generate,
                               "optimize": optimize, "edit": edit}
NEEDS = {"predict": ("zoo",), "generate": ("zoo",)}  # a stage's prerequisites, run with it under --only


def ticks(name: str, size: dict) -> int:
    """How many times stage ``name`` advances its progress bar."""
    return len(size["adam_lrs"]) + 1 if name == "optimize" else {"spec": 2, "zoo": 1, "predict": 2, "align": 3,
                                                                  "generate": 3, "edit": 3}[name]
