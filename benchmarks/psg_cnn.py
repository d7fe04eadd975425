"""PSG on the digits CNN: why scale 150 diverges, and PSG's scale (and lr) chosen on validation.

    python benchmarks/psg_cnn.py [--out benchmarks/results]
    python benchmarks/psg_cnn.py --table-only       # tables and figure from OUT/psg_cnn.jsonl alone

Same networks, splits, checkpoint and batches as ``benchmarks/psg.py`` (30 epochs of SGD, then 30 more plain or with
PSG, per seed).

1. ``trace``: the 4-bit PSG run at scale 150 (the paper's setting) on the MLP and the CNN, seeds 0-4: per epoch the
   full-batch training loss and, per scaled weight, ``max|w|`` and the largest gradient gain ``scale * |w - Q(w)|``
   (at most ``scale * step / 2 = scale * max|w| / 14`` at 4 bits). The gain multiplies SGD's learning rate per weight.
2. ``prune``: the pruning variant (target "zero") on the CNN, 90% per-tensor magnitude pruning. Its scale and
   learning rate for the PSG phase are chosen from ``ZERO_GRID``, and plain training's learning rate for the same
   phase from ``LRS`` (a lower rate alone might help), each by mean validation accuracy at 90% sparsity on choice
   seeds 0-2; both chosen settings are then reported on the test split of seeds 3-7, which took no part in the
   choice. The test split is never read for a choice.
3. ``quant``: PSG at 4 and 2 bits on the CNN (first/last layers at 8 bits below 4 bits, lr 0.02) with the scale
   chosen from ``QUANT_GRID[bits]`` by mean validation accuracy after quantisation to those bits on seeds 0-2, then
   reported with plain training (lr 0.02) on the test split of seeds 3-7.

One JSON line per finished run in ``OUT/psg_cnn.jsonl`` (a rerun skips them); ``OUT/psg_cnn.md`` and
``OUT/psg_cnn.png`` (the traces), written atomically.
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
import torch.nn.functional as F

from unf.io import atomic_write
from unf.optim import PSG
from unf.quant import layer_bits

from psg import NETS, evaluate, sgd, splits, train
from results_io import append_jsonl, load_jsonl

EPOCHS = 30
TRACE_SEEDS = range(5)
CHOICE_SEEDS = range(3)
REPORT_SEEDS = range(3, 8)
LRS = (0.02, 0.005)
ZERO_GRID = [(s, lr) for s in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0) for lr in LRS]
PLAIN_GRID = [(None, lr) for lr in LRS]
QUANT_GRID = {4: (150.0, 50.0, 15.0, 5.0), 2: (30.0, 10.0, 3.0, 1.0)}


def checkpoint(net: str, seed: int, train_xy):
    """The 30-epoch SGD checkpoint of ``benchmarks/psg.py`` (weights and momentum)."""
    torch.manual_seed(seed)
    base = NETS[net]()
    opt = sgd(base)
    train(base, opt, train_xy, EPOCHS, torch.Generator().manual_seed(seed))
    return base, opt.state_dict()


def resume(base, state, lr: float):
    model = copy.deepcopy(base)
    inner = sgd(model)
    inner.load_state_dict(state)
    for g in inner.param_groups:
        g["lr"] = lr
    return model, inner


@torch.no_grad()
def full_loss(model, xy) -> float:
    model.eval()
    return float(F.cross_entropy(model(xy[0]), xy[1]))


def trace(net: str, seed: int, sets, meta: dict) -> dict:
    train_xy = sets[0]
    base, state = checkpoint(net, seed, train_xy)
    model, inner = resume(base, state, 0.02)
    opt = PSG(inner, bits=layer_bits(model, 4), scale=150.0)
    names = {id(p): n for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = []

    def stats():
        out = {"loss": full_loss(model, train_xy), "max_abs": {}, "max_gain": {}}
        for p in opt.params():
            gain = opt.grad_scale(p)
            if gain is not None:
                out["max_abs"][names[id(p)]] = float(p.detach().abs().max())
                out["max_gain"][names[id(p)]] = float(gain.max())
        return out

    per_epoch.append(stats())
    for _ in range(EPOCHS):
        train(model, opt, train_xy, 1, g)
        per_epoch.append(stats())
    return {"kind": "trace", "net": net, "seed": seed, "scale": 150.0, "bits": 4, "per_epoch": per_epoch, **meta}


def phase_run(kind: str, seed: int, variant, sets, meta: dict, base_cache: dict, bits: int | None = None) -> dict:
    """The CNN's second phase from the seed's checkpoint. ``variant``: (scale, lr); scale None: plain SGD; else PSG
    with target "zero" (``kind`` "prune") or the ``bits`` grid (``kind`` "quant")."""
    train_xy, val_xy, test_xy = sets
    if seed not in base_cache:
        base_cache[seed] = checkpoint("cnn", seed, train_xy)
    base, state = base_cache[seed]
    scale, lr = variant
    model, inner = resume(base, state, lr)
    if scale is None:
        opt = inner
    elif kind == "prune":
        opt = PSG(inner, target="zero", scale=scale)
    else:
        opt = PSG(inner, bits=layer_bits(model, bits), scale=scale)
    t0 = time.perf_counter()
    train(model, opt, train_xy, EPOCHS, torch.Generator().manual_seed(10_000 + seed))
    return {"kind": kind, "net": "cnn", "seed": seed, "scale": scale, "lr": lr, "bits": bits,
            "train_s": time.perf_counter() - t0, "val": evaluate(model, val_xy), "test": evaluate(model, test_xy),
            **meta}


def key(r: dict) -> tuple:
    return r["kind"], r["net"], r["seed"], r["scale"], r.get("lr"), r.get("bits")


def ms(values, digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def choose(runs: list[dict], grid: list, metric: str = "prune90"):
    """The (scale, lr) of ``grid`` with the best mean validation ``metric`` over the choice seeds, and all the
    means."""
    means = {}
    for s, lr in grid:
        rs = [r for r in runs if r["scale"] == s and r["lr"] == lr and r["seed"] in CHOICE_SEEDS]
        if len(rs) == len(CHOICE_SEEDS):
            means[s, lr] = statistics.mean(r["val"][metric] for r in rs)
    return (max(means, key=means.get) if means else None), means


def summarise(rows: list[dict], out: Path) -> str:
    rng = lambda seeds: f"{seeds[0]}-{seeds[-1]}"  # noqa: E731
    lines = [f"### Scale 150 at 4 bits: gradient gain and divergence (seeds {rng(TRACE_SEEDS)}, SGD lr 0.02, "
             "momentum 0.9)", "",
             f"| net | seed | train loss at checkpoint | largest during PSG (epoch) | after {EPOCHS} PSG epochs | "
             "largest max abs w: checkpoint, peak | largest gain: checkpoint, peak |", "|---|---|---|---|---|---|---|"]
    traces = sorted((r for r in rows if r["kind"] == "trace"), key=lambda r: (r["net"], r["seed"]))
    for r in traces:
        ep = r["per_epoch"]
        top = lambda key, e: max(e[key].values())  # noqa: E731
        peak = max(range(1, len(ep)), key=lambda i: ep[i]["loss"] if math.isfinite(ep[i]["loss"]) else math.inf)
        lines.append(f"| {r['net']} | {r['seed']} | {ep[0]['loss']:.3f} | {ep[peak]['loss']:.3g} ({peak}) | "
                     f"{ep[-1]['loss']:.3g} | {top('max_abs', ep[0]):.2f}, {max(top('max_abs', e) for e in ep):.2f} | "
                     f"{top('max_gain', ep[0]):.1f}, {max(top('max_gain', e) for e in ep):.1f} |")
    prunes = [r for r in rows if r["kind"] == "prune"]
    best, means = choose(prunes, ZERO_GRID)
    best_plain, plain_means = choose(prunes, PLAIN_GRID)
    if means and plain_means:
        lines += ["", f"### Pruning variant on the CNN: scale and lr chosen on validation (seeds "
                  f"{rng(CHOICE_SEEDS)}), test on seeds {rng(REPORT_SEEDS)}", "",
                  "Mean validation accuracy % at 90% sparsity on the choice seeds, scale/second-phase lr: " +
                  ", ".join(f"{'plain' if s is None else f'{s:g}'}/{lr:g}: {100 * v:.1f}"
                            for (s, lr), v in {**plain_means, **means}.items()) +
                  f". Chosen: plain at lr {best_plain[1]:g}; zero at scale {best[0]:g}, lr {best[1]:g}.", ""]
        rep = {name: sorted((r for r in prunes if r["seed"] in REPORT_SEEDS and (r["scale"], r["lr"]) == v),
                            key=lambda r: r["seed"])
               for name, v in ((f"plain, lr {best_plain[1]:g}", best_plain),
                               (f"zero@{best[0]:g}, lr {best[1]:g}", best))}
        if all(len(v) == len(REPORT_SEEDS) for v in rep.values()):
            lines += [f"Test accuracy %, mean +- sample std over seeds {rng(REPORT_SEEDS)}:", "",
                      "| variant | FP | 50% | 70% | 90% |", "|---|---|---|---|---|"]
            for name, rs in rep.items():
                lines.append(f"| {name} | " + " | ".join(ms([100 * r["test"][k] for r in rs])
                                                        for k in ("fp", "prune50", "prune70", "prune90")) + " |")
            a, b = rep.values()
            ahead = sum(y["test"]["prune90"] > x["test"]["prune90"] for x, y in zip(a, b))
            lines += ["", "90% pruned, chosen pruning variant minus chosen plain (paired by seed): "
                      f"{ms([100 * (y['test']['prune90'] - x['test']['prune90']) for x, y in zip(a, b)])}; "
                      f"ahead on {ahead} of {len(a)} seeds"]
    plain = {r["seed"]: r for r in prunes if r["scale"] is None and r["lr"] == 0.02}
    for bits, scales in QUANT_GRID.items():
        runs = [r for r in rows if r["kind"] == "quant" and r["bits"] == bits]
        best, means = choose(runs, [(s, 0.02) for s in scales], f"q{bits}")
        if not means:
            continue
        lines += ["", f"### PSG at {bits} bits on the CNN: scale chosen on validation (seeds {rng(CHOICE_SEEDS)}), "
                  f"test on seeds {rng(REPORT_SEEDS)}", "", f"Mean validation accuracy % at {bits} bits on the choice "
                  "seeds, by scale: " + ", ".join(f"{s:g}: {100 * v:.1f}" for (s, _), v in means.items()) +
                  f"; plain: {100 * statistics.mean(plain[i]['val'][f'q{bits}'] for i in CHOICE_SEEDS):.1f}. "
                  f"Chosen: scale {best[0]:g}.", ""]
        chosen = sorted((r for r in runs if r["scale"] == best[0] and r["seed"] in REPORT_SEEDS),
                        key=lambda r: r["seed"])
        if len(chosen) == len(REPORT_SEEDS) and all(i in plain for i in REPORT_SEEDS):
            lines += [f"| variant | FP | {bits} bit |", "|---|---|---|"]
            for name, rs in (("plain", [plain[i] for i in REPORT_SEEDS]), (f"psg{bits}@{best[0]:g}", chosen)):
                lines.append(f"| {name} | {ms([100 * r['test']['fp'] for r in rs])} | "
                             f"{ms([100 * r['test'][f'q{bits}'] for r in rs])} |")
            d = [100 * (r["test"][k] - plain[r["seed"]]["test"][k]) for k in ("fp", f"q{bits}") for r in chosen]
            n = len(chosen)
            own = [100 * (r["test"][f"q{bits}"] - r["test"]["fp"]) for r in chosen]
            lines += ["", f"PSG minus plain (paired by seed): FP {ms(d[:n])}, {bits} bit {ms(d[n:])}; PSG's {bits} bit "
                      f"minus its FP: {ms(own)}"]
    text = "\n".join(lines)
    atomic_write(out / "psg_cnn.md", lambda t: Path(t).write_text(text + "\n"))
    if traces:
        plot(traces, out / "psg_cnn.png")
    return text


def plot(traces: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in traces:
        ep = r["per_epoch"]
        colour = "tab:blue" if r["net"] == "mlp" else "tab:red"
        label = r["net"] if r["seed"] == 0 else None
        axes[0].plot([min(e["loss"], 1e3) if math.isfinite(e["loss"]) else 1e3 for e in ep], color=colour,
                     label=label)
        axes[1].plot([max(e["max_gain"].values()) for e in ep], color=colour, label=label)
    axes[0].set(yscale="log", xlabel="PSG epoch (after 30 plain)", ylabel="full-batch training loss (capped at 1e3)",
                title="PSG 4 bit, scale 150")
    axes[1].set(yscale="log", xlabel="PSG epoch", ylabel="largest gradient gain scale*|w-Q(w)|",
                title="gain of the most amplified weight")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--table-only", action="store_true", help="tables and figure from OUT/psg_cnn.jsonl, no training")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    log = args.out / "psg_cnn.jsonl"
    rows = load_jsonl(log, key)
    if args.table_only:
        if not rows:
            p.error(f"--table-only: {log} holds no results")
        print(summarise(rows, args.out))
        return 0
    done = {key(r) for r in rows}
    sets = splits()
    meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "epochs": EPOCHS}

    def record(row):
        append_jsonl(log, row)
        rows.append(row)
        done.add(key(row))

    for net in ("mlp", "cnn"):
        for seed in TRACE_SEEDS:
            if ("trace", net, seed, 150.0, None, 4) not in done:
                record(trace(net, seed, sets, meta))
                print(f"trace {net} seed {seed}", file=sys.stderr, flush=True)
    cache: dict = {}
    for seed in CHOICE_SEEDS:
        for variant in (*PLAIN_GRID, *ZERO_GRID):
            if ("prune", "cnn", seed, *variant, None) not in done:
                record(phase_run("prune", seed, variant, sets, meta, cache))
        print(f"choice seed {seed}", file=sys.stderr, flush=True)
    prunes = [r for r in rows if r["kind"] == "prune"]
    chosen = choose(prunes, PLAIN_GRID)[0], choose(prunes, ZERO_GRID)[0]
    for seed in REPORT_SEEDS:
        for variant in {*chosen, (None, 0.02)}:  # plain at lr 0.02: also the reference of the quant study
            if ("prune", "cnn", seed, *variant, None) not in done:
                record(phase_run("prune", seed, variant, sets, meta, cache))
        print(f"report seed {seed}", file=sys.stderr, flush=True)
    for bits, scales in QUANT_GRID.items():
        for seed in CHOICE_SEEDS:
            for scale in scales:
                if ("quant", "cnn", seed, scale, 0.02, bits) not in done:
                    record(phase_run("quant", seed, (scale, 0.02), sets, meta, cache, bits))
        best = choose([r for r in rows if r["kind"] == "quant" and r["bits"] == bits],
                      [(s, 0.02) for s in scales], f"q{bits}")[0]
        for seed in REPORT_SEEDS:
            if ("quant", "cnn", seed, *best, bits) not in done:
                record(phase_run("quant", seed, best, sets, meta, cache, bits))
        print(f"quant {bits} bits done", file=sys.stderr, flush=True)
    print(summarise(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
