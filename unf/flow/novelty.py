"""Novelty of generated networks: are they new, or copies of the training zoo in disguise?

Zeng et al. (arXiv 2506.07998) found that most weight generators replicate or interpolate their training checkpoints.
This module measures, per generated network and against a reference set (the training zoo):

* :func:`error_iou`: the largest IoU of its set of wrong test predictions with any reference network's (Zeng et al.).
* :func:`derivedness`: the largest correlation of its probe logits, with the zoo's consensus removed, with any
  reference network's. Independently trained networks share the consensus but not each other's residual; a noised,
  permuted or lightly perturbed copy keeps its parent's residual.
* :func:`aligned_l2`: the smallest L2 distance to a reference network after permutation alignment (Zeng et al.).

Every value needs a reference level to mean anything: the same metric for held-out networks trained like the zoo
(independent by construction) against the zoo. :func:`novelty_report` computes both.

Networks are batches of one architecture, as :class:`~unf.weights.WeightSpace` (one channel) or lists of state_dicts.
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from ..align.matching import match_batched, permute_batched
from ..spec import WeightSpaceSpec
from ..weights import WeightSpace

StateDicts = Sequence[Mapping[str, torch.Tensor]]
Weights = Union[WeightSpace, StateDicts]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# -- helpers on batches of networks ----------------------------------------------------------------------------------
def as_weightspace(spec: WeightSpaceSpec, weights: Weights, name: str = "weights") -> WeightSpace:
    """``weights`` as a one-channel :class:`WeightSpace` of ``spec`` (state_dicts are stacked)."""
    if not isinstance(weights, WeightSpace):
        weights = WeightSpace.from_state_dicts(spec, list(weights))
    if weights.spec is not spec and weights.spec != spec:
        raise ValueError(f"{name}: its spec differs from the spec given")
    if weights.channels != 1:
        raise ValueError(f"{name}: networks have 1 channel; this weight space has {weights.channels}")
    return weights


def take(ws: WeightSpace, index: torch.Tensor) -> WeightSpace:
    """Members ``index`` (``[K]`` long, repeats allowed) of ``ws``, their integer buffers along."""
    index = torch.as_tensor(index, dtype=torch.long)
    extras = None if ws.extras is None else [ws.extras[i] for i in index.tolist()]
    return WeightSpace(ws.spec, {n: t[index.to(t.device)] for n, t in ws.items()}, extras)


def _stacked(ws: WeightSpace) -> dict[str, torch.Tensor]:
    """name -> ``[N, *shape]`` (the channel axis dropped)."""
    return {n: t[:, 0] for n, t in ws.items()}


def _from_stacked(ws: WeightSpace, tensors: Mapping[str, torch.Tensor],
                  extras: Optional[list] = None) -> WeightSpace:
    return WeightSpace(ws.spec, {n: tensors[n][:, None] for n in ws.names}, extras)


def _align(spec: WeightSpaceSpec, reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
           max_iter: int = 100, seed: int = 0, block: int = 512) -> dict[str, torch.Tensor]:
    """Weight matching of ``other`` (name -> ``[N, *shape]``) to ``reference`` (``[1 or N, *shape]``: one reference for
    all, or one per network); returns group -> ``[N, n]`` permutations for :func:`permute_batched`.

    :func:`unf.align.matching.match_batched` (signature start, head matching, coordinate descent) on the
    parameters, with a reference per network if given (buffers are permuted along but do not enter the objective,
    as in ``align_many``). Networks are matched in blocks of ``block`` to bound memory."""
    names = spec.parameter_names
    dtype = torch.promote_types(next(iter(other.values())).dtype, torch.float32)
    n_models = next(iter(other.values())).shape[0]
    out: dict[str, list] = {g: [] for g in spec.groups}
    for a in range(0, n_models, block):
        ref = {n: (reference[n] if reference[n].shape[0] == 1 else reference[n][a:a + block]).to(dtype)
               for n in names}
        oth = {n: other[n][a:a + block].to(dtype) for n in names}
        perms, _ = match_batched(spec, ref, oth, max_iter, seed)
        for g in spec.groups:
            out[g].append(perms[g])
    return {g: torch.cat(p) for g, p in out.items()}


def _permute(spec: WeightSpaceSpec, tensors: Mapping[str, torch.Tensor],
             perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: permute_batched(spec, n, t, {g: p.to(t.device) for g, p in perms.items()}) for n, t in tensors.items()}


def _flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors.values()], 1)


# -- outputs on probe inputs -----------------------------------------------------------------------------------------
@torch.no_grad()
def stacked_logits(model: nn.Module, spec: WeightSpaceSpec, weights: Weights, x: torch.Tensor,
                   batch: int = 256) -> torch.Tensor:
    """Outputs ``[N, P, C]`` of ``N`` networks of ``model``'s architecture on probe inputs ``x`` ``[P, *features]``.

    ``model`` only lends its structure: its own tensors are replaced by each network's (``torch.func.functional_call``
    vmapped over the stacked weights), in eval mode, ``batch`` networks at a time (memory ~ ``batch * P`` times the
    widest activation). ``x`` is moved to the weights' device and dtype; the model's train/eval mode is restored.
    """
    ws = as_weightspace(spec, weights)
    x = x.to(device=ws.device, dtype=ws.dtype)
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    stacked = _stacked(ws)

    def one(tensors, xb):
        # integer buffers (num_batches_tracked) are not in ``tensors``: the model's own serve, eval mode ignores them
        return functional_call(model, tensors, (xb,))

    run = vmap(one, in_dims=(0, None))
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # vmap's per-member fallback for some pooling ops is correct, only slower
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            out = [run({n: t[a:a + batch] for n, t in stacked.items()}, x) for a in range(0, ws.batch_size, batch)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def probe_set(x_test: torch.Tensor, copies: int = 2, noise: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Probe inputs ``[(1 + copies) * T, *features]``: the test inputs ``x_test`` ``[T, *features]`` first, then
    ``copies`` copies of them with Gaussian noise of ``noise`` times each feature's std over ``x_test``.

    Off-distribution inputs are where independently trained networks disagree most, so they separate a network's own
    behaviour from the consensus better than the clean test set. Constant features (digits' border pixels) get no
    noise. The noise is drawn on the CPU from ``seed`` (the same on every device), then moved to ``x_test``'s device.
    """
    if copies < 0 or noise < 0:
        raise ValueError(f"copies={copies} and noise={noise} must be >= 0")
    std = x_test.std(0, unbiased=False) if len(x_test) > 1 else torch.zeros_like(x_test[0])
    g = torch.Generator().manual_seed(seed)
    dtype = torch.promote_types(x_test.dtype, torch.float32)
    eps = torch.randn((copies, *x_test.shape), generator=g, dtype=dtype).to(x_test.device)
    noised = (x_test.to(dtype) + noise * std.to(dtype) * eps).to(x_test.dtype)
    return torch.cat([x_test, noised.reshape(-1, *x_test.shape[1:])])


