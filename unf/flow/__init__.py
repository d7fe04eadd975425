"""Weight-space flow matching: a generator of new networks whose velocity field is a UNF.

``train_flow`` fits a :class:`WeightFlow` to the networks of a zoo (``unf.flow.zoo`` selects rows and stores what
is generated), ``WeightFlow.sample`` integrates the learned ODE from noise with a fixed budget of velocity
evaluations (``unf.flow.solvers``).
"""
from .canonical import canonicalize
from .coupling import align_source, align_target, aligned_ot_pairing, ot_pairing
from .model import Conditioning, Source, Standardizer, WeightFlow
from .solvers import COST, integrate, steps_for
from .train import CheckpointError, FlowConfig, train_flow
from .velocity import MLPVelocity, UNFVelocity, VelocityField, build_velocity, num_parameters

__all__ = ["COST", "CheckpointError", "Conditioning", "FlowConfig", "MLPVelocity", "Source", "Standardizer", "UNFVelocity",
           "VelocityField", "WeightFlow", "align_source", "align_target", "aligned_ot_pairing", "build_velocity", "canonicalize", "integrate",
           "num_parameters", "ot_pairing", "steps_for", "train_flow"]
