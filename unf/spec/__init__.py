"""Weight-space symmetry specs: axis entries, permutations, the spec, and its inference from PyTorch modules."""
from .axes import AxisEntry
from .check import symmetry_error
from .homogeneous import homogeneous_groups
from .infer import SpecInferenceError, UnprovenSymmetryWarning, architecture_graph, spec_from_module, trace
from .permutation import Permutation
from .registry import register_frontend, register_function_rule, register_method_rule, register_module_rule
from .spec import TensorSpec, WeightSpaceSpec

__all__ = ["AxisEntry", "Permutation", "SpecInferenceError", "TensorSpec", "UnprovenSymmetryWarning",
           "WeightSpaceSpec", "architecture_graph", "homogeneous_groups", "register_frontend", "register_function_rule",
           "register_method_rule", "register_module_rule", "spec_from_module", "symmetry_error", "trace"]
