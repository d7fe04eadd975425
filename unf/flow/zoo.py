"""Zoos in and out: choose a flow's training rows from a stored zoo, and store what it generates as a zoo.

A generated zoo has the store's format (manifest, spec, metadata.csv, safetensors shards), so ``unf zoo info``,
``unf.zoo.Zoo`` and the predictors read it. Its manifest's ``info`` carries machine-readable ``data`` and
``split_seed`` (the dataset the networks are evaluated on), the source zoo, the flow's seed and settings, and the
``holdout`` model ids that the flow never saw (the reference level for novelty).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..io import load_factory
from ..weights import WeightSpace
from ..zoo.store import Zoo, ZooWriter


def parse_where(items: Iterable[str]) -> dict[str, str]:
    """``["activation=relu", ...]`` -> ``{"activation": "relu"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: write COLUMN=VALUE")
        out[key.strip()] = value.strip()
    return out


def _equal(a, b) -> bool:
    if str(a) == str(b):
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def select_rows(zoo: Zoo, where: Optional[Mapping[str, str]] = None, epoch=None) -> list[int]:
    """Indices of ``zoo.metadata`` rows matching every ``where`` column at ``epoch`` (default: the last epoch the
    zoo saved). Raises ``ValueError`` naming the column or value when nothing matches."""
    rows = zoo.metadata
    if not rows:
        raise ValueError(f"{zoo.root}: the zoo has no rows")
    for col in where or {}:
        if col not in rows[0]:
            raise ValueError(f"--where {col}=...: no column {col!r}; columns: {', '.join(rows[0])}")
    epochs = sorted({r["epoch"] for r in rows}, key=lambda e: (float(e) if _is_number(e) else 0.0, str(e)))
    if epoch is None:
        epoch = epochs[-1]
    elif not any(_equal(e, epoch) for e in epochs):
        raise ValueError(f"--epoch {epoch}: the zoo saved epochs {', '.join(map(str, epochs))}")
    picked = [i for i, r in enumerate(rows) if _equal(r["epoch"], epoch)
              and all(_equal(r[c], v) for c, v in (where or {}).items())]
    if not picked:
        raise ValueError(f"no row of {zoo.root} matches {dict(where or {})} at epoch {epoch}")
    return picked


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def holdout_split(model_ids: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Split distinct model ids into (train, held-out) with a seeded shuffle; ``fraction`` of them held out."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction {fraction} must be in [0, 1)")
    ids = sorted({str(m) for m in model_ids}, key=lambda s: (len(s), s))
    g = torch.Generator().manual_seed(seed)
    order = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
    k = int(round(fraction * len(ids)))
    return sorted(order[k:], key=lambda s: (len(s), s)), sorted(order[:k], key=lambda s: (len(s), s))


def zoo_data(info: Mapping) -> tuple[str, int]:
    """The dataset and split seed a zoo's networks are evaluated on: the manifest's machine-readable ``data`` and
    ``split_seed`` keys, or the built-in zoos' text "NAME (split seed S)"."""
    if "data" in info and "split_seed" in info:
        return str(info["data"]), int(info["split_seed"])
    m = re.fullmatch(r"\s*([\w.-]+)\s*\(split seed (\d+)\)\s*", str(info.get("data", "")))
    if m:
        return m.group(1), int(m.group(2))
    raise ValueError("the zoo's manifest does not say which data its networks were trained on (info.data and "
                     "info.split_seed); add them to manifest.json")


def model_factory(info: Mapping) -> Callable[..., nn.Module]:
    """The architecture of a zoo's manifest (``info.architecture``: ``module:function``)."""
    arch = info.get("architecture")
    if not arch:
        raise ValueError("the zoo's manifest has no info.architecture (module:function building the network)")
    return load_factory(arch)


def build_network(factory: Callable[..., nn.Module], row: Mapping) -> nn.Module:
    """One network of the zoo's architecture, with the row's activation when the factory takes one."""
    import inspect

    kwargs = {}
    params = inspect.signature(factory).parameters
    if "activation" in params and "activation" in row:
        kwargs["activation"] = row["activation"]
    return factory(**kwargs)


def write_generated(out: str | Path, ws: WeightSpace, rows: Sequence[dict], name: str, info: dict,
                    chunk_size: int = 500) -> Zoo:
    """Store generated networks ``ws`` ``[N, 1]`` with their metadata ``rows`` (each with ``model_id``, ``epoch``)
    as a zoo in ``out`` (a new directory)."""
    out = Path(out)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out}: a zoo is already there; choose a new directory")
    writer = ZooWriter(out, ws.spec, name, info)
    sds = ws.to_state_dicts()
    for c, a in enumerate(range(0, len(sds), chunk_size)):
        writer.write_chunk(c, list(rows[a:a + chunk_size]), sds[a:a + chunk_size])
    writer.finish()
    return Zoo(out)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x_train: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute the BatchNorm statistics of ``model`` from training inputs ``x_train`` (never test data:
    DeepWeightFlow's code recalibrated on the test split, which leaks it into every reported accuracy)."""
    from ..align.lmc import reset_bn_stats

    return reset_bn_stats(model, (x_train[i:i + batch_size] for i in range(0, len(x_train), batch_size)))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
