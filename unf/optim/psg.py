"""``PSG``: position-based scaled gradients (Kim et al., NeurIPS 2020) around any optimizer.

Before the inner step each weight's gradient is multiplied by ``scale * |w - Q(w)|`` (target ``"quant"``, ``Q`` the
symmetric grid of :mod:`unf.quant`) or ``scale * |w|`` (target ``"zero"``, the pruning variant): weights near a grid
point (near zero) move slowly and collect there, so post-training quantisation (pruning) costs little. Only
parameters with two or more dimensions (Linear and Conv weights) are scaled; biases, normalisation parameters and
names in ``skip`` keep their gradients. The forward pass stays in full precision.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..quant import check_bits, quantize
from .wrapper import GradientWrapper

TARGETS = ("quant", "zero")


class PSG(GradientWrapper):
    """Wrap ``optimizer`` (SGD, Adam, :class:`~unf.optim.UNFOptimizer`, ...) with position-based scaled gradients.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``; its ``param_groups`` are shared (schedulers work on either).
        bits: the target grid, an int >= 2, or ``{name: bits}`` per parameter (e.g. ``unf.quant.layer_bits(model,
            2)`` for the first/last-layer 8-bit rule); parameters not in the mapping are not scaled. Unused with
            ``target="zero"``.
        scale: ``lambda_s`` (the paper: 150 at 4 bits; here 50 at 3, 30 at 2).
        target: ``"quant"`` (``scale * |w - Q(w)|``) or ``"zero"`` (``scale * |w|``).
        skip: parameter names (or the parameters themselves) whose gradients are left alone.
        model: the model, to name parameters when the optimizer was built from ``model.parameters()``; not needed
            after ``torch.optim.X(model.named_parameters())`` or for ``UNFOptimizer``.
        range_momentum: None (the grid range is ``max|w|`` now) or ``m`` in [0, 1): the range is a running mean
            ``r <- m r + (1 - m) max|w|`` per tensor (kept in ``state_dict``), as the paper's option.

    Example::

        opt = PSG(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), bits=4, scale=150)
        ...; loss.backward(); opt.step()
        qmodel = unf.quant.quantize_model(model, 4)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, bits: Union[int, Mapping[str, int]] = 4,
                 scale: float = 150.0, target: str = "quant", skip: Iterable[Union[str, torch.Tensor]] = (),
                 model: Optional[nn.Module] = None, range_momentum: Optional[float] = None):
        super().__init__(optimizer, model)
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale: expected a positive number, got {scale!r}")
        if range_momentum is not None and not 0.0 <= range_momentum < 1.0:
            raise ValueError(f"range_momentum: expected None or a number in [0, 1), got {range_momentum!r}")
        self.target, self.scale, self.range_momentum = target, float(scale), range_momentum
        names = self.param_names()
        by_name = {n: i for i, n in names.items()}
        if isinstance(bits, Mapping):
            self._check_names(bits, by_name, "bits")
            self.bits = {n: check_bits(b, f"bits[{n!r}]") for n, b in bits.items()}
        else:
            self.bits = check_bits(bits)
        self._bits_id = {by_name[n]: b for n, b in self.bits.items()} if isinstance(self.bits, dict) else {}
        skip = list(skip)
        self._check_names([s for s in skip if isinstance(s, str)], by_name, "skip")
        self._skip = {by_name[s] if isinstance(s, str) else id(s) for s in skip}
        self._range: dict[int, torch.Tensor] = {}  # id(param) -> running max|w|

    def _check_names(self, wanted, by_name: dict, arg: str) -> None:
        if not wanted:
            return
        if not by_name:
            raise ValueError(f"{arg}: parameter names need names: build the optimizer from model.named_parameters() "
                             f"or pass model=... to PSG")
        bad = [n for n in wanted if n not in by_name]
        if bad:
            raise ValueError(f"{arg}: {bad} are not names of the optimizer's parameters "
                             f"(they are e.g. {list(by_name)[:6]})")

    def _describe(self) -> str:
        return f"bits={self.bits}, scale={self.scale}, target={self.target!r}"

    def bits_of(self, p: torch.Tensor) -> Optional[int]:
        """The grid ``p`` is pulled to (None: not scaled)."""
        if p.dim() < 2 or id(p) in self._skip:
            return None
        if isinstance(self.bits, dict):
            return self._bits_id.get(id(p))
        return self.bits

    def grad_scale(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """``scale * |w - Q(w)|`` (or ``scale * |w|``) for ``p``, shaped like it; None if ``p`` is not scaled.
        Updates the running range when ``range_momentum`` is set."""
        if p.dim() < 2 or id(p) in self._skip:
            return None
        w = p.detach()
        if self.target == "zero":
            return self.scale * w.abs()
        bits = self.bits_of(p)
        if bits is None:
            return None
        max_abs = None
        if self.range_momentum is not None:
            now = w.abs().amax()
            r = self._range.get(id(p))
            r = now if r is None else self.range_momentum * r.to(now) + (1 - self.range_momentum) * now
            self._range[id(p)] = max_abs = r
        return self.scale * (w - quantize(w, bits, max_abs)).abs()

    def transform_grads(self) -> None:
        for p in self.params():
            if p.grad is None:
                continue
            s = self.grad_scale(p)
            if s is not None:
                p.grad.mul_(s.to(p.grad.dtype))

    def extra_state(self) -> dict:
        index = {id(p): i for i, p in enumerate(self.params())}
        return {"bits": self.bits, "scale": self.scale, "target": self.target, "range_momentum": self.range_momentum,
                "range": {index[k]: v.clone() for k, v in self._range.items() if k in index}}

    def load_extra_state(self, state: dict) -> None:
        params = self.params()
        self.bits, self.scale, self.target = state["bits"], state["scale"], state["target"]
        self.range_momentum = state["range_momentum"]
        if isinstance(self.bits, dict):
            by_name = {n: i for i, n in self.param_names().items()}
            self._bits_id = {by_name[n]: b for n, b in self.bits.items()}
        self._range = {id(params[int(i)]): v.to(params[int(i)].device) for i, v in state["range"].items()}


__all__ = ["PSG"]
