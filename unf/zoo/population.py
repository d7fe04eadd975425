"""Train a population of networks of one architecture at once (torch.func: stacked parameters, vmap).

Every member has its own seed, initialisation scale, learning rate, weight decay, dropout rate, activation, optimizer
(SGD with momentum or Adam) and training fraction. Differences in activation and dropout are carried by per-member
buffers of :class:`MixedActivation` and :class:`MemberDropout`, so one vmapped graph serves the whole population.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")
_ACT_FNS = (F.relu, torch.tanh, F.gelu, torch.sigmoid)


class MixedActivation(nn.Module):
    """The activation chosen by a one-hot buffer ``choice`` (so that it can differ between vmapped members)."""

    def __init__(self, name: str = "relu"):
        super().__init__()
        self.register_buffer("choice", F.one_hot(torch.tensor(ACTIVATIONS.index(name)), len(ACTIVATIONS)).float())
        self.only: Optional[int] = None  # set when every member uses one activation: skip the blend (4x less work)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.only is not None:
            return _ACT_FNS[self.only](x)
        return sum(w * f(x) for w, f in zip(self.choice, _ACT_FNS))


class MemberDropout(nn.Module):
    """Dropout whose rate is a buffer ``p`` (so that it can differ between vmapped members)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))
        self.off = False  # set when no member uses dropout: skip drawing masks that would keep everything

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.off:
            return x
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p).clamp_min(1e-6)


@dataclass
class Member:
    """Hyperparameters of one population member."""
    seed: int = 0
    lr: float = 1e-3
    init_scale: float = 1.0
    weight_decay: float = 0.0
    dropout: float = 0.0
    activation: str = "relu"
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    train_fraction: float = 1.0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: choose from {ACTIVATIONS}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r}: choose 'adam' or 'sgd'")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction {self.train_fraction} must be in (0, 1]")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


def build_member(make_model: Callable[[], nn.Module], member: Member) -> nn.Module:
    """Instantiate one member: seeded initialisation scaled by ``init_scale``, its activation and dropout rate."""
    torch.manual_seed(member.seed)
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(member.init_scale)
    for m in model.modules():
        if isinstance(m, MixedActivation):
            m.choice.copy_(F.one_hot(torch.tensor(ACTIVATIONS.index(member.activation)), len(ACTIVATIONS)))
        elif isinstance(m, MemberDropout):
            m.p.fill_(member.dropout)
    return model


@dataclass
class Population:
    """Stacked state of ``N`` members: ``params``/``buffers`` name -> ``[N, *shape]``."""
    base: nn.Module
    members: list
    params: dict
    buffers: dict
    opt_state: dict = field(default_factory=dict)
    step: int = 0
    columns: Optional[tuple] = None  # per-member lr, weight decay, is-Adam (see _columns)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """One ordinary state_dict per member (parameters and buffers, in the base model's order)."""
        keys = list(self.base.state_dict())
        both = {**self.params, **self.buffers}
        return [{k: both[k][i].detach().clone() for k in keys} for i in range(len(self.members))]


def make_population(make_model: Callable[[], nn.Module], members: Sequence[Member]) -> Population:
    models = [build_member(make_model, m) for m in members]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    one_activation = len({m.activation for m in members}) == 1
    no_dropout = all(m.dropout == 0 for m in members)
    for mod in base.modules():
        if isinstance(mod, MixedActivation) and one_activation:
            mod.only = ACTIVATIONS.index(members[0].activation)
        elif isinstance(mod, MemberDropout) and no_dropout:
            mod.off = True
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    return Population(base, list(members), params, buffers)


def _forward(pop: Population, x: torch.Tensor, same_input: bool, train: bool) -> torch.Tensor:
    pop.base.train(train)

    def one(params, buffers, xb):
        return functional_call(pop.base, (params, buffers), (xb,))

    return vmap(one, in_dims=(0, 0, None if same_input else 0), randomness="different")(pop.params, pop.buffers, x)


