"""Universal neural functionals: equivariant and invariant layers built from a ``WeightSpaceSpec``."""
from .basis import bell, set_partitions
from .layout import Layout, Piece
from .linear import UNFLinear

__all__ = ["Layout", "Piece", "UNFLinear", "bell", "set_partitions"]
