"""Shared timing helper for the benchmark scripts."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable


def wall_times(fn: Callable[[], object], repeats: int = 5, warmup: bool = True,
               sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times of ``fn()`` over ``repeats`` calls (after one untimed call if ``warmup``); ``sync`` waits for
    asynchronous devices (``torch.cuda.synchronize``) around each call."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: bool = True,
                sync: Callable[[], None] = lambda: None) -> float:
    """Median of :func:`wall_times`."""
    return statistics.median(wall_times(fn, repeats, warmup, sync))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def provenance() -> dict:
    """``date`` (UTC, to the second), ``machine`` (CPU model and core count) and ``torch`` version: stamped on each
    results row a benchmark script writes."""
    import os
    from datetime import datetime, timezone

    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_name()}, {os.cpu_count()} cores", "torch": torch.__version__}


def aten_calls(fn: Callable[[], object]) -> int:
    """ATen operator calls of one ``fn()`` (a load-independent measure of dispatch overhead)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def matmul_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products in one ``fn()`` (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def machine_peaks(dev, sync: Callable[[], None] = lambda: None) -> dict:
    """Square-matmul GFLOP/s (1024^3, float32) and copy GB/s (64 MiB, read + write) on ``dev``, measured now."""
    import torch

    a = torch.randn(1024, 1024, device=dev)
    mm = statistics.median(wall_times(lambda: a @ a, 10, sync=sync))
    x = torch.empty(16 * 2**20, device=dev)
    cp = statistics.median(wall_times(lambda: x.clone(), 10, sync=sync))
    return {"matmul_gflops": 2 * 1024**3 / mm / 1e9, "copy_gbs": 2 * x.numel() * 4 / cp / 1e9}


def op_log(fn: Callable[[], object]) -> list[tuple]:
    """Every ATen call of one ``fn()`` as ``(op name, bytes read + written)``, views excluded, plus the product
    shapes: ``("aten.bmm", bytes, (shape, ...))``. Bytes are each operand's size once per op: a lower bound on the
    traffic of an op that re-reads, an upper bound where an operand stays in cache between ops."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    log = []

    class _Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                shapes = tuple(tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
                log.append((str(func.overloadpacket), nbytes, shapes))
            return out

    with _Log():
        fn()
    return log


def code_version() -> str:
    """The commit of the ``unf`` package being measured (``+dirty`` with local changes), for results rows."""
    import subprocess
    from pathlib import Path

    import unf

    root = Path(unf.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "unf"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def timed_spec(model, x) -> tuple:
    """``(spec, seconds, UnprovenSymmetryWarnings raised, fully fixed tensors)`` of ``unf.spec_from_module(model, x)``."""
    import warnings

    import unf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", unf.UnprovenSymmetryWarning)
        t = time.perf_counter()
        spec = unf.spec_from_module(model, x)
        elapsed = time.perf_counter() - t
    n_warn = sum(issubclass(w.category, unf.UnprovenSymmetryWarning) for w in caught)
    return spec, elapsed, n_warn, sum(not ts.permuted for ts in spec.values())


def unf_linear_runs(model, spec) -> str:
    """``"yes"`` if ``UNFLinear(spec, 1, 1)`` builds and runs one forward on ``model``'s weights (in float32; the model
    is put back in float64 afterwards), else ``"no (ErrorType)"``: a table row reports it and goes on."""
    import unf
    from unf.nn import UNFLinear

    try:
        UNFLinear(spec, 1, 1)(unf.WeightSpace.from_module(spec, [model.float()]))
        return "yes"
    except Exception as e:  # report, do not stop the table
        return f"no ({type(e).__name__})"
    finally:
        model.double()
