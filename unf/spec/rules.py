"""Built-in spec-inference rules: how each op moves axis terms from inputs to outputs.

A rule gets a :class:`~unf.spec.infer.RuleContext` and the op's arguments with tensors replaced by ``Sym`` objects
(shape + one term per axis); it unifies the axes that must be permuted alike and returns the output's ``Sym``.
Axes a rule cannot prove permutable are fixed.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import terms as T
from .symbolic import Slots, SlotState, Sym
from .registry import register_function_rule, register_method_rule, register_module_rule


def _is_sym(x) -> bool:
    return isinstance(x, Sym)


def lazy_inputs(rule):
    """Mark a rule that calls ``ctx.use`` on its inputs itself (pass-through ops that keep slots or stacks)."""
    rule.lazy_inputs = True
    return rule


def _syms(values) -> list:
    out = []
    for v in values:
        if _is_sym(v):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out += _syms(v)
    return out


def _shape_of(ctx):
    s = ctx.out_shape
    return s if isinstance(s, tuple) and all(isinstance(n, int) for n in s) else None


def broadcast_axes(parts, out_shape) -> list:
    """Unify the axes of (shape, axes) pairs under numpy broadcasting; returns the output terms."""
    out = []
    nd = len(out_shape)
    for i, n in enumerate(out_shape):
        r = nd - 1 - i
        cands = [axes[len(shape) - 1 - r] for shape, axes in parts
                 if len(shape) - 1 - r >= 0 and shape[len(shape) - 1 - r] == n]
        for c in cands[1:]:
            T.unify(cands[0], c)
        out.append(cands[0] if cands else T.fixed(n))
    return out


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# -- element-wise ----------------------------------------------------------------------------------------------------
def elementwise(ctx, *args, **kwargs):
    shape = _shape_of(ctx)
    if shape is None:
        return None  # a Python scalar computation
    syms = _syms(list(args) + list(kwargs.values()))
    return ctx.output(broadcast_axes([(s.shape, s.axes) for s in syms], shape))


_UNARY = ["relu", "relu6", "gelu", "silu", "mish", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "celu", "softplus",
          "softsign", "hardswish", "hardsigmoid", "hardtanh", "logsigmoid", "softmax", "log_softmax", "softmin",
          "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "normalize",
          "tanhshrink", "softshrink", "hardshrink", "threshold", "rrelu", "exp", "log", "log1p", "expm1", "abs",
          "sqrt", "rsqrt", "square", "pow", "neg", "sin", "cos", "erf", "clamp", "clip", "clamp_min", "clamp_max",
          "where", "maximum", "minimum", "add", "sub", "mul", "div", "true_divide", "sign", "reciprocal", "lerp",
          "masked_fill", "addcmul", "addcdiv", "exp2", "logit", "nan_to_num", "floor_divide", "remainder", "fmod",
          "gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "logical_and", "logical_or", "logical_not",
          "logical_xor", "isnan", "isfinite", "signbit", "heaviside", "hypot", "atan2", "floor", "ceil", "round",
          "trunc", "frac"]
_fns = [getattr(mod, n) for n in _UNARY for mod in (torch, F) if hasattr(mod, n)]
register_function_rule(operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
                       operator.neg, operator.pos, operator.mod, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv, operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
                       operator.and_, operator.or_, operator.xor, operator.invert, operator.abs, *_fns)(elementwise)
register_method_rule(*_UNARY, *[n + "_" for n in _UNARY], "float", "double", "half", "bfloat16", "to", "type",
                     "type_as", "clone", "detach", "requires_grad_", "cpu", "cuda")(elementwise)
register_module_rule(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
                     nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
                     nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.Softmax, nn.LogSoftmax, nn.Softmin,
                     nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                     nn.Identity)(elementwise)


def _constant(ctx, *args, **kwargs):
    """A constant-filled tensor is unchanged by any permutation: every axis may take any group."""
    shape = _shape_of(ctx)
    return None if shape is None else ctx.output([ctx.var(n, "const") for n in shape])


register_function_rule(torch.ones, torch.zeros, torch.full, torch.ones_like, torch.zeros_like,
                       torch.full_like)(_constant)
register_method_rule("new_ones", "new_zeros", "new_full")(_constant)


@register_function_rule(torch.rand_like, torch.randn_like)
def _random_like(ctx, x, *args, **kwargs):  # equivariant in distribution: same axes as its input
    return ctx.output(list(x.axes))


@register_function_rule(F.glu)
def glu(ctx, x, dim=-1):
    """``a * sigmoid(b)`` for the two halves of ``dim``: both halves are permuted alike."""
    d = _norm_dim(dim, x.ndim)
    a, b = T.split_concat(x.axes[d], [x.shape[d] // 2] * 2)
    ctx.unify(a, b)
    return ctx.output(list(x.axes[:d]) + [a] + list(x.axes[d + 1:]))


@register_module_rule(nn.GLU)
def _glu_module(ctx, x):
    return glu(ctx, x, ctx.module.dim)


@register_module_rule(nn.PReLU)
def prelu(ctx, x):
    w = ctx.param("weight")
    if w.shape[0] > 1:
        ctx.unify(w.axes[0], x.axes[1 if x.ndim > 1 else 0])
    return ctx.output(list(x.axes))


# -- shapes, views, indexing -----------------------------------------------------------------------------------------
@register_method_rule("size", "dim", "numel", "ndimension", "stride", "is_contiguous", "data_ptr", "element_size")
def _not_a_tensor(ctx, *args, **kwargs):
    return None


@register_function_rule(getattr)
@lazy_inputs
def _getattr(ctx, obj, name):
    if isinstance(obj, tuple) and name in ("values", "indices"):
        return obj[0 if name == "values" else 1]
    if _is_sym(obj):
        ctx.use(obj)
    if _is_sym(obj) and name in ("T", "mT"):
        axes = list(obj.axes)
        axes[-2:] = axes[-2:][::-1] if (name == "mT" or obj.ndim == 2) else axes[-2:]
        return ctx.output(axes if name == "mT" else list(reversed(obj.axes)))
    if _is_sym(obj) and name in ("data", "real"):
        return obj
    return None


MAX_SLOTS = 64


def reshape(ctx, x, *args, **kwargs):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: match blocks of equal size products; split/merge factors."""
    ctx.use(x)
    out_shape = _shape_of(ctx)
    ins = [(n, t) for n, t in zip(x.shape, x.axes) if n != 1]
    outs = [i for i, n in enumerate(out_shape) if n != 1]
    out_axes = [T.fixed(1)] * len(out_shape)
    blocks = T.product_blocks([n for n, _ in ins], [out_shape[i] for i in outs]) or []
    slot_block = None
    for i0, i1, j0, j1 in blocks:
        in_terms = [t for _, t in ins[i0:i1]]
        sizes = [out_shape[outs[j]] for j in range(j0, j1)]
        term = T.resolve(in_terms[0]) if len(in_terms) == 1 else None
        if (slot_block is None and term is not None and len(sizes) >= 2 and sizes[0] <= MAX_SLOTS
                and len(term) == 1 and len(term[0]) == 1 and isinstance(term[0][0], T.Var)):
            slot_block = (term[0][0], sizes, outs[j0:j1])
            continue
        pieces = in_terms if (len(in_terms) == 1 and len(sizes) == 1) else \
            T.split_product(T.product(in_terms), sizes)
        for j, p in zip(range(j0, j1), pieces):
            out_axes[outs[j]] = p
    if slot_block is None:
        return ctx.output(out_axes)
    var, sizes, positions = slot_block
    k = sizes[0]
    per_slot = [T.fresh(var.size // k) for _ in range(k)]
    T.find(var).binding = T.concat(per_slot)
    block_terms = [T.split_product(t, sizes[1:]) for t in per_slot]
    parts = []
    for terms in block_terms:
        axes = list(out_axes)
        for pos, t in zip(positions[1:], terms):
            axes[pos] = t
        del axes[positions[0]]
        parts.append(axes)
    state = SlotState(var, k, block_terms)
    out = ctx.output([T.fixed(n) for n in out_shape])
    out.slots = Slots(state, positions[0], parts)
    return out


register_method_rule("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                     "reshape_as")(reshape)
register_function_rule(torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze)(reshape)
register_module_rule(nn.Flatten, nn.Unflatten)(reshape)


def _reorder(ctx, x, order: list):
    """Output axis ``i`` is input axis ``order[i]``; slots (see SlotState) are carried along."""
    out = ctx.output([x.axes[i] for i in order])
    if x.slots is not None:
        sl, marker = x.slots, object()
        new_axis = order.index(sl.axis)
        parts = []
        for p in sl.parts:
            full = list(p[:sl.axis]) + [marker] + list(p[sl.axis:])
            parts.append([full[i] for i in order if i != sl.axis])
        out.slots = Slots(sl.state, new_axis, parts)
    return out


@lazy_inputs
def _perm_dims(ctx, x, *dims, **kwargs):
    dims = kwargs.get("dims", dims)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    ctx.use_pending(x)
    return _reorder(ctx, x, [_norm_dim(d, x.ndim) for d in dims])


register_method_rule("permute")(_perm_dims)
register_function_rule(torch.permute)(_perm_dims)


@lazy_inputs
def _transpose(ctx, x, dim0=None, dim1=None, **kwargs):
    order = list(range(x.ndim))
    if dim0 is None:  # .t()
        order.reverse()
    else:
        a, b = _norm_dim(dim0, x.ndim), _norm_dim(dim1, x.ndim)
        order[a], order[b] = order[b], order[a]
    ctx.use_pending(x)
    return _reorder(ctx, x, order)


@register_method_rule("contiguous")
@lazy_inputs
def _contiguous(ctx, x, *args, **kwargs):
    ctx.use_pending(x)
    return _reorder(ctx, x, list(range(x.ndim)))


register_method_rule("transpose", "swapaxes", "swapdims", "t")(_transpose)
register_function_rule(torch.transpose, torch.swapaxes, torch.swapdims, torch.t)(_transpose)


@register_method_rule("movedim", "moveaxis")
@register_function_rule(torch.movedim, torch.moveaxis)
def _movedim(ctx, x, source, destination):
    src = [source] if isinstance(source, int) else list(source)
    dst = [destination] if isinstance(destination, int) else list(destination)
    perm = list(range(x.ndim))
    src = [_norm_dim(s, x.ndim) for s in src]
    dst = [_norm_dim(d, x.ndim) for d in dst]
    rest = [p for p in perm if p not in src]
    result = [None] * x.ndim
    for s, d in zip(src, dst):
        result[d] = s
    it = iter(rest)
    result = [r if r is not None else next(it) for r in result]
    return ctx.output([x.axes[i] for i in result])


@register_method_rule("expand", "expand_as", "broadcast_to")
@register_function_rule(torch.broadcast_to)
def _expand(ctx, x, *args, **kwargs):
    out_shape = _shape_of(ctx)
    lead = len(out_shape) - x.ndim
    return ctx.output([T.fixed(n) for n in out_shape[:lead]] +
                      [t if m == n else T.fixed(n) for t, m, n in zip(x.axes, x.shape, out_shape[lead:])])


@register_method_rule("repeat")
def _repeat(ctx, x, *reps):
    """``x.repeat(*reps)``: axis ``i`` becomes ``reps[i]`` copies of itself. The counts are read from the shapes, since
    a count computed while tracing (``pos.repeat(B, 1, 1, 1)``, timm's XCiT) reaches the rule as no number."""
    out_shape = _shape_of(ctx)
    if out_shape is None:
        ctx.give_up("repeat with an unknown output shape", x)
        return ctx.fixed_output()
    lead = len(out_shape) - x.ndim
    axes = [T.fixed(n) for n in out_shape[:lead]]
    for t, m, n in zip(x.axes, x.shape, out_shape[lead:]):
        r = n // m if m else 1
        axes.append(t if r == 1 else T.product([T.fixed(r), t]))
    return ctx.output(axes)


@register_function_rule(operator.getitem)
@lazy_inputs
def getitem(ctx, obj, idx):
    if not _is_sym(obj):
        try:
            return obj[idx] if isinstance(obj, (tuple, list, dict)) else None
        except (TypeError, KeyError, IndexError):
            return None
    return _index(ctx, obj, idx)


def _index(ctx, x, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    if x.slots is not None:  # x[..., i, ...] at the slot axis picks one slot
        a = x.slots.axis
        if len(idx) > a and isinstance(idx[a], int) and all(i == slice(None) for j, i in enumerate(idx) if j != a):
            x.slots.state.handed_out = True
            return ctx.output(list(x.slots.parts[idx[a]]))
    if x.stack is not None and x.pending and isinstance(idx[0], int) and \
            all(i == slice(None) for i in idx[1:]) and x.ndim >= 2:  # one part of a stack, e.g. h_n[-1]
        return ctx.output([T.fixed(n) for n in x.shape[1:-1]] + [x.stack[idx[0]]])
    ctx.use(x)
    picked = _integer_index(ctx, x, idx)
    if picked is not None:
        return picked
    if any(_is_sym(i) or isinstance(i, (list, bool)) for i in idx):
        ctx.give_up("advanced (tensor/bool/list) indexing", x)
        return ctx.fixed_output()
    n_used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (x.ndim - n_used) + idx[k + 1:]
    idx = idx + (slice(None),) * (x.ndim - sum(1 for i in idx if i is not None))
    out_shape = _shape_of(ctx)
    axes, a = [], 0
    for i in idx:
        if i is None:
            axes.append(T.fixed(1))
            continue
        term, n = x.axes[a], x.shape[a]
        if isinstance(i, int):  # the picked position becomes a fixed block; the rest may still permute
            k = i % n
            T.split_concat(term, [k, 1, n - k - 1])
        elif isinstance(i, slice):
            m = out_shape[len(axes)]
            if m == n and i.step in (None, 1):
                axes.append(term)
            else:
                start, stop, step = (i.start, i.stop, i.step)
                ints = all(v is None or isinstance(v, int) for v in (start, stop, step))
                if ints:
                    start, stop, step = slice(start, stop, step).indices(n)
                elif start is None or start == 0:
                    start, stop, step = 0, m, step if isinstance(step, int) else 1
                elif stop is None:
                    start, stop, step = n - m, n, step if isinstance(step, int) else 1
                else:
                    step = None
                if step == 1 and stop - start == m:
                    axes.append(T.split_concat(term, [start, m, n - stop])[1]
                                if m > 0 else T.fixed(0))
                else:
                    ctx.give_up("strided or unknown slice of a permuted axis", term)
                    axes.append(T.fixed(m))
        else:
            ctx.give_up(f"index {i!r}", x)
            return ctx.fixed_output()
        a += 1
    return ctx.output(axes)


def _integer_index(ctx, x, idx):
    """``x[..., index, ...]`` with one integer index tensor and full slices elsewhere (a position-bias table read
    through a buffer of indices): the indexed axis is fixed, the index tensor's axes take its place."""
    arg = ctx.node.args[1]
    args = arg if isinstance(arg, tuple) else (arg,)
    tensors = [k for k, i in enumerate(idx) if _is_sym(i)]
    if len(tensors) != 1 or len(args) != len(idx) or \
            any(i != slice(None) for k, i in enumerate(idx) if k != tensors[0]):
        return None
    k = tensors[0]
    meta = getattr(args[k], "meta", {}).get("tensor_meta")
    if meta is None or meta.dtype.is_floating_point or meta.dtype.is_complex or meta.dtype == torch.bool:
        return None
    ctx.use(idx[k])
    ctx.fix(x.axes[k], reason="entries addressed by an index tensor")
    return ctx.output(list(x.axes[:k]) + list(idx[k].axes) + list(x.axes[k + 1:]))


# -- joining and splitting -------------------------------------------------------------------------------------------
@register_function_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx, tensors, dim=0, **kwargs):
    dim = kwargs.get("axis", dim)
    syms = [s for s in tensors if _is_sym(s) and s.shape != (0,)]
    d = _norm_dim(dim, syms[0].ndim)
    out = list(syms[0].axes)
    for s in syms[1:]:
        for a in range(len(out)):
            if a != d:
                T.unify(out[a], s.axes[a])
    out[d] = T.concat([s.axes[d] for s in syms])
    return ctx.output(out)


@register_function_rule(torch.stack)
def stack(ctx, tensors, dim=0):
    syms = [s for s in tensors if _is_sym(s)]
    out = list(syms[0].axes)
    for s in syms[1:]:
        for a, b in zip(out, s.axes):
            T.unify(a, b)
    d = _norm_dim(dim, syms[0].ndim + 1)
    out.insert(d, T.fixed(len(syms)))
    return ctx.output(out)


@lazy_inputs
def _split(ctx, x, *args, **kwargs):
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if name == "unbind":
        dim = kwargs.get("dim", args[0] if args else 0)
    d = _norm_dim(dim, x.ndim)
    if name == "unbind" and x.slots is not None and x.slots.axis == d:
        x.slots.state.handed_out = True
        return tuple(ctx.output(list(p), s) for p, s in zip(x.slots.parts, ctx.out_shape))
    ctx.use(x)
    shapes = ctx.out_shape
    sizes = [s[d] if name != "unbind" else 1 for s in shapes]
    pieces = T.split_concat(x.axes[d], sizes)
    outs = []
    for s, p in zip(shapes, pieces):
        axes = list(x.axes)
        if name == "unbind":
            del axes[d]
        else:
            axes[d] = p
        outs.append(ctx.output(axes, s))
    return tuple(outs)


register_method_rule("split", "chunk", "unbind", "tensor_split")(_split)
register_function_rule(torch.split, torch.chunk, torch.unbind, torch.tensor_split)(_split)


def _roll(ctx, x, shifts, dims=None):
    """``torch.roll``: a cyclic shift along ``dims`` (of the flattened tensor if ``dims`` is None). A permutation of
    a rolled axis does not commute with the shift, so rolled axes are fixed on purpose (they are positions, as in
    Swin's shifted windows); the other axes carry through."""
    if dims is None:
        ctx.fix(x, reason="roll of the flattened tensor")
        return ctx.fixed_output()
    dims = [dims] if isinstance(dims, int) else list(dims)
    rolled = {_norm_dim(d, x.ndim) for d in dims}
    ctx.fix(*[x.axes[a] for a in rolled], reason="cyclic shift of positions")
    return ctx.output([T.fixed(n) if a in rolled else t for a, (t, n) in enumerate(zip(x.axes, x.shape))])


register_function_rule(torch.roll)(_roll)
register_method_rule("roll")(_roll)


@register_function_rule(F.pad)
def pad(ctx, x, pad, mode="constant", value=None):
    axes = list(x.axes)
    for k in range(len(pad) // 2):
        a = x.ndim - 1 - k
        left, right = pad[2 * k], pad[2 * k + 1]
        if not (isinstance(left, int) and isinstance(right, int)):  # computed from shapes while tracing (timm Swin)
            ctx.give_up("padding by an amount computed at run time", axes[a])
            axes[a] = T.fixed(ctx.out_shape[a])
            continue
        if left == 0 and right == 0:
            continue
        if mode == "constant" and left >= 0 and right >= 0:  # padding adds fixed blocks around the permuted axis
            axes[a] = T.concat([T.fixed(left), axes[a], T.fixed(right)])
        else:
            ctx.give_up(f"{mode} padding of a permuted axis", axes[a])
            axes[a] = T.fixed(ctx.out_shape[a])
    return ctx.output(axes)


# -- reductions ------------------------------------------------------------------------------------------------------
def _reduction(dim_pos: int):
    """Sum/mean/...: the reduced axes are summed over, so any permutation of them is invisible afterwards."""

    def rule(ctx, x, *args, **kwargs):
        dim = kwargs.get("dim", args[dim_pos] if len(args) > dim_pos else None)
        if isinstance(dim, bool) or (dim is not None and not isinstance(dim, (int, tuple, list))):
            dim = None
        out_shape = _shape_of(ctx)
        if out_shape is None:
            return None
        dims = set(range(x.ndim)) if dim is None else {_norm_dim(d, x.ndim) for d in
                                                        ([dim] if isinstance(dim, int) else dim)}
        keep = len(out_shape) == x.ndim
        axes = [T.fixed(1) if a in dims else x.axes[a] for a in range(x.ndim) if keep or a not in dims]
        return ctx.output(axes)

    return rule


_REDUCE = ["sum", "mean", "amax", "amin", "prod", "logsumexp", "nansum", "nanmean", "std", "var", "any", "all"]
register_method_rule(*_REDUCE)(_reduction(0))
register_function_rule(*[getattr(torch, n) for n in _REDUCE])(_reduction(0))
register_method_rule("norm")(_reduction(1))
register_function_rule(torch.norm, torch.linalg.vector_norm)(_reduction(1))


def _max_min(ctx, x, *args, **kwargs):
    other = args[0] if args else kwargs.get("other")
    if _is_sym(other):
        return elementwise(ctx, x, other)
    dim = kwargs.get("dim", args[0] if args else None)
    if dim is None:
        return ctx.output([])
    d = _norm_dim(dim, x.ndim)
    vshape = ctx.out_shape[0]
    keep = len(vshape) == x.ndim
    axes = [T.fixed(1) if a == d else x.axes[a] for a in range(x.ndim) if keep or a != d]
    values = ctx.output(axes, vshape)
    # indices along a permuted axis change under the permutation: fix that axis as soon as they are used
    return values, ctx.deferred(vshape, [x.axes[d]], list(axes))


register_method_rule("max", "min")(_max_min)
register_function_rule(torch.max, torch.min)(_max_min)


def _arg_max_min(ctx, x, dim=None, keepdim=False):
    out_shape = _shape_of(ctx)
    if dim is None:
        return ctx.deferred(out_shape, list(x.axes), [T.fixed(n) for n in out_shape])
    d = _norm_dim(dim, x.ndim)
    axes = [T.fixed(1) if a == d else x.axes[a] for a in range(x.ndim) if keepdim or a != d]
    return ctx.deferred(out_shape, [x.axes[d]], axes)


register_method_rule("argmax", "argmin")(_arg_max_min)
register_function_rule(torch.argmax, torch.argmin)(_arg_max_min)


# -- products --------------------------------------------------------------------------------------------------------
def matmul(ctx, a, b, **kwargs):
    a_sh, a_ax = list(a.shape), list(a.axes)
    b_sh, b_ax = list(b.shape), list(b.axes)
    if a.ndim == 1:
        a_sh, a_ax = [1] + a_sh, [T.fixed(1)] + a_ax
    if b.ndim == 1:
        b_sh, b_ax = b_sh + [1], b_ax + [T.fixed(1)]
    T.unify(a_ax[-1], b_ax[-2])
    batch_shape = tuple(torch.broadcast_shapes(tuple(a_sh[:-2]), tuple(b_sh[:-2])))
    out = broadcast_axes([(tuple(a_sh[:-2]), a_ax[:-2]), (tuple(b_sh[:-2]), b_ax[:-2])], batch_shape)
    if a.ndim > 1:
        out.append(a_ax[-2])
    if b.ndim > 1:
        out.append(b_ax[-1])
    return ctx.output(out)


register_function_rule(operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.mv)(matmul)
register_method_rule("matmul", "bmm", "mm", "mv", "__matmul__")(matmul)


@register_function_rule(torch.einsum)
def einsum(ctx, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    eq = equation.replace(" ", "")
    if "..." in eq:
        ctx.give_up("einsum with ellipsis", *operands)
        return ctx.fixed_output()
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    if not _:
        rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    letter: dict[str, tuple] = {}
    for spec, op in zip(ins, operands):
        for c, n, t in zip(spec, op.shape, op.axes):
            if n == 1:
                continue
            if c in letter:
                T.unify(letter[c], t)
            else:
                letter[c] = t
    out_shape = _shape_of(ctx)
    return ctx.output([letter.get(c, T.fixed(n)) for c, n in zip(rhs, out_shape)])


@register_function_rule(F.scaled_dot_product_attention)
def sdpa(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa:
        ctx.give_up("grouped-query attention", query, key, value)
        return ctx.fixed_output()
    T.unify(query.axes[-1], key.axes[-1])
    T.unify(key.axes[-2], value.axes[-2])
    if is_causal:  # a causal mask depends on positions
        ctx.fix(query.axes[-2], key.axes[-2], reason="a causal mask orders positions")
    parts = [(s.shape[:-2], s.axes[:-2]) for s in (query, key, value)]
    out_shape = _shape_of(ctx)
    batch = broadcast_axes(parts, out_shape[:-2])
    if _is_sym(attn_mask):
        broadcast_axes([(out_shape[:-2] + (query.shape[-2], key.shape[-2]), batch + [query.axes[-2], key.axes[-2]]),
                        (attn_mask.shape, attn_mask.axes)], out_shape[:-2] + (query.shape[-2], key.shape[-2]))
    return ctx.output(batch + [query.axes[-2], value.axes[-1]])


# -- layers ----------------------------------------------------------------------------------------------------------
def linear(ctx, x, weight, bias=None):
    ctx.unify(x.axes[-1], weight.axes[1])
    if _is_sym(bias):
        ctx.unify(bias.axes[0], weight.axes[0])
    return ctx.output(list(x.axes[:-1]) + [weight.axes[0]])


register_function_rule(F.linear)(linear)


@register_module_rule(nn.Linear)
def _linear_module(ctx, x):
    return linear(ctx, x, ctx.param("weight"), ctx.param("bias"))


def conv(ctx, x, weight, bias=None, *, groups: int = 1, spatial: int, transposed: bool = False):
    """ConvNd: weight ``[out, in/groups, *k]`` (transposed: ``[in, out/groups, *k]``); groups permute as a block."""
    c = x.ndim - spatial - 1
    ctx.fix(*x.axes[c + 1:], *weight.axes[2:], reason="spatial positions and kernel taps")
    w_in, w_out = (0, 1) if transposed else (1, 0)
    cin = x.shape[c]
    if groups == 1:
        ctx.unify(x.axes[c], weight.axes[w_in])
        out_term = weight.axes[w_out]
    else:
        g = ctx.var(groups, "groups")
        per_group = ctx.var(cin // groups, "in_group")
        in_g = T.product([g, per_group])
        ctx.unify(x.axes[c], in_g)
        if transposed:
            ctx.unify(weight.axes[0], in_g)
            out_term = T.product([g, weight.axes[1]])
        else:
            ctx.unify(weight.axes[1], per_group)
            ctx.unify(weight.axes[0], T.product([g, ctx.var(weight.shape[0] // groups, "out_group")]))
            out_term = weight.axes[0]
    if _is_sym(bias):
        ctx.unify(bias.axes[0], out_term)
    out_shape = _shape_of(ctx)
    return ctx.output(list(x.axes[:c]) + [out_term] + [T.fixed(n) for n in out_shape[c + 1:]])


def _conv_fn(spatial, transposed=False):
    def rule(ctx, x, weight, bias=None, stride=1, padding=0, *rest, **kwargs):
        # conv(x, w, b, stride, padding, dilation, groups); conv_transpose(..., padding, output_padding, groups, ...)
        groups = kwargs.get("groups", rest[1] if len(rest) > 1 else 1)
        return conv(ctx, x, weight, bias, groups=groups, spatial=spatial, transposed=transposed)
    return rule


for _k, (_f, _ft) in enumerate([(F.conv1d, F.conv_transpose1d), (F.conv2d, F.conv_transpose2d),
                                (F.conv3d, F.conv_transpose3d)], start=1):
    register_function_rule(_f)(_conv_fn(_k))
    register_function_rule(_ft)(_conv_fn(_k, transposed=True))


@register_module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_module(ctx, x, output_size=None):
    m = ctx.module
    return conv(ctx, x, ctx.param("weight"), ctx.param("bias"), groups=m.groups, spatial=len(m.kernel_size),
                transposed=m.transposed)


def channel_affine(ctx, x, channel_axis: int, *tensors):
    """Per-channel statistics/affine (BatchNorm, InstanceNorm): every 1-d tensor is indexed by the channel axis."""
    for t in tensors:
        if _is_sym(t):
            ctx.unify(t.axes[0], x.axes[channel_axis])
    return ctx.output(list(x.axes))


@register_module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def _batch_norm_module(ctx, x):
    return channel_affine(ctx, x, 1, *[ctx.param(n) for n in ("weight", "bias", "running_mean", "running_var")])


@register_function_rule(F.batch_norm, F.instance_norm)
def _batch_norm_fn(ctx, x, running_mean=None, running_var=None, weight=None, bias=None, *args, **kwargs):
    return channel_affine(ctx, x, 1, running_mean, running_var, weight, bias)


@register_module_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _instance_norm_module(ctx, x):
    spatial = int(type(ctx.module).__name__[-2])
    return channel_affine(ctx, x, x.ndim - spatial - 1,
                          *[ctx.param(n) for n in ("weight", "bias", "running_mean", "running_var")])


def layer_norm(ctx, x, normalized_ndim: int, *tensors):
    """LayerNorm/RMSNorm: statistics over the last axes are invariant; weight/bias are element-wise over them."""
    for t in tensors:
        if _is_sym(t):
            for a, b in zip(t.axes, x.axes[x.ndim - normalized_ndim:]):
                ctx.unify(a, b)
    return ctx.output(list(x.axes))


@register_module_rule(nn.LayerNorm, nn.RMSNorm)
def _layer_norm_module(ctx, x):
    return layer_norm(ctx, x, len(ctx.module.normalized_shape), ctx.param("weight"), ctx.param("bias"))


@register_function_rule(F.layer_norm)
def _layer_norm_fn(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return layer_norm(ctx, x, len(normalized_shape), weight, bias)


@register_function_rule(F.rms_norm)
def _rms_norm_fn(ctx, x, normalized_shape, weight=None, eps=None):
    return layer_norm(ctx, x, len(normalized_shape), weight)


def group_norm(ctx, x, num_groups: int, weight=None, bias=None):
    """GroupNorm: channels are ``(groups, per-group)``; whole groups permute, and so do channels within groups."""
    c = x.shape[1]
    ctx.unify(x.axes[1], T.product([ctx.var(num_groups, "groups"), ctx.var(c // num_groups, "in_group")]))
    return channel_affine(ctx, x, 1, weight, bias)


@register_module_rule(nn.GroupNorm)
def _group_norm_module(ctx, x):
    return group_norm(ctx, x, ctx.module.num_groups, ctx.param("weight"), ctx.param("bias"))


@register_function_rule(F.group_norm)
def _group_norm_fn(ctx, x, num_groups, weight=None, bias=None, eps=1e-5):
    return group_norm(ctx, x, num_groups, weight, bias)


def embedding(ctx, ids, weight):
    ctx.fix(weight.axes[0], reason="embedding rows are addressed by input ids")
    return ctx.output(list(ids.axes) + [weight.axes[1]])


@register_module_rule(nn.Embedding)
def _embedding_module(ctx, ids):
    return embedding(ctx, ids, ctx.param("weight"))


@register_function_rule(F.embedding)
def _embedding_fn(ctx, ids, weight, *args, **kwargs):
    return embedding(ctx, ids, weight)


def _pool(spatial: int):
    def rule(ctx, x, *args, **kwargs):
        out_shape = ctx.out_shape
        if not (isinstance(out_shape, tuple) and all(isinstance(n, int) for n in out_shape)):
            ctx.give_up("pooling that returns indices", x)
            return ctx.fixed_output()
        c = x.ndim - spatial - 1
        ctx.fix(*x.axes[c + 1:], reason="spatial positions")
        return ctx.output(list(x.axes[:c + 1]) + [T.fixed(n) for n in out_shape[c + 1:]])
    return rule


for _k in (1, 2, 3):
    _mods = [getattr(nn, f"{p}{_k}d") for p in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool")
             if hasattr(nn, f"{p}{_k}d")]
    _fns = [getattr(F, f"{p}{_k}d") for p in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool",
                                               "lp_pool") if hasattr(F, f"{p}{_k}d")]
    register_module_rule(*_mods)(_pool(_k))
    register_function_rule(*_fns)(_pool(_k))


_WeightNorm = getattr(torch.nn.utils.parametrizations, "_WeightNorm", None)
if _WeightNorm is not None:
    @register_module_rule(_WeightNorm)
    def _weight_norm(ctx, weight_g, weight_v):
        """``g * v / ||v||`` with norms over all axes but ``dim``: permutations of the other axes leave norms alone."""
        d = _norm_dim(ctx.module.dim, weight_v.ndim)
        ctx.unify(weight_g.axes[d], weight_v.axes[d])
        return ctx.output(list(weight_v.axes))


# -- attention and recurrence ----------------------------------------------------------------------------------------
@register_module_rule(nn.MultiheadAttention)
def multihead_attention(ctx, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                        average_attn_weights=True, is_causal=False):
    """Heads permute as blocks; Q and K share a within-head permutation, V and the output projection another."""
    m = ctx.module
    heads = ctx.var(m.num_heads, "heads")
    qk = T.product([heads, ctx.var(m.head_dim, "qk")])
    vv = T.product([heads, ctx.var(m.head_dim, "v")])
    if m._qkv_same_embed_dim:
        w = ctx.param("in_proj_weight")
        ctx.unify(w.axes[0], T.concat([qk, qk, vv]))
        for x in (query, key, value):
            ctx.unify(w.axes[1], x.axes[-1])
    else:
        for name, x, t in (("q_proj_weight", query, qk), ("k_proj_weight", key, qk), ("v_proj_weight", value, vv)):
            w = ctx.param(name)
            ctx.unify(w.axes[0], t)
            ctx.unify(w.axes[1], x.axes[-1])
    b = ctx.param("in_proj_bias")
    if b is not None:
        ctx.unify(b.axes[0], T.concat([qk, qk, vv]))
    for name, t in (("bias_k", qk), ("bias_v", vv)):
        p = ctx.param(name)
        if p is not None:
            ctx.unify(p.axes[-1], t)
    w_o, b_o = ctx.param("out_proj.weight"), ctx.param("out_proj.bias")
    ctx.unify(w_o.axes[1], vv)
    if b_o is not None:
        ctx.unify(b_o.axes[0], w_o.axes[0])
    # non-feature axes: (L, N) / (N, L) / (L,) for queries, likewise (S, ...) for keys and values
    batched = query.ndim == 3
    seq, bat = (1, 0) if (batched and m.batch_first) else (0, 1)
    ctx.unify(key.axes[seq], value.axes[seq])
    if batched:
        for x in (key, value):
            ctx.unify(query.axes[bat], x.axes[bat])
    q_seq, k_seq = query.axes[seq], key.axes[seq]
    q_bat = query.axes[bat] if batched else T.fixed(1)
    if _is_sym(key_padding_mask):
        ctx.unify(key_padding_mask.axes[-1], k_seq)
        if key_padding_mask.ndim == 2:
            ctx.unify(key_padding_mask.axes[0], q_bat)
    if _is_sym(attn_mask):
        ctx.unify(attn_mask.axes[-1], k_seq)
        ctx.unify(attn_mask.axes[-2], q_seq)
        if attn_mask.ndim == 3:  # [N * heads, L, S]
            ctx.unify(attn_mask.axes[0], T.product([q_bat, heads]))
    if is_causal:  # a causal mask depends on positions
        ctx.fix(q_seq, k_seq, reason="a causal mask orders positions")
    out_shape, weights_shape = ctx.out_shape
    out = ctx.output(list(query.axes[:-1]) + [w_o.axes[0]], out_shape)
    if weights_shape is None or len(weights_shape) < 2:  # need_weights=False (None, or an empty tensor)
        return out, None if weights_shape is None else ctx.output([T.fixed(n) for n in weights_shape], weights_shape)
    per_head = len(weights_shape) == query.ndim + 1
    w_axes = ([q_bat] if batched else []) + ([heads] if per_head else []) + [q_seq, k_seq]
    return out, ctx.output(w_axes, weights_shape)


@register_module_rule(nn.RNN, nn.LSTM, nn.GRU)
def recurrent(ctx, x, hx=None):
    """Multi-layer (bi)directional RNN/LSTM/GRU: one hidden group per layer and direction; gates are fixed factors."""
    m = ctx.module
    gates = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}[m.mode]
    dirs = 2 if m.bidirectional else 1
    proj = getattr(m, "proj_size", 0)
    prev = x.axes[-1]
    states, cells = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            h = ctx.var(m.hidden_size, f"hidden_{sfx}")
            gated = T.product([T.fixed(gates), h])
            ctx.unify(ctx.param(f"weight_ih_{sfx}").axes[1], prev)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = ctx.param(f"{name}_{sfx}")
                if p is not None:
                    ctx.unify(p.axes[0], gated)
            state = h
            if proj:
                w_hr = ctx.param(f"weight_hr_{sfx}")
                state = ctx.var(proj, f"proj_{sfx}")
                ctx.unify(w_hr.axes[0], state)
                ctx.unify(w_hr.axes[1], h)
            ctx.unify(ctx.param(f"weight_hh_{sfx}").axes[1], state)
            outs.append(state)
            states.append(state)
            cells.append(h)
        prev = T.concat(outs)
    single = len(states) == 1
    hx_syms = _syms([hx]) if hx is not None else []
    if hx_syms:  # an initial state from outside pins the hidden units
        for s, term in zip(hx_syms, [states[0], cells[0]]):
            if single:
                ctx.unify(s.axes[-1], term)
            else:
                ctx.fix(s, *states, *cells, reason="an initial state from outside pins the stacked hidden units")
    shapes = ctx.out_shape
    out = ctx.output(list(x.axes[:-1]) + [prev], shapes[0])

    def final(shape, terms):
        if single:
            return ctx.output([T.fixed(n) for n in shape[:-1]] + [terms[0]], shape)
        # layers are stacked on axis 0, each permuted by its own group: h_n[k] picks one; other uses fix them all
        return ctx.deferred(shape, terms, [T.fixed(n) for n in shape], stack=list(terms))

    if m.mode == "LSTM":
        return out, (final(shapes[1][0], states), final(shapes[1][1], cells))
    return out, final(shapes[1], states)
