"""Baseline generators a weight generator has to beat (Zeng et al., arXiv 2506.07998), and the noise frontier.

A generator is only interesting if its networks are both accurate and novel. The cheapest way to get accurate
"new" networks is to copy training networks and perturb them: :func:`memorisers` over a range of noise levels traces
a frontier of (novelty, accuracy), and a generator whose points lie under it (:func:`dominated`) does no better than
copying. :func:`interpolations`, :func:`averages` and :func:`gaussian` are the other baselines.

Every baseline returns a one-channel :class:`~unf.weights.WeightSpace` of the training zoo's spec, the same for a
``seed`` on any device (random numbers are drawn on the CPU).
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .novelty import _align, _from_stacked, _permute, _stacked, as_weightspace, take


def _randn(shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (reproducible across devices), in ``like``'s device and dtype."""
    return torch.randn(shape, generator=g, dtype=torch.promote_types(like.dtype, torch.float32)).to(like)


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")


@torch.no_grad()
def memorisers(train: WeightSpace, acc: torch.Tensor, k: int, sigma: float, n: int, seed: int = 0,
               robust: bool = True) -> WeightSpace:
    """``n`` networks: the ``k`` most accurate training networks (``acc`` ``[M]``, accuracy on their training split:
    :func:`train_split_accuracy`), cycled, plus Gaussian noise.

    Noise on a tensor has std ``sigma`` times that tensor's spread across the zoo (one scale per tensor over all
    networks and entries, :meth:`WeightSpace.tensor_stats`; ``robust``: IQR / 1.349, which a few diverged networks
    cannot inflate). One scale per tensor keeps the noise permutation-invariant and comparable across layers of
    different scales, so one ``sigma`` means the same perturbation everywhere. Output ``i`` perturbs the
    ``i % k``-th best network; ties in ``acc`` go to the lower index.
    """
    train = as_weightspace(train.spec, train, "train")
    acc = torch.as_tensor(acc)
    if acc.shape != (train.batch_size,):
        raise ValueError(f"acc has shape {tuple(acc.shape)}; expected [M={train.batch_size}], one per training net")
    if not 1 <= k <= train.batch_size:
        raise ValueError(f"k={k} must be in [1, {train.batch_size}]")
    if sigma < 0:
        raise ValueError(f"sigma={sigma} must be >= 0")
    _check_n(n)
    best = torch.sort(acc.detach().cpu().double(), descending=True, stable=True).indices[:k]
    out = take(train, best[torch.arange(n) % k])
    scales = train.tensor_stats(robust=robust)
    g = torch.Generator().manual_seed(seed)
    return WeightSpace(out.spec, {name: t + sigma * scales[name][1].view(1, 1, *[1] * (t.dim() - 2))
                                  * _randn(t.shape, g, t) for name, t in out.items()}, out.extras)


def train_split_accuracy(rows: Sequence[Mapping]) -> torch.Tensor:
    """``[M]``: each metadata row's ``train_acc``, what :func:`memorisers` ranks a zoo by. Choosing the "best"
    networks by test accuracy would let the test split into a baseline that is then scored on it."""
    missing = [i for i, r in enumerate(rows) if "train_acc" not in r]
    if not rows or missing:
        raise ValueError("memorisers rank networks by their metadata's train_acc; "
                         + ("no rows" if not rows else f"row {missing[0]} has none"))
    return torch.tensor([float(r["train_acc"]) for r in rows], dtype=torch.float64)


