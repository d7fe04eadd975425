"""Model zoos: train populations of networks (``population``), store them safely (``store``), load public zoos
(``loaders``), serve them as datasets (``dataset``), build the embedded ones (``builtin``) and predict their properties
from weights (``predict``; the graph metanetwork it offers is ``unf.nn.graph``)."""
from .population import (ACTIVATIONS, Member, MemberDropout, MixedActivation, Population, build_member,
                         evaluate_population, make_population, train_population)
from .dataset import WeightDataset, collate, regression_metrics, split_by_run
from .loaders import convert_model_zoos, convert_small_cnn_zoo, load_model_zoos, load_small_cnn_zoo
from .store import Zoo, ZooFormatError, ZooWriter, build
from .builtin import ZOOS, build_builtin, sample_members
from .predict import PREDICTORS, fit_predictor

__all__ = ["ACTIVATIONS", "Member", "MemberDropout", "MixedActivation", "PREDICTORS", "Population", "WeightDataset",
           "ZOOS", "Zoo", "ZooFormatError", "ZooWriter", "build", "build_builtin", "build_member", "collate",
           "convert_model_zoos", "convert_small_cnn_zoo", "evaluate_population", "fit_predictor", "load_model_zoos",
           "load_small_cnn_zoo", "make_population", "regression_metrics", "sample_members", "split_by_run",
           "train_population"]
