"""Spec rules for the ATen ops of a ``make_fx`` graph (see :mod:`unf_transformers.frontend`).

Most are the core's rules (:mod:`unf.spec.rules`) behind ATen's signatures. Three say more than the core does:

- ``aten.expand`` of a size-1 axis gives that axis a *free* var: the copies are equal, so any permutation of them
  leaves the tensor unchanged. This is what lets ``repeat_kv`` (grouped-query attention written as expand + reshape)
  keep query heads permutable within their key/value group.
- ``aten.scaled_dot_product_attention(..., enable_gqa=True)``: query head ``h`` reads key/value head
  ``h // (Hq / Hkv)``, so the query heads axis is the product ``(kv_heads, per_kv)``, ``kv_heads`` shared with keys
  and values; heads permute as blocks and, within a key/value group, query heads by one shared permutation.
- ``aten.addmm`` (GPT-2's ``Conv1D``, weight ``[in, out]``).
"""
from __future__ import annotations

import torch

import unf
from unf.spec import rules as R
from unf.spec import terms as T
from unf.spec.symbolic import Sym

aten = torch.ops.aten


def _overloads(*names):
    out = []
    for n in names:
        packet = getattr(aten, n, None)
        if packet is None:
            continue
        out += [getattr(packet, o) for o in packet.overloads()]
    return out


def _fn(*names):
    return unf.register_function_rule(*_overloads(*names))


# element-wise (softmax too: it is equivariant along its own axis)
_ELEMENTWISE = ["add", "sub", "rsub", "mul", "div", "neg", "rsqrt", "sqrt", "pow", "exp", "log", "log1p", "expm1",
                "tanh", "sigmoid", "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "mish",
                "hardtanh", "hardswish", "hardsigmoid", "softplus", "erf", "sin", "cos", "abs", "square", "reciprocal",
                "clamp", "clamp_min", "clamp_max", "where", "masked_fill", "maximum", "minimum", "to", "_to_copy",
                "detach", "detach_", "lift_fresh_copy", "dropout", "softmax",
                "_softmax", "log_softmax", "_log_softmax", "eq", "ne", "gt", "lt", "ge", "le", "logical_not",
                "logical_and", "logical_or", "bitwise_not", "bitwise_and", "bitwise_or", "type_as", "sign",
                "addcmul", "lerp", "floor", "ceil", "round", "nan_to_num"]


def _constant(ctx, *args, **kwargs):
    shape = R._shape_of(ctx)
    return None if shape is None else ctx.output([ctx.var(n, "const") for n in shape])


def _reshape(ctx, x, *args, **kwargs):
    return R.reshape(ctx, x)


@R.lazy_inputs
def _permute(ctx, x, dims, *args):
    return R._perm_dims(ctx, x, *dims)


@R.lazy_inputs
def _transpose(ctx, x, dim0=None, dim1=None):
    return R._transpose(ctx, x, dim0, dim1)


def _expand(ctx, x, size, *args, **kwargs):
    """Broadcast copies are equal: a size-1 axis expanded to ``n`` (or a new leading axis) takes any permutation."""
    out_shape = R._shape_of(ctx)
    lead = len(out_shape) - x.ndim
    axes = [T.fresh(n) for n in out_shape[:lead]]
    axes += [t if m == n else T.fresh(n) for t, m, n in zip(x.axes, x.shape, out_shape[lead:])]
    return ctx.output(axes)


@R.lazy_inputs
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    d = R._norm_dim(dim, x.ndim)
    return R._index(ctx, x, (slice(None),) * d + (slice(start, end, step),))


@R.lazy_inputs
def _select(ctx, x, dim, index):
    """``x.select(dim, i)``: picks one slot of a fused projection reshaped to ``(k, ...)`` (see the core's slots),
    else fixes position ``i`` of the axis."""
    d = R._norm_dim(dim, x.ndim)
    return R._index(ctx, x, (slice(None),) * d + (index,))


def _split(ctx, x, split, dim=0):
    d = R._norm_dim(dim, x.ndim)
    sizes = [s[d] for s in ctx.out_shape]
    outs = []
    for shape, piece in zip(ctx.out_shape, T.split_concat(x.axes[d], sizes)):
        axes = list(x.axes)
        axes[d] = piece
        outs.append(ctx.output(axes, shape))
    return outs


def _chunk(ctx, x, chunks, dim=0):
    return _split(ctx, x, chunks, dim)


