"""Velocity fields ``v(x_t, t, c)`` for flow matching in weight space, behind one interface.

``x``: a ``WeightSpace`` ``[B, 1]`` in standardised coordinates; ``t``: ``[B]`` in [0, 1]; ``cond``: ``[B, K]`` long
indices of the conditioning columns' values (0 = unknown / dropped). Both fields return a ``WeightSpace`` ``[B, 1]``.

- :class:`UNFVelocity` is equivariant: a ``UNFNet``-style trunk whose blocks are modulated (FiLM: per tensor and
  channel scale and shift, as in DiT's adaptive norm) by an embedding of time and conditions. The modulation is
  constant over a tensor's entries, so it commutes with every permutation of the spec.
- :class:`MLPVelocity` is DeepWeightFlow's field: an MLP on the flat weight vector with an MLP time embedding
  added to its input projection. It sees every entry by position, so it must learn the symmetry (or be handed a
  canonicalised zoo).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from ..nn import Layout, Pointwise, PositionalEncoding, UNFLinear, UnitMLP, WSNorm
from ..nn.compiled import Compiled
from ..nn.layout import DEFAULT_FOLD_MAX


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` ``[B]`` -> ``[B, dim]`` (frequencies 1 .. 1000, as in diffusion models)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), half, device=t.device, dtype=t.dtype))
    ang = t[:, None] * freqs[None] * 2 * math.pi
    return torch.cat([ang.sin(), ang.cos(), t[:, None].expand(-1, dim - 2 * half)], dim=1)


class Embedding(nn.Module):
    """Time and conditions -> ``[B, dim]``: sinusoidal time features through an MLP, plus one learned embedding per
    conditioning column (index 0 of each table is "unknown", used when a column is dropped or not given)."""

    def __init__(self, dim: int, vocab: Sequence[int] = ()):
        super().__init__()
        self.dim = dim
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.tables = nn.ModuleList([nn.Embedding(n + 1, dim) for n in vocab])

    def forward(self, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        e = self.time(time_features(t, self.dim))
        if self.tables:
            if cond is None:
                cond = torch.zeros(len(t), len(self.tables), dtype=torch.long, device=t.device)
            if cond.shape != (len(t), len(self.tables)):
                raise ValueError(f"cond has shape {tuple(cond.shape)}; expected [batch={len(t)}, "
                                 f"columns={len(self.tables)}]")
            for k, table in enumerate(self.tables):
                e = e + table(cond[:, k])
        return e


PREDICTIONS = ("velocity", "data")


class VelocityField(nn.Module):
    """Base class: ``forward(x: WeightSpace[B, 1], t: [B], cond: [B, K] | None) -> WeightSpace[B, 1]``, the velocity.

    Subclasses implement ``_predict``, whose output is read according to ``prediction``:

    - ``"velocity"``: the output is the velocity itself;
    - ``"data"``: the output is the network's estimate of the clean weights ``x1``, and the velocity of the linear
      path is ``(x1_hat - x_t) / (1 - t)`` (with ``1 - t`` clamped at ``min_gap``). A velocity contains ``-x_t``, a
      full-rank noise vector that a narrow trunk (a 512-wide MLP on 3,466 weights) cannot carry; the clean weights
      of a zoo lie near a low-dimensional set and can (Li & He 2025, "Back to basics: let denoising generative
      models denoise"). The map is elementwise, so an equivariant trunk stays equivariant.

    ``config`` holds the constructor's keyword arguments (JSON), so that a saved field can be rebuilt by
    :func:`build_velocity`."""

    kind: str = ""
    config: dict
    prediction: str = "velocity"
    min_gap: float = 0.05
    _inference: Optional[Compiled] = None  # set by compile_inference

    def compile_inference(self, on: bool = True) -> None:
        """Evaluate without gradients through ``torch.compile`` from now on (sampling; training compiles its own
        step): one compile per input shape, paid at the first call and then kept (inductor also caches the generated
        code on disk for later processes); ``on=False`` goes back to eager."""
        self._inference = Compiled(self._predict, "sampling") if on else None

    def _set_prediction(self, prediction: str, min_gap: float) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r}: choose from {PREDICTIONS}")
        if not 0 < min_gap <= 1:
            raise ValueError(f"min_gap {min_gap} must be in (0, 1]")
        self.prediction, self.min_gap = prediction, float(min_gap)

    def _predict(self, x: WeightSpace, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> WeightSpace:
        raise NotImplementedError

    def predict(self, x: WeightSpace, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> WeightSpace:
        """The network's output (velocity or clean weights, by ``prediction``) ``[B, 1]``."""
        if self._inference is not None and not torch.is_grad_enabled():
            return self._inference(x, t, cond)
        return self._predict(x, t, cond)

    def forward(self, x: WeightSpace, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> WeightSpace:
        out = self.predict(x, t, cond)
        if self.prediction == "velocity":
            return out
        gap = (1 - t).clamp_min(self.min_gap)
        return WeightSpace(x.spec, {n: (out[n] - x[n]) / gap.view((-1,) + (1,) * (x[n].dim() - 1))
                                    for n in x.names}, x.extras)


class _ChannelMix(nn.Module):
    """``WeightSpace[B, C_in] -> WeightSpace[B, C_out]``: one ``[C_out, C_in]`` matrix per tensor, the same at every
    entry (a point-wise map over channels, so it commutes with every permutation of entries)."""

    def __init__(self, names: Sequence[str], c_in: int, c_out: int):
        super().__init__()
        self.names = list(names)
        self.weight = nn.Parameter(torch.randn(len(self.names), c_out, c_in) / math.sqrt(c_in))

    def forward(self, x: WeightSpace) -> WeightSpace:
        return WeightSpace(x.spec, {n: torch.einsum("dc,bc...->bd...", w, x[n]) for n, w in zip(self.names, self.weight)},
                           x.extras)


class _FiLMBlock(nn.Module):
    """``x + Linear(act(FiLM(Norm(x), e)))``: the residual branch of a ``UNFNet`` block, modulated by ``e``; with a
    unit MLP, ``+ Unit(act(...))``, read and written through ``unit_channels`` channels when that is fewer."""

    def __init__(self, layout: Layout, channels: int, emb: int, scale: float, unit_hidden: Union[int, str] = 0,
                 unit_rank: int = 0, unit_activation: str = "silu", unit_attention: int = 0, unit_channels: int = 0):
        super().__init__()
        self.names = layout.spec.float_names
        self.norm = WSNorm(layout.spec, channels)
        self.act = Pointwise("silu")
        self.linear = UNFLinear(layout, channels, channels, gain=math.sqrt(2.0) * scale)
        uc = unit_channels if 0 < unit_channels < channels else channels
        self.unit = UnitMLP(layout, uc, unit_hidden, rank=unit_rank, activation=unit_activation,
                            attention=unit_attention) if unit_hidden else None
        # the unit MLP's input grows with channels x the entries a unit touches: its own narrower channels keep a
        # wide field's parameters within a budget (digits MLP, width 32: 268k -> about 180k per block)
        narrow = self.unit is not None and uc < channels
        self.down = _ChannelMix(self.names, channels, uc) if narrow else nn.Identity()
        self.up = _ChannelMix(self.names, uc, channels) if narrow else nn.Identity()
        self.film = nn.Linear(emb, 2 * len(self.names) * channels)
        nn.init.zeros_(self.film.weight)  # start as the plain block
        nn.init.zeros_(self.film.bias)

    def forward(self, x: WeightSpace, e: torch.Tensor) -> WeightSpace:
        scale, shift = self.film(e).view(len(e), 2, len(self.names), -1).unbind(1)  # [B, T, C] each
        z = self.act(self.norm(x, scale, shift))
        out = self.linear(z, residual=x)
        return out if self.unit is None else out + self.up(self.unit(self.down(z)))


CHUNK_ENTRIES = 1 << 23  # hidden-state floats per chunk when sampling (32 MiB in float32)
# compiled, a layer's passes are fused and fewer: smaller chunks (4 MiB) then run 1.3x faster than 32 MiB ones on the
# 2-core Xeon (digits-mlp field, width 16: 0.69-0.72 against 0.92-0.94 s per evaluation of 1,000 networks), while
# eager evaluation is level between the two (BENCHMARKS.md, "The engine, sixth slice")
COMPILED_CHUNK_ENTRIES = 1 << 20


class UNFVelocity(VelocityField):
    """Equivariant velocity: positional encoding of pseudo-groups, input projection, ``depth`` FiLM-modulated
    residual UNF blocks, output projection (zero-initialised: the field starts at 0).

    Parameters grow with ``hidden^2`` and the number of basis terms, not with the network's size: for the digits
    MLP (3,466 weights) ``hidden=32, depth=3`` has ~1/50 of the MLP field's parameters. ``unit_hidden > 0`` adds to
    every block a :class:`~unf.nn.unit.UnitMLP` of that width (a memory of unit prototypes; its parameters grow with
    the fixed entries a unit touches); ``unit_rank > 0`` gives it pair tables of that rank for the weights between
    hidden layers; ``unit_activation="softmax"`` makes it a softmax memory of ``unit_hidden`` prototypes, and
    ``"sinkhorn"`` one whose prototypes a network's units compete for; ``unit_hidden="units"`` gives each group one
    prototype per unit (the best memory measured on the orbit rung, BENCHMARKS.md); ``unit_attention=L`` puts ``L``
    self-attention layers across the units of each group into it, so that a network's units decide together;
    ``unit_channels=U`` (``0 < U < hidden``) feeds it a ``U``-channel projection of the block's activations and
    projects its output back, so that a wider field's unit memories stay the size of a ``U``-wide one's."""

    kind = "unf"

    def __init__(self, spec: WeightSpaceSpec, hidden: int = 32, depth: int = 3, emb: int = 64,
                 vocab: Sequence[int] = (), pos_dim: int = 4, fold_max: int = DEFAULT_FOLD_MAX,
                 prediction: str = "velocity", min_gap: float = 0.05, unit_hidden: Union[int, str] = 0,
                 unit_rank: int = 0, unit_activation: str = "silu", unit_attention: int = 0,
                 unit_channels: int = 0):
        super().__init__()
        self._set_prediction(prediction, min_gap)
        if unit_channels < 0:
            raise ValueError(f"unit_channels {unit_channels}: must be >= 0 (0: the field's width)")
        self.config = dict(hidden=hidden, depth=depth, emb=emb, vocab=list(vocab), pos_dim=pos_dim,
                           fold_max=fold_max, prediction=prediction, min_gap=min_gap, unit_hidden=unit_hidden,
                           unit_rank=unit_rank, unit_activation=unit_activation, unit_attention=unit_attention,
                           unit_channels=unit_channels)
        self.layout = Layout(spec, fold_max)
        self.embed = Embedding(emb, vocab)
        self.pos = PositionalEncoding(self.layout, pos_dim) if pos_dim and self.layout.pseudo_groups() else None
        self.inp = UNFLinear(self.layout, 1 + (pos_dim if self.pos is not None else 0), hidden)
        scale = 1.0 / math.sqrt(max(depth, 1))
        self.blocks = nn.ModuleList([_FiLMBlock(self.layout, hidden, emb, scale, unit_hidden, unit_rank,
                                                unit_activation, unit_attention, unit_channels)
                                     for _ in range(depth)])
        self.out_norm = WSNorm(spec, hidden)
        self.act = Pointwise("silu")
        self.out = UNFLinear(self.layout, hidden, 1)
        with torch.no_grad():
            for w in self.out.parameters():
                w.zero_()

    def predict(self, x: WeightSpace, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> WeightSpace:
        # without gradients (sampling) evaluate in chunks whose hidden state stays in the last-level cache: every
        # layer streams the whole hidden state several times, and every member is computed on its own anyway
        if torch.is_grad_enabled():
            return self._predict(x, t, cond)
        run = self._inference or self._predict  # compile_inference compiles the block, not the loop over blocks
        numel = sum(t[0, 0].numel() for t in x.values())
        chunk = CHUNK_ENTRIES if self._inference is None else COMPILED_CHUNK_ENTRIES
        size = max(1, chunk // (numel * max(self.config["hidden"], x.channels)))
        if x.batch_size <= size:
            return run(x, t, cond)
        return WeightSpace.cat([run(xc, t[a:a + size], None if cond is None else cond[a:a + size])
                                for a, xc in zip(range(0, x.batch_size, size), x.split(size))])

    def _predict(self, x: WeightSpace, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> WeightSpace:
        e = self.embed(t, cond)
        h = self.inp(self.pos(x) if self.pos is not None else x)
        for block in self.blocks:
            h = block(h, e)
        return self.out(self.act(self.out_norm(h)))


class MLPVelocity(VelocityField):
    """DeepWeightFlow's velocity: ``[B, D]`` flat weights -> ``layers`` hidden layers of ``hidden`` (LayerNorm, SiLU),
    the time (and condition) embedding of width ``emb`` projected and added after the first layer."""

    kind = "mlp"

    def __init__(self, spec: WeightSpaceSpec, hidden: int = 512, layers: int = 3, emb: int = 64,
                 vocab: Sequence[int] = (), dropout: float = 0.0, prediction: str = "velocity",
                 min_gap: float = 0.05):
        super().__init__()
        self._set_prediction(prediction, min_gap)
        self.config = dict(hidden=hidden, layers=layers, emb=emb, vocab=list(vocab), dropout=dropout,
                           prediction=prediction, min_gap=min_gap)
        self.spec = spec
        dim = sum(math.prod(spec[n].shape) for n in spec.float_names)
        self.embed = Embedding(emb, vocab)
        self.inp = nn.Linear(dim, hidden)
        self.temb = nn.Linear(emb, hidden)
        self.hidden = nn.ModuleList([nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Dropout(dropout),
                                                   nn.Linear(hidden, hidden)) for _ in range(layers - 1)])
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _predict(self, x: WeightSpace, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> WeightSpace:
        if x.channels != 1:
            raise ValueError(f"MLPVelocity takes 1-channel weight spaces, got {x.channels} channels")
        h = self.inp(x.flatten()) + self.temb(self.embed(t, cond))
        for layer in self.hidden:
            h = h + layer(h)
        return WeightSpace.from_flat(x.spec, self.out(h))


VELOCITIES = {"unf": UNFVelocity, "mlp": MLPVelocity}


def build_velocity(kind: str, spec: WeightSpaceSpec, **config) -> VelocityField:
    """A velocity field by name (``"unf"`` or ``"mlp"``) with its constructor's keyword arguments."""
    if kind not in VELOCITIES:
        raise ValueError(f"unknown velocity {kind!r}; choose from {sorted(VELOCITIES)}")
    return VELOCITIES[kind](spec, **config)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

