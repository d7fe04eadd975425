"""CUTS (Mozafari et al.): unlearn label noise or a backdoor by task-vector negation.

Fine-tune the corrupted model on a small corrupted proxy set, take the task vector ``tau = theta_proxy - theta``
(the direction that learns the corruption), and return ``theta - alpha * tau``. ``alpha`` is chosen without clean
labels:

- label noise: the alpha maximising the k-NN label agreement of penultimate features on unlabelled held-out inputs,
  chance-corrected (Cohen's kappa against the agreement that the predicted class frequencies give by chance) and
  multiplied by two class-coverage penalties (the fraction of classes predicted at least half as often as uniform,
  and the normalised entropy of the predicted classes), so that a model collapsing onto a few classes cannot
  score well by agreeing with itself;
- backdoor: the first alpha whose attack success on the (triggered, target-labelled) proxy set is at most 1%.

Proxy recipes (``proxy_recipe``). ``"plain"`` (the paper's): ``tau`` is the fine-tune on the proxy set alone.
``"paired"`` (backdoors; an addition of this library, not in the paper): ``clean_x``, unlabelled untriggered inputs
(for instance the proxy inputs without the trigger), are labelled with the corrupted model's own predictions
(pseudo-labels: no clean label is read), and ``tau = tau(proxy + clean_x) - tau(clean_x)``: the fine-tune on the
triggered proxy together with its pseudo-labelled clean twins, minus the fine-tune on the twins alone (same seed,
same learning rate and epochs). The generic "fit these inputs harder" direction, which both fine-tunes share, cancels;
what is left is specific to the trigger, so subtracting it costs less clean accuracy. Its norm is smaller, so its
alphas are larger (search a longer grid).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..training import train_classifier
from .task_vector import TaskVector

Features = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class CutsResult:
    """``model``: the edited model; ``alpha``; ``curve``: one dict per alpha tried (``alpha`` and ``score`` for
    noise, ``alpha`` and ``asr`` for backdoors); ``task_vector``: the proxy task vector ``tau``."""
    model: nn.Module
    alpha: float
    curve: list = field(default_factory=list)
    task_vector: Optional[TaskVector] = None


def last_linear_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, features]``: the input of the model's last ``nn.Linear`` (the penultimate features), in eval mode."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear; pass features=callable(model, x) giving penultimate features")
    seen = []
    handle = linears[-1].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was)
    return seen[-1].flatten(1)


def knn_agreement(features: torch.Tensor, preds: torch.Tensor, num_classes: int, k: int = 10) -> float:
    """Chance-corrected k-NN agreement of predicted labels in feature space, times the class-coverage penalties.

    ``features``: ``[N, D]``; ``preds``: ``[N]`` predicted classes. Neighbours by cosine similarity, excluding the
    point itself. 1 for a model whose predictions are constant on feature clusters and spread over all classes;
    about 0 for predictions unrelated to the features; 0 for a constant prediction."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("knn_agreement needs at least 2 inputs")
    k = min(k, n - 1)
    f = torch.nn.functional.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)
    nbrs = sim.topk(k, dim=1).indices
    agree = float((preds[nbrs] == preds[:, None]).double().mean())
    p = torch.bincount(preds, minlength=num_classes).double() / n
    chance = float(p.square().sum())
    if chance >= 1 - 1e-12:
        return 0.0
    kappa = (agree - chance) / (1 - chance)
    coverage = float((p >= 0.5 / num_classes).double().mean())
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(num_classes)
    return kappa * coverage * entropy


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs in eval mode; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return _logits(model, x, batch_size).argmax(1)


