"""Inference of a :class:`WeightSpaceSpec` from a PyTorch module.

The module is traced with torch.fx (modules that have a rule stay single ops), shapes are propagated with an example
input, the graph is turned into a networkx architecture graph, and axis terms (:mod:`unf.spec.terms`) are pushed
through it in topological order by the per-op rules of :mod:`unf.spec.registry`. Network inputs and outputs are fixed;
what remains free at the end is the spec's symmetry groups.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections import OrderedDict
from typing import Any, Optional, Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from . import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)
from . import terms as T
from .registry import frontend, function_rule, load_plugins, method_rule, module_rule
from .symbolic import Sym, _consume, _fixed_sym
from .spec import TensorSpec, WeightSpaceSpec


_log = logging.getLogger("unf.spec")


class SpecInferenceError(RuntimeError):
    """The spec of a module could not be inferred (untraceable model, or an unproven op with ``strict=True``)."""


class UnprovenSymmetryWarning(UserWarning):
    """Axes were kept fixed because no rule proves their symmetry: an op without a rule, or an op whose axis
    structure (a reshape, a split) the rules cannot follow. Conservative: the spec stays sound."""


def _meta_to_shapes(meta) -> Any:
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)):
        return type(meta)(_meta_to_shapes(m) for m in meta) if not hasattr(meta, "_fields") else \
            tuple(_meta_to_shapes(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _meta_to_shapes(v) for k, v in meta.items()}
    return None


def _syms_in(value) -> list[Sym]:
    if isinstance(value, Sym):
        return [value]
    if isinstance(value, (tuple, list)):
        return [s for v in value for s in _syms_in(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _syms_in(v)]
    return []


class RuleContext:
    """What a rule sees: the node, its module (for module rules), the output shape(s), and term operations."""

    def __init__(self, engine: "_Inference", node: fx.Node, module: Optional[nn.Module] = None,
                 out_shape=None, scope: Optional[str] = None):
        self.engine, self.node, self.module = engine, node, module
        self._out_shape = out_shape
        self.scope = scope if scope is not None else (str(node.target) if node.op == "call_module" else "")

    @property
    def out_shape(self):
        """Shape of the output tensor (or a nested tuple of shapes for tuple outputs)."""
        return self._out_shape if self._out_shape is not None else self.engine.shapes.get(self.node)

    def sub(self, name: str, out_shape) -> "RuleContext":
        """Context for submodule ``name`` of a composite module rule, whose output has shape ``out_shape``."""
        return RuleContext(self.engine, self.node, self.module.get_submodule(name), out_shape,
                           f"{self.scope}.{name}" if self.scope else name)

    def param(self, name: str) -> Optional[Sym]:
        """The Sym of the called module's parameter/buffer ``name`` (dotted for submodules), or None if unset."""
        obj = self.module
        for part in name.split("."):
            obj = getattr(obj, part, None)
        return self.engine.tensor_sym(obj) if isinstance(obj, torch.Tensor) else None

    def var(self, size: int, hint: str) -> tuple:
        """A new term: a free var named after this op (fixed if size <= 1)."""
        return T.fresh(size, f"{self.scope}.{hint}" if self.scope else hint)

    def unify(self, a, b) -> None:
        T.unify(a, b)

    def fix(self, *items, reason: str) -> bool:
        """Fix every var in the given Syms/terms on purpose (``reason``: why no permutation is a symmetry, e.g.
        "spatial positions"); no warning, the reason is logged (logger ``unf.spec``). Returns whether symmetry was
        given up."""
        lost = self._fix(items)
        if lost:
            _log.debug("node %r fixes axes on purpose: %s", self.node.name, reason)
        return lost

    def _fix(self, items) -> bool:
        lost = False
        for it in items:
            for term in (it.axes if isinstance(it, Sym) else [it]):
                lost |= T.fix(term)
        return lost

    def give_up(self, reason: str, *items) -> None:
        """Fix the given Syms/terms because this rule cannot prove a symmetry; warns (or raises if strict)."""
        if self._fix(items):
            self.engine.report(self.node, reason)

    def output(self, axes: Sequence, shape=None) -> Sym:
        shape = tuple(self.out_shape if shape is None else shape)
        if len(axes) != len(shape):
            raise RuntimeError(f"rule for node {self.node.name!r} gave {len(axes)} axis terms for shape {shape}")
        return Sym(shape, list(axes))

    def fixed_output(self, shapes=None):
        shapes = self.out_shape if shapes is None else shapes
        if shapes is None:
            return None
        if isinstance(shapes, tuple) and all(isinstance(n, int) for n in shapes):
            return _fixed_sym(shapes)
        if isinstance(shapes, dict):
            return {k: self.fixed_output(v) for k, v in shapes.items()}
        return tuple(self.fixed_output(s) for s in shapes)

    def deferred(self, shape, terms_to_fix: list, axes: list, stack: Optional[list] = None) -> Sym:
        """An output whose first use fixes ``terms_to_fix`` (argmax indices, an RNN's stacked per-layer states).

        ``stack``: for a tensor stacked along axis 0 from parts permuted differently, the last-axis term of each
        part; an integer index on axis 0 then picks a part without fixing anything.
        """
        return Sym(tuple(shape), list(axes), pending=list(terms_to_fix), stack=stack)

    def use(self, sym: Sym) -> None:
        """Mark ``sym`` as used (rules with ``lazy_inputs`` call this): apply deferred fixes, collapse slots."""
        _consume(sym)

    def use_pending(self, sym: Sym) -> None:
        """Apply ``sym``'s deferred fixes but keep its slots (for pure axis moves)."""
        _consume(sym, slots=False)