# -- the metrics -----------------------------------------------------------------------------------------------------
def _check_self(exclude_self: bool, n: int, m: int, what: str) -> None:
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs the same networks on both sides; {what} has {n} and {m}")
    if exclude_self and m < 2:
        raise ValueError("exclude_self needs at least two reference networks")


def error_iou(pred: torch.Tensor, y: torch.Tensor, ref_pred: torch.Tensor, exclude_self: bool = False
              ) -> torch.Tensor:
    """``[N]``: for each network the largest IoU of its set of wrong predictions with any reference network's.

    ``pred`` ``[N, P]`` and ``ref_pred`` ``[M, P]`` are predicted classes, ``y`` ``[P]`` the labels. Two networks
    without any error have equal (empty) error sets: IoU 1, so a perfect network can never be called novel by this
    metric (there is no evidence either way); one without errors against one with errors: 0. ``exclude_self``: ``pred``
    and ``ref_pred`` are the same networks, and each is compared with the others only (the within-reference level).
    """
    if pred.dim() != 2 or ref_pred.dim() != 2 or y.dim() != 1:
        raise ValueError(f"pred {tuple(pred.shape)}, ref_pred {tuple(ref_pred.shape)} and y {tuple(y.shape)} must "
                         "be [N, P], [M, P] and [P]")
    if pred.shape[1] != y.shape[0] or ref_pred.shape[1] != y.shape[0]:
        raise ValueError(f"pred {tuple(pred.shape)} and ref_pred {tuple(ref_pred.shape)} must have P={len(y)} "
                         "columns, one per label in y")
    if len(ref_pred) == 0:
        raise ValueError("ref_pred has no reference networks")
    _check_self(exclude_self, len(pred), len(ref_pred), "pred/ref_pred")
    y = y.to(pred.device)
    wrong = (pred != y).float()  # counts in float32 are exact up to 2^24 probes
    ref_wrong = (ref_pred.to(pred.device) != y).float()
    inter = wrong @ ref_wrong.T  # [N, M]
    union = wrong.sum(1, keepdim=True) + ref_wrong.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    if exclude_self:
        iou.fill_diagonal_(-1.0)
    return iou.max(1).values


