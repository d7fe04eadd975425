"""Linear mode connectivity: interpolate two networks and measure the loss barrier between them."""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

StateDict = Mapping[str, torch.Tensor]


def interpolate(a: StateDict, b: StateDict, ts: Sequence[float]) -> list[dict[str, torch.Tensor]]:
    """``(1 - t) a + t b`` for every ``t``; integer buffers (``num_batches_tracked``) are taken from ``a``."""
    if set(a) != set(b):
        raise ValueError(f"state_dicts differ in keys: {sorted(set(a) ^ set(b))}")
    out = []
    for t in ts:
        out.append({k: torch.lerp(a[k], b[k].to(a[k].dtype), float(t)) if a[k].is_floating_point() else a[k].clone()
                    for k in a})
    return out


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Recompute every BatchNorm's running statistics from ``batches`` (training data, never test data): the
    statistics of an interpolated network are not the interpolation of its endpoints' (the REPAIR observation).
    A batch is an input tensor or a tuple whose first element is the input. Momenta are restored afterwards."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was, momenta = model.training, [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    try:
        for batch in batches:
            model(batch_input(batch))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was)
    return model


def batch_input(batch):
    """The input of a batch: the batch itself if it is a tensor, else its first element (``(x, y)`` batches)."""
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def loss_barrier(model: nn.Module, a: StateDict, b: StateDict, evaluate: Callable[[nn.Module], float],
                 ts: Optional[Sequence[float]] = None, bn_batches: Optional[Callable[[], Iterable]] = None) -> dict:
    """Evaluate along the straight path from ``a`` to ``b``.

    ``evaluate(model) -> float`` (a loss, or an error) is called on a copy of ``model`` loaded with each
    interpolated state_dict, in eval mode. ``bn_batches()`` yields training batches to recompute BatchNorm statistics
    for every point (required for networks with BatchNorm to be meaningful). Returns ``ts``, ``values`` and
    ``barrier`` = max over t of ``value(t) - ((1 - t) value(0) + t value(1))``.
    """
    ts = list(torch.linspace(0, 1, 11).tolist() if ts is None else ts)
    if len(ts) < 2 or ts[0] != 0 or ts[-1] != 1 or any(t1 <= t0 for t0, t1 in zip(ts, ts[1:])):
        raise ValueError(f"ts must increase from 0 to 1 (the barrier is measured against the endpoints); got {ts}")
    net = copy.deepcopy(model)
    values = []
    for sd in interpolate(a, b, ts):
        net.load_state_dict(sd)
        if bn_batches is not None:
            reset_bn_stats(net, bn_batches())
        net.eval()
        with torch.no_grad():
            values.append(float(evaluate(net)))
    v0, v1 = values[0], values[-1]
    barrier = max(v - ((1 - t) * v0 + t * v1) for t, v in zip(ts, values))
    return {"ts": ts, "values": values, "barrier": barrier}
