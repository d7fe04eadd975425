"""The learned update rule: a weight-space network over (param, grad, momenta, ...) on top of an Adam base.

For every parameter tensor ``p`` with gradient ``g``::

    m_k <- d_k m_k + (1 - d_k) g          (momenta at decays d_k, default 0.5, 0.9, 0.99)
    v   <- b2 v + (1 - b2) g^2
    base = m_0.9 / (1 - 0.9^t) / (sqrt(v / (1 - b2^t)) + eps)        (Adam's direction)
    p   <- p - lr * alpha * (base + beta * f)      (beta * f rescaled per tensor to at most trust * RMS(base))

``f`` is an equivariant network (:class:`~unf.nn.shared.SharedUNFLinear` layers, so one set of meta-weights fits
every architecture) over the per-tensor RMS-normalised, clipped features ``p, g, m_k, sqrt(v), base`` and the time
features ``tanh(t / s)``. Its last layer starts at zero: the untrained rule *is* its base (Adam with step ``alpha``).
Variants behind the same interface: ``"unf"`` (full shared basis), ``"deepsets"`` (each entry plus its tensor's mean)
and ``"mlp"`` (each entry alone: a per-parameter MLP).

Everything here works on batches of weight sets (``WeightSpace[B, ...]``): the optimizer uses ``B = 1``; meta-training
uses one batch member per perturbation of the meta-weights (stacked parameters, one tensor op for all).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from ..nn.shared import SharedPlan, SharedUNFLinear

FORMAT = "unf.optim.LearnedRule"
FORMAT_VERSION = 1
VARIANTS = {"unf": "unf", "deepsets": "deepsets", "mlp": "pointwise", "unf-exact": "unf"}  # variant -> basis


@dataclass
class RuleConfig:
    """Hyperparameters of a learned rule (stored as JSON in the weights file)."""
    variant: str = "unf"
    hidden: int = 8
    depth: int = 2  # hidden layers
    hyper_hidden: int = 16
    decays: tuple = (0.5, 0.9, 0.99)
    beta2: float = 0.999
    eps: float = 1e-8
    time_scales: tuple = (10.0, 100.0, 1000.0)
    clip: float = 10.0
    alpha: float = 1e-3  # initial step size (learned as log_alpha)
    beta: float = 1.0
    trust: float = 1.0  # per tensor, RMS(beta * f) <= trust * RMS(base); 0: unbounded

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r}: choose from {sorted(VARIANTS)}")
        self.decays, self.time_scales = tuple(self.decays), tuple(self.time_scales)
        if 0.9 not in self.decays:
            raise ValueError(f"decays {self.decays} must include 0.9 (the base's momentum)")

    @property
    def in_channels(self) -> int:
        return 4 + len(self.decays) + len(self.time_scales)  # p, g, m_k..., sqrt(v), base, time


class LearnedRule(nn.Module):
    """The meta-learned part of the optimizer: ``f`` and ``log_alpha``. Its parameters fit every spec, except with
    ``variant="unf-exact"``: one coefficient matrix per basis term of ``spec`` (the UNF paper's per-pair layer, for
    that one architecture; its weights file stores the spec)."""

    def __init__(self, config: Optional[RuleConfig] = None, spec: Optional[WeightSpaceSpec] = None, **kw):
        super().__init__()
        self.config = config if config is not None else RuleConfig(**kw)
        c, basis = self.config, VARIANTS[self.config.variant]
        self.spec, table = None, None
        if c.variant == "unf-exact":
            if spec is None:
                raise ValueError("variant 'unf-exact' is made for one architecture: pass its spec")
            self.spec, self._exact_plan = spec, SharedPlan(spec, basis, exact=True)
            table = len(self._exact_plan.descriptors)
        widths = [c.in_channels] + [c.hidden] * c.depth
        self.layers = nn.ModuleList(SharedUNFLinear(a, b, basis, c.hyper_hidden, table=table)
                                    for a, b in zip(widths, widths[1:]))
        self.out = SharedUNFLinear(widths[-1], 1, basis, c.hyper_hidden, zero_init=True, table=table)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(c.alpha)))

    def plan(self, spec: WeightSpaceSpec) -> SharedPlan:
        if self.spec is None:
            return SharedPlan(spec, VARIANTS[self.config.variant])
        if spec != self.spec:
            raise ValueError("these 'unf-exact' learned-optimizer weights fit only the architecture they were "
                             f"meta-trained on ({len(self.spec)} tensors, groups {dict(self.spec.groups)}); use the "
                             "shipped 'unf' weights, or meta-train for this model")
        return self._exact_plan

    def forward(self, feats: WeightSpace, plan: SharedPlan) -> tuple[WeightSpace, torch.Tensor]:
        """``f`` ``[B, in_channels] -> [B, 1]`` and ``log_alpha`` (``[]``, or ``[B]`` with stacked parameters)."""
        h = feats
        for layer in self.layers:
            h = layer(h, plan).map(F.relu)
        return self.out(h, plan), self.log_alpha

    # -- the weights file: safetensors with the configuration in its metadata ------------------------------------------
    def save(self, path) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_write

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(asdict(self.config)),
                **({"spec": self.spec.to_json()} if self.spec is not None else {})}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path) -> "LearnedRule":
        from pathlib import Path

        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"learned-optimizer weights {str(path)!r} do not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: could not be read as safetensors ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a unf learned-optimizer weights file (metadata 'format' is "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        if meta.get("version") != str(FORMAT_VERSION):
            raise ValueError(f"{path}: weights format version {meta.get('version')!r}; this unf reads {FORMAT_VERSION}")
        try:
            spec = WeightSpaceSpec.from_json(meta["spec"]) if "spec" in meta else None
            rule = cls(RuleConfig(**json.loads(meta["config"])), spec=spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: its configuration (metadata 'config') is missing or invalid: {e}") from None
        try:
            rule.load_state_dict(tensors)
        except RuntimeError as e:
            raise ValueError(f"{path}: tensors do not fit the stored configuration: {e}") from None
        return rule


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the entries of each batch member and channel of ``[B, C, ...]``, kept broadcastable."""
    return x.reshape(*x.shape[:2], -1).pow(2).mean(2).sqrt().view(*x.shape[:2], *[1] * (x.dim() - 2))


