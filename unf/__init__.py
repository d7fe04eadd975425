"""unf: learning on neural-network weights.

Data flow: ``spec`` (which permutation group acts on each axis of each tensor) -> weights -> layers -> applications.
"""
from . import align, data, manifold, merge, nn, quant
from .spec import (Permutation, SpecInferenceError, TensorSpec, UnprovenSymmetryWarning, WeightSpaceSpec,
                   register_function_rule, register_method_rule, register_module_rule, spec_from_module)
from .weights import WeightSpace

__version__ = "0.1.0"

__all__ = ["Permutation", "SpecInferenceError", "TensorSpec", "UnprovenSymmetryWarning", "WeightSpace", "WeightSpaceSpec",
           "align", "data", "manifold", "merge", "nn", "quant", "register_function_rule", "register_method_rule",
           "register_module_rule", "spec_from_module"]