class _Tracer(fx.Tracer):
    """Keeps modules with a rule (and childless torch.nn modules) as single ops; remembers where tracing fails."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if parametrize.is_parametrized(m):  # trace through, so that the parametrization's own ops are seen
            return False
        if module_rule(m) is not None:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return m.__module__.startswith("torch.nn") and next(m.children(), None) is None

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def trace(model: nn.Module, example_inputs) -> fx.GraphModule:
    """Trace ``model`` with torch.fx and annotate every node with its output shape (``node.meta['tensor_meta']``)."""
    load_plugins()  # before tracing: torch.fx swaps functions marked with torch.fx.wrap for patched ones while tracing
    front = frontend(model)
    if front is not None:  # a plugin builds the graph for this model family (see registry.register_frontend)
        return front(model, example_inputs)
    tracer = _Tracer()
    name = type(model).__name__
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = f" inside submodule {tracer.stack[-1]!r}" if tracer.stack and tracer.stack[-1] else ""
        raise SpecInferenceError(
            f"torch.fx could not trace {name}{where}: {type(e).__name__}: {e}\n"
            "Spec inference needs a forward without data-dependent control flow. Either write the spec by hand with "
            "unf.WeightSpaceSpec.from_axes(...), or register a rule for the offending module with "
            "unf.register_module_rule(ModuleType) so that it is treated as one op (see unf.spec.registry).") from e
    gm = fx.GraphModule(tracer.root, graph, name)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()  # shapes only: never touch BatchNorm running statistics
    try:
        _propagate_shapes(gm, inputs)
    except Exception as e:
        cause = e.__cause__ or e
        raise SpecInferenceError(f"running {name} on the example inputs failed at node {_failed_node(e)}: "
                                 f"{type(cause).__name__}: {cause}. Pass example inputs the model accepts "
                                 "(shape and dtype).") from e
    finally:
        model.train(was_training)
    return gm


class _FakeShapeProp(ShapeProp):
    """ShapeProp under a fake mode that runs the module itself, not the copy ShapeProp's own fake mode makes.

    ``ShapeProp(gm, fake_mode=...)`` deep-copies the module with every parameter turned into a fake tensor: on
    EfficientNet-V2-S and MaxViT-T that copy was 40% of all spec inference. Here the real parameters stay and the
    fake mode (``allow_non_fake_inputs``) turns each into a fake tensor when an op first reads it, so no data is
    touched; what a forward stores in Python attributes (a cache of computed tensors, as LeViT keeps) is undone
    afterwards by :func:`_restoring_module_state`."""

    def __init__(self, gm: fx.GraphModule, fake_mode: FakeTensorMode):
        super().__init__(gm)  # no fake mode given (none is active): no copy
        self.fake_mode = fake_mode  # run_node and propagate use it when set


@contextlib.contextmanager
def _restoring_module_state(gm: fx.GraphModule):
    """Every submodule's attributes as they were before: the same objects, and dicts and lists with the same contents
    (a cache filled in place). Identity matters: a hook's handle removes it from the very dict it was added to."""
    containers = (dict, list, OrderedDict)
    saved = [(m, {k: (v, copy.copy(v) if type(v) in containers else None) for k, v in vars(m).items()})
             for m in gm.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            vars(m).clear()
            for k, (v, contents) in attrs.items():
                vars(m)[k] = v  # first: a failure below must not lose the remaining attributes
                if contents is None:  # not a plain container (subclasses are kept as they are)
                    continue
                if isinstance(v, dict):
                    v.clear()
                    v.update(contents)
                else:
                    v[:] = contents


def _meta_propagate(gm: fx.GraphModule, inputs: tuple) -> None:
    """Shapes on the meta device: every parameter, buffer and tensor attribute is swapped for a meta tensor (new
    dicts, so that :func:`_restoring_module_state` puts the real ones back), and the inputs too. Meta kernels compute
    shapes in C++ with no Python dispatch per op, several times cheaper than fake tensors; an op that reads data
    (``.item()``, ``nonzero``) or mixes in a tensor created on the CPU fails here, and the caller falls back."""
    def meta(t):
        return nn.Parameter(t.detach().to("meta"), t.requires_grad) if isinstance(t, nn.Parameter) else t.to("meta")

    for m in gm.modules():
        attrs = vars(m)
        attrs["_parameters"] = {k: None if p is None else meta(p) for k, p in attrs["_parameters"].items()}
        attrs["_buffers"] = {k: None if b is None else meta(b) for k, b in attrs["_buffers"].items()}
        for k, v in list(attrs.items()):
            if isinstance(v, torch.Tensor):  # constants torch.fx attached as plain attributes
                attrs[k] = meta(v)
    ShapeProp(gm).propagate(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs))


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """Meta tensors first, then fake tensors (shapes without arithmetic: cost independent of FLOPs), real tensors if
    that fails."""
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failed fake attempt is not the user's problem
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks itself
            try:
                with _restoring_module_state(gm):
                    _meta_propagate(gm, inputs)
                return
            except Exception:
                pass
            try:
                with _restoring_module_state(gm):
                    _FakeShapeProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
            except Exception:  # e.g. an op that mutates a parameter: fake copies of everything, then real tensors
                try:
                    ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
                except Exception:  # an op without a fake implementation (or a real error): run it for real
                    ShapeProp(gm).propagate(*inputs)
    finally:
        fake_log.setLevel(level)


