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
from ..weights import WeightSpace, segment_sizes
from ..nn.compiled import Compiled
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

    @classmethod
    def exact_from(cls, rule: "LearnedRule", spec: WeightSpaceSpec) -> "LearnedRule":
        """The ``"unf-exact"`` rule for ``spec`` that takes the same steps as the shared ``"unf"`` ``rule`` on it (to
        float rounding): each term's coefficient matrix ``[C_out, C_in]`` is the hypernetwork's output for the term's
        descriptor, times the shared plan's term scale over the exact plan's. A warm start for meta-training a
        per-architecture rule from shared (e.g. the shipped) weights."""
        if rule.config.variant != "unf":
            raise ValueError(f"exact_from: needs a shared 'unf' rule, got variant {rule.config.variant!r}")
        exact = cls(RuleConfig(**{**asdict(rule.config), "variant": "unf-exact"}), spec=spec).to(
            rule.log_alpha.device, rule.log_alpha.dtype)
        shared, plan = rule.plan(spec), exact._exact_plan
        # both plans enumerate the same terms in the same order; only their descriptor ids and scales differ
        ratio = shared.term_scale / plan.term_scale  # [T]
        with torch.no_grad():
            for src, dst in zip([*rule.layers, rule.out], [*exact.layers, exact.out]):
                coef = src.coefficients(shared)[shared.term_desc]  # [T, C_out, C_in]
                dst.table[plan.term_desc] = (coef * ratio.to(coef)[:, None, None]).flatten(1).to(dst.table)
            exact.log_alpha.copy_(rule.log_alpha)
        return exact.requires_grad_(rule.log_alpha.requires_grad)

    def forward(self, feats: WeightSpace, plan: SharedPlan, times: Optional[torch.Tensor] = None
                ) -> tuple[WeightSpace, torch.Tensor]:
        """``f`` ``[B, in_channels] -> [B, 1]`` and ``log_alpha`` (``[]``, or ``[B]`` with stacked parameters).
        ``times`` ``[S, T]``: the time features as per-tensor constants (see ``SharedUNFLinear``'s ``const``); then
        ``feats`` carries the other ``in_channels - S`` channels."""
        h, const = feats, None if times is None else times[None]
        for layer in self.layers:
            h, const = layer(h, plan, const).map(F.relu), None
        return self.out(h, plan, const), self.log_alpha

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


def init_state(p: WeightSpace, num_decays: int) -> dict:
    """Zero optimizer state for weight sets ``p`` ``[B, 1]``: momenta ``m`` ``[B, K]`` and ``v`` ``[B, 1]``."""
    return {"m": p.map(lambda t: t.new_zeros(t.shape[0], num_decays, *t.shape[2:])), "v": p.map(torch.zeros_like)}


