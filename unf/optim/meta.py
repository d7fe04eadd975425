"""Meta-training learned rules with evolution strategies over truncated unrolls of batched inner tasks.

One outer step: draw antithetic perturbations ``theta +- sigma * eps_i`` of the rule's flat meta-parameters, run an
unroll of ``unroll`` inner steps for every perturbation at once (the inner networks are a
:class:`~unf.zoo.population.Population` with one member per perturbation; the rule runs on all members in one batched
call with stacked meta-parameters), and estimate the meta-gradient from the meta-losses:

* ``"es"``: antithetic ES on the truncation; all members restart each truncation from the unperturbed member's state.
* ``"pes"``: Persistent ES (Vicol et al. 2021): every member keeps its own inner state and the noise it has seen since
  the task began, which removes the truncation bias.

Meta-loss: the mean over the unroll of the log of the training loss divided by the task's initial loss, clipped to
[``loss_floor``, ``loss_clip``] (non-finite values count as the clip): the log weighs reaching a low loss as much as
the first drop. The floor (default 1e-3) is where the meta-loss stops seeing progress: a family on which tuned Adam
ends far below it (digits-mlp: about 4e-5 of the initial loss) needs a lower one, or a rule that stalls at the floor
scores as well as Adam. With ``loss_scale="adam"`` each family's meta-loss is divided by tuned Adam's on it
(:func:`adam_scales`), so that in a mix every family counts alike. Outer optimizer: Adam with gradient-norm clipping.

Tasks: with a :class:`~unf.optim.tasks.TaskFamily` (``meta_train(cfg, family)``), every inner task is that family
at a new seed, drawn from ``[META_SEED_BASE, 2**31)`` (evaluation seeds are below it); with a list of families (a
mix, e.g. ``unf.optim.tasks.MIXES["broad"]``) every inner task is one of them, drawn uniformly. Without one, the MLP
task mix
(:func:`sample_task`): MLPs with 1-3 hidden layers of width 16-128 and a random activation, on digits, iris or wine
(never breast cancer), random batch size, initialisation scale and horizon (log-uniform between ``min_horizon`` and
``max_horizon``). The inner models of a task are one :class:`~unf.zoo.population.Population` run with ``torch.func``
(vmap); a model with an op that vmap cannot batch (``aten::gru`` has no batching rule, so a GRU) runs member by member
(same results, about ``2 * pairs + 1`` times one model's time; a warning says so).

Budget: ``MetaConfig(budget_s=...)`` stops after that many seconds of outer steps, counted over resumes (the seconds
of the steps a checkpoint holds); ``steps`` may then be ``None``.

Under ``torchrun`` the perturbation pairs are split over ranks and the gradient is summed with ``all_reduce``: the
result equals one process's for the same seed, up to float rounding.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from ..distributed import dist_info, init_distributed  # noqa: F401  (init_distributed: re-exported)
from ..weights import segment_sizes
from .rule import CompiledRule, LearnedRule, RuleConfig, flat_step, segment_index
from .tasks import ADAM_LRS, META_SEED_BASE, TaskFamily, train_curve

DATASETS = ("digits-flat", "iris", "wine")
ACTIVATIONS = ("relu", "tanh", "gelu")


@dataclass
class MetaConfig:
    """Settings of a meta-training run (stored in its checkpoints). ``max_horizon``, ``min_horizon``, ``datasets``
    and ``widths`` describe the MLP task mix; with a task family, the family fixes model, data and horizon."""
    steps: Optional[int] = 2000  # outer steps (None: until the budget is spent)
    pairs: int = 8  # antithetic pairs per outer step
    sigma: float = 0.01
    unroll: int = 10
    max_horizon: int = 200
    min_horizon: int = 50
    estimator: str = "pes"
    outer_lr: float = 3e-3
    grad_clip: float = 1.0
    loss_clip: float = 2.0
    log_loss: bool = True  # meta-loss: mean of log(loss / initial loss), floored at loss_floor (else the plain ratio)
    loss_floor: float = 1e-3  # the log meta-loss's floor on loss / initial loss
    seed: int = 0
    rule: dict = field(default_factory=dict)  # RuleConfig fields
    datasets: tuple = DATASETS
    widths: Optional[tuple] = None  # fix the tasks' hidden widths (variant "unf-exact" needs one architecture)
    budget_s: Optional[float] = None  # stop after this many seconds of meta-training, counted over resumes
    validate_every: int = 0  # > 0: every that many outer steps score the rule on held-out tasks; keep the best
    validate_tasks: int = 2  # held-out tasks per validation (family seeds VALIDATION_SEED + i; see meta_train)
    rollback: float = 0.0  # > 0 (with validation): a score this much above the best restarts from the best rule
    loss_scale: str = "none"  # "adam": each family's meta-loss in units of tuned Adam's on it (see adam_scales)

    def __post_init__(self):
        if self.steps is None and self.budget_s is None:
            raise ValueError("give steps, a budget_s, or both")
        if self.budget_s is not None and not (math.isfinite(self.budget_s) and self.budget_s > 0):
            raise ValueError(f"budget_s {self.budget_s} must be a positive number of seconds")
        if self.sigma <= 0 or self.pairs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"need sigma > 0 ({self.sigma}), pairs >= 1 ({self.pairs}) and steps >= 1 ({self.steps})")
        self.datasets = tuple(self.datasets)
        self.widths = tuple(self.widths) if self.widths is not None else None
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ValueError(f"datasets {unknown or '()'}: choose from {DATASETS}")
        if self.validate_every < 0 or self.validate_tasks < 1:
            raise ValueError(f"need validate_every >= 0 ({self.validate_every}) and validate_tasks >= 1 "
                             f"({self.validate_tasks})")
        if self.rollback < 0 or (self.rollback > 0 and not self.validate_every):
            raise ValueError(f"rollback {self.rollback}: must be >= 0, and > 0 only with validate_every > 0 (it acts "
                             "on validation scores)")
        if not 0 < self.loss_floor < 1:
            raise ValueError(f"loss_floor {self.loss_floor}: must be in (0, 1) (a fraction of the initial loss)")
        if self.loss_scale not in ("none", "adam"):
            raise ValueError(f"loss_scale {self.loss_scale!r}: choose 'none' or 'adam'")
        if self.loss_scale == "adam" and not self.log_loss:
            raise ValueError("loss_scale 'adam' scales the log meta-loss: it needs log_loss=True")
        if self.estimator not in ("es", "pes"):
            raise ValueError(f"estimator {self.estimator!r}: choose 'es' or 'pes'")
        if self.unroll < 1 or not self.unroll <= self.min_horizon <= self.max_horizon:
            raise ValueError(f"need 1 <= unroll ({self.unroll}) <= min_horizon ({self.min_horizon}) <= max_horizon "
                             f"({self.max_horizon})")

    def check_mix(self) -> None:
        """The checks that concern the MLP task mix only (meta-training without a family runs them)."""
        if self.loss_scale != "none":
            raise ValueError(f"loss_scale {self.loss_scale!r} measures tuned Adam on each task family: it needs "
                             "families (meta-train on a task family or a mix of them)")
        if self.rule.get("variant") == "unf-exact" and (self.widths is None or len(self.datasets) != 1):
            raise ValueError("variant 'unf-exact' learns for one architecture: give widths and exactly one dataset "
                             "(or meta-train on a task family)")


@dataclass
class Task:
    """One inner problem: an MLP on a dataset, trained for ``horizon`` steps."""
    dataset: str
    widths: tuple
    activation: str
    batch_size: int
    init_scale: float
    horizon: int
    seed: int

    def make_model(self, in_features: int, classes: int) -> nn.Module:
        from .tasks import mlp

        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[self.activation]
        return mlp(in_features, self.widths, classes, act)

    def family(self) -> TaskFamily:
        """This MLP on its dataset as a task family (cross-entropy; the model factory seeds like ``build_member``)."""
        from .. import data
        from .tasks import _embedded, _seeded

        split = data.load(self.dataset)
        make = lambda: self.make_model(split.x_train.shape[1], int(split.y_train.max()) + 1)  # noqa: E731
        return TaskFamily(_seeded(make), _embedded(self.dataset), F.cross_entropy, self.batch_size, self.horizon,
                          name=f"mlp-mix:{self.dataset}")

    def record(self) -> dict:
        return asdict(self)


@dataclass
class FamilyTask:
    """One inner problem of a task family: the family at ``seed`` (its initialisation and batch order)."""
    task_family: TaskFamily
    seed: int
    init_scale: float = 1.0

    @property
    def horizon(self) -> int:
        return self.task_family.horizon

    @property
    def batch_size(self) -> int:
        return self.task_family.batch_size

    def family(self) -> TaskFamily:
        return self.task_family

    def record(self) -> dict:
        return {"family": self.task_family.name, "seed": self.seed, "horizon": self.horizon}


def sample_task(gen: torch.Generator, cfg: MetaConfig) -> Task:
    u = lambda: torch.rand((), generator=gen).item()  # noqa: E731
    pick = lambda seq: seq[int(torch.randint(len(seq), (), generator=gen))]  # noqa: E731
    depth = 1 + int(torch.randint(3, (), generator=gen))
    widths = tuple(int(round(math.exp(math.log(16) + u() * math.log(128 / 16)))) for _ in range(depth))
    widths = cfg.widths if cfg.widths is not None else widths  # drawn all the same: the task stream stays put
    lo, hi = math.log(cfg.min_horizon), math.log(cfg.max_horizon)
    horizon = cfg.unroll * max(1, round(math.exp(lo + u() * (hi - lo)) / cfg.unroll))
    return Task(pick(cfg.datasets), widths, pick(ACTIVATIONS), pick((16, 32, 64, 128)),
                math.exp(math.log(0.5) + u() * math.log(4.0)), horizon, int(torch.randint(2 ** 31, (), generator=gen)))


def es_gradient(loss_pos: torch.Tensor, loss_neg: torch.Tensor, directions: torch.Tensor, sigma: float,
                total_pairs: int) -> torch.Tensor:
    """Antithetic estimate of the meta-gradient: ``sum_i (L(+) - L(-)) dir_i / (2 sigma N)``.

    ``loss_pos``/``loss_neg``: ``[k]`` for this process's pairs; ``directions``: ``[k, D]`` (the noise ``eps_i``, or
    for PES the noise accumulated over the task); ``total_pairs``: ``N`` over all processes (their sums add up)."""
    return ((loss_pos - loss_neg)[:, None] * directions).sum(0) / (2 * sigma * total_pairs)


def _noise(cfg: MetaConfig, step: int, pair: int, dim: int) -> torch.Tensor:
    """The pair's perturbation direction: the same on every rank (seeded by run seed, outer step and pair)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 10_007 + pair)
    return torch.randn(dim, generator=g)


