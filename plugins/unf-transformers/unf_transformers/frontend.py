"""The front end for Hugging Face models: a dispatcher-level trace (``make_fx``) of one real forward.

Why not torch.fx: transformers 5.x forwards take ``**kwargs``, slice buffers by input lengths, build attention masks
with shape-dependent branches and check dtypes, so a symbolic trace fails on nearly every model class. ``make_fx``
runs the forward on real tensors, lets all of that Python run, and records the ATen ops that touch tensors
(``pre_dispatch=True`` keeps ``aten.linear``, ``aten.scaled_dot_product_attention`` and ``aten.layer_norm`` whole).
The parameters are passed in with ``torch.func.functional_call``, so each becomes a graph input that is mapped back
to its ``state_dict`` entry (tied tensors: one object, one entry in the spec's terms). Non-persistent buffers
(``position_ids``, rotary ``inv_freq``) become graph constants, which are never permuted.

What it costs: the trace is specific to the example input's shapes and to the branches the forward took on it
(the same holds for any trace). A forward whose control flow depends on the *values* of the weights would not be
covered; Hugging Face forwards branch on shapes, configuration and masks only.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils import _pytree as pytree

import unf
from unf.spec import terms as T
from unf.spec.infer import SpecInferenceError


@contextlib.contextmanager
def _tracing_state(model: nn.Module):
    """Eval mode, no cache (a ``DynamicCache`` in the output is no tensor), no gradients; restored afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    had_cache = hasattr(config, "use_cache")
    use_cache = getattr(config, "use_cache", None)
    is_compiling = torch.compiler.is_compiling
    model.eval()
    if had_cache:
        config.use_cache = False
    # transformers takes its graph-friendly paths (no data-dependent checks such as ``(mask == 0).all()``) when it
    # believes it is being compiled: ``transformers.utils.is_tracing`` asks ``torch.compiler.is_compiling()``
    torch.compiler.is_compiling = lambda: True
    try:
        with torch.no_grad():
            yield
    finally:
        torch.compiler.is_compiling = is_compiling
        model.train(was_training)
        if had_cache:
            config.use_cache = use_cache


class _ModuleLabels:
    """While tracing, which module each recorded op ran in (innermost), by node name: module hooks note where each
    module's forward starts and ends; ops recorded in between belong to the innermost open module."""

    def __init__(self, model: nn.Module):
        self.model, self.stack, self.paths, self.handles = model, [], {}, []

    def flush(self) -> None:
        mode = get_proxy_mode()
        if mode is None:
            return
        path = self.stack[-1] if self.stack else ""
        for node in reversed(mode.tracer.graph.nodes):
            if node.name in self.paths:
                break
            self.paths[node.name] = path

    def __enter__(self):
        for name, m in self.model.named_modules():
            def pre(mod, args, name=name):
                self.flush()
                self.stack.append(name)

            def post(mod, args, out):
                self.flush()
                if self.stack:
                    self.stack.pop()

            self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _meta(val):
    if isinstance(val, torch.Tensor):
        return _extract_tensor_metadata(val)
    if isinstance(val, (tuple, list)):
        return tuple(_meta(v) for v in val)
    return None


