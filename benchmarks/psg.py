"""PSG against plain SGD on digits: post-training quantisation and magnitude pruning (issue 16, item 1).

    python benchmarks/psg.py [--quick] [--seeds 5] [--out benchmarks/results]

Per seed and network (the MLP 64-128-128-10 ReLU and the digits CNN ``unf.zoo.builtin.cnn``): SGD (momentum 0.9,
lr 0.02, batch 64) for 30 epochs, then from that checkpoint (weights and momentum) 30 more epochs either plain or
with ``PSG`` (4 bits scale 150, 3 bits scale 50, 2 bits scale 30; below 4 bits the first/last layers target 8 bits,
the bits they are quantised to) or with the pruning variant (target "zero"). Then: test accuracy in full precision,
after ``unf.quant.quantize_model`` at 8/4/3/2 bits, the mean squared quantisation error, and after per-tensor
magnitude pruning of every weight at 50/70/90% (``torch.nn.utils.prune.l1_unstructured``).

Splits: digits (seed 0) train/test 80/20; 20% of the training split (stratified, seed 0) is a validation split, used
for the one choice made here: the pruning variant's scale (from 3/10/30, best mean validation accuracy at 90%
sparsity over the seeds' first run). The test split is only reported. One JSON line per (network, seed, variant) in
``OUT/psg.jsonl``, appended as each run finishes (a rerun skips the seeds whose lines are all there); then
``OUT/psg.md`` (tables, mean +- sample std over seeds) and ``OUT/psg.png``, written atomically. ``--quick`` writes the
same three files under ``OUT/quick/``. ``--table-only`` rebuilds the table and figure from ``OUT/psg.jsonl`` alone.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.nn.utils import prune

from unf import data
from unf.io import atomic_write
from unf.optim import PSG
from unf.quant import layer_bits, quantization_mse, quantize_model
from unf.zoo.builtin import cnn

from results_io import append_jsonl, load_jsonl

BITS = (8, 4, 3, 2)
PSG_SCALES = {4: 150.0, 3: 50.0, 2: 30.0}
ZERO_SCALES = (3.0, 10.0, 30.0)
SPARSITY = (0.5, 0.7, 0.9)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


NETS = {"mlp": mlp, "cnn": lambda: cnn("relu")}


def splits():
    s = data.load("digits-flat", seed=0)
    tr, va = train_test_split(torch.arange(len(s.y_train)).numpy(), test_size=0.2, stratify=s.y_train.numpy(),
                              random_state=0)
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    return (s.x_train[tr], s.y_train[tr]), (s.x_train[va], s.y_train[va]), (s.x_test, s.y_test)


def train(model, opt, xy, epochs: int, gen: torch.Generator, batch: int = 64) -> None:
    x, y = xy
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model, xy) -> float:
    model.eval()
    return float((model(xy[0]).argmax(1) == xy[1]).float().mean())


def pruned(model: nn.Module, sparsity: float) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(mod, "weight", amount=sparsity)
            prune.remove(mod, "weight")
    return m


def evaluate(model, xy) -> dict:
    out = {"fp": accuracy(model, xy)}
    for b in BITS:
        out[f"q{b}"] = accuracy(quantize_model(model, b), xy)
        out[f"mse{b}"] = quantization_mse(model, b)
    for p in SPARSITY:
        out[f"prune{int(p * 100)}"] = accuracy(pruned(model, p), xy)
    return out


def sgd(model):
    return torch.optim.SGD(model.named_parameters(), lr=0.02, momentum=0.9)


def run_seed(net: str, seed: int, epochs: int, sets, zero_scales, meta: dict, log: Path) -> list[dict]:
    train_xy, val_xy, test_xy = sets
    torch.manual_seed(seed)
    base = NETS[net]()
    opt = sgd(base)
    gen = torch.Generator().manual_seed(seed)
    train(base, opt, train_xy, epochs, gen)
    variants = {"plain": None, **{f"psg{b}": ("quant", b, s) for b, s in PSG_SCALES.items()},
                **{f"zero@{s:g}": ("zero", None, s) for s in zero_scales}}
    rows = []
    for name, how in variants.items():
        model = copy.deepcopy(base)
        inner = sgd(model)
        inner.load_state_dict(opt.state_dict())  # the momentum of the checkpoint
        if how is None:
            o = inner
        elif how[0] == "quant":
            o = PSG(inner, bits=layer_bits(model, how[1]), scale=how[2])
        else:
            o = PSG(inner, target="zero", scale=how[2])
        g = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every variant
        t0 = time.perf_counter()
        train(model, o, train_xy, epochs, g)
        row = {"net": net, "seed": seed, "variant": name, "epochs": epochs, "train_s": time.perf_counter() - t0,
               "test": evaluate(model, test_xy), "val": evaluate(model, val_xy), **meta}
        append_jsonl(log, row)
        rows.append(row)
    return rows


def load_rows(path: Path) -> list[dict]:
    return load_jsonl(path, key=lambda r: (r["net"], r["seed"], r["variant"], r["epochs"]))


def ms(values) -> str:
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {sd:.1f}"


def summarise(rows: list[dict], out: Path) -> str:
    lines = []
    for net in NETS:
        rs = [r for r in rows if r["net"] == net]
        if not rs:
            continue
        zero = [v for v in dict.fromkeys(r["variant"] for r in rs) if v.startswith("zero@")]
        val90 = {v: statistics.mean(r["val"]["prune90"] for r in rs if r["variant"] == v) for v in zero}
        best = max(zero, key=lambda v: val90[v])
        by = lambda v: [r for r in rs if r["variant"] == v]  # noqa: E731
        n = len(by("plain"))
        lines += [f"### {net} ({n} seeds; test accuracy %, mean +- sample std)", "",
                  "| variant | FP | 8 bit | 4 bit | 3 bit | 2 bit | MSE 4 bit | MSE 2 bit |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in ["plain", *[f"psg{b}" for b in PSG_SCALES]]:
            r = by(v)
            cells = [ms([x["test"]["fp"] for x in r])] + [ms([x["test"][f"q{b}"] for x in r]) for b in BITS]
            mse = [f"{statistics.mean(x['test'][f'mse{b}'] for x in r):.2e}" for b in (4, 2)]
            lines.append(f"| {v} | " + " | ".join(cells + mse) + " |")
        lines += ["", f"Pruning variant (target zero; scale {best[5:]} chosen on validation accuracy at 90%: "
                  + ", ".join(f"{v[5:]}: {100 * val90[v]:.1f}" for v in zero) + ")", "",
                  "| variant | FP | 50% | 70% | 90% |", "|---|---|---|---|---|"]
        for v in ("plain", best):
            r = by(v)
            lines.append(f"| {v} | " + " | ".join([ms([x["test"]["fp"] for x in r])] +
                                                  [ms([x["test"][f"prune{int(p * 100)}"] for x in r])
                                                   for p in SPARSITY]) + " |")
        lines.append("")
        pairs = lambda v, k, w="plain", k2=None: [a["test"][k] - b["test"][k2 or k]  # noqa: E731
                                                   for a, b in zip(sorted(by(v), key=lambda x: x["seed"]),
                                                                   sorted(by(w), key=lambda x: x["seed"]))]
        lines += [f"Targets ({net}): FP of PSG minus plain: " +
                  ", ".join(f"psg{b} {ms(pairs(f'psg{b}', 'fp'))}" for b in PSG_SCALES) +
                  f"; 2-bit PSG minus plain: {ms(pairs('psg2', 'q2'))}; 3-bit: {ms(pairs('psg3', 'q3'))}; "
                  f"4-bit PSG minus its FP: {ms(pairs('psg4', 'q4', 'psg4', 'fp'))}; "
                  f"90% pruned, pruning variant minus plain: {ms(pairs(best, 'prune90'))}", ""]
    text = "\n".join(lines)
    atomic_write(out / "psg.md", lambda t: Path(t).write_text(text))
    plot(rows, out / "psg.png")
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = [n for n in NETS if any(r["net"] == n for r in rows)]
    fig, axes = plt.subplots(2, len(nets), figsize=(5 * len(nets), 7), squeeze=False)
    for j, net in enumerate(nets):
        rs = [r for r in rows if r["net"] == net]
        ax = axes[0, j]
        xs = ["FP", *[f"{b}b" for b in BITS]]
        for v in ["plain", *[f"psg{b}" for b in PSG_SCALES]]:
            r = [x for x in rs if x["variant"] == v]
            keys = ["fp", *[f"q{b}" for b in BITS]]
            m = [100 * statistics.mean(x["test"][k] for x in r) for k in keys]
            s = [100 * (statistics.stdev(x["test"][k] for x in r) if len(r) > 1 else 0) for k in keys]
            ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=v)
        ax.set_title(f"{net}: post-training weight quantisation")
        ax.set_ylabel("test accuracy %")
        ax.legend()
        ax = axes[1, j]
        zero = sorted({x["variant"] for x in rs if x["variant"].startswith("zero@")})
        for v in ["plain", *zero]:
            r = [x for x in rs if x["variant"] == v]
            keys = ["fp", *[f"prune{int(p * 100)}" for p in SPARSITY]]
            m = [100 * statistics.mean(x["test"][k] for x in r) for k in keys]
            ax.plot(["0%", "50%", "70%", "90%"], m, marker="o", label=v)
        ax.set_title(f"{net}: magnitude pruning")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy %")
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 5+5 epochs (a check that everything runs)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--nets", default="mlp,cnn")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--table-only", action="store_true", help="tables and figure from OUT/psg.jsonl, no training")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds, epochs = (2, 5) if args.quick else (args.seeds, args.epochs)
    out = args.out / "quick" if args.quick else args.out
    log = out / "psg.jsonl"
    rows = load_rows(log)
    if args.table_only:
        if not rows:
            p.error(f"--table-only: {log} holds no results")
        print(summarise(rows, out))
        return 0
    nets = args.nets.split(",")
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        p.error(f"--nets: unknown {unknown}; choose from {list(NETS)}")
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r["epochs"] == epochs]  # another epoch count is kept in the file, not tabulated
    want = {"plain", *[f"psg{b}" for b in PSG_SCALES], *[f"zero@{s:g}" for s in ZERO_SCALES]}
    sets = splits()
    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "seeds": seeds, "epochs": epochs}
    for net in nets:
        for seed in range(seeds):
            have = [r for r in rows if r["net"] == net and r["seed"] == seed]
            if {r["variant"] for r in have} >= want:
                continue
            rows = [r for r in rows if r not in have]  # an incomplete seed is rerun whole (same base checkpoint)
            rows += run_seed(net, seed, epochs, sets, ZERO_SCALES, meta, log)
            print(f"{net} seed {seed} done", file=sys.stderr, flush=True)
    print(summarise([r for r in rows if r["net"] in nets and r["seed"] < seeds], out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
