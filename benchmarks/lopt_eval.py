"""Learned optimizers against tuned Adam and SGD+momentum on held-out tasks (issue: learned optimizer, item 5).

    python benchmarks/lopt_eval.py [--seeds 5] [--tasks NAME,...] [--out benchmarks/results]
    python benchmarks/lopt_eval.py --table-only    # table and figure from the committed results only
    python benchmarks/lopt_eval.py --rule broad=runs/lopt-broad/rule.safetensors [--shard I/N]   # a candidate rule

Every (task, optimizer, learning rate, seed) run is one JSON line in ``OUT/lopt_eval*.jsonl`` (resumable: done runs
are skipped; ``--shard I/N`` runs every N-th job in its own file, so N processes can share the cores). Then, per task: Adam's and SGDM's learning rate is chosen on the *training* loss (best mean over seeds of
the lowest full-batch training loss within the horizon); the learned optimizers run with their defaults (lr 1.0, no
tuning). Speed-up on one seed = steps tuned Adam needs to reach its best training loss / steps the optimizer needs to
reach that loss (0 if it never does); the same on test loss. Writes ``OUT/lopt_eval.md`` (table, mean +- sample std
over seeds) and ``OUT/lopt_eval.png`` (loss curves, mean over seeds), atomically.

``--rule NAME=FILE`` evaluates a candidate rule (a weights file of ``unf lopt meta-train``) on the same tasks and seeds
against the committed baselines: its runs go to ``OUT/lopt_eval.rule-NAME*.jsonl``, its table (the baselines, the
shipped rules and it) to ``OUT/lopt_eval.rule-NAME.md``, followed by the shipped default's criteria (issue 29): final
training loss within 1.1x constant-rate tuned Adam's on every task, below Adam at lr 1e-3 on at least 4 of 6, no
divergence.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from unf.io import atomic_write
from unf.optim import LearnedRule, UNFOptimizer
from unf.optim.tasks import ADAM_LRS, SGD_LRS, TASKS, speedup, train_curve

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "unf" / "optim" / "weights"
LEARNED = {"unf": WEIGHTS / "default.safetensors", "deepsets": WEIGHTS / "deepsets.safetensors",
           "mlp": WEIGHTS / "mlp.safetensors"}


def make_optimizer(name: str, lr: float):
    def make(model, example):
        if name == "adam":
            return torch.optim.Adam(model.parameters(), lr=lr)
        if name == "sgdm":
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return UNFOptimizer.for_model(model, example, weights=LearnedRule.load(LEARNED[name]), lr=lr)
    return make


def run_one(task: str, opt_name: str, lr: float, seed: int) -> dict:
    return {"task": task, "opt": opt_name, "lr": lr, "seed": seed,
            **train_curve(TASKS[task], make_optimizer(opt_name, lr), seed)}


def _ms(values: list, digits: int) -> str:
    """mean +- sample std (0 for a single value), or "-" for none."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def criteria(by: dict, name: str) -> list[str]:
    """The shipped default's criteria for the learned rule ``name`` (mean final training loss over seeds)."""
    lines, within, below, diverged = [], 0, 0, 0
    for task in TASKS:
        final = lambda opt, lr: [r["train"][-1] for r in by.get((task, opt, lr), [])]  # noqa: E731
        adam = {lr: statistics.mean(final("adam", lr)) for lr in ADAM_LRS if final("adam", lr)}
        mine = final(name, 1.0)
        if not adam or not mine:
            continue
        tuned = min(adam.values())
        ratio = statistics.mean(mine) / tuned
        within += ratio <= 1.1
        below += statistics.mean(mine) < adam.get(1e-3, math.inf)
        diverged += sum(r["diverged"] for r in by[(task, name, 1.0)])
        lines.append(f"| {task} | {statistics.mean(mine):.4f} | {tuned:.4f} | {ratio:.2f}x | {adam.get(1e-3, math.nan):.4f} |")
    head = [f"| task | {name}: final training loss | tuned Adam (constant) | ratio | Adam lr 1e-3 |", "|---|---|---|---|---|"]
    return head + lines + ["", f"{name}: within 1.1x tuned Adam on {within}/{len(lines)} tasks (target: all), below "
                               f"Adam at 1e-3 on {below}/{len(lines)} (target: >= 4 of 6), {diverged} diverged runs."]


