"""Conditional flow matching in weight space (Lipman et al. 2023; rectified flow, Liu et al. 2023).

Per step: networks ``x1`` from the training rows (standardised), noise ``x0 ~ N(0, I)``, optionally re-paired by
minibatch OT and/or permuted towards their targets; ``t ~ U(0, 1)`` (or logit-normal, ``time_sampling``); ``x_t = (1 - t) x0 + t x1``; the velocity is
regressed onto ``x1 - x0`` (mean squared error over every entry). AdamW, gradient clipping, an EMA of the weights
(``torch.optim.swa_utils``) that is what gets saved and sampled.

Under ``torchrun`` the velocity is wrapped in DistributedDataParallel: every rank draws the same global batch from
``(seed, step)`` and trains on its slice, so without OT coupling (which pairs within a rank's slice) two processes
compute exactly the step of one process with the whole batch. Checkpoints (``RUN/checkpoint.safetensors``: weights,
EMA, optimizer state, log) are written atomically; a run restarted with the same settings continues where it was.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..distributed import dist_info
from ..io import atomic_write
from ..weights import WeightSpace
from .canonical import canonicalize
from .coupling import align_source, align_target, aligned_ot_pairing, ot_pairing
from .model import Conditioning, Source, Standardizer, WeightFlow
from ..nn.compiled import Compiled
from .velocity import build_velocity, num_parameters

DEFAULT_VELOCITY = {"unf": dict(hidden=16, depth=2, emb=64, fold_max=2),
                    "mlp": dict(hidden=512, layers=3, emb=64, prediction="data")}


TIME_SAMPLING = ("uniform", "logit-normal")


@dataclass
class FlowConfig:
    """Settings of one flow-matching run (all recorded with the result)."""
    velocity: str = "unf"
    velocity_config: dict = field(default_factory=dict)  # overrides of DEFAULT_VELOCITY[velocity]
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100
    cooldown: int = 0  # the last `cooldown` of `steps` decay the rate linearly to 0 (warmup-stable-decay)
    grad_clip: float = 1.0
    ema: float = 0.999
    ot: bool = True
    align_source: bool = False
    align_target: bool = False  # permute each target towards its noise (equivariant OT flow matching)
    ot_candidates: int = 0  # > 0: OT pairs chosen on aligned distances, each target against this many nearest noises
    canonicalize: str = "none"  # "none", "reference", "barycentre"
    condition: list = field(default_factory=list)  # metadata columns to condition on
    cond_drop: float = 0.1  # probability of dropping each condition (so unconditioned sampling works)
    path_noise: float = 0.0  # std of Gaussian noise added to x_t (DeepWeightFlow: 0.001)
    time_sampling: str = "uniform"  # "uniform": t ~ U(0, 1); "logit-normal": t = sigmoid(N(0, 1)) (SD3), mid-path weighted
    loss: str = "velocity"  # "velocity" or "data" (the latter for data-predicting fields)
    source: str = "normal"  # "normal": N(0, I); "gaussian": per-entry Gaussian of the (canonicalised) rows
    seed: int = 0
    checkpoint_every: int = 250
    select_every: int = 0  # > 0: every that many steps score the EMA field by ``select`` and keep the best

    def velocity_kwargs(self, vocab: Sequence[int]) -> dict:
        if self.velocity not in DEFAULT_VELOCITY:
            raise ValueError(f"unknown velocity {self.velocity!r}; choose from {sorted(DEFAULT_VELOCITY)}")
        return {**DEFAULT_VELOCITY[self.velocity], **self.velocity_config, "vocab": list(vocab)}


class _Objective(nn.Module):
    """The flow-matching loss as a module, so DistributedDataParallel sees one forward and averages gradients.

    ``loss="velocity"``: mean squared error of the velocity (for a data-predicting field, the data error weighted by
    ``1 / (1 - t)^2``); ``loss="data"``: mean squared error of the predicted clean weights (data-predicting fields
    only), which weighs every time alike."""

    def __init__(self, velocity: nn.Module, loss: str = "velocity"):
        super().__init__()
        self.velocity, self.loss = velocity, loss

    def forward(self, xt: WeightSpace, t: torch.Tensor, cond, target: WeightSpace) -> torch.Tensor:
        if self.loss == "data":
            x1 = xt.flatten() + (1 - t)[:, None] * target.flatten()
            return (self.velocity.predict(xt, t, cond).flatten() - x1).square().mean()
        v = self.velocity(xt, t, cond)
        return (v.flatten() - target.flatten()).square().mean()


def lr_factor(cfg: FlowConfig, step: int) -> float:
    """The learning rate over ``cfg.lr`` at 0-based ``step``: a linear warm-up over ``cfg.warmup`` steps, constant,
    then with ``cfg.cooldown`` a linear decay to zero over the run's last ``cooldown`` steps. A constant-rate run can
    be resumed with a cooldown (and more steps) to anneal it, the warmup-stable-decay schedule."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.cooldown <= 0:
        return warm
    return warm * min(1.0, max(0.0, (cfg.steps - step) / cfg.cooldown))