def _model_spec(model: nn.Module, x: torch.Tensor):
    """The parameters-only spec of ``model`` on inputs like ``x``."""
    from .. import spec_from_module

    return spec_from_module(model, x[:1]).subset(dict(model.named_parameters()))


def _task_spec(task: Task):
    from .. import data

    split = data.load(task.dataset)
    return _model_spec(task.make_model(split.x_train.shape[1], int(split.y_train.max()) + 1), split.x_train)


def _family_seed(gen: torch.Generator) -> int:
    """A meta-training seed of a family: in ``[META_SEED_BASE, 2**31)``, never an evaluation seed."""
    return META_SEED_BASE + int(torch.randint(2 ** 31 - META_SEED_BASE, (), generator=gen))


class _Inner:
    """The inner training state of one task: ``n`` members (last: unperturbed), their optimizer state and noise."""

    def __init__(self, task: Task | FamilyTask, cfg: MetaConfig, rule: LearnedRule, n_pairs: int, dim: int):
        from ..zoo.population import Member, _prime_allocator, make_population

        self.task, self.t = task, 0
        family = task.family()
        self.loss = family.loss
        self.x, self.y = family.data()[:2]
        make = lambda: family.model(task.seed)  # noqa: E731  (build_member seeds the global RNG first)
        self.pop = make_population(make, [Member(seed=task.seed, init_scale=task.init_scale)] * (2 * n_pairs + 1))
        # the rule's activations on 17 stacked members are 5-20 MB each: without this every step page-faults them in
        # anew (a PES step of the digits-MLP family 1.2x slower in CPU time)
        _prime_allocator(self.pop.flat.device)
        self.spec = family.spec()
        self.plan = rule.plan(self.spec)
        n, dim_w = self.pop.flat.shape
        self.m, self.v = self.pop.flat.new_zeros(n, len(rule.config.decays), dim_w), torch.zeros_like(self.pop.flat)
        self.index = segment_index(segment_sizes(self.spec))
        self.xi = torch.zeros(n_pairs, dim)  # PES: accumulated noise per pair
        self.gen = torch.Generator().manual_seed(task.seed)
        self.loss0: Optional[float] = None

    def unroll(self, rule: LearnedRule, stacked: dict, steps: int, loss_clip: float, log_loss: bool = False,
               compiled=None, floor: float = 1e-3) -> torch.Tensor:
        """Run ``steps`` inner steps; the members' meta-loss ``[n]``: the mean over the steps of the training loss
        relative to the task's initial loss, clipped at ``loss_clip`` (non-finite: the clip), or of its log (the ratio
        floored at ``floor`` first).
        ``compiled``: a :class:`~unf.optim.rule.CompiledRule` (see :func:`meta_train`'s ``compile``)."""
        from ..zoo.population import member_grads

        total = torch.zeros(self.pop.flat.shape[0])
        for _ in range(steps):
            idx = torch.randint(len(self.x), (self.task.batch_size,), generator=self.gen)
            losses, grad = member_grads(self.pop, self.x[idx], self.y[idx], loss=self.loss, same_input=True)
            if self.loss0 is None:
                self.loss0 = float(losses[-1])
            self.t += 1
            with torch.no_grad():
                # pop.flat's layout is the flat step's: parameters in spec order
                direction, self.m, self.v = flat_step(rule, self.plan, self.pop.flat, grad, self.m, self.v, self.t,
                                                      params=stacked, index=self.index, compiled=compiled)
                self.pop.flat.sub_(direction)
                bad = ~torch.isfinite(self.pop.flat).all(1)
                if bad.any():  # a diverged member stays diverged: its losses count as the clip from here on
                    self.pop.flat[bad] = torch.nan
            norm = (losses / self.loss0).nan_to_num(loss_clip, loss_clip, loss_clip).clamp(0, loss_clip)
            total += norm.clamp_min(floor).log() if log_loss else norm
        return total / steps

    def sync_to_mean(self) -> None:
        """ES: every member restarts from the unperturbed member's state."""
        with torch.no_grad():
            self.pop.flat.copy_(self.pop.flat[-1:].expand_as(self.pop.flat))
            for t in (self.m, self.v):
                t.copy_(t[-1:].expand_as(t))


