"""Spec rules for ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (not traceable by torch.fx)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

import unf
from unf.spec.rules import elementwise, layer_norm, linear, multihead_attention

_ACTIVATIONS = (F.relu, F.gelu)


def _add(ctx, x, y):
    for a, b in zip(x.axes, y.axes):
        ctx.unify(a, b)
    return x


def encoder_layer(ctx, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    """One post- or pre-norm encoder layer: ``x + SA(x)`` and ``x + FF(x)``, LayerNorm before or after."""
    m, shape = ctx.module, src.shape
    act = m.activation
    if not (act in _ACTIVATIONS or (isinstance(act, nn.Module) and unf.spec.registry.module_rule(act) is elementwise)):
        ctx.give_up(f"unknown activation {act!r} in TransformerEncoderLayer", src)
        return ctx.fixed_output()

    def norm(name, x):
        sub = ctx.sub(name, shape)
        return layer_norm(sub, x, 1, sub.param("weight"), sub.param("bias"))

    def self_attention(x):
        return multihead_attention(ctx.sub("self_attn", (shape, None)), x, x, x, need_weights=False)[0]

    def feed_forward(x):
        l1 = ctx.sub("linear1", shape[:-1] + (m.linear1.out_features,))
        h = linear(l1, x, l1.param("weight"), l1.param("bias"))
        l2 = ctx.sub("linear2", shape)
        return linear(l2, h, l2.param("weight"), l2.param("bias"))

    x = src
    if m.norm_first:
        x = _add(ctx, x, self_attention(norm("norm1", x)))
        x = _add(ctx, x, feed_forward(norm("norm2", x)))
    else:
        x = norm("norm1", _add(ctx, x, self_attention(x)))
        x = norm("norm2", _add(ctx, x, feed_forward(x)))
    return ctx.output(list(x.axes), shape)


def encoder(ctx, src, mask=None, src_key_padding_mask=None, is_causal=None):
    x = src
    for i in range(len(ctx.module.layers)):
        x = encoder_layer(ctx.sub(f"layers.{i}", src.shape), x)
    if ctx.module.norm is not None:
        sub = ctx.sub("norm", src.shape)
        x = layer_norm(sub, x, 1, sub.param("weight"), sub.param("bias"))
    return ctx.output(list(x.axes), src.shape)


def register() -> None:
    """Entry point (group ``unf.spec_rules``): register the rules."""
    unf.register_module_rule(nn.TransformerEncoderLayer)(encoder_layer)
    unf.register_module_rule(nn.TransformerEncoder)(encoder)