def pseudo_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N]``: the model's own predicted classes on ``x`` (eval mode; its train/eval mode is kept): the labels of the
    clean twins in the ``"paired"`` proxy recipe, so that no true label is needed."""
    return _predict(model, x)


def select_alpha(model: nn.Module, tau: TaskVector, alphas: Sequence[float], *, kind: str,
                 inputs: Optional[torch.Tensor] = None, proxy_x: Optional[torch.Tensor] = None,
                 proxy_y: Optional[torch.Tensor] = None, features: Optional[Features] = None, k: int = 10,
                 asr_threshold: float = 0.01, num_classes: Optional[int] = None) -> tuple[float, list[dict]]:
    """Try ``theta - alpha * tau`` for every alpha; returns the chosen alpha and the curve (see :func:`cuts`)."""
    features = features or last_linear_input
    base = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
    net = copy.deepcopy(model)
    curve = []
    for a in alphas:
        net.load_state_dict(tau.apply(base, -float(a)))
        if kind == "noise":
            preds = _predict(net, inputs)
            c = num_classes or int(_logits(net, inputs[:1]).shape[1])
            curve.append({"alpha": float(a), "score": knn_agreement(features(net, inputs), preds, c, k)})
        else:
            asr = float((_predict(net, proxy_x) == proxy_y).double().mean())
            curve.append({"alpha": float(a), "asr": asr})
    if kind == "noise":
        best = max(range(len(curve)), key=lambda i: (curve[i]["score"], -i))  # first maximum
        return curve[best]["alpha"], curve
    for point in curve:
        if point["asr"] <= asr_threshold:
            return point["alpha"], curve
    best = min(curve, key=lambda p: p["asr"])
    warnings.warn(f"cuts: no alpha up to {alphas[-1]} brings attack success on the proxy set to {asr_threshold:.0%}; "
                  f"using alpha={best['alpha']} (success {best['asr']:.1%}); try larger alphas", RuntimeWarning)
    return best["alpha"], curve


def cuts(model: nn.Module, proxy_x: torch.Tensor, proxy_y: torch.Tensor, inputs: Optional[torch.Tensor] = None, *,
         kind: str = "noise", features: Optional[Features] = None, alphas: Optional[Sequence[float]] = None,
         epochs: int = 20, lr: float = 1e-4, batch_size: int = 64, proxies: int = 1, seed: int = 0, k: int = 10,
         asr_threshold: float = 0.01, exclude="buffers", proxy_recipe: str = "plain",
         clean_x: Optional[torch.Tensor] = None) -> CutsResult:
    """Unlearn the corruption of ``model`` by CUTS (see the module docstring).

    ``proxy_x``, ``proxy_y``: the small corrupted proxy set (``[P, *input]``, ``[P]``): for noise, held-out inputs
    with random labels; for a backdoor, held-out inputs carrying the trigger, labelled with the target class.
    ``inputs``: unlabelled held-out inputs for choosing alpha under label noise. ``features(model, x) -> [N, D]``:
    the penultimate features (default: the input of the last Linear). The proxy is fine-tuned with Adam for
    ``epochs`` at ``lr`` (the paper: 10x below the training rate); with ``proxies > 1`` several proxy fine-tunes
    (seeds ``seed .. seed + proxies - 1``, each with its own random labels for noise) are averaged into ``tau``.
    BatchNorm statistics are excluded from ``tau`` (``exclude``, see :class:`TaskVector`). The input model is not
    modified, its train/eval mode included; the edited model is returned in that same mode.
    ``proxy_recipe``: ``"plain"`` (default, the paper's) or ``"paired"`` (``kind="backdoor"`` only; needs
    ``clean_x``, unlabelled untriggered inputs ``[M, *input]``, pseudo-labelled by :func:`pseudo_labels`): ``tau``
    is, per proxy, the fine-tune on ``proxy_x`` together with ``clean_x`` minus the fine-tune on ``clean_x`` alone
    (see the module docstring).
    """
    if kind not in ("noise", "backdoor"):
        raise ValueError(f"kind={kind!r}: choose 'noise' or 'backdoor'")
    if kind == "noise" and inputs is None:
        raise ValueError("kind='noise' needs inputs: unlabelled held-out inputs to choose alpha by k-NN agreement")
    if proxy_recipe not in ("plain", "paired"):
        raise ValueError(f"proxy_recipe={proxy_recipe!r}: choose 'plain' or 'paired'")
    if proxy_recipe == "paired":
        if kind != "backdoor":
            raise ValueError("proxy_recipe='paired' is for kind='backdoor' (the twins are the untriggered inputs)")
        if clean_x is None or len(clean_x) == 0:
            raise ValueError("proxy_recipe='paired' needs clean_x: unlabelled untriggered inputs (pseudo-labelled by "
                             "the model itself)")
    elif clean_x is not None:
        raise ValueError("clean_x is used by proxy_recipe='paired' only")
    if len(proxy_x) != len(proxy_y):
        raise ValueError(f"proxy_x has {len(proxy_x)} inputs but proxy_y {len(proxy_y)} labels")
    alphas = list(alphas) if alphas is not None else [round(0.1 * i, 1) for i in range(0, 41)]
    base = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
    num_classes = int(_logits(model, proxy_x[:1]).shape[1])
    taus = []
    twin_y = pseudo_labels(model, clean_x) if proxy_recipe == "paired" else None

    def fine_tune(x, y, i):
        ft = train_classifier(copy.deepcopy(model), x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed + i)
        return TaskVector(base, ft.state_dict(), exclude=exclude)

    for i in range(proxies):
        y = proxy_y
        if kind == "noise" and i > 0:  # a fresh random labelling per extra proxy
            gen = torch.Generator().manual_seed(seed + i)
            y = torch.randint(0, num_classes, (len(proxy_y),), generator=gen).to(proxy_y.device)
        if proxy_recipe == "paired":
            both = fine_tune(torch.cat([proxy_x, clean_x]), torch.cat([y, twin_y.to(y.device, y.dtype)]), i)
            taus.append(both - fine_tune(clean_x, twin_y, i))
        else:
            taus.append(fine_tune(proxy_x, y, i))
    tau = sum(taus) / len(taus)
    alpha, curve = select_alpha(model, tau, alphas, kind=kind, inputs=inputs, proxy_x=proxy_x, proxy_y=proxy_y,
                                features=features, k=k, asr_threshold=asr_threshold, num_classes=num_classes)
    out = copy.deepcopy(model)  # in the caller's train/eval mode
    out.load_state_dict(tau.apply(base, -alpha))
    return CutsResult(out, alpha, curve, tau)
