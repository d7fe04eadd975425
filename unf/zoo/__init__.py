"""Model zoos: train populations of networks (``population``) and store them safely (``store``). Work in progress."""
from .population import (ACTIVATIONS, Member, MemberDropout, MixedActivation, Population, build_member,
                         evaluate_population, make_population, train_population)
from .dataset import WeightDataset, collate, regression_metrics, split_by_run
from .loaders import convert_model_zoos, convert_small_cnn_zoo, load_model_zoos, load_small_cnn_zoo
from .store import Zoo, ZooFormatError, ZooWriter, build

__all__ = ["ACTIVATIONS", "Member", "MemberDropout", "MixedActivation", "Population", "WeightDataset", "Zoo",
           "ZooFormatError", "ZooWriter", "build", "collate", "convert_model_zoos", "convert_small_cnn_zoo",
           "load_model_zoos", "load_small_cnn_zoo", "regression_metrics", "split_by_run", "build_member", "evaluate_population", "make_population", "train_population"]