def agreement(pred: torch.Tensor, classes: Optional[int] = None) -> torch.Tensor:
    """``[N]``: for each network the mean share of inputs on which it predicts what another network of the same
    set predicts (a diversity measure WITHIN a set: generated networks that all sit near one point agree on almost
    everything, independently trained ones less). ``pred`` ``[N, P]`` predicted classes, ``N >= 2``."""
    if pred.dim() != 2 or len(pred) < 2:
        raise ValueError(f"pred {tuple(pred.shape)} must be [N >= 2, P] predicted classes")
    classes = int(pred.max()) + 1 if classes is None else classes
    onehot = torch.nn.functional.one_hot(pred.long(), classes).flatten(1).float()  # [N, P * classes]
    same = onehot @ onehot.T  # [N, N]: inputs on which the two agree
    same.fill_diagonal_(0.0)
    return same.sum(1).double() / ((len(pred) - 1) * pred.shape[1])


def zscore(logits: torch.Tensor) -> torch.Tensor:
    """``[N, P, C]`` -> ``[N, P * C]``: each network's logits standardised over all its entries (a network's scale and
    offset say nothing about where it comes from; a rescaled copy has the same z-scores)."""
    flat = logits.flatten(1).to(torch.promote_types(logits.dtype, torch.float32))
    std = flat.std(1, unbiased=False, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    return (flat - flat.mean(1, keepdim=True)) / std


def _unit_rows(r: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to norm 1, so that their dot products are Pearson correlations (a zero row stays 0)."""
    r = r - r.mean(1, keepdim=True)
    return r / r.norm(dim=1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)


def derivedness(logits: torch.Tensor, ref_logits: torch.Tensor, consensus: Optional[torch.Tensor] = None,
                exclude_self: bool = False) -> torch.Tensor:
    """``[N]``: the largest Pearson correlation of a network's logit residual with any reference network's.

    ``logits`` ``[N, P, C]``, ``ref_logits`` ``[M, P, C]`` on the same probe inputs. Residual: the network's z-scored
    logits (:func:`zscore`) minus ``consensus`` ``[P, C]`` (in z-score units; default: the mean of the z-scored
    reference logits). What networks trained on the same data agree on is the consensus; what is left is each
    network's own, which independent networks do not share (near 0) and a copy keeps (near 1).
    ``exclude_self``: the two sets are the same networks; each is compared with the others only.
    """
    if logits.dim() != 3 or ref_logits.dim() != 3 or logits.shape[1:] != ref_logits.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must be [N, P, C] "
                         "and [M, P, C] on the same probes")
    if len(ref_logits) == 0:
        raise ValueError("ref_logits has no reference networks")
    _check_self(exclude_self, len(logits), len(ref_logits), "logits/ref_logits")
    z, zr = zscore(logits), zscore(ref_logits.to(logits.device))
    if consensus is None:
        c = zr.mean(0)
    elif tuple(consensus.shape) != tuple(logits.shape[1:]):
        raise ValueError(f"consensus has shape {tuple(consensus.shape)}; expected [P, C] = {tuple(logits.shape[1:])}")
    else:
        c = consensus.to(device=z.device, dtype=z.dtype).flatten()
    corr = _unit_rows(z - c) @ _unit_rows(zr - c).T  # [N, M]
    if exclude_self:
        corr.fill_diagonal_(-float("inf"))
    return corr.max(1).values


class _Canonical:
    """Reference networks brought to a canonical form (aligned to one anchor), for :func:`aligned_l2`."""

    def __init__(self, spec: WeightSpaceSpec, ref: WeightSpace, anchor: int = 0, max_iter: int = 100, seed: int = 0):
        if not 0 <= anchor < ref.batch_size:
            raise ValueError(f"anchor={anchor} is not a reference network (there are {ref.batch_size})")
        self.spec, self.max_iter, self.seed = spec, max_iter, seed
        self.ref = _stacked(ref)
        self.anchor = {n: t[anchor:anchor + 1] for n, t in self.ref.items()}
        self.flat = self.canonical(self.ref)

    def canonical(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, D]``: the networks aligned to the anchor, flattened."""
        return _flat(_permute(self.spec, tensors, _align(self.spec, self.anchor, tensors, self.max_iter, self.seed)))

    def distances(self, weights: WeightSpace, candidates: int, exclude_self: bool) -> torch.Tensor:
        _check_self(exclude_self, weights.batch_size, self.flat.shape[0], "weights/ref")
        w = _stacked(weights)
        flat = self.canonical(w)
        m = self.flat.shape[0]
        # nearest references in the canonical space; cdist's matmul shortcut is inexact near 0, so it only ranks
        d = torch.cdist(flat.float(), self.flat.float())
        if exclude_self:
            d.fill_diagonal_(float("inf"))
        k = min(max(candidates, 1), m - int(exclude_self))
        idx = d.topk(k, dim=1, largest=False).indices  # [N, k]
        best = (flat - self.flat[idx[:, 0]]).norm(dim=1)  # canonical forms: already an aligned distance
        for j in range(min(candidates, k)):
            ref_j = {nm: t[idx[:, j]] for nm, t in self.ref.items()}  # one reference per network
            moved = _permute(self.spec, w, _align(self.spec, ref_j, w, self.max_iter, self.seed))
            best = torch.minimum(best, (_flat(moved) - _flat(ref_j)).norm(dim=1))
        return best


@torch.no_grad()
def aligned_l2(spec: WeightSpaceSpec, weights: Weights, ref: Weights, candidates: int = 8, anchor: int = 0,
               exclude_self: bool = False, max_iter: int = 100, seed: int = 0) -> torch.Tensor:
    """``[N]``: each network's smallest L2 distance (over all float tensors) to a reference network after
    permutation alignment.

    Exact weight matching of all pairs (1,000 x 500) is too costly, so: every network of both sets is aligned to one
    anchor (reference ``anchor``) -- a common canonical form in which distances are already distances up to
    permutation, but through the anchor, so too large --; the ``candidates`` references nearest in that form are then
    matched to the network pairwise (batched over the networks, one candidate rank at a time), and the smallest
    distance of all is kept. The approximation can only overestimate (weight matching is itself a local search); it
    misses the true nearest reference only when that one is not among the candidates. ``candidates=0``: the canonical
    distance alone. A permuted copy of a reference is found at distance ~0. ``exclude_self``: ``weights`` are the
    reference networks themselves, each compared with the others.
    """
    ws, rs = as_weightspace(spec, weights, "weights"), as_weightspace(spec, ref, "ref")
    if candidates < 0:
        raise ValueError(f"candidates={candidates} must be >= 0")
    return _Canonical(spec, rs.to(device=ws.device, dtype=ws.dtype), anchor, max_iter, seed).distances(
        ws, candidates, exclude_self)


# -- report ----------------------------------------------------------------------------------------------------------
def summarize(values: torch.Tensor) -> dict[str, float]:
    """Mean, std and quantiles (``q05`` ... ``q95``) of ``[N]`` values, as floats."""
    v = values.detach().double().cpu()
    out = {"mean": float(v.mean()), "std": float(v.std(unbiased=False))}
    out.update({f"q{round(q * 100):02d}": float(x) for q, x in zip(QUANTILES, torch.quantile(v, torch.tensor(
        QUANTILES, dtype=v.dtype)))})
    return out


@torch.no_grad()
def novelty_report(model: nn.Module, spec: WeightSpaceSpec, generated: Union[Weights, Mapping[str, Weights]],
                   train: Weights, heldout: Weights, x: torch.Tensor, y: torch.Tensor, candidates: int = 8,
                   l2: bool = True, copy_threshold: float = 0.99, batch: int = 256,
                   progress: Optional[Callable[[str], None]] = None) -> dict[str, dict]:
    """Novelty of generated networks against the training zoo, beside held-out networks as the reference level.

    ``generated``: one batch of networks, or name -> batch (several generators or baselines share the training
    zoo's outputs and canonical forms). ``x``: probe inputs ``[P, *features]`` whose first ``T`` rows are the test
    inputs labelled by ``y`` ``[T]`` (as :func:`probe_set` lays them out). Accuracy and :func:`error_iou` use the test
    rows (as Zeng et al.), :func:`derivedness` and :func:`agreement` (within each set) all probes (consensus: the
    training zoo's), :func:`aligned_l2` the weights (skipped with ``l2=False``).

    Returns, for ``"heldout"`` and each generated set (``"generated"`` for a single batch):
    ``{"values": {"accuracy", "iou", "derivedness", "agreement" (sets of >= 2), "l2": [N] CPU tensors}, "summary": {metric:
    summarize(...),
    "copy_fraction": share with iou >= copy_threshold, "n": N}}``. ``progress``, if given, is called with a short text
    after each set (held-out first).
    """
    if y.dim() != 1 or len(y) > len(x):
        raise ValueError(f"y {tuple(y.shape)} must be [T] labels of the first T <= {len(x)} probe inputs x")
    sets = dict(generated) if isinstance(generated, Mapping) else {"generated": generated}
    if "heldout" in sets:
        raise ValueError("generated: the name 'heldout' is reserved for the reference level")
    sets = {"heldout": heldout, **sets}
    tr = as_weightspace(spec, train, "train")
    t = len(y)
    train_logits = stacked_logits(model, spec, tr, x, batch)
    train_pred = train_logits[:, :t].argmax(2)
    consensus = zscore(train_logits).mean(0).view(train_logits.shape[1:])
    canon = _Canonical(spec, tr) if l2 else None
    report = {}
    for name, nets in sets.items():
        ws = as_weightspace(spec, nets, name).to(device=tr.device, dtype=tr.dtype)
        logits = stacked_logits(model, spec, ws, x, batch)
        pred = logits[:, :t].argmax(2)
        values = {"accuracy": (pred == y.to(pred.device)).double().mean(1),
                  "iou": error_iou(pred, y, train_pred),
                  "derivedness": derivedness(logits, train_logits, consensus)}
        if ws.batch_size >= 2:  # a within-set measure: undefined for one network
            values["agreement"] = agreement(logits.argmax(2), logits.shape[2])
        if canon is not None:
            values["l2"] = canon.distances(ws, candidates, exclude_self=False)
        values = {k: v.detach().cpu() for k, v in values.items()}
        summary = {k: summarize(v) for k, v in values.items()}
        summary["copy_fraction"] = float((values["iou"] >= copy_threshold).double().mean())
        summary["n"] = ws.batch_size
        report[name] = {"values": values, "summary": summary}
        if progress is not None:
            progress(name)
    return report
