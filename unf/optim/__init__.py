"""Learned optimizers: ``UNFOptimizer`` (a ``torch.optim.Optimizer``) and the learned rule behind it.

``unf.optim.meta`` meta-trains rules with evolution strategies over batched inner tasks.
"""
from .optimizer import DEFAULT_WEIGHTS, UNFOptimizer, load_rule
from .rule import LearnedRule, RuleConfig, init_state, step_direction

__all__ = ["DEFAULT_WEIGHTS", "LearnedRule", "RuleConfig", "UNFOptimizer", "init_state", "load_rule", "step_direction"]
