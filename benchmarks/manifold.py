"""Walking the weight manifold against context concatenation on digits, on held-out contexts (issue 16, item 2).

    python benchmarks/manifold.py [--quick] [--seeds 5] [--out benchmarks/results]
    python benchmarks/manifold.py --table-only      # table and figure from OUT/manifold.jsonl alone

Two tasks on the 8x8 digits (pixels in [0, 1]), each with a context ``s`` in [0, 1]:

* ``noise`` (line manifold): the image plus Gaussian noise of std ``NOISE_STD * s``. Training contexts s in
  [0, 0.5]; held out: s in (0.5, 1] (more noise than ever seen).
* ``rotation`` (circle manifold): the image rotated by the angle 2 pi s about its centre (bilinear interpolation on
  the 8x8 grid, zeros outside). Training contexts s in [0, 0.75) (0-270 degrees); held out: [0.75, 1) (270-360).

Models (the same MLP 64-64-64-10, ReLU):

* ``manifold``: ``unf.manifold.wrap(mlp, "line" | "circle")``, every layer's weights a function of s; Adam.
* ``manifold+metric``: the same, Adam wrapped in ``unf.manifold.MetricCorrected``.
* ``concat``: the MLP with the context appended to its input (s for the line; cos 2 pi s, sin 2 pi s for the circle).
* ``concat-wide``: the concatenation MLP widened to the manifold model's parameter count.

Protocol: digits train/test 80/20 (``unf.data``, seed 0); 20% of the training images (stratified, seed 0) are a
validation split. Training draws a fresh context from the training range (and fresh noise) for every example of every
batch. Validation: the validation images at 11 contexts spread over the training range (fixed noise). For every
(task, model, seed, lr) the checkpoint is the epoch with the best validation accuracy, and per (task, model) the
learning rate (Adam, from ``LRS``) is the one with the best mean validation accuracy over the seeds: no choice sees a
held-out context or a test image. Reported: test accuracy of the chosen checkpoints on the test images at 21 contexts
(line: 0, 0.05, ..., 1) or 20 (circle: 0, 0.05, ..., 0.95), averaged over the training range and over the held-out
range; mean +- sample std over seeds. One JSON line per finished (task, model, seed, lr) run in ``OUT/manifold.jsonl``
(a rerun skips them); ``OUT/manifold.md`` and ``OUT/manifold.png`` (accuracy over s), written atomically.
``--quick``: 2 seeds, 4 epochs, one learning rate, under ``OUT/quick/``.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from unf import data
from unf.io import atomic_write
from unf.manifold import MetricCorrected, wrap

from results_io import append_jsonl, load_jsonl

NOISE_STD = 1.0
TASKS = {"noise": {"manifold": "line", "train": (0.0, 0.5), "closed": True},
         "rotation": {"manifold": "circle", "train": (0.0, 0.75), "closed": False}}
MODELS = ("manifold", "manifold+metric", "concat", "concat-wide")
HIDDEN = 64
LRS = (1e-3, 3e-3, 1e-2)
EPOCHS = 60
BATCH = 64


def mlp(inputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def context_features(manifold: str, s: torch.Tensor) -> torch.Tensor:
    if manifold == "line":
        return s[:, None]
    return torch.stack([torch.cos(2 * math.pi * s), torch.sin(2 * math.pi * s)], 1)


class Concat(nn.Module):
    """``mlp([x, features(s)])``: the context as extra inputs."""

    def __init__(self, manifold: str, hidden: int):
        super().__init__()
        self.manifold = manifold
        self.net = mlp(64 + context_features(manifold, torch.zeros(1)).shape[1], hidden)

    def forward(self, x, s):
        return self.net(torch.cat([x, context_features(self.manifold, s)], 1))


def equal_width(manifold: str, target: int) -> int:
    """The hidden width whose concatenation MLP has the parameter count closest to ``target``."""
    return min(range(HIDDEN, 8 * HIDDEN), key=lambda h: abs(n_params(Concat(manifold, h)) - target))


def build(task: str, model: str):
    manifold = TASKS[task]["manifold"]
    if model.startswith("manifold"):
        return wrap(mlp(64, HIDDEN), manifold)
    if model == "concat":
        return Concat(manifold, HIDDEN)
    return Concat(manifold, equal_width(manifold, n_params(wrap(mlp(64, HIDDEN), manifold))))


def apply_context(task: str, images: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 8, 8]`` images at contexts ``s`` ``[N]`` -> ``[N, 64]`` inputs (``noise``: standard normal, like
    the images; used by the noise task)."""
    if task == "noise":
        out = images + NOISE_STD * s[:, None, None, None] * noise
    else:
        a = 2 * math.pi * s
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.flatten(1)