VALIDATION_SEED = 2 ** 31  # held-out tasks' seeds: meta-training draws from [2**30, 2**31), evaluations use small ones


def _families(family) -> list:
    """``meta_train``'s ``family`` as a list: ``[]`` (the MLP task mix), ``[family]``, or a mix's families."""
    if family is None:
        return []
    fams = [family] if isinstance(family, TaskFamily) else list(family) if isinstance(family, (list, tuple)) else None
    if not fams or not all(isinstance(f, TaskFamily) for f in fams):
        raise TypeError(f"meta_train: family must be a unf.optim.TaskFamily or a non-empty list of them, got "
                        f"{type(family).__name__} (the run directory is out=...)")
    names = [f.name for f in fams]
    if len(set(names)) < len(names):
        raise ValueError(f"meta_train: the mix names a family twice ({names})")
    return fams


def validation_tasks(cfg: MetaConfig, family=None) -> list:
    """The held-out tasks of :func:`meta_train`'s validation: each family at seeds ``VALIDATION_SEED + i``, or for
    the MLP mix tasks drawn from a generator no meta-training step uses."""
    fams = _families(family)
    if fams:
        return [FamilyTask(f, VALIDATION_SEED + i) for f in fams for i in range(cfg.validate_tasks)]
    return [sample_task(torch.Generator().manual_seed(VALIDATION_SEED + cfg.seed * 7919 + i), cfg)
            for i in range(cfg.validate_tasks)]


