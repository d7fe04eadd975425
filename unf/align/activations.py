"""Activation matching (Git Re-Basin, Ainsworth et al. 2023): match units by how their activations correlate."""
from __future__ import annotations

from typing import Iterable, Union

import torch
import torch.nn as nn

from ..spec import Permutation, WeightSpaceSpec
from .matching import _stack, match_batched, solve_assignment


def _unit_outputs(spec: WeightSpaceSpec, model: nn.Module) -> dict[str, str]:
    """group -> a module whose output channels are exactly that group (a Linear/Conv whose weight rows it permutes)."""
    out = {}
    for path, m in model.named_modules():
        key = f"{path}.weight" if path else "weight"
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(m, "transposed", False) \
                and key in spec and isinstance(spec[key].axes[0], str):
            out.setdefault(spec[key].axes[0], path)
    return out


@torch.no_grad()
def _collect(model: nn.Module, modules: dict[str, str], batches: Iterable) -> dict[str, torch.Tensor]:
    acts = {g: [] for g in modules}
    hooks = []
    for g, path in modules.items():
        def hook(_, __, y, g=g):
            channel = -1 if y.dim() == 2 or isinstance(model.get_submodule(modules[g]), nn.Linear) else 1
            acts[g].append(y.movedim(channel, -1).reshape(-1, y.shape[channel]).double())
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(*(x if isinstance(x, (tuple, list)) else (x,)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {g: torch.cat(v) for g, v in acts.items()}


def activation_matching(model_ref: nn.Module, model_other: nn.Module, spec: WeightSpaceSpec,
                        data: Union[torch.Tensor, Iterable], max_iter: int = 100, seed: int = 0) -> Permutation:
    """Align ``model_other`` to ``model_ref`` by correlating unit activations on ``data`` (a batch tensor or an
    iterable of batches; use training data).

    Groups that are some Linear/Conv layer's output channels are matched by correlation (pre-activation outputs,
    standardised per unit); the rest (attention heads, within-head units, ...) by weight matching with those held.
    """
    modules = _unit_outputs(spec, model_ref)
    batches = [data] if isinstance(data, torch.Tensor) else list(data)
    ref, oth = _collect(model_ref, modules, batches), _collect(model_other, modules, batches)
    perms = {}
    for g in modules:
        za = (ref[g] - ref[g].mean(0)) / ref[g].std(0).clamp_min(1e-8)
        zb = (oth[g] - oth[g].mean(0)) / oth[g].std(0).clamp_min(1e-8)
        perms[g] = solve_assignment((za.T @ zb / za.shape[0])[None])
    rest = [g for g in spec.groups if g not in perms]
    if rest:
        w_ref = _stack(spec, model_ref.state_dict(), torch.float32)
        w_oth = _stack(spec, [model_other.state_dict()], torch.float32)
        full, _ = match_batched(spec, w_ref, w_oth, max_iter, seed, perms, frozen=list(perms))
        perms = full
    return Permutation({g: perms[g][0] for g in spec.groups})