def test_contexts(task: str) -> torch.Tensor:
    return torch.linspace(0, 1, 21) if TASKS[task]["closed"] else torch.arange(20) / 20


def in_training_range(task: str, s: float) -> bool:
    lo, hi = TASKS[task]["train"]
    return lo <= s <= hi if TASKS[task]["closed"] else lo <= s < hi


def splits():
    d = data.load("digits", seed=0)
    tr, va = train_test_split(torch.arange(len(d.y_train)).numpy(), test_size=0.2, stratify=d.y_train.numpy(),
                              random_state=0)
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    return (d.x_train[tr], d.y_train[tr]), (d.x_train[va], d.y_train[va]), (d.x_test, d.y_test)


def fixed_set(task: str, xy, contexts: torch.Tensor, seed: int):
    """Every image at every context, with fixed noise: (inputs, contexts, labels, context index)."""
    x, y = xy
    g = torch.Generator().manual_seed(seed)
    s = contexts.repeat_interleave(len(y))
    images = x.repeat(len(contexts), 1, 1, 1)
    return (apply_context(task, images, s, torch.randn(images.shape, generator=g)), s, y.repeat(len(contexts)),
            torch.arange(len(contexts)).repeat_interleave(len(y)))


@torch.no_grad()
def accuracy_per_context(model, fixed, n_contexts: int) -> list[float]:
    x, s, y, idx = fixed
    model.eval()
    hit = (model(x, s).argmax(1) == y).float()
    return [float(hit[idx == i].mean()) for i in range(n_contexts)]


def run_one(task: str, model_name: str, seed: int, lr: float, epochs: int, sets, meta: dict) -> dict:
    (x_tr, y_tr), val_xy, test_xy = sets
    lo, hi = TASKS[task]["train"]
    val_s = torch.linspace(lo, hi if TASKS[task]["closed"] else hi - (hi - lo) / 11, 11)
    val = fixed_set(task, val_xy, val_s, seed=1)
    torch.manual_seed(seed)
    model = build(task, model_name)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if model_name == "manifold+metric":
        opt = MetricCorrected(opt, model)
    g = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, val_curve = -1.0, copy.deepcopy(model.state_dict()), 0, []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(y_tr), BATCH):
            idx = perm[i:i + BATCH]
            s = lo + (hi - lo) * torch.rand(len(idx), generator=g)
            x = apply_context(task, x_tr[idx], s, torch.randn(x_tr[idx].shape, generator=g))
            opt.zero_grad()
            F.cross_entropy(model(x, s), y_tr[idx]).backward()
            opt.step()
        acc = statistics.mean(accuracy_per_context(model, val, len(val_s)))
        val_curve.append(acc)
        if acc > best:
            best, best_state, best_epoch = acc, copy.deepcopy(model.state_dict()), epoch
    train_s = time.perf_counter() - t0
    model.load_state_dict(best_state)
    contexts = test_contexts(task)
    test = accuracy_per_context(model, fixed_set(task, test_xy, contexts, seed=2), len(contexts))
    return {"task": task, "model": model_name, "seed": seed, "lr": lr, "epochs": epochs, "params": n_params(model),
            "best_epoch": best_epoch, "val_acc": best, "val_curve": val_curve, "contexts": contexts.tolist(),
            "test_acc": test, "train_s": train_s, **meta}


def ms(values, scale: float = 100.0, digits: int = 1) -> str:
    values = [scale * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def chosen(rows: list[dict]) -> dict:
    """(task, model) -> (lr, the runs at it): the lr with the best mean validation accuracy over seeds."""
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["model"]), {}).setdefault(r["lr"], []).append(r)
    out = {}
    for key, per_lr in by.items():
        lr = max(per_lr, key=lambda v: (statistics.mean(r["val_acc"] for r in per_lr[v]), -v))
        out[key] = lr, sorted(per_lr[lr], key=lambda r: r["seed"])
    return out


