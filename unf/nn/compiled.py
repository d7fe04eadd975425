"""``torch.compile`` with an eager fallback: the one wrapper through which every use (the learned rule, the flow
field's training and sampling) compiles the engine's evaluation path."""
from __future__ import annotations

import warnings
from typing import Callable

import torch


class Compiled:
    """``torch.compile(fn, dynamic=False)`` (a module or a function), compiled at its first call. A compiler failure
    (no C++ compiler, an unsupported op) warns once, naming ``what``, and every later call runs ``fn`` eagerly (the
    same results to float rounding): a compiler problem must not stop training. An error of ``fn`` itself re-raises
    from the eager call."""

    def __init__(self, fn: Callable, what: str):
        self.eager, self.compiled, self.what = fn, torch.compile(fn, dynamic=False), what

    @property
    def failed(self) -> bool:
        return self.compiled is None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- see the class docstring
                warnings.warn(f"{self.what}: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); going on "
                              "eagerly", RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.eager(*args, **kwargs)