def _pairs(m: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ordered pairs of distinct indices below ``m``."""
    i = torch.randint(m, (n,), generator=g)
    j = (i + 1 + torch.randint(m - 1, (n,), generator=g)) % m  # uniform over the others
    return i, j


@torch.no_grad()
def interpolations(spec: WeightSpaceSpec, train: WeightSpace, n: int, seed: int = 0,
                   alpha: tuple[float, float] = (0.25, 0.75), max_iter: int = 100) -> WeightSpace:
    """``n`` networks ``(1 - a) w_i + a P(w_j)``: random distinct training pairs, ``w_j`` permuted onto ``w_i`` by
    weight matching (without alignment the midpoint of two networks is usually broken), ``a ~ U(alpha)``.

    The range keeps away from the ends, where a sample would be a near-copy of a parent. Buffers are interpolated
    too; BatchNorm networks want :func:`unf.align.reset_bn_stats` afterwards. Integer buffers come from ``w_i``.
    """
    train = as_weightspace(spec, train, "train")
    _check_n(n)
    if train.batch_size < 2:
        raise ValueError("interpolations need at least two training networks")
    lo, hi = alpha
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"alpha={alpha} must be a range within [0, 1]")
    g = torch.Generator().manual_seed(seed)
    i, j = _pairs(train.batch_size, n, g)
    a = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    w = _stacked(train)
    wi, wj = {k: t[i.to(t.device)] for k, t in w.items()}, {k: t[j.to(t.device)] for k, t in w.items()}
    moved = _permute(spec, wj, _align(spec, wi, wj, max_iter, seed))
    out = {}
    for k, t in wi.items():
        ak = a.to(device=t.device, dtype=t.dtype).view(-1, *[1] * (t.dim() - 1))
        out[k] = (1 - ak) * t + ak * moved[k]
    return _from_stacked(train, out, None if train.extras is None else [train.extras[p] for p in i.tolist()])


@torch.no_grad()
def averages(spec: WeightSpaceSpec, train: WeightSpace, n: int, k: int = 4, seed: int = 0,
             max_iter: int = 100) -> WeightSpace:
    """``n`` networks, each the mean of ``k`` random distinct training networks aligned to the first of them.

    Aligning to one member, not to an iterated barycentre (:func:`unf.align.merge_many`), keeps this one batched
    matching for all ``n * (k - 1)`` pairs. Integer buffers come from the first member."""
    train = as_weightspace(spec, train, "train")
    _check_n(n)
    if not 2 <= k <= train.batch_size:
        raise ValueError(f"k={k} must be in [2, {train.batch_size}]")
    g = torch.Generator().manual_seed(seed)
    pick = torch.stack([torch.randperm(train.batch_size, generator=g)[:k] for _ in range(n)])  # [n, k]
    w = _stacked(train)
    first = pick[:, :1].expand(n, k - 1).reshape(-1)
    rest = pick[:, 1:].reshape(-1)
    ref = {name: t[first.to(t.device)] for name, t in w.items()}
    moved = _permute(spec, {name: t[rest.to(t.device)] for name, t in w.items()},
                     _align(spec, ref, {name: t[rest.to(t.device)] for name, t in w.items()}, max_iter, seed))
    out = {name: (w[name][pick[:, 0].to(t.device)] + t.view(n, k - 1, *t.shape[1:]).sum(1)) / k
           for name, t in moved.items()}
    return _from_stacked(train, out, None if train.extras is None else [train.extras[p] for p in pick[:, 0].tolist()])


@torch.no_grad()
def gaussian(train: WeightSpace, n: int, seed: int = 0, align: bool = False, max_iter: int = 100) -> WeightSpace:
    """``n`` networks drawn entry by entry from a Gaussian with the zoo's per-parameter mean and std.

    ``align``: fit it to the zoo aligned to its first network (a common frame, so that entries correspond across
    networks and the mean is not washed out by permutations); samples then live in that frame. Integer buffers come
    from the first network."""
    _check_n(n)
    w = _stacked(train)
    if align:
        anchor = {name: t[:1] for name, t in w.items()}
        w = _permute(train.spec, w, _align(train.spec, anchor, w, max_iter, seed))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in w.items():
        mean, std = t.mean(0), t.std(0, unbiased=False)
        out[name] = mean + std * _randn((n, *t.shape[1:]), g, t)
    return _from_stacked(train, out, None if train.extras is None else [train.extras[0]] * n)


# -- the noise frontier ----------------------------------------------------------------------------------------------
Points = Union[torch.Tensor, Sequence[Sequence[float]]]


def _points(points: Points, name: str) -> torch.Tensor:
    p = torch.as_tensor(points, dtype=torch.float64)
    if p.dim() == 1 and p.numel() == 2:
        p = p[None]
    if p.dim() != 2 or p.shape[1] != 2:
        raise ValueError(f"{name} has shape {tuple(p.shape)}; expected (novelty, accuracy) pairs [K, 2]")
    return p


def noise_frontier(points: Points) -> torch.Tensor:
    """``[F, 2]``: the (novelty, accuracy) points (larger = more novel, e.g. ``1 - iou`` or aligned L2) that no other
    point beats in both, by increasing novelty (so decreasing accuracy): the upper envelope of memorisers at
    several noise levels. Duplicates are kept once."""
    p = _points(points, "points")
    if len(p) == 0:
        return p
    # most novel first, more accurate first within a novelty: keep a point if it beats every more novel one
    order = sorted(range(len(p)), key=lambda i: (-p[i, 0].item(), -p[i, 1].item()))
    keep, best = [], -float("inf")
    for i in order:
        if p[i, 1].item() > best:
            keep.append(i)
            best = p[i, 1].item()
    return p[list(reversed(keep))]


def dominated(point: Points, frontier: Points) -> Union[bool, torch.Tensor]:
    """Is some frontier point at least as novel and at least as accurate as ``point``? A pair gives a ``bool``,
    ``[K, 2]`` points a ``[K]`` bool tensor. ``frontier`` may be any set of memoriser points."""
    single = torch.as_tensor(point).dim() == 1
    p, f = _points(point, "point"), _points(frontier, "frontier")
    out = ((f[None, :, 0] >= p[:, None, 0]) & (f[None, :, 1] >= p[:, None, 1])).any(1)
    return bool(out[0]) if single else out


def frontier_accuracy(frontier: Points, novelty: Union[float, torch.Tensor]) -> torch.Tensor:
    """The best frontier accuracy at novelty >= ``novelty`` (``-inf`` beyond the most novel point): the accuracy a
    generator has to beat at that novelty. Same shape as ``novelty``."""
    f = _points(frontier, "frontier")
    v = torch.as_tensor(novelty, dtype=torch.float64)
    if len(f) == 0:
        return torch.full_like(v, -float("inf"))
    ok = f[:, 0] >= v[..., None]
    return torch.where(ok, f[:, 1], torch.tensor(-float("inf"), dtype=torch.float64)).amax(-1)