def validation_loss(cfg: MetaConfig, rule: LearnedRule, params: dict, tasks: list, compiled=None,
                    scales: Optional[dict] = None) -> float:
    """The meta-loss of the rule with meta-parameters ``params`` (name -> ``[1, *shape]``) over whole tasks: each
    task trained for its full horizon from its seed, the mean over tasks of the mean (log) loss ratio, divided by its
    family's scale where ``scales`` (family name -> scale, :func:`adam_scales`) is given."""
    total = 0.0
    for task in tasks:
        inner = _Inner(task, cfg, rule, 0, 0)
        value = float(inner.unroll(rule, params, task.horizon, cfg.loss_clip, cfg.log_loss, compiled=compiled,
                                   floor=cfg.loss_floor)[0])
        total += value / scales[task.task_family.name] if scales else value
    return total / len(tasks)


MIN_SCALE = 1.0  # adam_scales never enlarges a meta-loss: a family on which tuned Adam gains less than e-fold keeps raw units


def adam_scales(cfg: MetaConfig, family: Union[TaskFamily, Sequence[TaskFamily]]) -> dict[str, float]:
    """Per family (name -> scale): minus the whole-horizon meta-loss of tuned Adam (:func:`tuned_adam_rule`, its
    constant learning rate chosen on the same held-out seeds) on the family's ``cfg.validate_tasks`` validation tasks,
    at least ``MIN_SCALE`` (1: a meta-loss is only ever shrunk). With ``MetaConfig(loss_scale="adam")`` every family's
    meta-loss is divided by its scale, so tuned Adam scores -1 on each family where it gains more than e-fold, and a
    rule 10 % better in log-loss scores -1.1 whatever the family: in a mix, the families that reach far lower losses
    than the others no longer dominate the meta-gradient (with a low ``loss_floor`` their log-losses span ten times
    the others'), and one that no optimizer trains within its horizon (the broad mix's parity GRU) is not blown up
    into noise."""
    scales = {}
    for f in _families(family):
        rule, _ = tuned_adam_rule(f, dict(cfg.rule), tasks=cfg.validate_tasks)
        params = {n: p.detach()[None] for n, p in rule.named_parameters()}
        tasks = validation_tasks(cfg, f)
        scales[f.name] = max(-validation_loss(cfg, rule, params, tasks), MIN_SCALE)  # eager: one rule per family
    return scales


