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