def summarise(rows: list[dict], out: Path, candidate: str = "") -> str:
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["opt"], r["lr"]), []).append(r)
    lines = ["| task | optimizer | lr | train-loss speed-up vs tuned Adam | test-loss speed-up | final test acc | "
             "diverged | stalled |", "|---|---|---|---|---|---|---|---|"]
    curves = {}
    means = {}
    for task in TASKS:
        chosen = {}
        for opt, grid in (("adam", ADAM_LRS), ("sgdm", SGD_LRS)):
            def score(lr):
                rs = by.get((task, opt, lr), [])
                if not rs:
                    return math.inf
                return statistics.mean(min((v for v in r["train"] if v is not None), default=math.inf) for r in rs)
            chosen[opt] = min(grid, key=score)
        for name in LEARNED:
            chosen[name] = 1.0
        adam = {r["seed"]: r for r in by.get((task, "adam", chosen["adam"]), [])}
        for opt, lr in chosen.items():
            rs = by.get((task, opt, lr), [])
            if not rs:
                continue
            tr = [speedup(adam[r["seed"]]["train"], r["train"]) for r in rs if r["seed"] in adam]
            te = [speedup(adam[r["seed"]]["test"], r["test"]) for r in rs if r["seed"] in adam]
            acc = [r["test_acc"] for r in rs]
            lines.append(f"| {task} | {opt} | {lr:g} | {_ms(tr, 2)} | {_ms(te, 2)} | "
                         f"{_ms([100 * a for a in acc], 1)} | {sum(r['diverged'] for r in rs)}/{len(rs)} | "
                         f"{sum(r['stalled'] for r in rs)}/{len(rs)} |")
            means.setdefault(opt, []).append(statistics.mean(tr) if tr else 0.0)
            n = min(len(r["train"]) for r in rs)
            curves[(task, opt)] = [statistics.mean(r["train"][i] if r["train"][i] is not None else math.nan
                                                   for r in rs) for i in range(n)], rs[0]["eval_every"]
    lines.append("")
    lines.append("Mean train-loss speed-up over the tasks: " + ", ".join(
        f"{k} {statistics.mean(v):.2f}" for k, v in means.items()) + ". Tasks at >= 1.0x: " + ", ".join(
        f"{k} {sum(x >= 1.0 for x in v)}/{len(v)}" for k, v in means.items()) + ".")
    if candidate:
        lines += [""] + criteria(by, "unf") + [""] + criteria(by, candidate)
    text = "\n".join(lines)
    stem = f"lopt_eval.rule-{candidate}" if candidate else "lopt_eval"
    atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    _plot(curves, out / f"{stem}.png")
    return text


def _plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(TASKS)
    fig, axes = plt.subplots(2, math.ceil(len(names) / 2), figsize=(5 * math.ceil(len(names) / 2), 7))
    for ax, task in zip(axes.flat, names):
        for (t, opt), (curve, every) in curves.items():
            if t == task:
                ax.plot([i * every for i in range(len(curve))], curve, label=opt, lw=2 if opt == "unf" else 1)
        ax.set(title=task, xlabel="step", ylabel="full-batch training loss", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the task names")
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th job from the I-th (one process per core)")
    ap.add_argument("--table-only", action="store_true", help="table and figure from OUT/lopt_eval*.jsonl, no runs")
    ap.add_argument("--rule", default=None, metavar="NAME=FILE",
                    help="evaluate a candidate rule (weights file) against the committed baselines")
    args = ap.parse_args(argv)
    candidate = ""
    if args.rule:
        candidate, _, path = args.rule.partition("=")
        if not candidate or not path or candidate in ("adam", "sgdm", *LEARNED) or not Path(path).is_file():
            ap.error(f"--rule {args.rule!r}: NAME=FILE with a new name and an existing weights file")
        LEARNED[candidate] = Path(path)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    i, n = (int(v) for v in args.shard.split("/"))
    stem = f"lopt_eval.rule-{candidate}" if candidate else "lopt_eval"
    log = out / (f"{stem}.jsonl" if n == 1 else f"{stem}.shard{i}.jsonl")
    rows = [json.loads(line) for f in sorted(out.glob("lopt_eval*.jsonl")) for line in f.read_text().splitlines()]
    if not candidate:  # the committed table: baselines and the shipped rules only
        rows = [r for r in rows if r["opt"] in ("adam", "sgdm", *LEARNED)]
    if args.table_only:
        if not rows:
            ap.error(f"--table-only: no lopt_eval*.jsonl results in {out}")
        print(summarise(rows, out, candidate))
        return
    done = {(r["task"], r["opt"], r["lr"], r["seed"]) for r in rows}
    names = args.tasks.split(",") if args.tasks else list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; choose from {list(TASKS)}")
    grids = (("adam", ADAM_LRS), ("sgdm", SGD_LRS), *((k, [1.0]) for k in LEARNED)) if not candidate else \
        ((candidate, [1.0]),)  # a candidate runs alone; the baselines are the committed runs
    jobs = [(t, o, lr, s) for t in names for s in range(args.seeds) for o, grid in grids for lr in grid]
    todo = [j for j in jobs[i::n] if j not in done]
    from tqdm.auto import tqdm

    with log.open("a") as f:
        for job in tqdm(todo, desc="lopt eval", disable=not sys.stderr.isatty()):
            row = run_one(*job)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
    print(summarise(rows, out, candidate))


if __name__ == "__main__":
    main()
