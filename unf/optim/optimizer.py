"""``UNFOptimizer``: a ``torch.optim.Optimizer`` whose update is a learned equivariant network over the model's spec."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

from ..nn.shared import SharedUNFLinear
from ..spec import TensorSpec, WeightSpaceSpec
from .rule import CompiledRule, LearnedRule, flat_step, segment_index

DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "default.safetensors"
# SHA-256 of the shipped file: loading "default" checks it, so a damaged or swapped file is refused
DEFAULT_SHA256 = "c698c657150c5e30252199fbbae89f06c164a4f87d46873ac6c3f7a921081359"


def load_rule(weights: Union[str, Path, nn.Module, None]) -> LearnedRule:
    """``"default"`` (the shipped meta-weights, hash-checked), a safetensors path, or a :class:`LearnedRule`."""
    if isinstance(weights, LearnedRule):
        return weights
    if isinstance(weights, nn.Module):
        raise TypeError(f"weights: expected a unf.optim.LearnedRule module, got {type(weights).__name__}")
    if weights is None or weights == "default":
        digest = hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest() if DEFAULT_WEIGHTS.is_file() else None
        if digest is None or (DEFAULT_SHA256 is not None and digest != DEFAULT_SHA256):
            raise RuntimeError(f"the shipped learned-optimizer weights {DEFAULT_WEIGHTS} are missing or damaged "
                               f"(SHA-256 {digest}, expected {DEFAULT_SHA256}); reinstall unf")
        return LearnedRule.load(DEFAULT_WEIGHTS)
    return LearnedRule.load(weights)


def _fixed_spec(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {n: TensorSpec(tuple(t.shape), (None,) * t.dim()) for n, t in tensors.items()}


class UNFOptimizer(torch.optim.Optimizer):
    """A learned optimizer: ``p <- p - lr * alpha * (adam_direction + beta * f(p, g, momenta, t))``, with ``f`` an
    equivariant network over the model's weight space (see :mod:`unf.optim.rule`).

    Args:
        params: ``model.named_parameters()`` (names matched to ``spec``), or param groups (dicts whose ``"params"``
            are named pairs), or plain parameters (then every tensor is treated on its own: a warning says so).
        spec: the model's :class:`~unf.WeightSpaceSpec` (its parameters-only part is used; buffers and tied
            duplicates drop out). Parameters it does not cover are treated as tensors whose axes are all fixed.
        weights: ``"default"`` (meta-weights shipped in the package; nothing is downloaded), a path to a weights file
            written by ``unf lopt meta-train`` / :meth:`LearnedRule.save`, or a :class:`LearnedRule`.
        lr: a multiplier of the learned step size (1.0: as meta-trained); LR schedulers drive it.
        compile: run the rule through ``torch.compile`` (one graph per parameter set; the compile, tens of seconds on
            a CPU, is paid at the first step and not again). If compiling fails, a warning says so and the optimizer
            steps eagerly from then on.

    ``step(closure=None, loss=None)`` returns the closure's loss (``loss`` is accepted for wrappers that pass one on).
    Parameters without a gradient are skipped; a tensor whose gradient is not finite is skipped with a warning and its
    state left as it was. State (momenta, step counts) follows each parameter's device and dtype.
    """

    def __init__(self, params: Iterable, spec: Optional[WeightSpaceSpec] = None,
                 weights: Union[str, Path, nn.Module, None] = "default", lr: float = 1.0, compile: bool = False):
        if lr < 0:
            raise ValueError(f"lr {lr} must be >= 0")
        groups = list(params)
        if not groups:
            raise ValueError("UNFOptimizer got an empty parameter list")
        self.spec = spec
        self._names: dict[int, str] = {}  # id(param) -> name in the spec (unnamed ones: "param<k>")
        self._unnamed = False
        super().__init__(groups if isinstance(groups[0], dict) else [{"params": groups}], dict(lr=lr))
        if self._unnamed or spec is None:
            warnings.warn("UNFOptimizer: no parameter names or no spec, so each parameter tensor is treated on its "
                          "own (no symmetry shared between tensors); pass model.named_parameters() with spec=..., or "
                          "use UNFOptimizer.for_model(model, example_inputs)", UserWarning, stacklevel=2)
        elif not any(n in spec for n in self._names.values()):
            raise ValueError(f"no parameter name is in the spec (parameters {list(self._names.values())[:4]}..., spec "
                             f"{spec.names[:4]}...): a wrapper such as DDP prefixes names with 'module.'; build the "
                             "spec from the same module whose named_parameters() you pass")
        self.rule = load_rule(weights)
        self._rules: dict = {}  # (device, dtype) -> rule copy
        self._plans: dict = {}  # tuple of names -> (spec, plan)
        self._flat: dict = {}  # device -> _FlatState
        self._compiled = CompiledRule() if compile else None
        if self.rule.spec is not None:  # weights for one architecture: check it now, not at the first step
            tensors = {self._names[id(p)]: p for g in self.param_groups for p in g["params"]}
            self._plan(tuple(tensors), tensors)

    def add_param_group(self, group: dict) -> None:
        """torch.optim's ``add_param_group``; its ``"params"`` may be named pairs ``(name, param)``."""
        group = dict(group)
        items = list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        named = bool(items) and all(isinstance(it, tuple) and len(it) == 2 for it in items)
        for i, it in enumerate(items):
            n, p = it if named else (None, it)
            if n is None:
                self._unnamed = True
                n = f"param{len(self._names)}"
            if self.spec is not None and n in self.spec and tuple(self.spec[n].shape) != tuple(p.shape):
                raise ValueError(f"parameter {n!r} has shape {tuple(p.shape)} but the spec says "
                                 f"{tuple(self.spec[n].shape)}: is the spec for this model?")
            self._names[id(p)] = n
            items[i] = p
        group["params"] = items
        super().add_param_group(group)

    @classmethod
    def for_model(cls, model: nn.Module, example_inputs, weights="default", **kw) -> "UNFOptimizer":
        """Infer ``model``'s spec from ``example_inputs`` and optimise all its parameters."""
        from ..spec import spec_from_module

        return cls(model.named_parameters(), spec=spec_from_module(model, example_inputs), weights=weights, **kw)

    def _plan(self, names: tuple, tensors: dict):
        if names not in self._plans:
            covered = [n for n in names if self.spec is not None and n in self.spec]
            sub = self.spec.subset(covered) if covered else WeightSpaceSpec({}, {})
            ts = {**{n: sub[n] for n in covered}, **_fixed_spec({n: tensors[n] for n in names if n not in sub})}
            spec = WeightSpaceSpec(sub.groups, {n: ts[n] for n in names})
            self._plans[names] = (spec, self.rule.plan(spec))
        return self._plans[names]

    def _rule_for(self, device, dtype) -> LearnedRule:
        key = (str(device), dtype)
        if key not in self._rules:
            rule = copy.deepcopy(self.rule).to(device=device, dtype=dtype).requires_grad_(False)
            for m in rule.modules():  # a private frozen copy: its coefficients are computed once per plan
                if isinstance(m, SharedUNFLinear):
                    m.cache_coefficients = True
            self._rules[key] = rule
        return self._rules[key]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, loss=None):
        out = None
        if closure is not None:
            with torch.enable_grad():
                out = closure()
        by_device: dict = {}
        bad = []
        stepped = [(p, g["lr"]) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in stepped:
            if p.grad.is_sparse:
                raise RuntimeError(f"UNFOptimizer does not support sparse gradients ({self._names[id(p)]!r})")
        # one max-norm per gradient in one foreach kernel and one host sync (a NaN or inf propagates into it)
        finite = _all_finite([p.grad for p, _ in stepped])
        for (p, lr), ok in zip(stepped, finite):
            if not ok:
                bad.append(self._names[id(p)])
                continue
            by_device.setdefault(p.device, []).append((self._names[id(p)], p, lr))
        if bad:
            warnings.warn(f"UNFOptimizer: non-finite gradients in {bad}; their step is skipped", RuntimeWarning,
                          stacklevel=2)
        for device, items in by_device.items():
            self._step_device(device, items)
        return out

    def _step_device(self, device, items: list) -> None:
        dtype = torch.float64 if all(p.dtype == torch.float64 for _, p, _ in items) else torch.float32
        rule = self._rule_for(device, dtype)
        tensors = {n: p for n, p, _ in items}
        spec, plan = self._plan(tuple(tensors), tensors)
        flat = self._flat_state(device, dtype, spec, [p for _, p, _ in items], len(rule.config.decays))
        params = [p for _, p, _ in items]
        cat = lambda ts: torch.cat([t.reshape(1, -1).to(dtype) for t in ts], 1)  # noqa: E731
        args = (rule, plan, cat(params), cat([p.grad for p in params]), flat.m[None].to(dtype), flat.v[None].to(dtype),
                [s + 1 for s in flat.steps])
        direction, m, v = flat_step(*args, index=flat.index, compiled=self._compiled)
        flat.m.copy_(m[0])
        flat.v.copy_(v[0])
        flat.steps = [s + 1 for s in flat.steps]
        for (_, p, _), s in zip(items, flat.steps):
            self.state[p]["step"].fill_(s)
        parts = [d.view(p.shape).to(p.dtype) for d, p in zip(direction[0].split(flat.sizes), params)]
        lrs = [lr for _, _, lr in items]
        if len(set(lrs)) == 1:
            torch._foreach_add_(params, parts, alpha=-lrs[0])
        else:
            for p, d, lr in zip(params, parts, lrs):
                p.add_(d, alpha=-lr)

    def _flat_state(self, device, dtype, spec: WeightSpaceSpec, params: list, k: int) -> "_FlatState":
        """The momenta of ``params`` in one flat buffer per device; ``self.state[p]["m"]``/``["v"]`` are views of it.
        Rebuilt (copying the per-parameter state in) when the set of parameters stepped changes or a state was
        replaced (``load_state_dict``). Stored in the parameters' dtype when they share one (as torch.optim does),
        else in the compute dtype; computed in float32 (float64 when every parameter is)."""
        flat = self._flat.get(device)
        store = params[0].dtype if all(p.dtype == params[0].dtype for p in params) else dtype
        if flat is not None and flat.m.dtype == store and len(flat.params) == len(params) and all(
                a is b for a, b in zip(flat.params, params)) and all(
                self.state[p].get("m") is mv for p, mv in zip(params, flat.m_views)):
            return flat
        sizes = [p.numel() for p in params]
        flat = _FlatState(params, sizes, torch.zeros(k, sum(sizes), device=device, dtype=store),
                          torch.zeros(sum(sizes), device=device, dtype=store), segment_index(sizes, device))
        for p, m, v in zip(params, flat.m.split(sizes, 1), flat.v.split(sizes)):
            st = self.state[p]
            if st:  # carry the existing state over (a load_state_dict, or a parameter set that changed)
                m.copy_(st["m"].reshape(k, -1))
                v.copy_(st["v"].reshape(-1))
            else:
                st["step"] = torch.tensor(0.0)
            st["m"], st["v"] = m.view(k, *p.shape), v.view(p.shape)
            flat.m_views.append(st["m"])
            flat.steps.append(int(st["step"].item()))
        self._flat[device] = flat
        return flat


def _all_finite(tensors: list) -> list[bool]:
    """For every tensor: are all its entries finite? (One host sync per device and dtype.)"""
    out = [True] * len(tensors)
    by_device: dict = {}
    for i, t in enumerate(tensors):
        if t.numel():  # an empty tensor is finite (and has no max-norm)
            by_device.setdefault((t.device, t.dtype), []).append(i)
    for idx in by_device.values():
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in idx], float("inf")))
        for i, ok in zip(idx, torch.isfinite(norms).tolist()):
            out[i] = ok
    return out


@dataclass
class _FlatState:
    params: list
    sizes: list
    m: torch.Tensor  # [K, N]
    v: torch.Tensor  # [N]
    index: torch.Tensor  # [N]: the tensor of every entry
    m_views: list = field(default_factory=list)
    steps: list = field(default_factory=list)


__all__ = ["DEFAULT_WEIGHTS", "UNFOptimizer", "load_rule"]
