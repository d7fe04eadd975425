"""Registry of spec-inference rules, keyed by module type, function or tensor-method name.

A rule says how one op moves axis terms from its inputs to its output (see :mod:`unf.spec.rules`)::

    @unf.register_module_rule(MyLayer)
    def my_layer(ctx, x):                  # ctx: unf.spec.infer.RuleContext; x: a Sym (shape + axis terms)
        w = ctx.param("weight")
        ctx.unify(x.axes[-1], w.axes[1])
        return ctx.output([*x.axes[:-1], w.axes[0]])

A rule that fixes axes on purpose says why: ``ctx.fix(x.axes[2], reason="spatial positions")`` (logged, no warning);
one that cannot prove a symmetry calls ``ctx.give_up(reason, *syms)`` (an ``UnprovenSymmetryWarning``).

Third-party packages register rules through the entry-point group ``unf.spec_rules``: each entry point names a
callable taking no arguments that registers its rules; it is loaded once, on the first inference.
"""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Callable, Optional

import torch.nn as nn

ENTRY_POINT_GROUP = "unf.spec_rules"

_module_rules: dict[type, Callable] = {}
_named_module_rules: dict[str, Callable] = {}  # dotted class name -> rule
_function_rules: dict[Callable, Callable] = {}
_method_rules: dict[str, Callable] = {}
_frontends: dict = {}  # type or dotted class name -> front end
_plugins_loaded = False


def register_module_rule(*module_types) -> Callable:
    """Decorator: ``rule(ctx, *args, **kwargs)`` handles calls of these module types (they become leaves).

    A type may be given as its dotted name (``"timm.models.levit.Attention"``: module and qualified name), so that a
    plugin need not import a heavy library when it is loaded, before any of its models is seen."""
    def deco(rule):
        for t in module_types:
            (_named_module_rules if isinstance(t, str) else _module_rules)[t] = rule
        return rule
    return deco


def register_function_rule(*functions: Callable) -> Callable:
    """Decorator: ``rule(ctx, *args, **kwargs)`` handles calls of these functions (``torch.*``, ``F.*``, operators)."""
    def deco(rule):
        for f in functions:
            _function_rules[f] = rule
        return rule
    return deco


def register_method_rule(*names: str) -> Callable:
    """Decorator: ``rule(ctx, self, *args, **kwargs)`` handles ``tensor.<name>(...)`` calls."""
    def deco(rule):
        for n in names:
            _method_rules[n] = rule
        return rule
    return deco


def register_frontend(*module_types) -> Callable:
    """Decorator: ``frontend(model, example_inputs) -> torch.fx.GraphModule`` builds the graph that inference walks
    for models of these types (and their subclasses) instead of torch.fx's symbolic trace.

    A type may be given as its dotted name (``"transformers.modeling_utils.PreTrainedModel"``), so that a plugin need
    not import a heavy library when it is loaded, before any of its models is seen. The graph's nodes must carry
    ``meta['tensor_meta']`` (shapes), and its ``get_attr`` nodes must resolve to the model's own ``state_dict``
    tensors (the same objects), so that inference knows which entry each one is. A plugin uses this for model
    families that torch.fx cannot trace (``unf-transformers``: Hugging Face models)."""
    def deco(fn):
        for t in module_types:
            _frontends[t] = fn
        return fn
    return deco


def frontend(model: nn.Module) -> Optional[Callable]:
    """The front end registered for ``model``'s class or one of its bases (by type or dotted name), if any."""
    load_plugins()
    if not _frontends:
        return None
    for cls in type(model).__mro__:
        fn = _frontends.get(cls) or _frontends.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn
    return None


def module_rule(module: nn.Module) -> Optional[Callable]:
    """The rule for a module, looked up along its class hierarchy.

    A subclass inherits a rule only if it does not override ``forward`` (otherwise it computes something else).
    """
    load_plugins()
    for cls in type(module).__mro__:
        rule = _module_rules.get(cls)
        if rule is None and _named_module_rules:
            rule = _named_module_rules.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


def function_rule(fn: Callable) -> Optional[Callable]:
    load_plugins()
    return _function_rules.get(fn)


def method_rule(name: str) -> Optional[Callable]:
    load_plugins()
    return _method_rules.get(name)


def load_plugins() -> list[str]:
    """Load architecture-spec plugins from the ``unf.spec_rules`` entry points (once); returns their names."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
            loaded.append(ep.name)
        except Exception as e:  # a broken plugin must not break inference for everyone else
            warnings.warn(f"unf: could not load spec plugin {ep.name!r} ({ep.value}): {e}", RuntimeWarning)
    return loaded
