"""unf: learning on neural-network weights.

Data flow: ``spec`` (which permutation group acts on each axis of each tensor) -> weights -> layers -> applications.
"""
import os
import sys

if "torch" not in sys.modules:
    # OpenMP reads this once, when torch loads it. Passive threads sleep at the end of a parallel region instead of
    # spinning: alone that costs nothing measurable here, but when another process shares the cores, a spinning
    # wait for a descheduled thread made UNFLinear 16x slower (1.2x passive; BENCHMARKS.md). A user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import align, data, manifold, merge, nn, quant  # noqa: E402
from .spec import (Permutation, SpecInferenceError, TensorSpec, UnprovenSymmetryWarning, WeightSpaceSpec,
                   register_function_rule, register_method_rule, register_module_rule, spec_from_module)
from .weights import WeightSpace

__version__ = "0.1.0"

__all__ = ["Permutation", "SpecInferenceError", "TensorSpec", "UnprovenSymmetryWarning", "WeightSpace", "WeightSpaceSpec",
           "align", "data", "manifold", "merge", "nn", "quant", "register_function_rule", "register_method_rule",
           "register_module_rule", "spec_from_module"]