def _per_tensor_rms(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``[B, C, N]`` (tensors of ``sizes`` one after another) -> RMS of every tensor and channel, ``[B, C, T]``."""
    return torch.stack([torch.linalg.vector_norm(part, dim=2) / math.sqrt(n)
                        for part, n in zip(x.split(sizes, dim=2), sizes)], 2)


_SEGMENT_LOOP = 16  # flat_features scales up to this many tensors slice by slice (more: one expanded multiplication)


def _expand(v: torch.Tensor, sizes: list[int], index: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-tensor values ``[..., T]`` -> per-entry ``[..., N]`` (``index``: the tensor of each entry, cached)."""
    return v.expand(*v.shape[:-1], sum(sizes)) if len(sizes) == 1 else v.index_select(-1, index)


def flat_step(rule: LearnedRule, plan: SharedPlan, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
              v: torch.Tensor, t: Union[int, list[int]], params: Optional[Mapping[str, torch.Tensor]] = None,
              index: Optional[torch.Tensor] = None, compiled: Optional["CompiledRule"] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One update of the rule on flat buffers (every tensor of ``plan``'s spec flattened, in spec order).

    ``p``, ``g``, ``v``: ``[B, N]``; ``m``: ``[B, K, N]``; ``t``: the step number (1-based), or one per tensor.
    Returns the direction ``alpha * (base + beta * f)`` ``[B, N]`` (to be scaled by ``-lr``) and the new ``m``, ``v``
    (the inputs are not changed). ``index``: ``[N]`` long, the tensor of every entry (pass it to save building it
    each step). ``params``: the rule's parameters stacked ``[B, ...]`` (one set per batch member). ``compiled``: a
    :class:`CompiledRule` to run instead of the eager :func:`flat_core`."""
    c = rule.config
    sizes = segment_sizes(plan.layout.spec)
    if len(sizes) > 1 and index is None:
        index = segment_index(sizes, p.device)
    steps = [t] * len(sizes) if isinstance(t, int) else list(t)
    if len(set(steps)) == 1:  # one step count: the bias corrections are scalars
        bc1 = p.new_tensor(1 / (1 - 0.9 ** steps[0]))
        sbc2 = p.new_tensor(math.sqrt(1 / (1 - c.beta2 ** steps[0])))
    else:
        bc1 = _expand(p.new_tensor([1 / (1 - 0.9 ** s) for s in steps]), sizes, index)
        sbc2 = _expand(p.new_tensor([math.sqrt(1 / (1 - c.beta2 ** s)) for s in steps]), sizes, index)
    times = p.new_tensor([[math.tanh(s / ts) for s in steps] for ts in c.time_scales])  # [S, T]
    plan.tensors(p.device, p.dtype)  # fill the plan's cache here, so that a compiled rule traces one graph, not two
    return (compiled or flat_core)(rule, plan, p, g, m, v, bc1, sbc2, times, index, params)


def flat_features(rule: LearnedRule, plan: SharedPlan, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
                  v: torch.Tensor, bc1: torch.Tensor, sbc2: torch.Tensor, times: torch.Tensor,
                  index: Optional[torch.Tensor], normalise: bool = True) -> tuple:
    """The rule's inputs: ``feats`` ``[B, 4 + K + S, N]`` (``p, g, m_k..., sqrt(v), base``, each RMS-normalised per
    tensor and clipped, then the time features), Adam's direction ``base`` ``[B, N]``, its per-tensor RMS ``[B, T]``,
    the new ``m``, ``v``, and ``None``. Adam's bias corrections ``bc1`` and ``sqrt(bc2)`` are ``[]`` or ``[N]``;
    ``times`` ``[S, T]``. ``normalise=False`` leaves the first ``4 + K`` channels raw and returns their per-tensor
    reciprocal RMS ``[B, 4 + K, T]`` last, for :func:`flat_head` to apply. Where the plan allows it
    (``plan.constant_channels``) the time features are not written: ``feats`` is ``[B, 4 + K, N]`` and the network
    takes ``times`` as per-tensor constants."""
    c, sizes = rule.config, segment_sizes(plan.layout.spec)
    k, nk, nt = c.decays.index(0.9), len(c.decays), times.shape[0]
    # every input channel is written once into one [B, 4 + K + S, N] buffer and normalised there in place: with
    # 17 stacked members of a 26k-parameter MLP (PES meta-training) the concatenations and the [B, C, N] expansion
    # of the per-tensor scales were fresh 12-17 MB tensors each step, and the features cost 3.3x this (pes_step.py)
    if plan.constant_channels:  # the network takes the time features per tensor (3 of 10 channels never written)
        nt = 0
    feats = p.new_empty(p.shape[0], 4 + nk + nt, p.shape[1])
    feats[:, 0], feats[:, 1] = p, g
    d = torch.tensor(c.decays, dtype=p.dtype, device=p.device).view(1, -1, 1)
    v = torch.lerp(g * g, v, c.beta2)
    if normalise:  # the buffer is normalised in place below: the state and the base must not live in it
        m = torch.lerp(g[:, None], m, d)  # d m + (1 - d) g
        feats[:, 2:2 + nk] = m
        sv = v.sqrt()
        feats[:, 2 + nk] = sv
        base = m[:, k] * bc1 / (sv * sbc2 + c.eps)
        feats[:, 3 + nk] = base
    else:  # left raw: m, sqrt(v) and the base are computed straight into it (three copies fewer)
        m = torch.lerp(g[:, None], m, d, out=feats[:, 2:2 + nk])
        sv = torch.sqrt(v, out=feats[:, 2 + nk])
        base = torch.div(m[:, k] * bc1, sv * sbc2 + c.eps, out=feats[:, 3 + nk])
    raw = feats[:, :4 + nk]  # [B, 4 + K, N]: p, g, m_k..., sqrt(v), base
    rms = _per_tensor_rms(raw, sizes)  # [B, C, T]; the last channel is the base's
    inv = (rms + 1e-30).reciprocal()
    if len(sizes) <= _SEGMENT_LOOP:  # a few tensors: each one's slice, no [B, C, N] expansion of per-tensor values
        start = 0
        for i, n in enumerate(sizes):
            if normalise:
                raw[:, :, start:start + n].mul_(inv[:, :, i:i + 1])
            if nt:
                feats[:, 4 + nk:, start:start + n] = times[:, i:i + 1]
            start += n
    else:  # many small tensors: one multiplication beats a loop of tiny ones
        if normalise:
            raw.mul_(_expand(inv, sizes, index))
        if nt:
            feats[:, 4 + nk:] = _expand(times, sizes, index)  # [S, N], broadcast over the batch
    if not normalise:
        return feats, base, rms[:, -1], m, v, inv
    raw.clamp_(-c.clip, c.clip)
    return feats, base, rms[:, -1], m, v, None


def flat_head(rule: LearnedRule, plan: SharedPlan, feats: torch.Tensor, base: torch.Tensor, base_rms: torch.Tensor,
              index: Optional[torch.Tensor], params: Optional[Mapping[str, torch.Tensor]] = None,
              inv: Optional[torch.Tensor] = None, times: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rule's network on the features of :func:`flat_features`: the direction ``alpha * (base + beta * f)``
    ``[B, N]``. ``inv``: the per-tensor reciprocal RMS of the first channels when ``flat_features`` left them raw
    (``normalise=False``). ``times`` ``[S, T]``: the time features, when ``feats`` lacks them (per-tensor
    constants). Tensors in, tensors out: what ``torch.compile`` traces as one graph."""
    c, spec = rule.config, plan.layout.spec
    sizes = segment_sizes(spec)
    ws = WeightSpace.from_channels(spec, feats)
    if inv is not None:  # tensor by tensor, so that inductor fuses the scaling into the first layer's reads
        nr = inv.shape[1]
        scaled = lambda i, t: (t[:, :nr] * inv[:, :, i].reshape(*inv.shape[:2], *[1] * (t.dim() - 2))  # noqa: E731
                               ).clamp(-c.clip, c.clip)
        ws = WeightSpace(spec, {n: scaled(i, t) if t.shape[1] == nr else torch.cat([scaled(i, t), t[:, nr:]], 1)
                                for i, (n, t) in enumerate((n, ws[n]) for n in spec.float_names)}, ws.extras)
    args = (ws, plan, times)
    f, log_alpha = rule(*args) if params is None else torch.func.functional_call(rule, dict(params), args)
    if c.trust > 0 and len(sizes) <= _SEGMENT_LOOP:
        # the learned term never outgrows the base step (per tensor: invariant, so equivariant); tensor by tensor,
        # because inductor turns the expanded per-tensor ratio into an entry-by-entry gather (5 ms per PES step)
        parts = [c.beta * t.reshape(t.shape[0], -1) for t in f.values()]
        learned = torch.cat([x * (c.trust * base_rms[:, i:i + 1] / (
            torch.linalg.vector_norm(x, dim=1, keepdim=True) / math.sqrt(n) + 1e-30)).clamp(max=1.0)
            for i, (x, n) in enumerate(zip(parts, sizes))], 1)  # [B, N]
    else:
        learned = c.beta * f.channels_flat()[:, 0]  # [B, N]
        if c.trust > 0:
            ratio = (c.trust * base_rms / (_per_tensor_rms(learned[:, None], sizes)[:, 0] + 1e-30)).clamp_(max=1.0)
            learned = learned * _expand(ratio, sizes, index)
    alpha = log_alpha.exp().reshape(-1, 1)  # [1, 1] or, with stacked meta-weights, [B, 1]
    return alpha * (base + learned)


def flat_core(rule: LearnedRule, plan: SharedPlan, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor,
              v: torch.Tensor, bc1: torch.Tensor, sbc2: torch.Tensor, times: torch.Tensor,
              index: Optional[torch.Tensor], params: Optional[Mapping[str, torch.Tensor]] = None, head=None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`flat_step` after the step count became tensors: :func:`flat_features`, then :func:`flat_head` (or
    ``head``, a compiled one). Tensors in, tensors out: what ``torch.compile`` traces as one graph."""
    feats, base, base_rms, m, v, inv = flat_features(rule, plan, p, g, m, v, bc1, sbc2, times, index,
                                                      normalise=head is None)
    times = times if plan.constant_channels else None  # else written into feats
    return (head or flat_head)(rule, plan, feats, base, base_rms, index, params, inv, times), m, v


def _raw_core(rule: LearnedRule, plan: SharedPlan, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
              bc1: torch.Tensor, sbc2: torch.Tensor, times: torch.Tensor, index: Optional[torch.Tensor],
              params: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`flat_core` with the features left raw and scaled per tensor inside the network (:func:`flat_head`'s
    ``inv``): the graph :class:`CompiledRule` compiles for large weight spaces."""
    return flat_core(rule, plan, p, g, m, v, bc1, sbc2, times, index, params, head=flat_head)


# Up to this many entries (all batch members together) the whole rule is compiled as one graph with the features
# normalised in place (small weight spaces are dispatch-bound: the 1,338-parameter digits CNN); above it the features
# are left raw and each tensor's scaling is applied as the network reads it, because inductor turns the in-place
# per-tensor scaling of a large flat buffer into one kernel that tests every entry against every tensor's range (4x
# the eager features' time on the 112k-parameter MLP). Both are one graph (benchmarks/lopt_overhead.py, issue 27).
WHOLE_GRAPH_ENTRIES = 1 << 16


class CompiledRule:
    """:func:`flat_core` through ``torch.compile``: one graph per spec and batch size, compiled at its first call and
    not again; small weight spaces with the features normalised in place, large ones with them raw
    (``WHOLE_GRAPH_ENTRIES``). Each graph is a :class:`~unf.nn.compiled.Compiled`: if compiling or running it fails,
    a warning says so and it runs eagerly from then on (the same steps to float rounding)."""

    def __init__(self):
        self.whole = Compiled(flat_core, "the learned rule")
        self.head = Compiled(_raw_core, "the learned rule (raw features)")

    @property
    def failed(self) -> bool:
        return self.whole.failed or self.head.failed

    def __call__(self, rule, plan, p, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if p.numel() <= WHOLE_GRAPH_ENTRIES:
            return self.whole(rule, plan, p, *args)
        return self.head(rule, plan, p, *args)


def segment_index(sizes: list[int], device=None) -> torch.Tensor:
    """``[N]`` long: for every entry of a flat buffer with segments ``sizes``, the index of its segment."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def step_direction(rule: LearnedRule, plan: SharedPlan, p: WeightSpace, g: WeightSpace, state: dict,
                   t: Union[int, Mapping[str, int]], params: Optional[Mapping[str, torch.Tensor]] = None
                   ) -> tuple[WeightSpace, dict]:
    """:func:`flat_step` on weight spaces: ``p``, ``g`` ``[B, 1]``; ``state`` as :func:`init_state`; ``t``: the step
    number, or one per tensor name. Returns the direction ``[B, 1]`` and the new state (not changed in place)."""
    spec = p.spec
    steps = t if isinstance(t, int) else [t[n] for n in spec.float_names]
    flat = lambda ws: ws.channels_flat()  # noqa: E731
    d, m, v = flat_step(rule, plan, flat(p)[:, 0], flat(g)[:, 0], flat(state["m"]), flat(state["v"])[:, 0], steps,
                        params)
    ws = lambda x: WeightSpace.from_channels(spec, x)  # noqa: E731
    return ws(d[:, None]), {"m": ws(m), "v": ws(v[:, None])}


__all__ = ["FORMAT", "CompiledRule", "LearnedRule", "RuleConfig", "VARIANTS", "WHOLE_GRAPH_ENTRIES", "flat_core",
           "flat_features", "flat_head", "flat_step", "init_state", "segment_index", "step_direction"]
