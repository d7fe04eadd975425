"""Optimizers: the learned ``UNFOptimizer`` (a ``torch.optim.Optimizer``) and the learned rule behind it, and
``PSG`` (position-based scaled gradients around any optimizer, for quantisation- and pruning-friendly weights).

``meta_train`` meta-trains rules with evolution strategies over batched inner tasks: on a :class:`TaskFamily` of
the user's own (model, data, loss, batch size, horizon), or on the built-in MLP task mix.
"""
from .meta import MetaConfig, meta_train, tuned_adam_rule
from .optimizer import DEFAULT_WEIGHTS, UNFOptimizer, load_rule
from .psg import PSG
from .rule import LearnedRule, RuleConfig, init_state, step_direction
from .tasks import TaskFamily, train_curve
from .wrapper import GradientWrapper

__all__ = ["DEFAULT_WEIGHTS", "GradientWrapper", "LearnedRule", "MetaConfig", "PSG", "RuleConfig", "TaskFamily",
           "UNFOptimizer", "init_state", "load_rule", "meta_train", "step_direction", "train_curve",
           "tuned_adam_rule"]