def tuned_adam_rule(family: Union[TaskFamily, Sequence[TaskFamily]], rule: Optional[dict] = None,
                    lrs: Sequence[float] = ADAM_LRS, tasks: int = 2) -> tuple[LearnedRule, float]:
    """A new rule that takes Adam's steps at the constant learning rate that trains ``family`` best, and that rate.

    A new rule's last layer is zero, so it is its base: Adam with step ``alpha``. Each rate of ``lrs`` trains each
    family at its held-out seeds ``VALIDATION_SEED + i`` (``i < tasks``: those of :func:`validation_tasks`, never a
    meta-training or evaluation seed) for its horizon; the rate with the lowest mean over them of
    ``log(lowest training loss / initial loss)`` becomes ``alpha``. Meta-training from this start begins at tuned
    Adam, so what it keeps (with validation) is never worse than Adam there. ``rule``: ``RuleConfig`` fields
    (``variant="unf-exact"`` takes the one family's spec)."""
    fams = _families(family)
    if not fams:
        raise TypeError("tuned_adam_rule: needs a task family (or a list of them)")
    if (rule or {}).get("variant") == "unf-exact" and len(fams) > 1:  # before the tuning runs, not after
        raise ValueError("variant 'unf-exact' learns for one architecture: give one family, not a mix")

    def score(lr: float) -> float:
        total = 0.0
        for f in fams:
            for i in range(tasks):
                curve = train_curve(f, lambda m, x: torch.optim.Adam(m.parameters(), lr=lr), VALIDATION_SEED + i)
                low = min((v for v in curve["train"] if v is not None), default=math.inf)
                total += math.log(max(low, 1e-30) / curve["train"][0]) if math.isfinite(low) else math.inf
        return total / (len(fams) * tasks)

    best = min(lrs, key=score)
    config = RuleConfig(**{**(rule or {}), "alpha": best})
    spec = fams[0].spec() if config.variant == "unf-exact" else None
    return LearnedRule(config, spec=spec), best


