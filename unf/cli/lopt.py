"""``unf lopt``: meta-train a learned optimizer, and evaluate one against tuned Adam."""
from __future__ import annotations

import json
from pathlib import Path

from .common import (UserError, add_command, add_group, at_least, emit, info, positive_float, progress, run_record,
                     user_error)


def register(sub) -> None:
    grp = add_group(sub, "lopt", help="learned optimizers: meta-train one, evaluate one against tuned Adam",
                    example="unf lopt meta-train --out runs/lopt --steps 2000\n"
                            "unf lopt eval --weights runs/lopt/rule.safetensors --task breast-cancer-mlp")
    p = add_command(grp, "meta-train", run=run_meta_train, seed=True,
                    help="meta-train a learned rule with (persistent) evolution strategies; resumable; "
                         "under torchrun the perturbations are split over the processes",
                    example="unf lopt meta-train --out runs/lopt --variant unf --steps 2000\n"
                            "torchrun --nproc-per-node 2 -m unf.cli lopt meta-train --out runs/lopt")
    p.add_argument("--out", required=True, help="run directory: checkpoint.safetensors, rule.safetensors, "
                                                "log.jsonl, run.json (an existing run resumes)")
    p.add_argument("--variant", choices=["unf", "deepsets", "mlp", "unf-exact"], default="unf",
                   help="update network; unf-exact: per-term coefficients for one architecture (needs --widths and "
                        "one --datasets)")
    p.add_argument("--widths", default=None, help="fix the tasks' hidden widths, e.g. 64,64 (default: random)")
    p.add_argument("--datasets", default="digits-flat,iris,wine", help="comma-separated task datasets")
    p.add_argument("--steps", type=at_least(1), default=2000, help="outer (meta) steps")
    p.add_argument("--pairs", type=at_least(1), default=8, help="antithetic perturbation pairs per step")
    p.add_argument("--sigma", type=positive_float, default=0.01, help="perturbation scale")
    p.add_argument("--unroll", type=at_least(1), default=10, help="inner steps per truncation")
    p.add_argument("--max-horizon", type=at_least(1), default=200, help="longest inner training (steps)")
    p.add_argument("--min-horizon", type=at_least(1), default=50, help="shortest inner training (steps)")
    p.add_argument("--estimator", choices=["pes", "es"], default="pes")
    p.add_argument("--outer-lr", type=positive_float, default=3e-3)

    from ..optim.tasks import ADAM_LRS, TASKS

    grid = ",".join(f"{v:g}" for v in ADAM_LRS)
    p = add_command(grp, "eval", run=run_eval, seed=True, device=True,
                    help="train a held-out task with a learned optimizer (its defaults) and with Adam over a grid "
                         "of learning rates; report the speed-up over the best Adam",
                    example="unf lopt eval --weights default --task digits-cnn --seed 1 --json")
    p.add_argument("--weights", default="default", help="'default' (shipped) or a weights file (.safetensors)")
    p.add_argument("--task", choices=sorted(TASKS), default="breast-cancer-mlp")
    p.add_argument("--steps", type=at_least(1), default=None, help="training steps (default: the task's horizon)")
    p.add_argument("--adam-lrs", default=grid, help=f"comma-separated Adam learning rates (default {grid})")


def run_meta_train(args) -> int:
    from ..io import atomic_write
    from ..optim.meta import CheckpointError, MetaConfig, checkpoint_history, init_distributed, meta_train

    if not args.unroll <= args.min_horizon <= args.max_horizon:
        raise UserError(f"need --unroll ({args.unroll}) <= --min-horizon ({args.min_horizon}) <= --max-horizon "
                        f"({args.max_horizon})")
    init_distributed("cpu")
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        widths = tuple(int(v) for v in args.widths.split(",")) if args.widths else None
        if widths is not None and min(widths) < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--widths {args.widths!r}: comma-separated positive integers, e.g. 64,64") from None
    with user_error("--variant/--widths/--datasets", types=(ValueError,)):
        cfg = MetaConfig(steps=args.steps, pairs=args.pairs, sigma=args.sigma, unroll=args.unroll,
                         max_horizon=args.max_horizon, min_horizon=args.min_horizon, estimator=args.estimator,
                         outer_lr=args.outer_lr, seed=args.seed, rule={"variant": args.variant}, widths=widths,
                         datasets=tuple(d for d in args.datasets.split(",") if d))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        rec = json.dumps(run_record(config=cfg.__dict__), indent=1)
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
        rule, history = meta_train(cfg, out=out, log=on_step)
    if rank == 0:
        bar.close()
        log.close()
        last = history[-20:]
        mean = sum(h["meta_loss"] for h in last) / max(1, len(last))
        info(f"meta-trained {args.variant} rule for {len(history)} steps; mean meta-loss of the last "
             f"{len(last)}: {mean:.4f}; weights: {out / 'rule.safetensors'}")
        emit({"out": str(out), "steps": len(history), "meta_loss_last20": mean,
              "alpha": float(rule.log_alpha.detach().exp())})
    return 0


def _log_row(h: dict) -> dict:
    return {k: h[k] for k in ("step", "meta_loss", "grad_norm", "seconds")}


def run_eval(args) -> int:
    import math

    import torch

    from ..optim import UNFOptimizer, load_rule
    from ..optim.tasks import TASKS, speedup, train_curve

    try:
        lrs = [float(v) for v in args.adam_lrs.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--adam-lrs {args.adam_lrs!r}: comma-separated numbers, e.g. 1e-3,3e-3,1e-2") from None
    if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise UserError("--adam-lrs: give at least one positive learning rate")
    with user_error("--weights", types=(OSError, ValueError, RuntimeError)):
        rule = load_rule(args.weights)
    task = TASKS[args.task]
    runs = {}
    bar = progress(total=len(lrs) + 1, desc=args.task, unit="run")  # the Adam grid, then the learned optimizer
    for lr in lrs:
        bar.set_postfix_str(f"Adam lr={lr:g}")
        runs[f"adam lr={lr:g}"] = train_curve(task, lambda m, x: torch.optim.Adam(m.parameters(), lr=lr), args.seed,
                                              steps=args.steps, device=args.device)
        bar.update(1)
    best = min(runs, key=lambda k: min((v for v in runs[k]["train"] if v is not None), default=float("inf")))
    bar.set_postfix_str("learned")
    runs["learned"] = train_curve(task, lambda m, x: UNFOptimizer.for_model(m, x, weights=rule), args.seed,
                                  steps=args.steps, device=args.device)
    bar.update(1)
    bar.close()
    ref = runs[best]
    for name in (best, "learned"):
        r = runs[name]
        final = r["train"][-1]
        info(f"{args.task} {name:>14}: final train loss {final if final is None else round(final, 4)}, "
             f"test acc {r['test_acc']:.3f}, train-loss speed-up vs {best} {speedup(ref['train'], r['train']):.2f}x, "
             f"test-loss {speedup(ref['test'], r['test']):.2f}x, {r['seconds']:.1f} s")
    emit({"task": args.task, "weights": str(args.weights), "best_adam": best,
          "speedup_train": speedup(ref["train"], runs["learned"]["train"]),
          "speedup_test": speedup(ref["test"], runs["learned"]["test"]),
          "test_acc": runs["learned"]["test_acc"], "adam_test_acc": ref["test_acc"],
          "diverged": runs["learned"]["diverged"], "device": str(args.device)})
    return 0
