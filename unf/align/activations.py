"""Activation matching (Git Re-Basin, Ainsworth et al. 2023): match units by how their activations correlate."""
from __future__ import annotations

from typing import Iterable, Union

import torch
import torch.nn as nn

from ..spec import Permutation, WeightSpaceSpec
from .lmc import batch_input
from .matching import _stack, match_batched, solve_assignment


def _unit_outputs(spec: WeightSpaceSpec, model: nn.Module) -> dict[str, list[str]]:
    """group -> modules whose output channels are exactly that group (Linear/Conv layers whose weight rows it
    permutes). Several may qualify; some may never run their own forward (``MultiheadAttention.out_proj``)."""
    out: dict[str, list[str]] = {}
    for path, m in model.named_modules():
        key = f"{path}.weight" if path else "weight"
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(m, "transposed", False) \
                and key in spec and isinstance(spec[key].axes[0], str):
            out.setdefault(spec[key].axes[0], []).append(path)
    return out


@torch.no_grad()
def _collect(model: nn.Module, modules: dict[str, list[str]], batches: list) -> dict[str, torch.Tensor]:
    """Per group, the ``[samples, units]`` outputs of the first of its modules that actually ran."""
    acts: dict[tuple, list] = {}
    hooks = []
    for g, paths in modules.items():
        for path in paths:
            module = model.get_submodule(path)

            def hook(_, __, y, key=(g, path), linear=isinstance(module, nn.Linear)):
                channel = -1 if linear else 1
                acts.setdefault(key, []).append(y.movedim(channel, -1).reshape(-1, y.shape[channel]).double())
            hooks.append(module.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch_input(batch))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {}
    for g, paths in modules.items():
        ran = [p for p in paths if (g, p) in acts]
        if ran:
            out[g] = torch.cat(acts[(g, ran[0])])
    return out


def activation_matching(model_ref: nn.Module, model_other: nn.Module, spec: WeightSpaceSpec,
                        data: Union[torch.Tensor, Iterable], max_iter: int = 100, seed: int = 0) -> Permutation:
    """Align ``model_other`` to ``model_ref`` by correlating unit activations on ``data``: an input tensor, or an
    iterable of batches, each an input tensor or a tuple whose first element is the input. Use training data.

    Groups that are some Linear/Conv layer's output channels are matched by correlation (pre-activation outputs,
    standardised per unit); the rest (attention heads, within-head units, ...) by weight matching with those held.
    """
    modules = _unit_outputs(spec, model_ref)
    batches = [data] if isinstance(data, torch.Tensor) else list(data)
    ref, oth = _collect(model_ref, modules, batches), _collect(model_other, modules, batches)
    perms = {}
    for g in ref:
        za = (ref[g] - ref[g].mean(0)) / ref[g].std(0).clamp_min(1e-8)
        zb = (oth[g] - oth[g].mean(0)) / oth[g].std(0).clamp_min(1e-8)
        perms[g] = solve_assignment((za.T @ zb / za.shape[0])[None])
    rest = [g for g in spec.groups if g not in perms]
    if rest:
        w_ref = _stack(spec, model_ref.state_dict(), torch.float32)
        w_oth = _stack(spec, [model_other.state_dict()], torch.float32)  # parameters only
        full, _ = match_batched(spec, w_ref, w_oth, max_iter, seed, perms, frozen=list(perms))
        perms = full
    return Permutation({g: perms[g][0] for g in spec.groups})