def meta_train(cfg: MetaConfig, family: Union[TaskFamily, Sequence[TaskFamily], None] = None,
               out: Optional[str | Path] = None,
               rule: Optional[LearnedRule] = None, progress: bool = False, checkpoint_every: int = 10, log=None,
               compile: bool = False) -> tuple[LearnedRule, list[dict]]:
    """Meta-train a rule (``rule`` or a new one from ``cfg.rule``) on ``family`` at new seeds, or on the MLP task mix
    without one; checkpoints to ``out`` and resumes from there (refusing a checkpoint of other settings or another
    family). Stops after ``cfg.steps`` outer steps or ``cfg.budget_s`` seconds, whichever comes first. ``family``
    may be a list of families (a mix, e.g. ``unf.optim.tasks.MIXES["broad"]``): each inner task is one of them,
    drawn uniformly, at a new seed; validation then scores ``cfg.validate_tasks`` seeds of each.

    Returns the rule and the per-step log (``{"step", "meta_loss", "grad_norm", "task", "seconds"}``). At the end
    ``out/rule.safetensors`` holds the result in the weights-file format that ``UNFOptimizer(weights=...)`` reads.

    With ``cfg.validate_every > 0`` the rule is scored before the first step, every that many steps and after the
    last one on ``cfg.validate_tasks`` held-out tasks (:func:`validation_tasks`: never a meta-training task, and
    not the small seeds evaluations use), each trained for its whole horizon (:func:`validation_loss`); the result is
    the rule with the lowest score, not the last one (PES can walk a rule into a diverging region late in a run).
    Scores go into the log (``"valid_loss"``; the starting rule's: ``"valid_loss_start"`` of step 1), and the budget
    counts their time. With ``cfg.rollback > 0`` a score more than that above the best one sends the run back: the
    meta-parameters become the best rule's, the outer Adam restarts at half its learning rate, and a new inner task
    begins (logged as ``"rollback": {"to_step", "outer_lr"}``). A diverging rule otherwise stays diverged: its
    clipped meta-loss is flat, so PES has no gradient to leave the region by.

    ``compile``: the rule runs through ``torch.compile`` (:class:`~unf.optim.rule.CompiledRule`): one
    compile per architecture and member count, tens of seconds each on a CPU, counted in the budget. The steps equal
    eager ones to float rounding, not bit for bit, so it is not a setting of the run: a run resumes with or without
    it."""
    fams = _families(family)
    if not fams:
        cfg.check_mix()
    for f in fams:
        if cfg.unroll > f.horizon:
            raise ValueError(f"unroll ({cfg.unroll}) is longer than task family {f.name!r}'s horizon ({f.horizon})")
    if len(fams) > 1 and cfg.rule.get("variant") == "unf-exact":
        raise ValueError("variant 'unf-exact' learns for one architecture: meta-train it on one family, not a mix")
    identity = None if not fams else {"name": fams[0].name, "spec_hash": fams[0].fingerprint()} if len(fams) == 1 \
        else {"mix": [{"name": f.name, "spec_hash": f.fingerprint()} for f in fams]}
    dist, rank, world = dist_info()
    torch.manual_seed(cfg.seed)
    if rule is None:
        spec = None
        if cfg.rule.get("variant") == "unf-exact":
            spec = fams[0].spec() if fams else \
                _task_spec(sample_task(torch.Generator().manual_seed(cfg.seed), cfg))
        rule = LearnedRule(RuleConfig(**cfg.rule), spec=spec)
    names = [n for n, _ in rule.named_parameters()]
    shapes = [p.shape for p in rule.parameters()]
    theta = parameters_to_vector(rule.parameters()).detach().clone()
    opt = torch.optim.Adam([theta.requires_grad_(False)], lr=cfg.outer_lr)
    history: list[dict] = []
    start = 0
    out = Path(out) if out is not None else None
    if out is not None and (out / "checkpoint.safetensors").is_file():
        history = load_checkpoint(out, cfg, theta, opt, family=identity)
        start = len(history)
        for h in history:  # the outer learning rate after the rollbacks the run has had
            if "rollback" in h:
                opt.param_groups[0]["lr"] = h["rollback"]["outer_lr"]
    saved = start
    elapsed = sum(h["seconds"] for h in history)  # the budget counts the steps the checkpoint holds
    held_out = validation_tasks(cfg, fams or None) if cfg.validate_every else []
    best: Optional[tuple[float, int, torch.Tensor]] = None  # (score, step, theta)
    if held_out and out is not None and (out / "checkpoint.safetensors").is_file():
        best = _read_best(out)
    scales, scale_s = None, 0.0  # family name -> scale of its meta-loss (loss_scale "adam"), measured once per run
    if cfg.loss_scale == "adam":
        scales = next((h["loss_scales"] for h in history[:1] if "loss_scales" in h), None)
        if scales is None:
            t0 = time.perf_counter()
            scales = adam_scales(cfg, fams)
            scale_s = time.perf_counter() - t0
            elapsed += scale_s

    compiled = CompiledRule() if compile else None

    def validate(at: int) -> float:
        nonlocal best
        score = validation_loss(cfg, rule, _stack(theta[None], names, shapes), held_out, compiled, scales)
        if best is None or score < best[0]:
            best = (score, at, theta.clone())
        return score

    initial = None  # the starting rule's score and seconds, logged with the first step (so resumes count them)
    if held_out and start == 0:
        t0 = time.perf_counter()
        initial = (validate(0), time.perf_counter() - t0)
        elapsed += initial[1]
    over = lambda: cfg.budget_s is not None and elapsed >= cfg.budget_s  # noqa: E731
    my_pairs = list(range(rank, cfg.pairs, world))
    task_gen = torch.Generator()
    inner: Optional[_Inner] = None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(desc="meta-training", unit="step", initial=start, total=cfg.steps)
    step = start
    while (cfg.steps is None or step < cfg.steps) and not over():
        t0 = time.perf_counter()
        if inner is None or inner.t >= inner.task.horizon:
            task_gen.manual_seed(cfg.seed * 7919 + step)  # a task depends only on (seed, step it starts at)
            if not fams:
                task = sample_task(task_gen, cfg)
            else:  # one family: no draw, so a family's task stream is that of a one-family run
                pick = fams[int(torch.randint(len(fams), (), generator=task_gen))] if len(fams) > 1 else fams[0]
                task = FamilyTask(pick, _family_seed(task_gen))
            inner = _Inner(task, cfg, rule, len(my_pairs), theta.numel())
        eps = torch.stack([_noise(cfg, step, i, theta.numel()) for i in my_pairs]) if my_pairs else \
            theta.new_zeros(0, theta.numel())
        signs = torch.cat([torch.ones(len(my_pairs)), -torch.ones(len(my_pairs)), torch.zeros(1)])
        pert = torch.cat([eps, eps, theta.new_zeros(1, theta.numel())])
        flat = theta[None] + cfg.sigma * signs[:, None] * pert  # [n, D]
        stacked = _stack(flat, names, shapes)
        if cfg.estimator == "pes":
            inner.xi += eps
            direction = inner.xi
        else:
            direction = eps
        # a family's horizon need not be a multiple of the unroll: the task's last truncation is shorter
        losses = inner.unroll(rule, stacked, min(cfg.unroll, inner.task.horizon - inner.t), cfg.loss_clip,
                              cfg.log_loss, compiled=compiled, floor=cfg.loss_floor)
        if scales is not None:
            losses = losses / scales[inner.task.task_family.name]
        k = len(my_pairs)
        grad = es_gradient(losses[:k], losses[k:2 * k], direction, cfg.sigma, cfg.pairs)
        if cfg.estimator == "es":
            inner.sync_to_mean()
        if dist is not None:
            dist.all_reduce(grad)
        gnorm = grad.norm()
        if gnorm > cfg.grad_clip:
            grad = grad * (cfg.grad_clip / gnorm)
        theta.grad = grad
        opt.step()
        theta.grad = None
        due = held_out and ((step + 1) % cfg.validate_every == 0 or step + 1 == cfg.steps)
        score = validate(step + 1) if due else None  # inside the step's seconds, so every rank's clock counts it
        seconds = time.perf_counter() - t0
        if dist is not None and cfg.budget_s is not None:  # every rank stops at one step: rank 0's clock counts
            t = torch.tensor([seconds], dtype=torch.float64)
            dist.broadcast(t, 0)
            seconds = float(t)
        history.append({"step": step + 1, "meta_loss": float(losses[-1]), "grad_norm": float(gnorm),
                        "task": inner.task.record(), "seconds": seconds})
        elapsed += seconds
        step += 1
        if held_out and score is None and over():  # the budget ends the run here: score its last rule too
            t0 = time.perf_counter()
            score = validate(step)
            history[-1]["seconds"] += time.perf_counter() - t0
        restart = False
        if score is not None:
            history[-1]["valid_loss"] = score
            if cfg.rollback > 0 and score > best[0] + cfg.rollback:
                theta.copy_(best[2])
                opt.state.clear()
                opt.param_groups[0]["lr"] *= 0.5
                history[-1]["rollback"] = {"to_step": best[1], "outer_lr": opt.param_groups[0]["lr"]}
                restart = True
        if initial is not None and step == 1:
            history[-1]["valid_loss_start"] = initial[0]
            history[-1]["seconds"] += initial[1]
        if scales is not None and step == 1:  # kept in the log, so a resume reads them back
            history[-1]["loss_scales"] = scales
            history[-1]["seconds"] += scale_s
        if log is not None:
            log(history[-1])
        if bar is not None:
            bar.update(1)
        if restart:  # the inner task's state (PES noise, momenta) belongs to the abandoned meta-parameters
            inner.t = inner.task.horizon
        done = inner.t >= inner.task.horizon
        last = step == cfg.steps or over()
        if out is not None and rank == 0 and done and (step - saved >= checkpoint_every or last):
            save_checkpoint(out, cfg, theta, opt, history, family=identity, best=best)
            saved = step
    if bar is not None:
        bar.close()
    _assign(rule, theta if best is None else best[2])
    if out is not None and rank == 0:
        rule.save(out / "rule.safetensors")
    return rule, history


