"""Model zoos: train populations of networks (``population``) and store them safely (``store``). Work in progress."""
from .population import (ACTIVATIONS, Member, MemberDropout, MixedActivation, Population, build_member,
                         evaluate_population, make_population, train_population)
from .store import Zoo, ZooFormatError, ZooWriter, build

__all__ = ["ACTIVATIONS", "Member", "MemberDropout", "MixedActivation", "Population", "Zoo", "ZooFormatError",
           "ZooWriter", "build", "build_member", "evaluate_population", "make_population", "train_population"]
