"""Manifold layers: ``W(s) = sum_k c_k(s) P_k`` per example, computed as ``sum_k c_k(s) (P_k x)``.

No per-example weight matrix is built: the input goes through all ``K`` basis points at once (one matmul or one
convolution with ``K`` times the output channels) and the outputs are mixed by ``c(s)``. The context comes as
``forward(x, s)``, or from an enclosing :func:`~unf.manifold.wrap` model.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .basis import check_context, check_manifold, coefficients, metric, num_basis

__all__ = ["ManifoldConv2d", "ManifoldLayer", "ManifoldLinear"]


class ManifoldLayer(nn.Module):
    """Shared parts: ``manifold``, ``basis`` ``[K, out, ...]``, ``basis_bias`` ``[K, out]`` (or None), the context."""

    manifold: str
    basis: nn.Parameter
    basis_bias: Optional[nn.Parameter]

    def _setup(self, manifold: str, shape: tuple, bias: bool, fan_in: int, device, dtype) -> None:
        self.manifold = check_manifold(manifold)
        k = num_basis(manifold)
        self.num_basis = k
        self.basis = nn.Parameter(torch.empty(k, *shape, device=device, dtype=dtype))
        self.basis_bias = nn.Parameter(torch.empty(k, shape[0], device=device, dtype=dtype)) if bias else None
        self._context: Optional[torch.Tensor] = None
        self.reset_parameters(fan_in)

    def reset_parameters(self, fan_in: Optional[int] = None) -> None:
        """Each basis point as nn.Linear/Conv2d initialise a weight, scaled by ``1/sqrt(trace G)`` so that
        ``W(s)`` has the usual variance on average over the manifold."""
        fan_in = fan_in or self.basis[0, 0].numel()
        shrink = 1 / math.sqrt(float(metric(self.manifold).trace()))
        bound = shrink / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) as torch does, = 1/sqrt(fan_in)
        nn.init.uniform_(self.basis, -bound, bound)
        if self.basis_bias is not None:
            nn.init.uniform_(self.basis_bias, -bound, bound)

    def coefficients(self, s) -> torch.Tensor:
        """``c(s)``, ``[batch, K]``."""
        return coefficients(self.manifold, check_context(self.manifold, s, like=self.basis))

    def weight_at(self, s) -> torch.Tensor:
        """The explicit weights ``[batch, out, ...]`` at contexts ``s`` (for inspection and tests; ``forward`` does
        not build them)."""
        c = self.coefficients(s)
        return torch.einsum("bk,k...->b...", c, self.basis)

    def bias_at(self, s) -> Optional[torch.Tensor]:
        """The explicit biases ``[batch, out]`` at contexts ``s``."""
        return None if self.basis_bias is None else self.coefficients(s) @ self.basis_bias

    def _coeffs(self, x: torch.Tensor, s) -> torch.Tensor:
        if s is None:
            s = self._context
        if s is None:
            raise ValueError(f"s: {type(self).__name__} needs a context: call it as layer(x, s), or wrap the model "
                             "with unf.manifold.wrap and call model(x, s)")
        s = check_context(self.manifold, s, batch=x.shape[0], like=self.basis)
        return coefficients(self.manifold, s).to(x.dtype)

    def extra_repr(self) -> str:
        return f"manifold={self.manifold!r}, K={self.num_basis}, basis={tuple(self.basis.shape)}"


class ManifoldLinear(ManifoldLayer):
    """A Linear layer on a weight manifold. ``forward(x, s)``: ``x`` ``[batch, *, in_features]``, ``s`` ``[batch]``
    (torus ``[batch, 2]``) -> ``[batch, *, out_features]``."""

    def __init__(self, in_features: int, out_features: int, manifold: str = "line", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._setup(manifold, (out_features, in_features), bias, in_features, device, dtype)

    @classmethod
    def from_linear(cls, layer: nn.Linear, manifold: str) -> "ManifoldLinear":
        """A manifold layer with ``W(s) = layer.weight`` for every ``s`` (the function is kept)."""
        new = cls(layer.in_features, layer.out_features, manifold, layer.bias is not None,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        new._copy_from(layer.weight, layer.bias)
        return new

    def _copy_from(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        # constant manifold: line P1 = P2 = W; circle/torus: the constant term is W, the rest 0
        with torch.no_grad():
            self.basis.zero_()
            if self.basis_bias is not None:
                self.basis_bias.zero_()
            ks = range(self.num_basis) if self.manifold == "line" else [0]
            for k in ks:
                self.basis[k].copy_(weight)
                if bias is not None:
                    self.basis_bias[k].copy_(bias)

    def forward(self, x: torch.Tensor, s=None) -> torch.Tensor:
        c = self._coeffs(x, s)  # [B, K]
        y = torch.einsum("b...i,koi->b...ko", x, self.basis)  # every basis point at once
        cb = c.reshape(c.shape[0], *([1] * (x.dim() - 2)), c.shape[1])
        out = torch.einsum("b...ko,b...k->b...o", y, cb)
        if self.basis_bias is not None:
            out = out + (c @ self.basis_bias).reshape(c.shape[0], *([1] * (x.dim() - 2)), -1)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, " + super().extra_repr()


class ManifoldConv2d(ManifoldLayer):
    """A Conv2d on a weight manifold (``basis`` ``[K, out, in/groups, kh, kw]``). ``forward(x, s)``: ``x``
    ``[batch, in, H, W]``, ``s`` ``[batch]`` (torus ``[batch, 2]``) -> ``[batch, out, H', W']``. Zero padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, manifold: str = "line", device=None, dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: in_channels {in_channels} and out_channels {out_channels} must be divisible "
                             f"by groups {groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding: Union[str, tuple] = padding if isinstance(padding, str) else _pair(padding)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._setup(manifold, shape, bias, shape[1] * shape[2] * shape[3], device, dtype)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, manifold: str) -> "ManifoldConv2d":
        """A manifold layer with ``W(s) = layer.weight`` for every ``s``."""
        if layer.padding_mode != "zeros":
            raise ValueError(f"layer: ManifoldConv2d supports padding_mode='zeros', got {layer.padding_mode!r}")
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, manifold,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        ManifoldLinear._copy_from(new, layer.weight, layer.bias)
        return new

    def forward(self, x: torch.Tensor, s=None) -> torch.Tensor:
        c = self._coeffs(x, s)  # [B, K]
        k, g, out = self.num_basis, self.groups, self.out_channels
        # one convolution with K*out channels, ordered (group, k, channel) so that every group sees its own inputs
        w = self.basis.reshape(k, g, out // g, *self.basis.shape[2:]).transpose(0, 1).reshape(k * out,
                                                                                              *self.basis.shape[2:])
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, g)
        y = y.reshape(y.shape[0], g, k, out // g, *y.shape[2:])
        y = torch.einsum("bgkc...,bk->bgc...", y, c).reshape(y.shape[0], out, *y.shape[4:])
        if self.basis_bias is not None:
            y = y + (c @ self.basis_bias)[:, :, None, None]
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, " + super().extra_repr())