class CheckpointError(ValueError):
    """A run directory's checkpoint cannot be resumed (damaged, or written with other settings)."""


def _stack(flat: torch.Tensor, names: list, shapes: list) -> dict:
    """``[n, D]`` meta-parameter vectors -> name -> ``[n, *shape]`` views."""
    stacked, i = {}, 0
    for name, shape in zip(names, shapes):
        size = math.prod(shape)
        stacked[name] = flat[:, i:i + size].reshape(-1, *shape)
        i += size
    return stacked


def _read_best(out: Path) -> Optional[tuple[float, int, torch.Tensor]]:
    meta, tensors = _read_checkpoint(out)
    best = json.loads(meta.get("best", "null"))
    return None if best is None else (best["valid_loss"], best["step"], tensors["best_theta"])


def save_checkpoint(out: Path, cfg: MetaConfig, theta: torch.Tensor, opt: torch.optim.Adam, history: list,
                    family: Optional[dict] = None, best: Optional[tuple] = None) -> None:
    """``out/checkpoint.safetensors``: meta-parameters and outer Adam state, settings, the task family (``{"name",
    "spec_hash"}``, or none: the MLP mix) and log in its metadata; written atomically, at task boundaries only (a
    task depends on (seed, step), so a resumed run continues exactly)."""
    from safetensors.torch import save_file

    from ..io import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    st = opt.state.get(theta, {})
    tensors = {"theta": theta.detach().clone()}
    if st:
        tensors.update(exp_avg=st["exp_avg"].clone(), exp_avg_sq=st["exp_avg_sq"].clone(),
                       adam_step=torch.as_tensor(st["step"], dtype=torch.float64).reshape(1))
    meta = {"config": json.dumps(asdict(cfg)), "history": json.dumps(history), "family": json.dumps(family)}
    if best is not None:  # validation's best rule so far: (score, step, theta)
        tensors["best_theta"] = best[2].detach().clone()
        meta["best"] = json.dumps({"valid_loss": best[0], "step": best[1]})
    atomic_write(out / "checkpoint.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read_checkpoint(out: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    path = out / "checkpoint.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta["config"], meta["history"] = json.loads(meta["config"]), json.loads(meta["history"])
    except Exception as e:  # safetensors' own errors, missing or broken metadata
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to start over") from None
    return meta, tensors


def checkpoint_history(out: str | Path) -> list:
    """The log of the steps a run directory's checkpoint holds ([] without one)."""
    out = Path(out)
    return _read_checkpoint(out)[0]["history"] if (out / "checkpoint.safetensors").is_file() else []


def load_checkpoint(out: Path, cfg: MetaConfig, theta: torch.Tensor, opt: torch.optim.Adam,
                    family: Optional[dict] = None) -> list:
    """Restore ``theta`` and ``opt`` from ``out``; returns the log. Refuses a checkpoint made with other settings or
    for another task family (``family``: ``{"name", "spec_hash"}`` as :func:`save_checkpoint` records it, or
    ``{"mix": [...]}`` of those for a mix)."""
    meta, tensors = _read_checkpoint(out)
    path = out / "checkpoint.safetensors"
    theirs = json.loads(meta.get("family", "null"))
    if theirs != family:
        what = lambda f: "the MLP task mix" if f is None else \
            f"the mix of {', '.join(repr(m['name']) for m in f['mix'])}" if "mix" in f else \
            f"task family {f['name']!r} (spec hash {f['spec_hash']})"  # noqa: E731
        raise CheckpointError(f"{path} was meta-trained on {what(theirs)}, not on {what(family)}; use another --out "
                              "or the same task to resume")
    # steps and budget may change: a run may be extended; a setting added since the checkpoint was written counts
    # at its default
    same = lambda c: {k: v for k, v in c.items() if k not in ("steps", "budget_s")}  # noqa: E731
    defaults = {f.name: f.default for f in fields(MetaConfig) if f.default is not MISSING}
    stored = {**json.loads(json.dumps({k: v for k, v in defaults.items() if k not in meta["config"]})),
              **meta["config"]}
    if same(stored) != same(json.loads(json.dumps(asdict(cfg)))):
        raise CheckpointError(f"{path} was written with other settings ({json.dumps(meta['config'])}); use another "
                              "--out or the same settings to resume")
    if tensors["theta"].shape != theta.shape:
        raise CheckpointError(f"{path}: {tensors['theta'].numel()} meta-parameters, this rule has {theta.numel()}")
    theta.copy_(tensors["theta"])
    if "exp_avg" in tensors:
        opt.state[theta] = {"step": torch.tensor(float(tensors["adam_step"][0])),
                            "exp_avg": tensors["exp_avg"], "exp_avg_sq": tensors["exp_avg_sq"]}
    return meta["history"]


def _assign(rule: LearnedRule, theta: torch.Tensor) -> None:
    from torch.nn.utils import vector_to_parameters

    with torch.no_grad():
        vector_to_parameters(theta.clone(), rule.parameters())


__all__ = ["CheckpointError", "DATASETS", "FamilyTask", "MetaConfig", "Task", "VALIDATION_SEED", "adam_scales",
           "checkpoint_history",
           "es_gradient", "init_distributed", "load_checkpoint", "meta_train", "sample_task", "save_checkpoint",
           "validation_loss", "validation_tasks"]
