"""Universal neural functionals: equivariant and invariant layers built from a ``WeightSpaceSpec``.

``UNFLinear`` (equivariant linear), ``InvariantPool`` (invariant linear features), point-wise ``Pointwise``,
``WSDropout``, ``WSNorm``, ``PositionalEncoding`` for pseudo-groups; ``UNFNet`` and ``UNFEncoder`` put them together;
``DeepSets``, ``DeepSetsEncoder`` and ``StatNN`` are baselines with the same interface. ``SharedUNFLinear`` is
an equivariant layer whose parameters fit every spec (coefficients shared by the kind of basis term). ``UnitMLP``
is a per-unit MLP over all entries a unit touches (a memory of unit prototypes).
``unf.nn.graph`` (imported on its own, as it needs ``torch_geometric``) has the graph metanetwork over a network's
neural graph.
"""
from .baselines import DeepSets, DeepSetsEncoder, StatNN
from .basis import bell, set_partitions
from .layout import DEFAULT_FOLD_MAX, Layout, Piece
from .linear import UNFLinear
from .models import UNFBlock, UNFEncoder, UNFNet
from .modules import InvariantPool, Pointwise, PositionalEncoding, WSDropout, WSNorm, tensor_statistics
from .shared import SharedPlan, SharedUNFLinear
from .unit import UnitMLP

__all__ = ["DEFAULT_FOLD_MAX", "DeepSets", "DeepSetsEncoder", "InvariantPool", "Layout", "Piece", "Pointwise",
           "PositionalEncoding", "SharedPlan", "SharedUNFLinear", "StatNN", "UNFBlock", "UNFEncoder", "UNFLinear", "UNFNet",
           "UnitMLP", "WSDropout", "WSNorm",
           "bell", "set_partitions", "tensor_statistics"]
