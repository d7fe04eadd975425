"""Which symmetry groups also admit positive per-unit rescalings (the spec alone knows only permutations).

A unit ``i`` of group ``g`` can be rescaled, ``z_i -> s z_i`` at the layer producing it and ``1 / s`` on every weight
reading it, without changing the function, when ``s > 0`` and the unit passes through a positively homogeneous
activation only (``relu(s z) = s relu(z)``, likewise LeakyReLU) and then through ops that commute with per-channel
scaling (pooling, flattening, dropout) into Linear/Conv layers. :func:`homogeneous_groups` reports the groups for
which the traced graph proves this; anything it cannot prove is left out.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .spec import WeightSpaceSpec

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, torch.relu_}
# Ops that commute with a positive per-channel scale (and keep channels where they are).
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
                 nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d) + _HOMOGENEOUS_MODULES
_PASS_FUNCTIONS = {torch.flatten, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                   F.adaptive_avg_pool2d} | _HOMOGENEOUS_FUNCTIONS
_PASS_METHODS = {"flatten", "view", "reshape", "relu", "contiguous"}
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target == "relu"


def _passes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _consumers(gm: fx.GraphModule, node: fx.Node) -> list[str] | None:
    """Linear/Conv modules reached from ``node`` through pass-through ops only (None if anything else reads it)."""
    out, todo = [], list(node.users)
    while todo:
        user = todo.pop()
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), _LAYERS) \
                and len(user.args) == 1 and not user.kwargs:
            out.append(user.target)
        elif _passes(gm, user) and user.args and isinstance(user.args[0], fx.Node):
            todo += list(user.users)
        else:
            return None
    return out


def homogeneous_groups(model: nn.Module, example_inputs, spec: WeightSpaceSpec) -> list[str]:
    """Groups of ``spec`` whose units admit positive per-unit rescaling (ReLU/LeakyReLU units; see module doc).

    A group qualifies when it is the whole output axis of one Linear/Conv layer (called once), that layer's output
    goes only into ReLU/LeakyReLU and from there, through pooling/flatten/dropout, only into Linear/Conv layers,
    and the group acts on nothing else (no normalisation, residual or bias of another layer)."""
    from ..align.assignment import places
    from .infer import trace

    gm = trace(model, example_inputs)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    where = places(spec)
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        module = gm.get_submodule(node.target)
        key = f"{node.target}.weight"
        if not isinstance(module, _LAYERS) or key not in spec or not isinstance(spec[key].axes[0], str):
            continue
        g = spec[key].axes[0]
        if not node.users or not all(_is_activation(gm, u) for u in node.users):
            continue
        consumers = set()
        for act in node.users:
            c = _consumers(gm, act)
            if c is None:
                consumers = None
                break
            consumers |= set(c)
        if not consumers or any(calls[c] != 1 for c in consumers):
            continue
        produced = {key, f"{node.target}.bias"}
        read = {f"{c}.weight" for c in consumers}
        if all((p.name in produced and p.axis == 0) or (p.name in read and p.axis >= 1) for p in where[g]):
            out.append(g)
    return out