def _failed_node(e: Exception) -> str:
    text = str(e)
    return repr(text.split("node=%", 1)[1].split(" ", 1)[0]) if "node=%" in text else "(unknown)"


def architecture_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The traced graph as a networkx DiGraph: nodes are fx nodes (attrs ``op``, ``target``, ``shape``)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node, op=node.op, target=node.target, shape=_meta_to_shapes(node.meta.get("tensor_meta")))
        for src in node.all_input_nodes:
            g.add_edge(src, node)
    return g


class _Inference:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, strict: bool):
        self.model, self.gm, self.strict = model, gm, strict
        self.shapes = {n: _meta_to_shapes(n.meta.get("tensor_meta")) for n in gm.graph.nodes}
        self.env: dict[fx.Node, Any] = {}
        self.reported: set[str] = set()
        # state_dict entries; tied tensors (same object under several keys) share one Sym
        sd = model.state_dict(keep_vars=True)
        self.keys = list(sd)
        self.key_sym: dict[str, Sym] = {}
        self.by_id: dict[int, Sym] = {}
        self.used: set[int] = set()
        self.initial_axes: dict[str, list] = {}
        for key, t in sd.items():
            if id(t) not in self.by_id:
                axes = [T.fresh(n) if t.is_floating_point() else T.fixed(n) for n in t.shape]
                self.by_id[id(t)] = Sym(tuple(t.shape), axes)
            self.key_sym[key] = self.by_id[id(t)]
            self.initial_axes[key] = list(self.key_sym[key].axes)

    # -- helpers for rules ---------------------------------------------------------------------------------------
    def tensor_sym(self, t: torch.Tensor) -> Sym:
        sym = self.by_id.get(id(t))
        if sym is None:  # a tensor outside the state_dict is never permuted
            return _fixed_sym(t.shape)
        self.used.add(id(t))
        return sym

    def report(self, node: fx.Node, reason: str) -> None:
        self.report_node(f"node {node.name!r} ({_describe(node)})", reason)

    def report_node(self, where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if msg in self.reported:
            return
        self.reported.add(msg)
        if self.strict:
            raise SpecInferenceError(msg + " (strict=True). Register a rule for it (unf.register_module_rule / "
                                           "register_function_rule / register_method_rule) or pass strict=False.")
        warnings.warn(msg + "; the axes it touches are kept fixed.", UnprovenSymmetryWarning, stacklevel=4)

    # -- the walk ------------------------------------------------------------------------------------------------
    def _load(self, value, consume: bool = True):
        """Node args -> Syms; using a tensor triggers its deferred fixes (not so for picking it out of a tuple)."""
        if isinstance(value, fx.Node):
            v = self.env[value]
            if consume:
                for s in _syms_in(v):
                    _consume(s)
            return v
        if isinstance(value, (tuple, list)):
            return type(value)(self._load(v, consume) for v in value)
        if isinstance(value, dict):
            return {k: self._load(v, consume) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self._load(value.start), self._load(value.stop), self._load(value.step))
        return value

    def run(self) -> None:
        for path, m in self.model.named_modules():
            if m._forward_hooks or m._forward_pre_hooks:
                self.report_node(f"module {path or type(m).__name__!r}", "has forward hooks, which torch.fx does not "
                                 "trace; what they do is not part of the inferred spec")
        try:
            for node in nx.topological_sort(architecture_graph(self.gm)):
                T.loss_hook = lambda reason, node=node: self.report(node, f"no rule proves this symmetry: {reason}")
                self.env[node] = self._step(node)
        finally:
            T.loss_hook = None

    def _step(self, node: fx.Node):
        shape = self.shapes.get(node)
        if node.op == "placeholder":
            return _fixed_sym(shape) if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape) \
                else RuleContext(self, node).fixed_output()
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return self.tensor_sym(obj) if isinstance(obj, torch.Tensor) else None
        if node.op == "output":
            for s in _syms_in(self._load(node.args)):
                for a in s.axes:
                    T.fix(a)
            return None
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "call_module":
            rule = module_rule(module)
        elif node.op == "call_method":
            rule = method_rule(node.target)
        else:
            rule = function_rule(node.target)
        # most rules see their inputs "used"; lazy ones (getitem, permute, ...) decide themselves
        consume = not getattr(rule, "lazy_inputs", False)
        args, kwargs = self._load(node.args, consume), self._load(node.kwargs, consume)
        ctx = RuleContext(self, node, module)
        if rule is None:
            return self._fallback(ctx, args, kwargs)
        return rule(ctx, *args, **kwargs)

    def _fallback(self, ctx: RuleContext, args, kwargs):
        if not _syms_in((args, kwargs)) and ctx.module is None:
            return ctx.fixed_output()  # no tensor input (a constant, a shape computation): nothing to prove
        touched = list(_syms_in((args, kwargs)))
        if ctx.module is not None:
            touched += [self.tensor_sym(t) for t in ctx.module.state_dict(keep_vars=True).values()]
        ctx.give_up("no spec rule for this op", *touched)
        return ctx.fixed_output()

    def _fixed_ids(self, resolved: dict) -> dict:
        """Fixed axes that were unified with each other before being fixed index the same units: label them."""
        owners: dict[T.Var, list] = {}
        for key in self.keys:
            for axis, (init, now) in enumerate(zip(self.initial_axes[key], resolved[key])):
                if not any(isinstance(f, T.Var) for seg in now for f in seg) and len(init) == 1 and len(init[0]) == 1 and isinstance(init[0][0], T.Var):
                    owners.setdefault(T.find(init[0][0]), []).append((key, axis))
        ids: dict[str, list] = {}
        for places in owners.values():
            if len({k for k, _ in places}) < 2:
                continue
            label = "{}:{}".format(*places[0])
            for key, axis in places:
                ids.setdefault(key, [None] * len(resolved[key]))[axis] = label
        return {k: tuple(v) for k, v in ids.items()}

    # -- result --------------------------------------------------------------------------------------------------
    def emit(self) -> WeightSpaceSpec:
        unused = []
        for key, t in self.model.state_dict(keep_vars=True).items():
            if id(t) not in self.used:  # never used in forward: keep it as it is
                unused += [key] if any([T.fix(a) for a in self.key_sym[key].axes]) else []  # fix all axes
        if unused:
            warnings.warn(f"state_dict entries {unused} are not used by the traced forward; they are kept fixed",
                          UnprovenSymmetryWarning, stacklevel=3)
        while True:
            try:
                resolved = {k: [T.resolve(a) for a in s.axes] for k, s in self.key_sym.items()}
                break
            except T.NotExpressible as e:
                T.fix(((e.var,),))
                self.report_node(f"group {e.var.hint or e.var!r}", "a concatenation inside a permuted product "
                                 "cannot be expressed in a spec")
        names = _group_names(self.keys, resolved)
        groups = {name: v.size for v, name in names.items()}
        fixed_ids = self._fixed_ids(resolved)
        sd = self.model.state_dict(keep_vars=True)
        buffers = {k for k, _ in self.model.named_buffers(remove_duplicate=False)}
        tensors = {k: TensorSpec(self.key_sym[k].shape, tuple(_entry(t, names) for t in resolved[k]),
                                 sd[k].is_floating_point(), fixed_ids.get(k), k in buffers) for k in self.keys}
        return WeightSpaceSpec(groups, tensors)


