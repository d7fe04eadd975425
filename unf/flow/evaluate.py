"""Measure generated networks: accuracy on the zoo's own data (BatchNorm recalibrated on training inputs only) and
novelty against the networks the flow was trained on, with held-out zoo networks as the reference level."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import data as datasets
from ..weights import WeightSpace
from ..zoo.store import Zoo
from .novelty import agreement, novelty_report, probe_set, stacked_logits, summarize, take
from .zoo import build_network, has_batchnorm, model_factory, recalibrate_bn, select_rows


def _groups(rows: Sequence[Mapping]) -> dict[str, list[int]]:
    """Row indices by activation (one architecture instance per group)."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(str(r.get("activation", "")), []).append(i)
    return out


def recalibrated(factory: Callable[..., nn.Module], ws: WeightSpace, rows: Sequence[Mapping],
                 x_train: torch.Tensor) -> WeightSpace:
    """``ws`` with every network's BatchNorm statistics recomputed on ``x_train`` (unchanged without BatchNorm)."""
    if not has_batchnorm(build_network(factory, rows[0])):
        return ws
    sds = []
    for sd, row in zip(ws.to_state_dicts(), rows):
        net = build_network(factory, row)
        net.load_state_dict(sd)
        sds.append(recalibrate_bn(net, x_train).state_dict())
    return WeightSpace.from_state_dicts(ws.spec, sds)


@torch.no_grad()
def evaluate_networks(factory: Callable[..., nn.Module], ws: WeightSpace, rows: Sequence[Mapping], data: str,
                      split_seed: int, device=None) -> tuple[WeightSpace, list[dict]]:
    """Recalibrate BatchNorm on the training split, then per network ``train_acc``, ``test_acc`` and
    ``test_loss`` on ``data`` (split ``split_seed``). Returns the (recalibrated) networks and the metrics."""
    split = datasets.load(data, seed=split_seed)
    ws = recalibrated(factory, ws, rows, split.x_train)
    metrics: list[dict] = [{} for _ in rows]
    for _, idx in _groups(rows).items():
        model = build_network(factory, rows[idx[0]])
        part = take(ws, torch.tensor(idx)).to(device)
        for name, x, y in (("train", split.x_train, split.y_train), ("test", split.x_test, split.y_test)):
            logits = stacked_logits(model, ws.spec, part, x.to(part.device))
            y = y.to(logits.device)
            acc = (logits.argmax(2) == y).double().mean(1)
            for j, i in enumerate(idx):
                metrics[i][f"{name}_acc"] = float(acc[j])
            if name == "test":
                loss = F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none").mean(1)
                for j, i in enumerate(idx):
                    metrics[i]["test_loss"] = float(loss[j])
    return ws, metrics


def train_split_scorer(factory: Callable[..., nn.Module], row: Mapping, data: str, split_seed: int, num: int = 100,
                       nfe: int = 20, solver: str = "heun", seed: int = 0,
                       condition: Optional[Mapping] = None, reference: Optional[WeightSpace] = None,
                       margin: float = 0.03, temperature: float = 1.0) -> Callable:
    """A ``select`` score for :func:`unf.flow.train_flow`: the mean accuracy of ``num`` networks sampled from a
    flow (seed ``seed``), on the TRAINING split of ``data`` -- the split the zoo's networks were trained on, so
    choosing a checkpoint by it looks at no test data. ``row``: metadata of the architecture (activation).

    ``reference`` (the flow's training networks, zoo coordinates): the score becomes ``{"score", "agreement",
    "reference_agreement", "eligible"}``, and a snapshot is eligible only if the median agreement of its samples with
    each other on the training inputs is at most the training networks' own (up to ``num`` of them) plus ``margin``.
    A field that collapses onto one network is accurate but not a generator; selection then never keeps it.
    Eligibility bounds agreement from above only (diversity); accuracy is the score that ranks eligible snapshots.
    ``temperature``: sample as ``WeightFlow.sample`` does with it (a sampling setting chosen on this split)."""
    split = datasets.load(data, seed=split_seed)
    model = build_network(factory, row)

    def predictions(ws: WeightSpace) -> torch.Tensor:
        return stacked_logits(model, ws.spec, ws, split.x_train).argmax(2)

    ref_agreement = None
    if reference is not None:
        if num < 2:
            raise ValueError(f"num={num}: the agreement of samples with each other needs at least 2 of them")
        if reference.batch_size < 2:
            raise ValueError(f"reference has {reference.batch_size} network; agreement needs at least 2")
        pick = torch.randperm(reference.batch_size, generator=torch.Generator().manual_seed(seed))[:num]
        ref = WeightSpace(reference.spec, {n: t[pick] for n, t in reference.items()})
        ref_agreement = float(agreement(predictions(ref)).median())

    def score(flow):
        ws, _ = flow.sample(num, nfe=nfe, solver=solver, condition=condition, seed=seed, temperature=temperature)
        ws = recalibrated(factory, ws, [row] * num, split.x_train)
        pred = predictions(ws)
        acc = float((pred == split.y_train).double().mean())
        if ref_agreement is None:
            return acc
        agree = float(agreement(pred).median())
        return {"score": acc, "agreement": agree, "reference_agreement": ref_agreement,
                "eligible": agree <= ref_agreement + margin}

    return score


