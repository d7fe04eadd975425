"""``unf lopt``: meta-train a learned optimizer, and evaluate one against tuned Adam."""
from __future__ import annotations

import json
from pathlib import Path

from .common import (UserError, add_command, add_group, at_least, emit, info, positive_float, progress, run_record,
                     user_error)


TASK_HELP = ("a built-in task family ({names}) or FILE.py:FN, where FN() returns a unf.optim.TaskFamily (your model, "
             "data, loss, batch size and horizon)")


def register(sub) -> None:
    from ..optim.tasks import ADAM_LRS, FAMILIES, MIXES, SGD_LRS, TASKS

    names = ", ".join(sorted({**TASKS, **FAMILIES}))
    grp = add_group(sub, "lopt", help="learned optimizers: meta-train one, evaluate one against tuned Adam",
                    example="unf lopt meta-train --out runs/lopt --steps 2000\n"
                            "unf lopt meta-train --task my_task.py:family --out runs/mine --budget-min 30\n"
                            "unf lopt eval --weights runs/lopt/rule.safetensors --task breast-cancer-mlp")
    p = add_command(grp, "meta-train", run=run_meta_train, seed=True,
                    help="meta-train a learned rule with (persistent) evolution strategies, on a task family or on "
                         "the MLP task mix; resumable; under torchrun the perturbations are split over the processes",
                    example="unf lopt meta-train --out runs/lopt --variant unf --steps 2000\n"
                            "unf lopt meta-train --task digits-mlp --out runs/digits --budget-min 60\n"
                            "unf lopt meta-train --task broad --out runs/broad --budget-min 60\n"
                            "unf lopt meta-train --task my_task.py:family --out runs/mine --budget-min 30\n"
                            "torchrun --nproc-per-node 2 -m unf.cli lopt meta-train --out runs/lopt")
    p.add_argument("--out", required=True, help="run directory: checkpoint.safetensors, rule.safetensors, "
                                                "log.jsonl, run.json (an existing run resumes)")
    p.add_argument("--task", default=None, help=TASK_HELP.format(names=names) + "; every inner task is that family "
                   "at a new seed. A comma-separated list, or a mix name (" + ", ".join(sorted(MIXES)) + "), "
                   "meta-trains one rule on several families, each inner task one of them (default: the MLP task "
                   "mix of --datasets/--widths)")
    p.add_argument("--budget-min", type=positive_float, default=None,
                   help="stop after this many minutes of meta-training, counted over resumes (with no --steps: "
                        "the budget alone decides)")
    p.add_argument("--variant", choices=["unf", "deepsets", "mlp", "unf-exact"], default="unf",
                   help="update network; unf-exact: per-term coefficients for one architecture (needs --task, or "
                        "--widths and one --datasets)")
    p.add_argument("--widths", default=None, help="MLP mix: fix the tasks' hidden widths, e.g. 64,64 (default: "
                                                  "random)")
    p.add_argument("--datasets", default=None, help="MLP mix: comma-separated task datasets (default "
                                                    "digits-flat,iris,wine)")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="outer (meta) steps (default: 2000, or unlimited with --budget-min)")
    p.add_argument("--pairs", type=at_least(1), default=8, help="antithetic perturbation pairs per step")
    p.add_argument("--sigma", type=positive_float, default=0.01, help="perturbation scale")
    p.add_argument("--unroll", type=at_least(1), default=10, help="inner steps per truncation")
    p.add_argument("--max-horizon", type=at_least(1), default=None, help="MLP mix: longest inner training (steps; "
                                                                         "default 200)")
    p.add_argument("--min-horizon", type=at_least(1), default=None, help="MLP mix: shortest inner training (steps; "
                                                                         "default 50)")
    p.add_argument("--validate-every", type=at_least(0), default=0, metavar="K",
                   help="every K outer steps train --validate-tasks held-out tasks (never meta-trained on, nor the "
                        "small seeds evaluations use) for their whole horizon with the rule, and keep the rule with "
                        "the lowest meta-loss there instead of the last (default 0: keep the last)")
    p.add_argument("--validate-tasks", type=at_least(1), default=2, metavar="N",
                   help="held-out tasks per validation (default 2)")
    p.add_argument("--rollback", type=float, default=0.0, metavar="D",
                   help="with --validate-every: a validation score D above the best so far (log-loss units; e.g. 1) "
                        "restarts from the best rule with half the outer learning rate (default 0: off)")
    p.add_argument("--start", default="new", metavar="new|adam|FILE",
                   help="the rule meta-training starts from: 'new' (Adam at step 1e-3 plus a zero learned term), "
                        "'adam' (the same at the constant Adam learning rate that trains the --task family's "
                        "held-out validation seeds best, from the grid 1e-4..1e-1: meta-training starts at tuned "
                        "Adam) or a weights file (e.g. the shipped unf/optim/weights/default.safetensors); ignored "
                        "when --out holds a checkpoint")
    p.add_argument("--loss-floor", type=positive_float, default=1e-3, metavar="F",
                   help="floor of the meta-loss's log(loss / initial loss): progress below F times the initial "
                        "loss is not seen (default 1e-3; lower it, e.g. to 1e-6, where tuned Adam trains the family "
                        "below that)")
    p.add_argument("--loss-scale", choices=["none", "adam"], default="none",
                   help="adam: each family's meta-loss in units of tuned Adam's on its held-out validation seeds "
                        "(measured once per run, counted in the budget), so that in a mix (--task broad, or a "
                        "comma-separated list) every family counts alike; needs --task (default none)")
    p.add_argument("--estimator", choices=["pes", "es"], default="pes")
    p.add_argument("--outer-lr", type=positive_float, default=3e-3)
    p.add_argument("--compile", action="store_true",
                   help="run the rule's network through torch.compile (a compile of tens of seconds per architecture, "
                        "counted in the budget; same steps to float rounding, so a run resumes with or without it)")

    grid = ",".join(f"{v:g}" for v in ADAM_LRS)
    sgd_grid = ",".join(f"{v:g}" for v in SGD_LRS)
    p = add_command(grp, "eval", run=run_eval, seed=True, device=True,
                    help="train a task at a seed never meta-trained on with a learned optimizer (its defaults), "
                         "and with Adam and SGD+momentum over grids of learning rates, constant and with cosine "
                         "decay to zero over the horizon; report the speed-up over the better tuned Adam",
                    example="unf lopt eval --weights default --task digits-cnn --seed 1 --json\n"
                            "unf lopt eval --weights runs/mine --task my_task.py:family --seed 0")
    p.add_argument("--weights", default="default", help="'default' (shipped), a weights file (.safetensors) or a "
                                                        "meta-train run directory (its rule.safetensors)")
    p.add_argument("--task", default="breast-cancer-mlp", help=TASK_HELP.format(names=names))
    p.add_argument("--steps", type=at_least(1), default=None, help="training steps (default: the task's horizon)")
    p.add_argument("--adam-lrs", default=grid, help=f"comma-separated Adam learning rates (default {grid})")
    p.add_argument("--sgd-lrs", default=sgd_grid, help="comma-separated learning rates of SGD with momentum 0.9 "
                                                       f"(default {sgd_grid}; 'none': no SGD baseline)")
    p.add_argument("--schedules", default="constant,cosine",
                   help="baseline learning-rate schedules, comma-separated: constant, cosine (decay to zero over "
                        "the steps); the reference is the best Adam over all of them")


