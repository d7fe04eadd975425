"""Git Re-Basin's linear-mode-connectivity results, reproduced with ``unf.align`` on the embedded digits data.

    python benchmarks/rebasin_lmc.py            # full run (about 10 minutes on 2 CPU cores)
    python benchmarks/rebasin_lmc.py --quick    # smoke version (about 2 minutes)

Prints markdown tables and saves PNGs to ``benchmarks/figures/`` (``--figures DIR`` to change; needs matplotlib).

Protocol (the same for every case):

* Data: ``unf.data.load("digits-flat")`` / ``load("digits")``, the fixed seeded stratified split (seed 0,
  1437 train / 360 test images).
* Two networks per pair, trained independently: pair ``k`` uses seeds ``(2k, 2k + 1)``; the seed sets both the
  initialisation and the order of the mini-batches. Every network is trained for a fixed number of epochs; there is
  no early stopping and no checkpoint selection, and the test split is never used for any choice.
* Alignment: ``unf.align.weight_matching(spec, model_a, model_b)`` on the weights only (no data), ``seed=0``,
  parameters only (the default; ``include_buffers=True`` rows add the BatchNorm running statistics);
  ``spec.permute(model_b, perm)`` is checked to compute the same function as ``model_b`` ("func diff").
* Path: ``unf.align.loss_barrier`` at evenly spaced ``t`` in [0, 1]. Every point (endpoints included) is evaluated
  on the test split for loss and error (evaluation only), and on the train split for loss. For BatchNorm networks the
  running statistics of every point are recomputed from the training set (``bn_batches``), never from test data.
* Barrier: ``max_t [f(t) - ((1 - t) f(0) + t f(1))]``, for test loss, test error (in points of %) and train loss.
  Reduction = ``1 - aligned / naive`` of the test-loss barrier.
* "self-recovery": weight matching of a randomly permuted copy of model A (pair 0) back onto A; the max |weight
  difference| left (0 = the permutation was found exactly).

Two things the tables show:

* BatchNorm networks, ``include_buffers=True``. With buffers, every float tensor is scored unweighted, running
  statistics included. ``running_var``/``running_mean`` are large (norms 10-100 here, against ~5-10 for a whole
  conv weight). They make up most of the objective, so matching mostly pairs channels by their activation
  statistics: after matching, the running statistics' cosine similarity goes from ~0 to 0.8-0.99, but the conv
  weights' stays at 0.01-0.07. The aligned barrier can then be worse than the naive one. That is why the default
  (parameters only) leaves the buffers out of the objective; they are still permuted.
* ``init="identity"`` (plain coordinate descent, as in Ainsworth et al.) can stall in a poor local optimum, e.g.
  with the transformer's residual stream left at the identity. Self-recovery tests this directly.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
import unf  # noqa: E402
from unf.align import loss_barrier, weight_matching  # noqa: E402
from unf.io import atomic_write  # noqa: E402

ALIGN_SEED = 0  # seed of weight_matching's coordinate descent


# ---------------------------------------------------------------------------------------------------------- models

def mlp(width: int) -> nn.Module:
    """64 - width - width - 10, ReLU."""
    return models.mlp(64, (width, width), 10)


def _to_layernorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d child by ``GroupNorm(1, C)``: LayerNorm over (C, H, W) with per-channel affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            _to_layernorm(child)
    return module


class BasicBlockLN(models.BasicBlock):
    """``examples/models.py``'s BasicBlock with ``GroupNorm(1, C)`` (LayerNorm) in place of every BatchNorm2d."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__(cin, width, stride)
        _to_layernorm(self)


def resnet20(w: int, norm: str) -> nn.Module:
    """ResNet-20 (3 stages x 3 basic blocks), widths (16w, 32w, 64w), 1 input channel."""
    block = models.BasicBlock if norm == "bn" else BasicBlockLN
    net = models.ResNet(block, (3, 3, 3), (16 * w, 32 * w, 64 * w), in_channels=1)
    if norm == "ln":
        _to_layernorm(net.stem)
    return net