def _ema_fn(decay: float):
    """EMA with warm-up: the plain average of the first ``1 / (1 - decay)`` steps, then decay ``decay`` -- so a
    short run's EMA is not dominated by the (zero) initial field."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        w = max(1.0 - decay, 1.0 / (float(num_averaged) + 1.0))
        return averaged + (current - averaged) * w

    return avg


class CheckpointError(ValueError):
    """A run directory's checkpoint is damaged or was made with other settings."""


def _batch(data: WeightSpace, cond: Optional[torch.Tensor], cfg: FlowConfig, step: int, world: int, rank: int,
           source: Source):
    """This rank's slice of the global batch of ``step``: targets, noise, times, conditions (all from
    ``(seed, step)``, so the batch does not depend on how many processes share it)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    total = cfg.batch_size * world
    idx = torch.randint(data.batch_size, (total,), generator=g)
    dim = sum(t[0].numel() for t in data.values())
    noise = torch.randn(total, dim, generator=g)
    t = torch.rand(total, generator=g) if cfg.time_sampling == "uniform" else torch.randn(total, generator=g).sigmoid()
    drop = torch.rand(total, cond.shape[1] if cond is not None else 0, generator=g) < cfg.cond_drop
    path = torch.randn(total, dim, generator=g) * cfg.path_noise if cfg.path_noise else None
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    idx, noise, t, drop = idx[mine], noise[mine], t[mine], drop[mine]
    dev, dtype = data.device, data.dtype
    x1 = WeightSpace(data.spec, {n: v[idx] for n, v in data.items()})
    flat1 = x1.flatten()
    noise = source.draw(noise.to(dev, dtype))
    if cfg.ot and cfg.ot_candidates:
        noise = noise[aligned_ot_pairing(WeightSpace.from_flat(data.spec, noise), x1, cfg.ot_candidates, seed=step)]
    elif cfg.ot:
        noise = noise[ot_pairing(noise, flat1)]
    x0 = WeightSpace.from_flat(data.spec, noise)
    if cfg.align_source:
        x0 = align_source(x0, x1, seed=step)
    if cfg.align_target:
        x1 = align_target(x1, x0, seed=step)
        flat1 = x1.flatten()
    t = t.to(dev, dtype)
    tt = t[:, None]
    xt_flat = (1 - tt) * x0.flatten() + tt * flat1
    if path is not None:
        xt_flat = xt_flat + path[mine].to(dev, dtype)
    c = None
    if cond is not None:
        c = cond[idx.to(cond.device)].masked_fill(drop.to(cond.device), 0)
    return (WeightSpace.from_flat(data.spec, xt_flat), t, c, WeightSpace.from_flat(data.spec, flat1 - x0.flatten()))


def train_flow(train: WeightSpace, rows: Optional[Sequence[Mapping]] = None, cfg: Optional[FlowConfig] = None,
               out: Optional[str | Path] = None, device=None, progress: bool = False,
               info: Optional[dict] = None, reference: int = 0,
               log: Optional[Callable[[dict], None]] = None,
               select: Optional[Callable[[WeightFlow], float]] = None,
               compile: bool = False) -> tuple[WeightFlow, list[dict]]:
    """Fit a flow to the networks ``train`` ``[N, 1]`` (zoo coordinates; ``rows``: their metadata, for
    conditioning). ``out``: run directory for checkpoints (resumed when present) and ``flow.safetensors``.
    ``reference``: the network canonicalisation aligns to. Returns the flow (EMA weights) and the log.

    ``select`` (with ``cfg.select_every > 0``): a score of a flow, higher is better, computed on training data
    only (``unf flow train`` uses the accuracy of sampled networks on the zoo's training split). The flow returned
    and saved is then the EMA snapshot with the best score, not the last: a flow's samples can get worse while its
    loss still falls (BENCHMARKS.md). The scores are in the log (``"select"``), so a resumed run keeps its best.
    ``select`` may also return a mapping with ``"score"`` and ``"eligible"`` (and more, logged too): only eligible
    snapshots are kept (``unf flow train``: those whose samples are as diverse as the training networks); with none
    eligible the last one is returned, without ``selected_step``.

    ``compile``: run the loss and its backward through ``torch.compile`` (one graph; compiled once, in the first
    step, whose log entry gets ``compile_seconds``; minutes for a UNF field with unit memories). It pays where the
    step is many small ops (small networks, Sinkhorn memories; BENCHMARKS.md); results equal eager's to float
    tolerance, so it is not a setting of the run (a run may be resumed with or without it). If the compiler fails,
    training warns and goes on eagerly."""
    cfg = cfg or FlowConfig()
    dist, rank, world = dist_info()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if train.channels != 1:
        raise ValueError(f"train_flow takes 1-channel weight spaces, got {train.channels}")
    if train.batch_size < 2:
        raise ValueError(f"train_flow needs at least 2 networks, got {train.batch_size}")
    rows = list(rows) if rows is not None else [{} for _ in range(train.batch_size)]
    if len(rows) != train.batch_size:
        raise ValueError(f"{len(rows)} metadata rows for {train.batch_size} networks")
    torch.manual_seed(cfg.seed)
    train = canonicalize(train.to(dtype=torch.float32), cfg.canonicalize, reference=reference, seed=cfg.seed)
    standardizer = Standardizer.fit(train)
    data = standardizer.to_std(train).to(device)
    if not 0 <= cfg.cooldown <= cfg.steps:
        raise ValueError(f"cooldown {cfg.cooldown}: must be between 0 and steps ({cfg.steps})")
    if cfg.source not in ("normal", "gaussian"):
        raise ValueError(f"source {cfg.source!r}: choose 'normal' or 'gaussian'")
    if cfg.ot_candidates and not (cfg.ot and cfg.align_target):
        raise ValueError("ot_candidates pairs by aligned distances: it needs ot=True and align_target=True (the "
                         "targets are then permuted towards the noise they were paired with)")
    if cfg.align_source and cfg.align_target:
        raise ValueError("align_source and align_target both remove the symmetry's path length: choose one")
    if cfg.source == "gaussian" and cfg.align_source:
        raise ValueError("align_source permutes source samples, which only keeps a permutation-invariant source "
                         "(source='normal') unchanged")
    source = Source.fit(data.flatten()) if cfg.source == "gaussian" else Source()
    conditioning = Conditioning.fit(rows, cfg.condition)
    cond = conditioning.encode(rows, device)
    velocity = build_velocity(cfg.velocity, train.spec, **cfg.velocity_kwargs(conditioning.vocab)).to(device)
    ema = torch.optim.swa_utils.AveragedModel(velocity, avg_fn=_ema_fn(cfg.ema))
    opt = torch.optim.AdamW(velocity.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    history: list[dict] = []
    out = Path(out) if out is not None else None
    if out is not None and (out / "checkpoint.safetensors").is_file():
        history = load_checkpoint(out, cfg, velocity, ema, opt)
        sched.last_epoch = len(history)  # LambdaLR restarts from the step count
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, len(history))
    if cfg.loss not in ("velocity", "data"):
        raise ValueError(f"loss {cfg.loss!r}: choose 'velocity' or 'data'")
    if cfg.time_sampling not in TIME_SAMPLING:
        raise ValueError(f"time_sampling {cfg.time_sampling!r}: choose from {TIME_SAMPLING}")
    if cfg.loss == "data" and velocity.prediction != "data":
        raise ValueError("loss='data' needs a data-predicting field (velocity_config prediction='data')")
    objective = _Objective(velocity, cfg.loss)
    if dist is not None:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda"
                                                        else None)
    if compile:
        objective = Compiled(objective, "train_flow")
    first = len(history)
    steps = range(first, cfg.steps)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"flow matching ({cfg.velocity})", unit="step", initial=len(history),
                     total=cfg.steps)
    if cfg.select_every and select is None:
        raise ValueError("select_every > 0 needs a select function")
    scored = [h for h in history if "select" in h and h.get("eligible", True)]
    best = max(scored, key=lambda h: h["select"]) if scored else None
    best_state = None  # the best EMA weights of this process's run (a resumed run reads them from the flow file)

    def snapshot(module: nn.Module) -> WeightFlow:
        return WeightFlow(train.spec, module, standardizer, conditioning, {**(info or {}), "config": asdict(cfg)},
                          source)

    start = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    velocity.train()
    for step in steps:
        xt, t, c, target = _batch(data, cond, cfg, step, world, rank, source)
        loss = objective(xt, t, c, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(velocity.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(velocity)
        value = float(loss.detach())
        if dist is not None:  # the log shows the global batch's loss
            lt = torch.tensor([value], device=device)
            dist.all_reduce(lt)
            value = float(lt) / world
        history.append({"step": step + 1, "loss": value, "grad_norm": float(norm),
                        "seconds": time.perf_counter() - start})
        if compile and step == first and objective.compiled is not None:
            history[-1]["compile_seconds"] = history[-1]["seconds"] - (history[-2]["seconds"] if first else 0.0)
        if cfg.select_every and (step + 1) % cfg.select_every == 0:
            result = select(snapshot(ema.module))
            velocity.train()
            if isinstance(result, Mapping):
                history[-1].update({f"select_{k}": v for k, v in result.items() if k not in ("score", "eligible")})
                history[-1]["eligible"] = eligible = bool(result["eligible"])
                score = float(result["score"])
            else:
                score, eligible = float(result), True
            history[-1]["select"] = score
            if eligible and (best is None or score > best["select"]):
                best = history[-1]
                best_state = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
                if out is not None and rank == 0:
                    _final(snapshot(ema.module), cfg, velocity, train, history, world, info, best).save(
                        out / "flow.safetensors")
        if log is not None and rank == 0:
            log(history[-1])
        if progress and rank == 0 and hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{value:.4f}")
        if out is not None and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out, cfg, velocity, ema, opt, history)
    if best is None:
        flow = _final(snapshot(ema.module), cfg, velocity, train, history, world, info)
        if out is not None and rank == 0:
            flow.save(out / "flow.safetensors")
    elif best_state is not None:
        ema.module.load_state_dict(best_state)
        flow = _final(snapshot(ema.module), cfg, velocity, train, history, world, info, best)
        if out is not None and rank == 0:
            flow.save(out / "flow.safetensors")
    else:  # resumed past the best step: it is the one on disk
        flow = WeightFlow.load(out / "flow.safetensors", device=device)
    if dist is not None:
        dist.barrier()
    return flow, history


def _final(flow: WeightFlow, cfg: FlowConfig, velocity: nn.Module, train: WeightSpace, history: list, world: int,
           info: Optional[dict], best: Optional[dict] = None) -> WeightFlow:
    """``flow`` with the run's record in ``info`` (and the selected step, when one was selected)."""
    flow.info = {**(info or {}), "config": asdict(cfg), "velocity_parameters": num_parameters(velocity),
                 "train_networks": train.batch_size, "seconds": history[-1]["seconds"] if history else 0.0,
                 "world_size": world}
    if best is not None:
        flow.info.update(selected_step=best["step"], selected_score=best["select"])
    return flow


# -- checkpoints ---------------------------------------------------------------------------------------------------

def save_checkpoint(out: Path, cfg: FlowConfig, velocity: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer,
                    history: list) -> None:
    """``out/checkpoint.safetensors``: velocity and EMA weights, AdamW state; settings and log in the metadata."""
    from safetensors.torch import save_file

    tensors = {f"velocity.{k}": v for k, v in velocity.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"config": json.dumps(asdict(cfg)), "history": json.dumps(history),
            "param_groups": json.dumps(sd["param_groups"])}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "checkpoint.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(out: Path, cfg: FlowConfig, velocity: nn.Module, ema: nn.Module,
                    opt: torch.optim.Optimizer) -> list:
    """Restore a run; refuses a checkpoint made with other settings (``steps`` and ``cooldown`` may differ: a run can
    be extended, and annealed at its end)."""
    from safetensors import safe_open

    path = out / "checkpoint.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        stored, history = json.loads(meta["config"]), json.loads(meta["history"])
        groups = json.loads(meta["param_groups"])
    except Exception as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to start over") from None
    want = json.loads(json.dumps(asdict(cfg)))
    # a setting added since the checkpoint was written counts as its default there
    stored = {**json.loads(json.dumps(asdict(FlowConfig()))), **stored}
    # steps and cooldown may change: a run can be extended, and annealed at its end
    diff = sorted(k for k in set(want) | set(stored) if k not in ("steps", "cooldown") and want.get(k) != stored.get(k))
    if diff:
        shown = ", ".join(f"{k}: stored {stored.get(k)!r}, asked {want.get(k)!r}" for k in diff)
        raise CheckpointError(f"{path} was made with other settings ({shown}); use another run directory or the "
                              "same settings")
    dev = next(velocity.parameters()).device
    velocity.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("velocity.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v.to(dev) if name != "step" else v
    opt.load_state_dict({"state": state, "param_groups": groups})
    return history
