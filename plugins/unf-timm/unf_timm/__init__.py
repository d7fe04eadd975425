"""Spec rules for timm modules whose symmetry the core rules cannot state: LeViT's attention (q, k and v interleaved
within each head of one projection) and DropPath (in train mode); and a front end for the timm models torch.fx
cannot trace (the ATen trace of ``unf-transformers``).

Everything else in the timm models tried (ResNet, ConvNeXt, ViT, DeiT, EfficientNet, MobileNetV3, RegNet, Swin, Mixer,
ResMLP, PoolFormer, PVT-v2) is traced through by torch.fx and handled by the core rules; relative-position tables
indexed by an index buffer need no rule either (the core fixes the indexed axis on purpose). Classes are named by
dotted name, so loading the plugin does not import timm.
"""
from __future__ import annotations

import unf
from unf.spec import terms as T


def drop_path(ctx, x):
    """``x * noise``, one Bernoulli draw per sample scaled by ``1 / keep``, of shape ``[N, 1, ...]``: constant along
    every non-batch axis and independent of the weights, so it commutes with any permutation of those axes (in train
    mode too, for the same random state). The output has the input's axes."""
    return ctx.output(list(x.axes))


def _linear_norm(ctx, name: str, x_term, out_term) -> None:
    """timm's ``LinearNorm``/``ConvNorm`` ``name``: a bias-free linear map (or 1x1 convolution) then BatchNorm on its
    outputs. The weight maps ``x_term`` to ``out_term``; every BatchNorm vector follows ``out_term``."""
    w = ctx.param(f"{name}.linear.weight")
    ctx.unify(w.axes[1], x_term)
    ctx.unify(w.axes[0], out_term)
    bias = ctx.param(f"{name}.linear.bias")
    for p in ([bias] if bias is not None else []) + [ctx.param(f"{name}.bn.{k}")
                                                       for k in ("weight", "bias", "running_mean", "running_var")]:
        if p is not None:
            ctx.unify(p.axes[0], out_term)


def _head_vars(ctx, heads: int, size: int, hint: str) -> list:
    return [ctx.var(size, f"head{i}.{hint}") for i in range(heads)]


def _channel_axis(m) -> int:
    return 1 if m.use_conv else -1  # [B, C, H, W] with 1x1 convolutions, else [B, N, C]


def _output(ctx, x, m, out_term):
    """Output axes: batch carried, token/spatial positions fixed (they index the position-bias table), channels
    ``out_term``."""
    positions = x.axes[2:] if m.use_conv else x.axes[1:2]
    ctx.fix(*positions, reason="token positions index the attention-bias table")
    shape = ctx.out_shape
    if m.use_conv:
        return ctx.output([x.axes[0], out_term] + [T.fixed(n) for n in shape[2:]])
    return ctx.output([x.axes[0], T.fixed(shape[1]), out_term])


def levit_attention(ctx, x):
    """LeViT's ``Attention``: one projection yields, per head ``i``, ``[q_i | k_i | v_i]`` (key_dim, key_dim,
    val_dim rows), then ``softmax(q_i k_i^T * scale + bias_i) v_i`` and an output projection of ``[v_0 | ... ]``.

    q_i and k_i may share any permutation of their key_dim rows (their dot product is unchanged), v_i and the output
    projection's columns of head i another, independently for each head. Permuting whole heads is a symmetry as well,
    but a spec cannot state a head permutation over blocks that are themselves concatenations; of the two, the
    per-head within-head permutations are the larger group (heads x key_dim! x val_dim! against
    (key_dim! x val_dim!)^heads), so heads stay fixed, and so does the per-head bias table (its rows also follow
    token positions). The core, left alone, keeps only one within-head permutation shared by all heads."""
    m = ctx.module
    h = m.num_heads
    qk, v = _head_vars(ctx, h, m.key_dim, "qk"), _head_vars(ctx, h, m.val_dim, "v")
    ch = x.axes[_channel_axis(m)]
    _linear_norm(ctx, "qkv", ch, T.concat([t for i in range(h) for t in (qk[i], qk[i], v[i])]))
    out = ctx.param("proj.ln.linear.weight").axes[0]
    _linear_norm(ctx, "proj.ln", T.concat(v), out)  # proj.act is elementwise
    ctx.fix(ctx.param("attention_biases"), reason="per-head position bias: heads and positions stay fixed")
    return _output(ctx, x, m, out)


def levit_attention_downsample(ctx, x):
    """LeViT's ``AttentionDownsample``: keys and values from one projection, per head ``[k_i | v_i]``; queries from
    a subsampled input through their own projection, per head ``q_i``. Same symmetry as :func:`levit_attention`:
    q_i and k_i share a permutation, v_i has its own, per head; heads and the bias table stay fixed."""
    m = ctx.module
    h = m.num_heads
    qk, v = _head_vars(ctx, h, m.key_dim, "qk"), _head_vars(ctx, h, m.val_dim, "v")
    ch = x.axes[_channel_axis(m)]
    _linear_norm(ctx, "kv", ch, T.concat([t for i in range(h) for t in (qk[i], v[i])]))
    _linear_norm(ctx, "q.ln", ch, T.concat(qk))  # q.down subsamples token positions only
    out = ctx.param("proj.ln.linear.weight").axes[0]
    _linear_norm(ctx, "proj.ln", T.concat(v), out)
    ctx.fix(ctx.param("attention_biases"), reason="per-head position bias: heads and positions stay fixed")
    return _output(ctx, x, m, out)


#: timm model classes whose forward torch.fx cannot trace (control flow on traced values): MobileViT's blocks unfold
#: patches with shape checks, EfficientViT (MSRA) and CrossViT branch on sizes
ATEN_TRACED = ("timm.models.byobnet.ByobNet", "timm.models.efficientvit_msra.EfficientVitMsra",
               "timm.models.crossvit.CrossVit")


def aten_frontend(model, example_inputs):
    """Trace one real forward to ATen ops with the front end of ``unf-transformers`` (``make_fx``; it runs the
    Python control flow for real), whose ATen rules then apply; see that plugin's README."""
    try:
        from unf_transformers.frontend import trace_aten
    except ImportError as e:
        from unf.spec.infer import SpecInferenceError
        raise SpecInferenceError(f"torch.fx cannot trace {type(model).__name__}; its spec needs the ATen front end of "
                                 "plugins/unf-transformers (pip install -e plugins/unf-transformers)") from e
    return trace_aten(model, example_inputs)


def register() -> None:
    """Entry point (group ``unf.spec_rules``): register the rules, by class name, so that loading the plugin does not
    import timm (about 1 s) for users who have no timm model."""
    unf.register_module_rule("timm.layers.drop.DropPath")(drop_path)
    unf.register_module_rule("timm.models.levit.Attention")(levit_attention)
    unf.register_module_rule("timm.models.levit.AttentionDownsample")(levit_attention_downsample)
    unf.spec.register_frontend(*ATEN_TRACED)(aten_frontend)
