"""Fixed-step ODE solvers from ``t = 0`` (source) to ``t = 1`` (data) with an exact count of velocity evaluations.

``nfe`` is the budget of velocity evaluations: Euler spends 1 per step, Heun and midpoint 2, RK4 4, so a budget
gives ``nfe // cost`` steps (at least one). The count the solver reports is what it spent, checked by the tests.
"""
from __future__ import annotations

from typing import Callable

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


@torch.no_grad()
def integrate(field: Field, x0: WeightSpace, nfe: int, solver: str = "euler") -> tuple[WeightSpace, int]:
    """Solve ``dx/dt = field(x, t)`` from ``x0`` at ``t = 0`` to ``t = 1``; returns ``(x1, evaluations)``.

    ``field(x, t)`` takes ``t`` ``[B]``. Uniform steps; Heun's last evaluation stays inside ``[0, 1]``."""
    steps = steps_for(solver, nfe)
    count = 0

    def f(x: WeightSpace, t: float) -> WeightSpace:
        nonlocal count
        count += 1
        return field(x, torch.full((x.batch_size,), t, dtype=x.dtype, device=x.device))

    x, h = x0, 1.0 / steps
    for i in range(steps):
        t = i * h
        if solver == "euler":
            x = _axpy(x, h, f(x, t))
        elif solver == "midpoint":
            x = _axpy(x, h, f(_axpy(x, h / 2, f(x, t)), t + h / 2))
        elif solver == "heun":
            k1 = f(x, t)
            k2 = f(_axpy(x, h, k1), t + h)
            x = _combine(x, h, [(0.5, k1), (0.5, k2)])
        else:  # rk4
            k1 = f(x, t)
            k2 = f(_axpy(x, h / 2, k1), t + h / 2)
            k3 = f(_axpy(x, h / 2, k2), t + h / 2)
            k4 = f(_axpy(x, h, k3), t + h)
            x = _combine(x, h, [(1 / 6, k1), (1 / 3, k2), (1 / 3, k3), (1 / 6, k4)])
    return x, count