class DigitTransformer(nn.Module):
    """Each 8x8 image is 8 tokens (rows) of 8 pixels: linear embedding + learned positional embedding, pre-norm blocks
    (``examples/models.py``'s Block, hand-written attention with a fused QKV projection), final LayerNorm, mean pool."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, tokens: int = 8, num_classes: int = 10):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Linear(64 // tokens, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[models.Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x.reshape(x.shape[0], self.tokens, -1)) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


# ---------------------------------------------------------------------------------------------------------- training

def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, batch: int, opt: str,
          lr: float) -> nn.Module:
    """Fixed number of epochs, seeded mini-batch order; no evaluation on held-out data, no checkpoint selection."""
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(y) / batch)
    if opt == "adam":
        optim = torch.optim.Adam(model.parameters(), lr=lr)
        sched = None
    elif opt == "adamw":
        optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps)
    else:  # SGD with momentum and a one-cycle schedule
        optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if sched is not None:
                sched.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------------------------------------------------- LMC

def barrier_of(ts, values) -> float:
    v0, v1 = values[0], values[-1]
    return max(v - ((1 - t) * v0 + t * v1) for t, v in zip(ts, values))


def path(model: nn.Module, sd_a, sd_b, data, ts, bn: bool) -> dict:
    """Test loss, test error (%) and train loss along the straight path from ``sd_a`` to ``sd_b``."""
    rec = {"test_loss": [], "test_err": [], "train_loss": []}

    @torch.no_grad()
    def evaluate(net: nn.Module) -> float:
        out = net(data.x_test)
        loss = F.cross_entropy(out, data.y_test).item()
        rec["test_loss"].append(loss)
        rec["test_err"].append(100.0 * (out.argmax(1) != data.y_test).float().mean().item())
        rec["train_loss"].append(F.cross_entropy(net(data.x_train), data.y_train).item())
        return loss

    bn_batches = None
    if bn:  # training data only, fixed order, batches of 256
        def bn_batches():
            return (data.x_train[i:i + 256] for i in range(0, len(data.y_train), 256))

    res = loss_barrier(model, sd_a, sd_b, evaluate, ts=ts, bn_batches=bn_batches)
    out = {"ts": res["ts"], **rec}
    out["barrier"] = {k: barrier_of(res["ts"], v) for k, v in rec.items()}
    assert abs(out["barrier"]["test_loss"] - res["barrier"]) < 1e-9
    return out


@torch.no_grad()
def func_diff(model: nn.Module, sd: dict, sd_perm: dict, x: torch.Tensor) -> float:
    """Max |logit difference| between a network and its permuted copy (eval mode): should be ~1e-6."""
    a, b = _clone(model, sd), _clone(model, sd_perm)
    return (a(x) - b(x)).abs().max().item()


def _clone(model: nn.Module, sd: dict) -> nn.Module:
    import copy
    m = copy.deepcopy(model)
    m.load_state_dict(sd)
    return m.eval()


def align(spec, sd_a, sd_b, **kw):
    """``weight_matching`` (timed); the permutation is applied to the whole state_dict, buffers included."""
    t = time.perf_counter()
    perm = weight_matching(spec, sd_a, sd_b, seed=ALIGN_SEED, **kw)
    return spec.permute(sd_b, perm), time.perf_counter() - t, perm


def self_recovery(spec, sd_a, kw) -> float:
    """Align a randomly permuted copy of ``sd_a`` back to ``sd_a``: max |weight difference| left (0 = recovered)."""
    perm = spec.sample_permutation(torch.Generator().manual_seed(1234))
    shuffled = spec.permute(sd_a, perm)
    back, _, _ = align(spec, sd_a, shuffled, **kw)
    return max((back[k].float() - sd_a[k].float()).abs().max().item() for k in spec.float_names)


# ---------------------------------------------------------------------------------------------------------- helpers

def sd_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mean_std(xs) -> str:
    xs = list(xs)
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def mean_std_pct(xs, digits=1) -> str:
    xs = list(xs)
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def reduction(naive: float, aligned: float) -> float:
    return 100.0 * (1.0 - aligned / naive) if naive > 0 else float("nan")


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class Figures:
    def __init__(self, out: Optional[Path]):
        self.out, self.plt = out, None
        if out is None:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            self.plt = plt
            out.mkdir(parents=True, exist_ok=True)
        except ImportError:
            print("(matplotlib not installed: no figures)")

    def save(self, fig, name: str) -> None:
        path = self.out / name
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=120))
        self.plt.close(fig)
        print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    def paths(self, name: str, title: str, runs: dict[str, list[dict]]) -> None:
        """``runs``: method -> list of path dicts (one per pair); test loss and test accuracy against t."""
        if self.plt is None:
            return
        fig, axes = self.plt.subplots(1, 2, figsize=(10, 3.8))
        colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
        for (method, ps), c in zip(runs.items(), colors):
            for i, p in enumerate(ps):
                lab = method if i == 0 else None
                axes[0].plot(p["ts"], p["test_loss"], color=c, marker=".", alpha=0.8, label=lab)
                axes[1].plot(p["ts"], [100 - e for e in p["test_err"]], color=c, marker=".", alpha=0.8, label=lab)
        axes[0].set(xlabel="t  (model A at 0, model B at 1)", ylabel="test loss", title=title)
        axes[1].set(xlabel="t  (model A at 0, model B at 1)", ylabel="test accuracy (%)", title=title)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        self.save(fig, name)

    def widths(self, name: str, widths, naive, aligned) -> None:
        if self.plt is None:
            return
        fig, ax = self.plt.subplots(figsize=(5.5, 3.8))
        for label, vals, c in (("naive", naive, "tab:red"), ("weight matching", aligned, "tab:blue")):
            m = [statistics.mean(v) for v in vals]
            s = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(widths, m, yerr=s, color=c, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set(xlabel="hidden width (2 hidden layers)", ylabel="test-loss barrier",
               title="MLP on digits: barrier vs width")
        ax.grid(alpha=0.3)
        ax.legend()
        self.save(fig, name)


# ---------------------------------------------------------------------------------------------------------- cases

class MLPCache:
    """Trained MLPs by (width, seed), shared by the main MLP experiment and the width ablation."""

    def __init__(self, data, epochs: int):
        self.data, self.epochs, self.cache = data, epochs, {}

    def get(self, width: int, seed: int) -> nn.Module:
        if (width, seed) not in self.cache:
            torch.manual_seed(seed)
            m = mlp(width)
            train(m, self.data.x_train, self.data.y_train, self.epochs, seed, batch=64, opt="adam", lr=1e-3)
            self.cache[width, seed] = m
        return self.cache[width, seed]


def run_pair(make: Callable[[int], nn.Module], data, pair: int, ts, bn: bool, methods: dict) -> dict:
    """Both endpoints for pair ``pair``; naive path plus one path per weight-matching variant in ``methods``."""
    a, b = make(2 * pair), make(2 * pair + 1)
    spec = unf.spec_from_module(a, data.x_train[:2])
    sd_a, sd_b = sd_of(a), sd_of(b)
    out = {"acc": {"train": (accuracy(a, data.x_train, data.y_train), accuracy(b, data.x_train, data.y_train)),
                   "test": (accuracy(a, data.x_test, data.y_test), accuracy(b, data.x_test, data.y_test))},
           "paths": {"naive": path(a, sd_a, sd_b, data, ts, bn)}, "time": {}, "func": {}, "perms": {}, "recover": {}}
    for name, kw in methods.items():
        sd_p, secs, perm = align(spec, sd_a, sd_b, **kw)
        out["time"][name] = secs
        out["func"][name] = func_diff(a, sd_b, sd_p, data.x_test)
        out["perms"][name] = perm
        if pair == 0:
            out["recover"][name] = self_recovery(spec, sd_a, kw)
        out["paths"][name] = path(a, sd_a, sd_p, data, ts, bn)
    return out


def summarise(title: str, results: list[dict], methods: list[str]) -> None:
    print(f"\n### {title}\n")
    tr = [x for r in results for x in r["acc"]["train"]]
    te = [x for r in results for x in r["acc"]["test"]]
    print(f"Endpoints ({len(tr)} networks): train acc {100 * min(tr):.2f}-{100 * max(tr):.2f}%, "
          f"test acc {100 * min(te):.2f}-{100 * max(te):.2f}%\n")
    rows = []
    naive = [r["paths"]["naive"]["barrier"] for r in results]
    for m in ["naive"] + methods:
        b = [r["paths"][m]["barrier"] for r in results]
        red = "" if m == "naive" else mean_std_pct([reduction(n["test_loss"], x["test_loss"]) for n, x in zip(naive, b)])
        secs = "" if m == "naive" else mean_std_pct([r["time"][m] for r in results], 2)
        fd = "" if m == "naive" else f"{max(r['func'][m] for r in results):.1e}"
        rec = "" if m == "naive" else f"{results[0]['recover'][m]:.1e}"
        mid = mean_std_pct([100 - r["paths"][m]["test_err"][len(r["paths"][m]["ts"]) // 2] for r in results])
        rows.append([m, mean_std([x["test_loss"] for x in b]), mean_std_pct([x["test_err"] for x in b]),
                     mean_std([x["train_loss"] for x in b]), mid, red, secs, fd, rec])
    print(table(["path", "test-loss barrier", "test-error barrier (pts)", "train-loss barrier", "test acc at t=0.5 (%)",
                 "test-loss reduction (%)", "matching time (s)", "func diff", "self-recovery"], rows))
    if len(results) > 1:
        print("\nPer pair, test-loss barrier: " + "; ".join(
            f"{m}: " + ", ".join(f"{r['paths'][m]['barrier']['test_loss']:.3f}" for r in results)
            for m in ["naive"] + methods))


# ---------------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke version: fewer epochs, pairs and widths")
    ap.add_argument("--figures", default=str(ROOT / "benchmarks" / "figures"), help="where PNGs go ('' for none)")
    ap.add_argument("--resnet-width", type=int, default=None, help="ResNet-20 width multiplier (default 4; quick 1)")
    ap.add_argument("--resnet-pairs", type=int, default=2, help="ResNet seed pairs in the full run (default 2)")
    ap.add_argument("--only", default="mlp,width,resnet,transformer", help="comma-separated subset of cases")
    args = ap.parse_args()
    only = set(args.only.split(","))
    q = args.quick
    cfg = dict(
        mlp_epochs=10 if q else 30, mlp_pairs=1 if q else 3,
        widths=(32, 128, 512) if q else (32, 64, 128, 256, 512, 1024), width_pairs=1 if q else 3,
        resnet_w=args.resnet_width or (1 if q else 4), resnet_epochs=3 if q else 8, resnet_pairs=1 if q else args.resnet_pairs,
        tf_epochs=10 if q else 40, tf_pairs=1 if q else 3,
    )
    figs = Figures(Path(args.figures) if args.figures else None)
    t_start = time.perf_counter()
    print(f"# Git Re-Basin LMC on digits ({'quick' if q else 'full'} run)\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config: {cfg}")
    print(f"pair k = seeds (2k, 2k+1) for init and batch order; weight_matching seed={ALIGN_SEED}, max_iter=100")
    flat, img = unf.data.load("digits-flat"), unf.data.load("digits")
    print(f"data: {flat} / {img} (split seed 0)")

    ts21 = [i / 20 for i in range(21)]
    cache = MLPCache(flat, cfg["mlp_epochs"])
    default = {"wm": {}}  # heads="auto", init="signature"

    # 1. MLP 64-512-512-10
    if "mlp" in only:
        t0 = time.perf_counter()
        methods = {"wm": {}, "wm (init=identity)": {"init": "identity"}}
        res = [run_pair(lambda s: cache.get(512, s), flat, k, ts21, False, methods) for k in range(cfg["mlp_pairs"])]
        summarise(f"1. MLP 64-512-512-10 (Adam 1e-3, batch 64, {cfg['mlp_epochs']} epochs), "
                  f"{cfg['mlp_pairs']} seed pairs, 21 points", res, list(methods))
        figs.paths("mlp_lmc.png", "MLP 64-512-512-10, digits",
                   {"naive": [r["paths"]["naive"] for r in res],
                    "weight matching": [r["paths"]["wm"] for r in res]})
        print(f"({time.perf_counter() - t0:.0f} s)")

    # 2. Width ablation
    if "width" in only:
        t0 = time.perf_counter()
        rows, naive_b, wm_b = [], [], []
        for width in cfg["widths"]:
            res = [run_pair(lambda s: cache.get(width, s), flat, k, ts21, False, default)
                   for k in range(cfg["width_pairs"])]
            nb = [r["paths"]["naive"]["barrier"]["test_loss"] for r in res]
            ab = [r["paths"]["wm"]["barrier"]["test_loss"] for r in res]
            naive_b.append(nb)
            wm_b.append(ab)
            ne = [r["paths"]["naive"]["barrier"]["test_err"] for r in res]
            ae = [r["paths"]["wm"]["barrier"]["test_err"] for r in res]
            te = [x for r in res for x in r["acc"]["test"]]
            tr = [x for r in res for x in r["acc"]["train"]]
            rows.append([width, f"{100 * min(tr):.1f}", f"{100 * statistics.mean(te):.1f}", mean_std(nb),
                         mean_std(ab), mean_std_pct([reduction(n, a) for n, a in zip(nb, ab)]),
                         mean_std_pct(ne), mean_std_pct(ae), mean_std_pct([r["time"]["wm"] for r in res], 2)])
        print(f"\n### 2. Width ablation: MLP 64-w-w-10 (same training as 1), {cfg['width_pairs']} seed pairs per "
              f"width\n")
        print(table(["width", "min train acc (%)", "mean test acc (%)", "naive loss barrier", "WM loss barrier",
                     "reduction (%)", "naive error barrier (pts)", "WM error barrier (pts)", "matching time (s)"],
                    rows))
        figs.widths("width_ablation.png", list(cfg["widths"]), naive_b, wm_b)
        print(f"({time.perf_counter() - t0:.0f} s)")

    # 3. ResNet-20 (BatchNorm and LayerNorm)
    if "resnet" in only:
        w, ep = cfg["resnet_w"], cfg["resnet_epochs"]
        ts11 = [i / 10 for i in range(11)]
        for norm, label in (("bn", "BatchNorm"), ("ln", "LayerNorm = GroupNorm(1, C)")):
            t0 = time.perf_counter()

            def make(seed, norm=norm):
                torch.manual_seed(seed)
                net = resnet20(w, norm)
                return train(net, img.x_train, img.y_train, ep, seed, batch=64, opt="sgd", lr=0.1)

            methods = {"wm": {}, "wm (init=identity)": {"init": "identity"}}
            if norm == "bn":  # running statistics in the objective: see the module docstring
                methods["wm, include_buffers=True"] = {"include_buffers": True}
                methods["wm (init=identity), include_buffers=True"] = {"init": "identity", "include_buffers": True}
            res = [run_pair(make, img, k, ts11, norm == "bn", methods) for k in range(cfg["resnet_pairs"])]
            bn_note = ", BN stats recomputed from train data at every point" if norm == "bn" else ""
            summarise(f"3. ResNet-20 x{w} ({label}; SGD one-cycle lr 0.1, batch 64, {ep} epochs), "
                      f"{cfg['resnet_pairs']} seed pair(s), 11 points{bn_note}", res, list(methods))
            figs.paths(f"resnet20_{norm}_lmc.png", f"ResNet-20 x{w} ({norm.upper()}), digits",
                       {"naive": [r["paths"]["naive"] for r in res], "weight matching": [r["paths"]["wm"] for r in res],
                        **({"weight matching, include_buffers=True":
                            [r["paths"]["wm, include_buffers=True"] for r in res]} if norm == "bn" else {})})
            print(f"({time.perf_counter() - t0:.0f} s)")

    # 4. Transformer
    if "transformer" in only:
        t0 = time.perf_counter()
        ep = cfg["tf_epochs"]

        def make_tf(seed):
            torch.manual_seed(seed)
            return train(DigitTransformer(), img.x_train, img.y_train, ep, seed, batch=64, opt="adamw", lr=3e-3)

        methods = {
            "head-agnostic (heads=False, init=identity)": {"heads": False, "init": "identity"},
            "heads=False, init=signature": {"heads": False, "init": "signature"},
            "head-aware (heads=True, init=identity)": {"heads": True, "init": "identity"},
            "head-aware (heads=True, init=signature)": {"heads": True, "init": "signature"},
            "default (heads=auto, init=signature)": {},
        }
        res = [run_pair(make_tf, img, k, ts21, False, methods) for k in range(cfg["tf_pairs"])]
        print()
        summarise(f"4. Transformer (8 tokens x 8 pixels, d=64, 4 heads, 2 blocks; AdamW one-cycle lr 3e-3, "
                  f"batch 64, {ep} epochs), {cfg['tf_pairs']} seed pairs, 21 points", res, list(methods))
        print()
        spec = unf.spec_from_module(DigitTransformer(), img.x_train[:2])
        hg = unf.align.head_groups(spec)
        for k, r in enumerate(res):
            hp = {m: [r["perms"][m][g].tolist() for g in hg] for m in methods}
            print(f"pair {k}, head permutations of {hg}: " + "; ".join(f"{m}: {v}" for m, v in hp.items()))
        figs.paths("transformer_lmc.png", "2-block transformer, digits",
                   {"naive": [r["paths"]["naive"] for r in res],
                    "head-agnostic": [r["paths"]["head-agnostic (heads=False, init=identity)"] for r in res],
                    "head-aware": [r["paths"]["head-aware (heads=True, init=signature)"] for r in res]})
        print(f"({time.perf_counter() - t0:.0f} s)")

    print(f"\nTotal wall time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