def split_means(r: dict) -> tuple[float, float]:
    """Mean test accuracy over the training-range contexts and over the held-out ones."""
    seen = [a for s, a in zip(r["contexts"], r["test_acc"]) if in_training_range(r["task"], s)]
    held = [a for s, a in zip(r["contexts"], r["test_acc"]) if not in_training_range(r["task"], s)]
    return statistics.mean(seen), statistics.mean(held)


def summarise(rows: list[dict], out: Path) -> str:
    pick = chosen(rows)
    lines = []
    for task, spec in TASKS.items():
        models = [m for m in MODELS if (task, m) in pick]
        if not models:
            continue
        lo, hi = spec["train"]
        n = len(pick[task, models[0]][1])
        lines += [f"### {task} ({spec['manifold']} manifold; training contexts s in [{lo:g}, {hi:g}"
                  f"{']' if spec['closed'] else ')'}; {n} seeds; test accuracy %, mean +- sample std)", "",
                  "| model | params | lr (val) | best epoch | val acc | test, training contexts | "
                  "test, held-out contexts |", "|---|---|---|---|---|---|---|"]
        for m in models:
            lr, rs = pick[task, m]
            seen, held = zip(*(split_means(r) for r in rs))
            lines.append(f"| {m} | {rs[0]['params']:,} | {lr:g} | {statistics.mean(r['best_epoch'] for r in rs):.0f}"
                         f" | {ms([r['val_acc'] for r in rs])} | {ms(seen)} | {ms(held)} |")
        lines.append("")
        if {"manifold", "concat", "concat-wide"} <= set(models):
            base = {r["seed"]: split_means(r)[1] for r in pick[task, "manifold"][1]}
            diffs = []
            for other in ("concat", "concat-wide"):
                d = [base[r["seed"]] - split_means(r)[1] for r in pick[task, other][1] if r["seed"] in base]
                diffs.append(f"{other} {ms(d)}")
            lines += ["Held-out contexts, manifold minus (paired by seed): " + ", ".join(diffs), ""]
    text = "\n".join(lines)
    atomic_write(out / "manifold.md", lambda t: Path(t).write_text(text + "\n"))
    plot(pick, out / "manifold.png")
    return text


def plot(pick: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(k[0] == t for k in pick)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in MODELS:
            if (task, m) not in pick:
                continue
            lr, rs = pick[task, m]
            xs = rs[0]["contexts"]
            acc = [[100 * r["test_acc"][i] for r in rs] for i in range(len(xs))]
            mean = [statistics.mean(a) for a in acc]
            sd = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
            ax.plot(xs, mean, marker="o", ms=3, label=f"{m} (lr {lr:g})")
            ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], alpha=0.15)
        lo, hi = TASKS[task]["train"]
        ax.axvspan(hi, 1.0, color="grey", alpha=0.15, label="held-out contexts")
        ax.set(title=f"{task} ({TASKS[task]['manifold']})", ylabel="test accuracy % (mean +- sample std)",
               xlabel="noise level s" if task == "noise" else "rotation s (turns)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 4 epochs, one lr (a check that everything runs)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--table-only", action="store_true", help="table and figure from OUT/manifold.jsonl, no training")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds, epochs, lrs = (2, 4, LRS[1:2]) if args.quick else (args.seeds, EPOCHS, LRS)
    out = args.out / "quick" if args.quick else args.out
    log = out / "manifold.jsonl"
    key = lambda r: (r["task"], r["model"], r["seed"], r["lr"], r["epochs"])  # noqa: E731
    rows = load_jsonl(log, key)
    if args.table_only:
        if not rows:
            p.error(f"--table-only: {log} holds no results")
        print(summarise(rows, out))
        return 0
    rows = [r for r in rows if r["epochs"] == epochs]  # another epoch count is kept in the file, not tabulated
    done = {key(r) for r in rows}
    sets = splits()
    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    for seed in range(seeds):
        for task in TASKS:
            for model in MODELS:
                for lr in lrs:
                    if (task, model, seed, lr, epochs) in done:
                        continue
                    row = run_one(task, model, seed, lr, epochs, sets, meta)
                    append_jsonl(log, row)
                    rows.append(row)
                    print(f"{task} {model} seed {seed} lr {lr:g}: val {row['val_acc']:.3f} "
                          f"({row['train_s']:.1f} s)", file=sys.stderr, flush=True)
    print(summarise([r for r in rows if r["seed"] < seeds and r["lr"] in lrs], out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