def evaluate_generated(gen: Zoo, source: Zoo, l2: bool = True, probe_copies: int = 2,
                       extra: Optional[Mapping[str, WeightSpace]] = None,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Accuracy and novelty of a generated zoo (``unf flow sample``'s manifest names the flow's training and
    held-out networks) against ``source``, the zoo the flow was trained on.

    Returns summaries for ``"train"`` (accuracy only), ``"heldout"`` (the reference level), ``"generated"`` and any
    ``extra`` sets (baselines), each ``{metric: {mean, std, q05..q95}, "copy_fraction", "n"}``. ``progress``: called
    after each set, as in :func:`novelty_report`."""
    ginfo = gen.manifest.get("info", {})
    for key in ("data", "split_seed", "holdout", "train_ids", "epoch"):
        if key not in ginfo:
            raise ValueError(f"{gen.root}: manifest info has no {key!r}; is it a zoo written by `unf flow sample`?")
    picked = select_rows(source, ginfo.get("where", {}), ginfo["epoch"])
    train_ids, held_ids = set(map(str, ginfo["train_ids"])), set(map(str, ginfo["holdout"]))
    train_rows = [i for i in picked if str(source.metadata[i]["model_id"]) in train_ids]
    held_rows = [i for i in picked if str(source.metadata[i]["model_id"]) in held_ids]
    if len(train_rows) != len(train_ids):
        raise ValueError(f"{source.root}: holds {len(train_rows)} of the flow's {len(train_ids)} training networks; "
                         "is it the zoo the flow was trained on?")
    if not held_rows:
        raise ValueError(f"{gen.root}: the flow held out no networks (trained with --holdout 0); nothing to compare "
                         "novelty against")
    split = datasets.load(ginfo["data"], seed=int(ginfo["split_seed"]))
    factory = model_factory(source.manifest.get("info", {}))
    acts = {str(r.get("activation", "")) for r in gen.metadata} | {str(source.metadata[i].get("activation", ""))
                                                                  for i in picked}
    if len(acts) > 1:
        raise ValueError(f"novelty compares networks of one activation; {gen.root} and its training rows mix "
                         f"{sorted(acts)} (select one with --where activation=...)")
    model = build_network(factory, source.metadata[picked[0]])
    x = probe_set(split.x_test, copies=probe_copies, seed=int(ginfo["split_seed"]))
    train_ws = source.weight_space(train_rows)
    sets = {"generated": gen.weight_space(), **(extra or {})}
    report = novelty_report(model, source.spec, sets, train_ws, source.weight_space(held_rows), x, split.y_test,
                            l2=l2, progress=progress)
    train_logits = stacked_logits(model, source.spec, train_ws, split.x_test)
    train_acc = (train_logits.argmax(2) == split.y_test).double().mean(1)
    out = {"train": {"accuracy": summarize(train_acc), "n": len(train_rows)}}
    for name, r in report.items():
        out[name] = r["summary"]
    return out
