"""Model zoos: populations of trained networks (work in progress: population training)."""
from .population import (ACTIVATIONS, Member, MemberDropout, MixedActivation, Population, build_member,
                         evaluate_population, make_population, train_population)

__all__ = ["ACTIVATIONS", "Member", "MemberDropout", "MixedActivation", "Population", "build_member",
           "evaluate_population", "make_population", "train_population"]
