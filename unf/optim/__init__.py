"""Optimizers: the learned ``UNFOptimizer`` (a ``torch.optim.Optimizer``) and the learned rule behind it, and
``PSG`` (position-based scaled gradients around any optimizer, for quantisation- and pruning-friendly weights).

``unf.optim.meta`` meta-trains rules with evolution strategies over batched inner tasks.
"""
from .optimizer import DEFAULT_WEIGHTS, UNFOptimizer, load_rule
from .psg import PSG
from .rule import LearnedRule, RuleConfig, init_state, step_direction
from .wrapper import GradientWrapper

__all__ = ["DEFAULT_WEIGHTS", "GradientWrapper", "LearnedRule", "PSG", "RuleConfig", "UNFOptimizer", "init_state",
           "load_rule", "step_direction"]