def _columns(pop: Population, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-member ``lr``, ``weight_decay`` and is-Adam as ``[N]`` vectors (built once per population)."""
    if pop.columns is None:
        pop.columns = (
            torch.tensor([m.lr for m in pop.members], dtype=like.dtype, device=like.device),
            torch.tensor([m.weight_decay for m in pop.members], dtype=like.dtype, device=like.device),
            torch.tensor([m.optimizer == "adam" for m in pop.members], device=like.device))
    return pop.columns


@torch.no_grad()
def _update(pop: Population) -> None:
    """One optimizer step for every member: Adam or SGD with momentum 0.9, decoupled weight decay."""
    pop.step += 1
    t = pop.step
    lrs, wds, adams = _columns(pop, next(iter(pop.params.values())))
    for k, p in pop.params.items():
        g = p.grad
        shape = (-1,) + (1,) * (p.dim() - 1)
        lr, wd, adam = lrs.view(shape), wds.view(shape), adams.view(shape)
        st = pop.opt_state.setdefault(k, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        # Adam moments (also used as SGD momentum buffer where the member uses SGD)
        st["m"] = torch.where(adam, 0.9 * st["m"] + 0.1 * g, 0.9 * st["m"] + g)
        st["v"] = torch.where(adam, 0.999 * st["v"] + 0.001 * g * g, st["v"])
        adam_step = (st["m"] / (1 - 0.9 ** t)) / ((st["v"] / (1 - 0.999 ** t)).sqrt() + 1e-8)
        p.mul_(1 - lr * wd).sub_(lr * torch.where(adam, adam_step, st["m"]))
        p.grad = None


def train_population(pop: Population, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64,
                     seed: int = 0, on_epoch: Optional[Callable[[int, Population], None]] = None,
                     progress: bool = False) -> Population:
    """Cross-entropy training of every member on its own subset (``train_fraction``) and its own batch order.

    A member's subset comes from its ``seed``, its batch order from ``(seed, member.seed)``, and an epoch is
    ``ceil(len(x) / batch_size)`` steps for everyone (a smaller subset is cycled), so a member trains the same alone
    or in any population.

    ``on_epoch(epoch, pop)`` is called after each epoch (1-based), e.g. to evaluate and save checkpoints.
    """
    n = len(pop.members)
    # each member draws its subset and batch order from its own generator: it trains the same in any population
    gens, subsets = [], []
    for m in pop.members:
        g = torch.Generator().manual_seed(m.seed)
        k = max(batch_size, int(round(m.train_fraction * len(x))))
        subsets.append(torch.randperm(len(x), generator=g)[:k])
        gens.append(torch.Generator().manual_seed(seed * 1_000_003 + m.seed))
    steps = math.ceil(len(x) / batch_size)  # the same for every member; smaller subsets are cycled
    epochs_iter: Iterable[int] = range(1, epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=f"training {n} networks", unit="epoch")
    for epoch in epochs_iter:
        orders = [s[torch.randperm(len(s), generator=g)] for s, g in zip(subsets, gens)]
        for i in range(steps):
            idx = torch.stack([o[(i * batch_size + torch.arange(batch_size)) % len(o)] for o in orders])  # [N, B]
            out = _forward(pop, x[idx], same_input=False, train=True)  # [N, B, classes]
            loss = F.cross_entropy(out.flatten(0, 1), y[idx].flatten(), reduction="sum") / batch_size
            loss.backward()
            _update(pop)
        if on_epoch is not None:
            on_epoch(epoch, pop)
    return pop


@torch.no_grad()
def evaluate_population(pop: Population, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member: mean cross-entropy and accuracy on ``(x, y)`` (eval mode), each ``[N]``."""
    n = len(pop.members)
    loss, correct = torch.zeros(n), torch.zeros(n)
    for i in range(0, len(x), batch_size):
        out = _forward(pop, x[i:i + batch_size], same_input=True, train=False)  # [N, B, classes]
        yb = y[i:i + batch_size]
        loss += F.cross_entropy(out.transpose(1, 2), yb.expand(n, -1), reduction="none").sum(1)
        correct += (out.argmax(2) == yb).sum(1)
    return loss / len(x), correct / len(x)
