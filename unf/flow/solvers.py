"""Fixed-step solvers from ``t = 0`` (source) to ``t = 1`` (data) with an exact count of velocity evaluations.

``nfe`` is the budget of velocity evaluations: Euler spends 1 per step, Heun and midpoint 2, RK4 4, so a budget
gives ``nfe // cost`` steps (at least one). The count the solver reports is what it spent, checked by the tests.

``churn > 0`` integrates the SDE with the same marginals as the flow's ODE instead (stochastic sampling, as
diffusion samplers offer): for the linear path ``x_t = t x_1 + (1 - t) x_0`` from a diagonal Gaussian source
``N(mu, s^2)``, the velocity gives the posterior mean of the source point, ``x_0 ~ x - t v``, hence the score
``-(x_0 - mu) / ((1 - t) s^2)``, and

    dx = [v - churn (x - t v - mu)] dt + s sqrt(2 churn (1 - t)) dW

has the ODE's marginals for every ``churn >= 0`` (exactly when source and data points are paired independently;
with minibatch OT pairs the source point is not independent of its target and the score is an approximation). The
drift pulls each sample back towards where the field's data lie, and the fresh noise breaks ties an equivariant
field cannot break alone: two hidden units that became equal stay equal under any equivariant ODE (BENCHMARKS.md,
the orbit rung). Each step is the chosen solver's ODE step
plus an Euler-Maruyama step of the correction with the step's first velocity (no extra evaluations); the noise
fades to zero at ``t = 1`` and the last step adds none. The pull is explicit, so ``churn`` times the step
``1 / steps`` must stay well below 1 (``churn * h <= 0.2`` is checked).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..weights import WeightSpace

Field = Callable[[WeightSpace, torch.Tensor], WeightSpace]

COST = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def steps_for(solver: str, nfe: int) -> int:
    """Steps the solver takes within ``nfe`` evaluations."""
    if solver not in COST:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(COST)}")
    if nfe < COST[solver]:
        raise ValueError(f"nfe={nfe} is below one {solver} step ({COST[solver]} evaluations)")
    return nfe // COST[solver]


def _axpy(x: WeightSpace, h: float, v: WeightSpace) -> WeightSpace:
    return WeightSpace(x.spec, {n: x[n] + h * v[n] for n in x.names}, x.extras)


def _combine(x: WeightSpace, h: float, terms: list[tuple[float, WeightSpace]]) -> WeightSpace:
    out = {n: x[n] + h * sum(w * v[n] for w, v in terms) for n in x.names}
    return WeightSpace(x.spec, out, x.extras)


CHURN_STEP_MAX = 0.2  # churn * h above this overshoots the explicit pull (measured: 0.5 diverges, 0.15 does not)


@torch.no_grad()
def integrate(field: Field, x0: WeightSpace, nfe: int, solver: str = "euler", churn: float = 0.0,
              source_mean: Optional[torch.Tensor] = None, source_std: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, t0: float = 0.0) -> tuple[WeightSpace, int]:
    """Solve ``dx/dt = field(x, t)`` from ``x0`` at ``t = t0`` (default 0) to ``t = 1``; returns ``(x1,
    evaluations)``.

    ``field(x, t)`` takes ``t`` ``[B]``. Uniform steps over ``[t0, 1]``; Heun's last evaluation stays inside it.
    ``churn > 0``: the SDE with the same marginals (module docstring) for a source ``N(source_mean, source_std^2)``
    over the flat entries ``[D]`` (default ``N(0, I)``); its noise is drawn on the CPU from ``generator``, so a seed
    gives the same networks on any device. ``t0 > 0`` starts from a point of the path (``x0`` noised to ``t0``),
    as denoising does."""
    if not 0.0 <= t0 < 1.0:
        raise ValueError(f"t0={t0}: the start time must be in [0, 1)")
    steps = steps_for(solver, nfe)
    x, h = x0, (1.0 - t0) / steps
    if churn < 0 or churn * h > CHURN_STEP_MAX:
        limit = CHURN_STEP_MAX / h
        raise ValueError(f"churn={churn} with {steps} {solver} steps over [{t0:g}, 1]: use 0 <= churn <= "
                         f"{CHURN_STEP_MAX} / step size (= {limit:g}), or more steps")
    count = 0

    def f(x: WeightSpace, t: float) -> WeightSpace:
        nonlocal count
        count += 1
        return field(x, torch.full((x.batch_size,), t, dtype=x.dtype, device=x.device))

    for i in range(steps):
        t = t0 + i * h
        k1 = f(x, t)
        if solver == "euler":
            nxt = _axpy(x, h, k1)
        elif solver == "midpoint":
            nxt = _axpy(x, h, f(_axpy(x, h / 2, k1), t + h / 2))
        elif solver == "heun":
            k2 = f(_axpy(x, h, k1), t + h)
            nxt = _combine(x, h, [(0.5, k1), (0.5, k2)])
        else:  # rk4
            k2 = f(_axpy(x, h / 2, k1), t + h / 2)
            k3 = f(_axpy(x, h / 2, k2), t + h / 2)
            k4 = f(_axpy(x, h, k3), t + h)
            nxt = _combine(x, h, [(1 / 6, k1), (1 / 3, k2), (1 / 3, k3), (1 / 6, k4)])
        if churn > 0 and i < steps - 1:
            nxt = _churn(nxt, x, k1, t, h, churn, source_mean, source_std, generator)
        x = nxt
    return x, count


def _churn(nxt: WeightSpace, x: WeightSpace, v: WeightSpace, t: float, h: float, churn: float,
           mean: Optional[torch.Tensor], std: Optional[torch.Tensor], generator: Optional[torch.Generator]
           ) -> WeightSpace:
    """``nxt - churn h (x - t v - mu) + s sqrt(2 churn (1 - t) h) z``, on the flat entries."""
    flat = x.flatten()
    pull = flat - t * v.flatten()
    if mean is not None:
        pull = pull - mean.to(flat)
    z = torch.randn(flat.shape, generator=generator).to(flat)
    if std is not None:
        z = z * std.to(flat)
    out = WeightSpace.from_flat(x.spec, nxt.flatten() - churn * h * pull + math.sqrt(2 * churn * (1 - t) * h) * z)
    return WeightSpace(x.spec, {n: out[n] for n in x.names}, x.extras)