def trace_aten(model: nn.Module, example_inputs) -> fx.GraphModule:
    """The ATen graph of ``model`` on ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs), with ``get_attr`` nodes holding the model's own ``state_dict`` tensors and shapes in ``tensor_meta``."""
    if isinstance(example_inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}
    sd = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for key, t in sd.items():  # tied tensors: one input (functional_call ties the other names to it)
        first.setdefault(id(t), key)
    keys = list(first.values())
    flat_in, in_spec = pytree.tree_flatten((args, kwargs))

    def forward(*flat):
        params = dict(zip(keys, flat[:len(keys)]))
        a, kw = pytree.tree_unflatten(list(flat[len(keys):]), in_spec)
        out = torch.func.functional_call(model, params, a, kw, strict=False)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))

    name = type(model).__name__
    with _tracing_state(model), _ModuleLabels(model) as labels:
        try:
            params = [sd[k].detach() for k in keys]
            gm = make_fx(forward, tracing_mode="real", pre_dispatch=True)(*params, *flat_in)
            labels.flush()
        except Exception as e:
            raise SpecInferenceError(
                f"unf-transformers could not trace {name} on the example inputs: {type(e).__name__}: {e}\n"
                "Pass inputs the model accepts (input_ids for text models, pixel_values for vision models; a dict "
                "for several keyword inputs), or write the spec by hand with unf.WeightSpaceSpec.from_axes(...).") \
                from e
    for node in gm.graph.nodes:  # warnings name the module an op ran in (unf.spec.infer reads nn_module_stack)
        path = labels.paths.get(node.name)
        if path:
            node.meta["nn_module_stack"] = {path: (path, type(model.get_submodule(path)))}
    # parameters: placeholders -> get_attr nodes holding the state_dict's own tensors (ids identify the entries)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, key) in enumerate(zip(placeholders, keys)):
        attr = f"_unf_sd_{i}"
        if isinstance(sd[key], nn.Parameter):
            gm.register_parameter(attr, sd[key])
        else:
            gm.register_buffer(attr, sd[key], persistent=False)
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(attr)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    _fold_weight_independent(gm, flat_in)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["tensor_meta"] = _meta(node.meta["val"])
        elif node.op == "get_attr":
            obj = getattr(gm, node.target)
            if isinstance(obj, torch.Tensor):
                node.meta["tensor_meta"] = _meta(obj)
    gm.recompile()
    return gm


def folded_constant(value: torch.Tensor, uniform: tuple) -> torch.Tensor:
    """A tensor computed without the weights, folded to its value; ``uniform[a]``: it is the same along axis ``a``
    whatever the inputs' values (it does not depend on them)."""
    return value


def _folded_constant_rule(ctx, value, uniform):
    """Fixed along every axis, except those along which the value does not change: there any permutation leaves it
    as it is (a zero position bias, a mask equal for all heads), so such an axis takes any group."""
    return ctx.output([T.fresh(n) if u else T.fixed(n) for n, u in zip(value.shape, uniform)])


def _fold_weight_independent(gm: fx.GraphModule, flat_in: list) -> None:
    """Replace every tensor computed without the weights (attention masks, position ids, rotary cos/sin) by its
    value on the example inputs. Such tensors do not change when the weights are permuted, so nothing needs
    proving about the ops that made them (the mask code's ``index``, ``diff``, ``cumsum``, ... need no rules). A
    folded value is fixed along every axis (as tensors outside the state_dict are) except the axes along which it
    is constant (see :func:`folded_constant`)."""
    dep: set[fx.Node] = set()
    for node in gm.graph.nodes:
        weight = node.op == "get_attr" and node.target.startswith("_unf_sd_")
        if weight or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    on_inputs: set[fx.Node] = set()  # what depends on the example inputs' values (padding masks, position ids)
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in on_inputs for a in node.all_input_nodes):
            on_inputs.add(node)
    fold = {n for n in gm.graph.nodes if n.op == "call_function" and n not in dep
            and isinstance(n.meta.get("val"), torch.Tensor) and any(u in dep for u in n.users)}
    values: dict[fx.Node, torch.Tensor] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in fold:
                values[n] = out
            return out

    if fold:
        with torch.no_grad():
            _Record(gm).run(*flat_in)
    for i, node in enumerate(sorted(fold, key=lambda n: n.name)):
        attr = f"_unf_const_{i}"
        value = values[node]
        gm.register_buffer(attr, value, persistent=False)
        # uniform on this input is not uniform on every input: only input-independent values (a zero bias, ALiBi
        # slopes) may be uniform along an axis; masks made from the inputs stay fixed in every axis
        uniform = tuple(node not in on_inputs and value.numel() > 0
                        and torch.equal(value, value.narrow(a, 0, 1).expand_as(value)) for a in range(value.ndim))
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(attr)
        for user in [u for u in node.users if u in dep]:  # one node per use: a uniform axis is free at each use
            with gm.graph.inserting_before(user):
                new = gm.graph.call_function(folded_constant, (const, uniform))
            new.meta = dict(node.meta)
            user.replace_input_with(node, new)
    # what only fed the folded values goes, in-place ops on weight-independent tensors (``add_``) included
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n in dep and n.is_impure())


def register() -> None:
    # by name: importing transformers takes seconds, and a user of unf without a Hugging Face model should not wait
    unf.spec.register_frontend("transformers.modeling_utils.PreTrainedModel")(trace_aten)
    unf.register_function_rule(folded_constant)(_folded_constant_rule)