def init_state(p: WeightSpace, num_decays: int) -> dict:
    """Zero optimizer state for weight sets ``p`` ``[B, 1]``: momenta ``m`` ``[B, K]`` and ``v`` ``[B, 1]``."""
    return {"m": p.map(lambda t: t.new_zeros(t.shape[0], num_decays, *t.shape[2:])), "v": p.map(torch.zeros_like)}


def step_direction(rule: LearnedRule, plan: SharedPlan, p: WeightSpace, g: WeightSpace, state: dict,
                   t: Union[int, Mapping[str, int]], params: Optional[Mapping[str, torch.Tensor]] = None
                   ) -> tuple[WeightSpace, dict]:
    """One update of the rule: the direction ``alpha * (base + beta * f)`` (to be scaled by ``-lr``) and the new state.

    ``p``, ``g``: ``[B, 1]``; ``state``: as :func:`init_state`; ``t``: the step number (1-based), or one per tensor.
    The state is not changed in place. Computed in ``p``'s dtype; the rule must be in that dtype and on that device.
    ``params``: the rule's parameters stacked ``[B, ...]`` (one set per batch member), instead of its own."""
    c = rule.config
    names = p.spec.float_names
    steps = {n: t for n in names} if isinstance(t, int) else dict(t)
    d = torch.tensor(c.decays, dtype=p.dtype, device=p.device)
    k = c.decays.index(0.9)
    m, v, base, feats = {}, {}, {}, {}
    for n in names:
        gn, tn = g[n], steps[n]
        bshape = (1, -1) + (1,) * (gn.dim() - 2)
        m[n] = state["m"][n] * d.view(bshape) + gn * (1 - d).view(bshape)
        v[n] = state["v"][n] * c.beta2 + (1 - c.beta2) * gn * gn
        base[n] = (m[n][:, k:k + 1] / (1 - 0.9 ** tn)) / ((v[n] / (1 - c.beta2 ** tn)).sqrt() + c.eps)
        raw = torch.cat([p[n], gn, m[n], v[n].sqrt(), base[n]], 1)
        rms = _rms(raw) + 1e-30
        times = torch.tensor([math.tanh(tn / s) for s in c.time_scales], dtype=p.dtype, device=p.device)
        feats[n] = torch.cat([(raw / rms).clamp(-c.clip, c.clip),
                              times.view(bshape).expand(raw.shape[0], -1, *raw.shape[2:])], 1)
    args = (WeightSpace(p.spec, feats), plan)
    f, log_alpha = rule(*args) if params is None else torch.func.functional_call(rule, dict(params), args)
    alpha = log_alpha.exp()  # [] or, with stacked meta-weights, [B]
    direction = {}
    for n in names:
        learned = c.beta * f[n]
        if c.trust > 0:  # the learned term never outgrows the base step (per tensor: invariant, so equivariant)
            learned = learned * (c.trust * _rms(base[n]) / (_rms(learned) + 1e-30)).clamp(max=1.0)
        direction[n] = alpha.reshape(-1, *[1] * (base[n].dim() - 1)) * (base[n] + learned)
    direction = WeightSpace(p.spec, direction)
    return direction, {"m": WeightSpace(p.spec, m), "v": WeightSpace(p.spec, v)}


__all__ = ["FORMAT", "LearnedRule", "RuleConfig", "VARIANTS", "init_state", "step_direction"]