@R.lazy_inputs
def _unbind(ctx, x, dim=0):
    """Q, K, V unbound from a fused projection reshaped to ``(3, ...)`` keep separate within-head groups (slots);
    otherwise each output is one position of the axis, which is fixed."""
    d = R._norm_dim(dim, x.ndim)
    if x.slots is not None and x.slots.axis == d:
        x.slots.state.handed_out = True
        return [ctx.output(list(p), s) for p, s in zip(x.slots.parts, ctx.out_shape)]
    ctx.use(x)
    T.split_concat(x.axes[d], [1] * x.shape[d])
    return [ctx.output(list(x.axes[:d]) + list(x.axes[d + 1:]), s) for s in ctx.out_shape]


def _cat(ctx, tensors, dim=0):
    return R.cat(ctx, tensors, dim)


def _stack(ctx, tensors, dim=0):
    return R.stack(ctx, tensors, dim)


def _reduce(ctx, x, dim=None, keepdim=False, *args, **kwargs):
    return R._reduction(0)(ctx, x, dim, keepdim)


def _linear(ctx, x, weight, bias=None):
    return R.linear(ctx, x, weight, bias)


def _addmm(ctx, bias, m1, m2, *args, **kwargs):
    """``bias + m1 @ m2``: a ``Conv1D`` (weight ``[in, out]``)."""
    out = R.matmul(ctx, m1, m2)
    if isinstance(bias, Sym):
        R.broadcast_axes([(bias.shape, bias.axes), (out.shape, out.axes)], out.shape)
    return out


def _baddbmm(ctx, inp, b1, b2, *args, **kwargs):
    return _addmm(ctx, inp, b1, b2)


def _matmul(ctx, a, b):
    return R.matmul(ctx, a, b)


def _embedding(ctx, weight, ids, *args, **kwargs):
    return R.embedding(ctx, ids, weight)


def _layer_norm(ctx, x, normalized_shape, weight=None, bias=None, *args, **kwargs):
    return R.layer_norm(ctx, x, len(normalized_shape), weight, bias)


def _rms_norm(ctx, x, normalized_shape, weight=None, *args, **kwargs):
    return R.layer_norm(ctx, x, len(normalized_shape), weight)