def _group_names(keys: list[str], resolved: dict) -> dict:
    """Readable, unique group names: a rule's hint, else the module whose output axis the group first permutes."""
    candidates: dict[T.Var, list] = {}
    for key in keys:
        mod = key.rpartition(".")[0] or key
        for axis, term in enumerate(resolved[key]):
            for seg in term:
                for j, f in enumerate(seg):
                    if isinstance(f, T.Var):
                        whole = len(term) == 1 and len(seg) == 1
                        rank = (0 if axis == 0 and len(resolved[key]) > 1 else 1, 0 if whole else 1)
                        name = mod if whole and axis == 0 else f"{mod}.{'out' if axis == 0 else f'in{axis}'}"
                        candidates.setdefault(f, []).append((rank, name if whole else f"{name}.f{j}"))
    names, used = {}, set()
    for v, cands in candidates.items():
        base = v.hint or min(cands, key=lambda c: c[0])[1]
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        names[v] = used.add(name) or name
    return names


def _entry(term, names):
    def seg_entry(seg):
        if all(isinstance(f, int) for f in seg):
            return T.segment_size(seg)
        if len(seg) == 1:
            return names[seg[0]]
        return tuple(names[f] if isinstance(f, T.Var) else f for f in seg)

    if all(isinstance(f, int) for seg in term for f in seg):
        return None
    if len(term) == 1:
        return seg_entry(term[0])
    return [seg_entry(s) for s in term]


def _describe(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    where = f" in module {next(reversed(stack.values()))[0]!r}" if stack and node.op != "call_module" else ""
    return _describe_op(node) + where


def _describe_op(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    t = node.target
    return f"function {getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}".replace("function .", "function ")


def spec_from_module(model: nn.Module, example_inputs, strict: bool = False) -> WeightSpaceSpec:
    """Infer the largest permutation symmetry of ``model``'s state_dict that the rules can prove.

    ``example_inputs``: a tensor or a tuple of positional inputs, used to propagate shapes. Ops without a rule, and
    ops whose axis structure the rules cannot follow (a reshape that regroups factors), keep the axes they touch fixed
    and emit an :class:`UnprovenSymmetryWarning` naming the node; ``strict=True`` raises :class:`SpecInferenceError`
    instead. Network inputs and outputs are never permuted.
    """
    gm = trace(model, example_inputs)
    engine = _Inference(model, gm, strict)
    engine.run()
    return engine.emit()
