"""``GradientWrapper``: a ``torch.optim.Optimizer`` that changes the gradients, then steps an inner optimizer.

It holds no parameter groups of its own: ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's
(so LR schedulers, gradient scalers and code that reads ``opt.state[p]`` see the inner optimizer), and
``add_param_group``/``zero_grad`` go to it. Subclasses implement :meth:`transform_grads` (in place, under no_grad)
and may keep state of their own (``extra_state``/``load_extra_state``).
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn as nn


class GradientWrapper(torch.optim.Optimizer):
    """Base class: ``step`` transforms the gradients, then steps ``optimizer`` (any ``torch.optim.Optimizer``,
    :class:`~unf.optim.UNFOptimizer` included).

    ``step(closure)``: the inner optimizer gets a closure that calls yours and transforms the fresh gradients, so
    optimizers that re-evaluate it (LBFGS) see transformed gradients every time. ``step(loss=...)`` is passed on to
    inner optimizers whose ``step`` takes ``loss`` (and dropped for those that do not).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        # torch.optim.Optimizer.__init__ would build parameter groups of its own; set up only its hooks
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self._model_names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        params = inspect.signature(optimizer.step).parameters
        self._inner_takes_loss = "loss" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    # -- the inner optimizer's groups, state and defaults --------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, optimizer={self.optimizer!r})"

    def _describe(self) -> str:
        return ""

    # -- names ---------------------------------------------------------------------------------------------------
    def param_names(self) -> dict[int, str]:
        """``id(param) -> name`` from the groups' ``param_names`` (an optimizer built from
        ``model.named_parameters()``), a :class:`~unf.optim.UNFOptimizer`'s names, or the ``model=`` given."""
        names = dict(getattr(self.optimizer, "_names", {}) or {})
        for g in self.param_groups:
            for p, n in zip(g["params"], g.get("param_names", ())):
                names[id(p)] = n
        names.update(self._model_names)
        return names

    def params(self):
        return [p for g in self.param_groups for p in g["params"]]

    # -- the step ------------------------------------------------------------------------------------------------
    def transform_grads(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, closure: Optional[Callable[[], float]] = None, loss=None):
        kw = {"loss": loss} if (loss is not None and self._inner_takes_loss) else {}
        if closure is None:
            with torch.no_grad():
                self.transform_grads()
            return self.optimizer.step(**kw)

        def transformed():
            out = closure()
            with torch.no_grad():
                self.transform_grads()
            return out

        return self.optimizer.step(transformed, **kw)

    # -- state_dict ----------------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """``{"optimizer": inner state_dict, "wrapper": this wrapper's settings and state}``."""
        return {"optimizer": self.optimizer.state_dict(), "wrapper": self.extra_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "wrapper"}:
            raise ValueError(f"state_dict: expected the dict of {type(self).__name__}.state_dict() with keys "
                             f"'optimizer' and 'wrapper', got keys {sorted(state_dict)[:6]}; to load a state_dict "
                             f"of the inner optimizer alone, call .optimizer.load_state_dict")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.load_extra_state(state_dict["wrapper"])


__all__ = ["GradientWrapper"]