def _conv(spatial):
    def rule(ctx, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return R.conv(ctx, x, weight, bias, groups=groups, spatial=spatial)
    return rule


def _index_tensor(ctx, x, indices):
    """``x[..., idx, ...]`` with integer index tensors (a pooled token picked by position, a relative-position table):
    the indexed axes of ``x`` are fixed, the index tensors' broadcast axes take their place (numpy's rule: in place
    if the indexed axes are adjacent, else in front)."""
    args = ctx.node.args[1]
    dims = [d for d, i in enumerate(indices) if i is not None]
    metas = [getattr(args[d], "meta", {}).get("tensor_meta") for d in dims]
    if not dims or any(m is None or m.dtype == torch.bool or m.dtype.is_floating_point for m in metas):
        ctx.give_up("boolean or unknown tensor indexing", x)
        return ctx.fixed_output()
    ctx.fix(*[x.axes[d] for d in dims], reason="entries addressed by an index tensor")
    idx = [indices[d] for d in dims]
    bshape = tuple(torch.broadcast_shapes(*[i.shape for i in idx]))
    picked = R.broadcast_axes([(i.shape, i.axes) for i in idx], bshape)
    rest = [x.axes[d] for d in range(x.ndim) if d not in dims]
    if dims == list(range(dims[0], dims[-1] + 1)):
        axes = list(x.axes[:dims[0]]) + picked + list(x.axes[dims[-1] + 1:])
    else:
        axes = picked + rest
    return ctx.output(axes)


def _triangle(ctx, x, *args, **kwargs):
    ctx.fix(*x.axes[-2:], reason="a triangular mask orders positions")
    return ctx.output(list(x.axes))


def _label(ctx, term, names) -> None:
    """Name the groups of an attention's axis after the module it runs in (``model.layers.0.self_attn.heads``), for
    readable specs; a group that already has a name keeps it."""
    stack = ctx.node.meta.get("nn_module_stack")
    if not stack:
        return
    path = next(reversed(stack.values()))[0]
    try:
        resolved = T.resolve(term)
    except T.NotExpressible:
        return
    if len(resolved) != 1:
        return
    factors = [f for f in resolved[0] if isinstance(f, T.Var)]
    if len(factors) != len(names):
        return
    for f, name in zip(factors, names):
        root = T.find(f)
        if root.hint is None:
            root.hint = f"{path}.{name}"


def sdpa(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention on ``[..., heads, positions, dim]``; with ``enable_gqa`` the query heads are
    ``(kv_heads, per_kv)``."""
    gqa = enable_gqa and query.ndim >= 3 and query.shape[-3] != key.shape[-3]
    if gqa:
        hq, hkv = query.shape[-3], key.shape[-3]
        T.unify(key.axes[-3], value.axes[-3])
        T.unify(query.axes[-3], T.product([key.axes[-3], T.fresh(hq // hkv)]))
        key = Sym(key.shape[:-3] + (hq,) + key.shape[-2:], list(key.axes[:-3]) + [query.axes[-3]] + list(key.axes[-2:]))
        value = Sym(value.shape[:-3] + (hq,) + value.shape[-2:],
                    list(value.axes[:-3]) + [query.axes[-3]] + list(value.axes[-2:]))
    out = R.sdpa(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale)
    if query.ndim >= 3:
        heads = query.axes[-3]
        _label(ctx, heads, ["kv_heads", "heads_per_kv"] if _n_vars(heads) == 2 else ["heads"])
    _label(ctx, query.axes[-1], ["qk"])
    _label(ctx, value.axes[-1], ["v"])
    return out


def _n_vars(term) -> int:
    try:
        resolved = T.resolve(term)
    except T.NotExpressible:
        return 0
    return sum(isinstance(f, T.Var) for seg in resolved for f in seg)


def register() -> None:
    _fn(*_ELEMENTWISE, *[n + "_" for n in _ELEMENTWISE])(R.elementwise)
    _fn("ones", "zeros", "full", "ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full",
        "scalar_tensor")(_constant)
    _fn("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten", "view_as",
        "reshape_as")(_reshape)
    _fn("permute")(_permute)
    _fn("transpose", "swapaxes")(_transpose)
    _fn("t", "numpy_T")(R.lazy_inputs(lambda ctx, x: R._transpose(ctx, x)))
    _fn("clone", "contiguous", "alias")(R._contiguous)  # pure moves: they keep slots
    _fn("expand", "expand_as", "broadcast_to")(_expand)
    _fn("slice")(_slice)
    _fn("select")(_select)
    _fn("split", "split_with_sizes")(_split)
    _fn("chunk")(_chunk)
    _fn("unbind")(_unbind)
    _fn("cat", "concat")(_cat)
    _fn("stack")(_stack)
    _fn("mean", "sum", "amax", "amin", "var", "std")(_reduce)
    _fn("linear")(_linear)
    _fn("addmm")(_addmm)
    _fn("baddbmm")(_baddbmm)
    _fn("matmul", "bmm", "mm")(_matmul)
    _fn("einsum")(lambda ctx, equation, tensors, *args, **kwargs: R.einsum(ctx, equation, *tensors))
    _fn("embedding")(_embedding)
    _fn("layer_norm")(_layer_norm)
    _fn("rms_norm")(_rms_norm)
    _fn("batch_norm")(lambda ctx, x, weight=None, bias=None, mean=None, var=None, *args, **kwargs:
                      R.channel_affine(ctx, x, 1, weight, bias, mean, var))
    _fn("instance_norm")(lambda ctx, x, weight=None, bias=None, mean=None, var=None, *args, **kwargs:
                         R.channel_affine(ctx, x, 1, weight, bias, mean, var))
    _fn("group_norm")(lambda ctx, x, num_groups, weight=None, bias=None, *args, **kwargs:
                      R.group_norm(ctx, x, num_groups, weight, bias))
    _fn("conv1d")(_conv(1))
    _fn("conv2d")(_conv(2))
    _fn("conv3d")(_conv(3))
    _fn("tril", "triu")(_triangle)
    _fn("index")(_index_tensor)
    _fn("pad")(lambda ctx, x, pad, mode="constant", value=None: R.pad(ctx, x, pad, mode, value))
    _fn("constant_pad_nd")(lambda ctx, x, pad, value=0: R.pad(ctx, x, pad, "constant", value))
    for k in (1, 2, 3):  # pools over the last k (spatial) axes
        _fn(*[f"{p}{k}d" for p in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")])(R._pool(k))
    _fn("scaled_dot_product_attention")(sdpa)
