"""The CUTS experiment on digits (``unf merge cuts-demo``): label noise or a BadNets backdoor, unlearnt by CUTS.

Splits, per seed, all carved from the training split of ``unf.data.load("digits-flat", seed=0)`` (the test split
is only reported): ``holdout`` (30%) is divided into three equal parts: the proxy inputs, the unlabelled inputs for
choosing alpha, and the clean held-out set (for the fine-tuning baseline); the rest is the training set, corrupted.
With ``evaluate_on="validation"`` a seeded validation split (20% of the training split) takes the test split's
place and the experiment runs on the remaining 80%: the test split is not read at all. Settings (the defaults below
included) are chosen that way, by ``benchmarks/merge_cuts.py choose``.

- ``noise``: symmetric label noise (each training label, with probability ``noise_rate``, replaced by a uniformly
  drawn *other* class); a wide MLP (64-512-512-10) memorises it. Proxy: the proxy inputs with uniformly random
  labels, fine-tuned at 1/10 of the training rate (the paper's recipe).
- ``backdoor``: a 2x2 white patch in the bottom-right corner on 5% of the training inputs, relabelled to class 0.
  Proxy: the proxy inputs of other classes with the trigger, labelled 0. Attack success (ASR) is measured on
  triggered test inputs whose class is not the target. With ``proxy_recipe="paired"`` (see :func:`unf.merge.cuts`)
  the clean twins are all the proxy inputs without the trigger, labelled by the backdoored model's own predictions.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import data
from ..training import evaluate, train_classifier
from .cuts import _predict, cuts

TARGET = 0
WIDTH = 512
TRAIN_LR = 1e-3
VALIDATION_FRACTION = 0.2
PRETRAIN_EPOCHS = 30  # the rotation-pretrained backbone (backbone="rotation")
# the defaults of run_cuts_demo and the CLI, per (kind, backbone), chosen on the validation split of seed 0 (no test
# data) by `benchmarks/merge_cuts.py choose --kind K --backbone B` (benchmarks/results/merge_cuts_choice.jsonl): for
# noise the largest gap recovered; for a backdoor the fewest points of accuracy lost with attack success <= 5%
# (the backdoor's choice, 2026-12-07, now includes the proxy recipe: "paired" won on both backbones)
DEFAULTS = {("noise", "scratch"): {"epochs": 150, "proxies": 10, "proxy_epochs": 40, "proxy_recipe": "plain"},
            ("backdoor", "scratch"): {"epochs": 150, "proxies": 5, "proxy_epochs": 40, "proxy_recipe": "paired"},
            ("noise", "rotation"): {"epochs": 60, "proxies": 10, "proxy_epochs": 40, "proxy_recipe": "plain"},
            ("backdoor", "rotation"): {"epochs": 150, "proxies": 5, "proxy_epochs": 40, "proxy_recipe": "paired"}}
NOISE_ALPHAS = [round(0.1 * i, 1) for i in range(0, 41)]
# attack success on the proxy set stays above 1% up to alpha 4 (the rule's own signal, no labels): a longer grid
BACKDOOR_ALPHAS = [round(0.1 * i, 1) for i in range(0, 81)]
# the "paired" proxy vector is trigger-specific and shorter: its proxy attack success reaches 1% at alpha 7-14
PAIRED_ALPHAS = [round(0.1 * i, 1) for i in range(0, 241)]


def wide_mlp(width: int = WIDTH) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def rotation_pretrained(x: torch.Tensor, seed: int, epochs: int = PRETRAIN_EPOCHS) -> nn.Module:
    """A wide MLP whose body is pretrained without labels on ``x`` ``[N, 64]`` (self-supervised: which of the four
    90-degree rotations an 8x8 input shows), returned with a fresh, seeded 10-class head: a pretrained backbone
    made from the inputs alone, so that no clean label enters the corrupted experiment."""
    img = x.reshape(-1, 8, 8)
    xs = torch.cat([torch.rot90(img, k, dims=(1, 2)).reshape(-1, 64) for k in range(4)])
    ys = torch.arange(4).repeat_interleave(len(x))
    torch.manual_seed(seed)
    net = wide_mlp()
    net[-1] = nn.Linear(WIDTH, 4)
    train_classifier(net, xs, ys, epochs=epochs, lr=TRAIN_LR, seed=seed)
    net[-1] = nn.Linear(WIDTH, 10)
    return net


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    """``[N, 64]`` digits with the 2x2 patch (rows 6-7, columns 6-7 of the 8x8 image) set to 1."""
    img = x.clone().view(-1, 8, 8)
    img[:, 6:, 6:] = 1.0
    return img.view(-1, 64)


def symmetric_noise(y: torch.Tensor, rate: float, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(y), generator=gen) < rate
    other = (y + torch.randint(1, num_classes, (len(y),), generator=gen)) % num_classes  # never the true class
    return torch.where(flip, other, y)


def _acc(model, x, y) -> float:
    return evaluate(model, x, y)[1]


def _asr(model, x_trig, y_true) -> float:
    keep = y_true != TARGET
    return float((_predict(model, x_trig[keep]) == TARGET).double().mean())


def experiment_data(evaluate_on: str, seed: int) -> tuple[torch.Tensor, ...]:
    """``(x, y, x_eval, y_eval, num_classes)``: the data the experiment is carved from and the data it reports on
    (the test split, or with ``evaluate_on="validation"`` a seeded 20% of the training split, the rest being
    ``x, y``; the test split is then never read)."""
    if evaluate_on not in ("test", "validation"):
        raise ValueError(f"evaluate_on={evaluate_on!r}: choose 'test' or 'validation'")
    split = data.load("digits-flat", seed=0)
    if evaluate_on == "test":
        return split.x_train, split.y_train, split.x_test, split.y_test, split.num_classes
    order = torch.as_tensor(np.random.default_rng([seed, 1]).permutation(len(split.y_train)))
    n_val = int(VALIDATION_FRACTION * len(order))
    val, rest = order[:n_val], order[n_val:]
    return split.x_train[rest], split.y_train[rest], split.x_train[val], split.y_train[val], split.num_classes


def settings(kind: str, backbone: str, epochs: Optional[int] = None, proxies: Optional[int] = None,
             proxy_epochs: Optional[int] = None, proxy_recipe: Optional[str] = None) -> dict:
    """``{"epochs", "proxies", "proxy_epochs", "proxy_recipe"}``: the given values, each ``None`` replaced by
    ``DEFAULTS[kind, backbone]`` (the setting chosen on validation for that kind and backbone)."""
    default = DEFAULTS[kind, backbone]
    given = {"epochs": epochs, "proxies": proxies, "proxy_epochs": proxy_epochs, "proxy_recipe": proxy_recipe}
    return {k: default[k] if v is None else v for k, v in given.items()}


def run_cuts_demo(kind: str = "noise", noise_rate: float = 0.4, seed: int = 0, *, epochs: Optional[int] = None,
                  proxy_epochs: Optional[int] = None, proxies: Optional[int] = None, poison_rate: float = 0.05,
                  alphas: Optional[list] = None, evaluate_on: str = "test", backbone: str = "scratch",
                  proxy_recipe: Optional[str] = None, progress=None) -> dict:
    """One run of the experiment (see the module docstring); the JSON record ``unf merge cuts-demo`` prints.

    The reported accuracies (``*_acc``, ``*_asr``, the alpha curve's ``acc`` and ``asr``) are on ``evaluate_on``
    (``"test"``, or ``"validation"``: see :func:`experiment_data`). ``alphas``: default ``NOISE_ALPHAS`` or
    ``BACKDOOR_ALPHAS`` (``PAIRED_ALPHAS`` with the paired recipe). ``epochs``, ``proxies``, ``proxy_epochs``,
    ``proxy_recipe`` (``"plain"`` or, for backdoors, ``"paired"``): default ``DEFAULTS[kind, backbone]`` (see
    :func:`settings`). ``backbone``: ``"scratch"`` (the corrupted and the clean model trained from a random
    initialisation) or ``"rotation"`` (both trained from :func:`rotation_pretrained` on the experiment's training
    inputs, without labels)."""
    if kind not in ("noise", "backdoor"):
        raise ValueError(f"kind={kind!r}: choose 'noise' or 'backdoor'")
    if backbone not in ("scratch", "rotation"):
        raise ValueError(f"backbone={backbone!r}: choose 'scratch' or 'rotation'")
    if not 0 <= noise_rate < 1:
        raise ValueError(f"noise_rate={noise_rate}: must be in [0, 1)")
    tick = progress or (lambda _: None)
    chosen = settings(kind, backbone, epochs, proxies, proxy_epochs, proxy_recipe)
    epochs, proxies, proxy_epochs = chosen["epochs"], chosen["proxies"], chosen["proxy_epochs"]
    proxy_recipe = chosen["proxy_recipe"]
    if proxy_recipe not in ("plain", "paired") or (proxy_recipe == "paired" and kind != "backdoor"):
        raise ValueError(f"proxy_recipe={proxy_recipe!r}: choose 'plain', or 'paired' for kind='backdoor'")
    x, y, xt, yt, c = experiment_data(evaluate_on, seed)
    if alphas is None:
        alphas = NOISE_ALPHAS if kind == "noise" else PAIRED_ALPHAS if proxy_recipe == "paired" else BACKDOOR_ALPHAS
    rng = np.random.default_rng(seed)
    order = torch.as_tensor(rng.permutation(len(y)))
    n_hold = int(0.3 * len(y)) // 3 * 3
    proxy_idx, input_idx, clean_idx = order[:n_hold].chunk(3)
    train_idx = order[n_hold:]
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = x[train_idx], y[train_idx]
    if kind == "noise":
        y_bad, x_bad = symmetric_noise(y_tr, noise_rate, c, gen), x_tr
    else:
        poison = torch.randperm(len(y_tr), generator=gen)[:int(round(poison_rate * len(y_tr)))]
        x_bad, y_bad = x_tr.clone(), y_tr.clone()
        x_bad[poison], y_bad[poison] = add_trigger(x_tr[poison]), TARGET
    pretrained = rotation_pretrained(x, seed) if backbone == "rotation" else None

    def start() -> nn.Module:  # the same initial weights for the corrupted and the clean model
        if pretrained is not None:
            return copy.deepcopy(pretrained)
        torch.manual_seed(seed)
        return wide_mlp()

    corrupted = train_classifier(start(), x_bad, y_bad, epochs=epochs, lr=TRAIN_LR, seed=seed)
    tick("corrupted model trained")
    clean = train_classifier(start(), x_tr, y_tr, epochs=epochs, lr=TRAIN_LR, seed=seed)
    tick("clean model trained")
    clean_ft = train_classifier(copy.deepcopy(corrupted), x[clean_idx], y[clean_idx], epochs=proxy_epochs,
                                lr=TRAIN_LR / 10, seed=seed)
    tick("clean fine-tuning baseline trained")
    if kind == "noise":
        proxy_x = x[proxy_idx]
        proxy_y = torch.randint(0, c, (len(proxy_idx),), generator=gen)  # fully random labels
    else:
        keep = proxy_idx[y[proxy_idx] != TARGET]  # the trigger on inputs of other classes
        proxy_x, proxy_y = add_trigger(x[keep]), torch.full((len(keep),), TARGET)
    clean_x = x[proxy_idx] if proxy_recipe == "paired" else None  # unlabelled: pseudo-labelled inside cuts
    res = cuts(corrupted, proxy_x, proxy_y, x[input_idx], kind=kind, alphas=alphas, epochs=proxy_epochs,
               lr=TRAIN_LR / 10, proxies=proxies, seed=seed, proxy_recipe=proxy_recipe, clean_x=clean_x)
    tick("CUTS done")
    base = corrupted.state_dict()
    rand = copy.deepcopy(corrupted)
    rand.load_state_dict(res.task_vector.random_like(seed).apply(base, -res.alpha))
    xt_trig = add_trigger(xt)
    net = copy.deepcopy(corrupted)
    curve = []
    for point in res.curve:
        net.load_state_dict(res.task_vector.apply(base, -point["alpha"]))
        row = {"alpha": point["alpha"], "acc": _acc(net, xt, yt)}
        if kind == "backdoor":
            row["asr"] = _asr(net, xt_trig, yt)
            row["proxy_asr"] = point["asr"]
        else:
            row["score"] = point["score"]
        curve.append(row)
    out = {"kind": kind, "seed": seed, "evaluated_on": evaluate_on, "backbone": backbone,
           "corrupted_acc": _acc(corrupted, xt, yt), "cuts_acc": _acc(res.model, xt, yt),
           "random_acc": _acc(rand, xt, yt), "clean_ft_acc": _acc(clean_ft, xt, yt), "clean_acc": _acc(clean, xt, yt),
           "alpha": res.alpha, "alpha_curve": curve}
    if kind == "noise":
        out["noise_rate"] = noise_rate
        out["train_fit_noisy"] = _acc(corrupted, x_bad, y_bad)  # memorisation check
        gap = out["clean_acc"] - out["corrupted_acc"]
        out["gap_recovered"] = (out["cuts_acc"] - out["corrupted_acc"]) / gap if gap > 0 else None
        out["best_alpha_gap_recovered"] = (max(r["acc"] for r in curve) - out["corrupted_acc"]) / gap \
            if gap > 0 else None  # hindsight, on the reported split: for reference only, never used to choose
    else:
        out.update(poison_rate=poison_rate, corrupted_asr=_asr(corrupted, xt_trig, yt),
                   cuts_asr=_asr(res.model, xt_trig, yt), random_asr=_asr(rand, xt_trig, yt),
                   clean_ft_asr=_asr(clean_ft, xt_trig, yt), clean_asr=_asr(clean, xt_trig, yt))
    out.update(proxies=proxies, epochs=epochs, proxy_epochs=proxy_epochs, proxy_recipe=proxy_recipe,
               proxy_size=len(proxy_x),
               holdout_sizes=[len(proxy_idx), len(input_idx), len(clean_idx)], train_size=len(train_idx))
    return out


def plot_alpha_curves(records: list[dict], path: str) -> None:
    """Test accuracy (and attack success, or the label-free score) against alpha, one line per run; the chosen
    alphas marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    kind = records[0]["kind"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax2 = ax.twinx()
    for r in records:
        a = [p["alpha"] for p in r["alpha_curve"]]
        line, = ax.plot(a, [p["acc"] for p in r["alpha_curve"]], lw=1.5, label=f"seed {r['seed']} test acc")
        key = "asr" if kind == "backdoor" else "score"
        ax2.plot(a, [p[key] for p in r["alpha_curve"]], ls="--", lw=1, color=line.get_color())
        ax.axvline(r["alpha"], color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="alpha (model = theta - alpha tau)", ylabel="clean test accuracy (solid)")
    ax2.set_ylabel("attack success on triggered test inputs (dashed)" if kind == "backdoor"
                   else "k-NN agreement score, no labels (dashed)")
    title = "CUTS, backdoor" if kind == "backdoor" else f"CUTS, label noise {records[0].get('noise_rate')}"
    ax.set_title(title + " (dotted: chosen alpha)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
