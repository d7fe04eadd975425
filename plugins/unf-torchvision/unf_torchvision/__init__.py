"""Spec rules for torchvision functions that torch.fx keeps as single calls (``torch.fx.wrap``): stochastic depth and
Swin's window attention, its relative position bias and its patch-merging pad."""
from __future__ import annotations

import torchvision.ops
from torchvision.models import swin_transformer as _swin

import unf
from unf.spec import terms as T


def stochastic_depth(ctx, x, *args, **kwargs):
    """``x * noise``, ``noise`` one Bernoulli draw per sample (or per batch) scaled by ``1 / (1 - p)``, shape
    ``[N, 1, ...]``: it is constant along every non-batch axis and does not depend on the weights, so it commutes
    with any permutation of those axes (in train mode too, for the same random state). The output has the input's axes.
    """
    return ctx.output(list(x.axes))


def relative_position_bias(ctx, table, index, window_size):
    """``table[index].view(N, N, heads).permute(2, 0, 1)[None]``: table rows are addressed by the (fixed) index
    buffer, so they stay fixed; the heads axis carries through."""
    ctx.fix(table.axes[0], reason="relative-position table rows are addressed by an index buffer")
    n = ctx.out_shape[-1]
    return ctx.output([T.fixed(1), table.axes[1], T.fixed(n), T.fixed(n)])


def patch_merging_pad(ctx, x):
    """Pad H and W to even sizes and stack the four 2x2 neighbours on the channel axis: ``[c | c | c | c]``."""
    ctx.fix(*x.axes[-3:-1], reason="spatial positions")
    lead = [T.fixed(n) for n in ctx.out_shape[:-1]]
    return ctx.output(list(x.axes[:-3]) + lead[-2:] + [T.concat([x.axes[-1]] * 4)])


def shifted_window_attention(ctx, x, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
                             shift_size=None, attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None,
                             logit_scale=None, training=True):
    """(Shifted) window multi-head attention on ``[B, H, W, C]``: heads permute as blocks across Q, K, V, the
    position bias and V2's per-head logit scale; Q and K share a within-head permutation, V and the output projection
    another. Positions are fixed (windows, shifts and the shift mask depend on them)."""
    c = x.shape[-1]
    heads = ctx.var(num_heads, "heads")
    qk = T.product([heads, ctx.var(c // num_heads, "qk")])
    v = T.product([heads, ctx.var(c // num_heads, "v")])
    qkv = T.concat([qk, qk, v])
    ctx.unify(qkv_weight.axes[0], qkv)
    ctx.unify(qkv_weight.axes[1], x.axes[-1])
    if qkv_bias is not None:
        ctx.unify(qkv_bias.axes[0], qkv)
    ctx.unify(proj_weight.axes[1], v)
    if proj_bias is not None:
        ctx.unify(proj_bias.axes[0], proj_weight.axes[0])
    ctx.unify(relative_position_bias.axes[-3], heads)
    ctx.fix(*relative_position_bias.axes[-2:], reason="positions within a window")
    if logit_scale is not None:
        ctx.unify(logit_scale.axes[0], heads)
    ctx.fix(*x.axes[1:-1], reason="spatial positions (windows and shifts)")
    return ctx.output(list(x.axes[:-1]) + [proj_weight.axes[0]])


def register() -> None:
    """Entry point (group ``unf.spec_rules``): register the rules."""
    unf.register_function_rule(torchvision.ops.stochastic_depth)(stochastic_depth)
    unf.register_module_rule(torchvision.ops.StochasticDepth)(stochastic_depth)
    unf.register_function_rule(_swin._get_relative_position_bias)(relative_position_bias)
    unf.register_function_rule(_swin._patch_merging_pad)(patch_merging_pad)
    unf.register_function_rule(_swin.shifted_window_attention)(shifted_window_attention)