def _family(ref: str):
    """``--task`` -> a TaskFamily; anything wrong is one user error naming --task."""
    from ..optim.tasks import get_family

    with user_error("--task", types=(ValueError, TypeError)):
        family = get_family(ref)
        family.data()  # a lazy family's data is loaded (and checked) now, before any work
        return family


def _families(ref: str):
    """``--task A,B`` or a mix name -> a list of TaskFamily (one family alone: that family)."""
    from ..optim.tasks import get_families

    with user_error("--task", types=(ValueError, TypeError)):
        fams = get_families(ref)
        for f in fams:
            f.data()
    return fams[0] if len(fams) == 1 else fams


def run_meta_train(args) -> int:
    from ..io import atomic_write
    from ..optim.meta import CheckpointError, MetaConfig, checkpoint_history, init_distributed, meta_train

    mix_only = [o for o, v in (("--widths", args.widths), ("--datasets", args.datasets),
                               ("--min-horizon", args.min_horizon), ("--max-horizon", args.max_horizon))
                if v is not None]
    if args.task is not None and mix_only:
        raise UserError(f"{', '.join(mix_only)}: the MLP task mix's options; with --task the family fixes the model, "
                        "data and horizon")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    min_h, max_h = args.min_horizon or 50, args.max_horizon or 200
    family = _families(args.task) if args.task is not None else None
    if family is None and not args.unroll <= min_h <= max_h:
        raise UserError(f"need --unroll ({args.unroll}) <= --min-horizon ({min_h}) <= --max-horizon ({max_h})")
    for f in ([] if family is None else family if isinstance(family, list) else [family]):
        if args.unroll > f.horizon:
            raise UserError(f"--unroll {args.unroll}: longer than the horizon of --task {f.name} ({f.horizon})")
    if isinstance(family, list) and args.variant == "unf-exact":
        raise UserError("--variant unf-exact learns for one architecture: give one --task family, not a mix")
    task_name = None if family is None else ",".join(f.name for f in family) if isinstance(family, list) \
        else family.name
    init_distributed("cpu")
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        widths = tuple(int(v) for v in args.widths.split(",")) if args.widths else None
        if widths is not None and min(widths) < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--widths {args.widths!r}: comma-separated positive integers, e.g. 64,64") from None
    datasets = args.datasets if args.datasets is not None else "digits-flat,iris,wine"
    budget = None if args.budget_min is None else 60.0 * args.budget_min
    steps = args.steps if args.steps is not None or budget is not None else 2000
    if family is not None:  # the family fixes the horizon; the mix's fields (unused) only need to stay valid
        min_h, max_h = max(args.unroll, 50), max(args.unroll, 200)
    with user_error("--variant/--widths/--datasets/--rollback/--loss-scale", types=(ValueError,)):
        cfg = MetaConfig(steps=steps, pairs=args.pairs, sigma=args.sigma, unroll=args.unroll,
                         max_horizon=max_h, min_horizon=min_h, estimator=args.estimator,
                         outer_lr=args.outer_lr, seed=args.seed, rule={"variant": args.variant}, widths=widths,
                         datasets=tuple(d for d in datasets.split(",") if d), budget_s=budget,
                         validate_every=args.validate_every, validate_tasks=args.validate_tasks,
                         rollback=args.rollback, loss_floor=args.loss_floor, loss_scale=args.loss_scale)
        if family is None:
            cfg.check_mix()
    rule = _start_rule(args.start, family, cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        rec = json.dumps(run_record(config=cfg.__dict__, task=task_name, start=args.start), indent=1)
        atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(rec))
    with user_error("--out", types=(CheckpointError,)):
        done = checkpoint_history(out)
    bar, log = None, None
    if rank == 0:  # the log restarts from the checkpoint: steps after it are run again
        keep = "".join(json.dumps(_log_row(h)) + "\n" for h in done)
        atomic_write(out / "log.jsonl", lambda tmp: Path(tmp).write_text(keep))
        bar, log = progress(total=cfg.steps, desc="meta-training", unit="step"), (out / "log.jsonl").open("a")

    def on_step(h):
        if rank == 0:
            log.write(json.dumps(_log_row(h)) + "\n")
            log.flush()
            bar.n = h["step"]
            bar.set_postfix(meta_loss=f"{h['meta_loss']:.3f}")
            bar.refresh()

    with user_error("--out", types=(CheckpointError,)):
        rule, history = meta_train(cfg, family, out=out, rule=rule, log=on_step, compile=args.compile)
    if rank == 0:
        bar.close()
        log.close()
        last = history[-20:]
        mean = sum(h["meta_loss"] for h in last) / max(1, len(last))
        minutes = sum(h["seconds"] for h in history) / 60
        scored = [(h["valid_loss_start"], 0) for h in history[:1] if "valid_loss_start" in h] + \
            [(h["valid_loss"], h["step"]) for h in history if "valid_loss" in h]
        kept = min(scored) if scored else None
        scales = next((h["loss_scales"] for h in history[:1] if "loss_scales" in h), None)
        if scales:
            info("meta-loss scales (tuned Adam's whole-horizon meta-loss on each family's validation seeds): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in scales.items()))
        info(f"meta-trained {args.variant} rule on {task_name or 'the MLP task mix'} for "
             f"{len(history)} steps ({minutes:.1f} min); mean meta-loss of the last {len(last)}: {mean:.4f}; "
             + (f"kept the rule of step {kept[1]} (held-out meta-loss {kept[0]:.4f}); " if kept else "")
             + f"weights: {out / 'rule.safetensors'}")
        emit({"out": str(out), "task": task_name, "steps": len(history),
              "minutes": minutes, "meta_loss_last20": mean, "alpha": float(rule.log_alpha.detach().exp()),
              "selected_step": kept[1] if kept else None, "valid_loss": kept[0] if kept else None})
    return 0


def _start_rule(start: str, family, cfg, out: Path):
    """``--start`` -> the rule meta-training starts from (``None``: a new one from ``cfg.rule``)."""
    from ..optim import LearnedRule
    from ..optim.meta import tuned_adam_rule

    if start == "new":
        return None
    if start == "adam":
        if family is None:
            raise UserError("--start adam tunes Adam on the --task family's held-out seeds: give --task")
        if (out / "checkpoint.safetensors").is_file():  # resumed: the parameters (alpha too) come from there
            return None
        with user_error("--start/--variant", types=(ValueError,)):
            rule, lr = tuned_adam_rule(family, cfg.rule)
        info(f"--start adam: Adam's best constant learning rate on the held-out seeds: {lr:g}")
        return rule
    path = Path(start)
    if not path.is_file():
        raise UserError(f"--start {start}: not 'new', 'adam' or an existing weights file (.safetensors)")
    with user_error("--start", types=(ValueError, OSError)):
        rule = LearnedRule.load(path)
    if rule.config.variant != cfg.rule["variant"]:
        raise UserError(f"--start {start}: holds a {rule.config.variant!r} rule, but --variant is "
                        f"{cfg.rule['variant']!r}")
    return rule


def _log_row(h: dict) -> dict:
    return {k: h[k] for k in ("step", "meta_loss", "grad_norm", "seconds", "valid_loss_start", "valid_loss",
                              "rollback", "loss_scales") if k in h}


def _lrs(text: str, option: str, allow_none: bool = False) -> list:
    """A comma-separated list of positive learning rates (``none``: empty, where allowed)."""
    import math

    if allow_none and text.strip().lower() == "none":
        return []
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: comma-separated numbers, e.g. 1e-3,3e-3,1e-2") from None
    if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise UserError(f"{option}: give at least one positive learning rate")
    return lrs


def run_eval(args) -> int:
    import torch

    from ..optim import UNFOptimizer, load_rule
    from ..optim.tasks import META_SEED_BASE, SCHEDULES, speedup, train_curve

    adam_lrs = _lrs(args.adam_lrs, "--adam-lrs")
    sgd_lrs = _lrs(args.sgd_lrs, "--sgd-lrs", allow_none=True)
    schedules = [v.strip() for v in args.schedules.split(",") if v.strip()]
    if not schedules or any(v not in SCHEDULES for v in schedules):
        raise UserError(f"--schedules {args.schedules!r}: comma-separated, from {', '.join(SCHEDULES)}")
    if args.seed >= META_SEED_BASE:
        raise UserError(f"--seed {args.seed}: evaluation seeds are below 2**30 (meta-training draws its seeds from "
                        "[2**30, 2**31), so that a rule is tested on initialisations it never saw)")
    weights = args.weights
    if Path(weights).is_dir():  # a meta-train run directory
        weights = Path(weights) / "rule.safetensors"
        if not weights.is_file():
            raise UserError(f"--weights {args.weights}: a directory without rule.safetensors (not a finished "
                            "meta-train run)")
    with user_error("--weights", types=(OSError, ValueError, RuntimeError)):
        rule = load_rule(weights)
    task = _family(args.task)
    makers = {"adam": lambda lr: lambda m, x: torch.optim.Adam(m.parameters(), lr=lr),
              "sgdm": lambda lr: lambda m, x: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)}
    jobs = [(opt, lr, sch) for opt, lrs in (("adam", adam_lrs), ("sgdm", sgd_lrs)) for sch in schedules
            for lr in lrs]
    runs = {}
    bar = progress(total=len(jobs) + 1, desc=args.task, unit="run")  # the baselines' grids, then the learned rule
    for opt, lr, sch in jobs:
        name = f"{opt} lr={lr:g}" + ("" if sch == "constant" else f" {sch}")
        bar.set_postfix_str(name)
        runs[name] = train_curve(task, makers[opt](lr), args.seed, steps=args.steps, device=args.device,
                                 schedule=sch)
        bar.update(1)
    lowest = lambda k: min((v for v in runs[k]["train"] if v is not None), default=float("inf"))  # noqa: E731
    best = min((k for k in runs if k.startswith("adam")), key=lowest)
    best_sgd = min((k for k in runs if k.startswith("sgdm")), key=lowest, default=None)
    bar.set_postfix_str("learned")
    runs["learned"] = train_curve(task, lambda m, x: UNFOptimizer.for_model(m, x, weights=rule), args.seed,
                                  steps=args.steps, device=args.device)
    bar.update(1)
    bar.close()
    ref = runs[best]
    for name in [best, *([best_sgd] if best_sgd else []), "learned"]:
        r = runs[name]
        final = r["train"][-1]
        acc = "" if r["test_acc"] is None else f"test acc {r['test_acc']:.3f}, "
        info(f"{args.task} {name:>22}: final train loss {final if final is None else round(final, 4)}, "
             f"{acc}train-loss speed-up vs {best} {speedup(ref['train'], r['train']):.2f}x, "
             f"test-loss {speedup(ref['test'], r['test']):.2f}x, {r['seconds']:.1f} s")
    learned = runs["learned"]
    emit({"task": task.name, "weights": str(args.weights), "best_adam": best,
          "speedup_train": speedup(ref["train"], learned["train"]),
          "speedup_test": speedup(ref["test"], learned["test"]),
          "test_acc": learned["test_acc"], "adam_test_acc": ref["test_acc"],
          "best_sgdm": best_sgd, "speedup_train_vs_sgdm": None if best_sgd is None else
          speedup(runs[best_sgd]["train"], learned["train"]),
          "final_train_loss": learned["train"][-1], "adam_final_train_loss": ref["train"][-1],
          "diverged": learned["diverged"], "device": str(args.device)})
    return 0
