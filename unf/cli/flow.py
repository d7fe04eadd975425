"""``unf flow train | sample | eval``: fit a weight-space flow to a zoo, generate a zoo from it, measure what came out."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (UserError, add_command, add_group, at_least, check_output, emit, info, positive_float, progress,
                     user_error, warn)


def _unit_width(text: str):
    """``--unit-hidden``: a width >= 0 or ``units``."""
    if text == "units":
        return text
    try:
        return at_least(0)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (give a width >= 0, or 'units')") from None


def register(sub) -> None:
    flow = add_group(sub, "flow", help="generate networks: flow matching in weight space with a UNF velocity",
                     example="unf flow train --zoo zoos/digits-mlp --out runs/flow --where activation=relu\n"
                             "unf flow sample runs/flow --num 1000 --out zoos/generated\n"
                             "unf flow eval zoos/generated --zoo zoos/digits-mlp")
    p = add_command(flow, "train", run=run_train, seed=True, device=True,
                    help="fit a flow to a zoo's networks (resumes an interrupted run in --out; runs under torchrun)",
                    example="unf flow train --zoo zoos/digits-mlp --out runs/flow --where activation=relu --epoch 10 "
                            "--holdout 0.2\nunf flow train --zoo zoos/digits-mlp --out runs/unf --where activation=relu "
                            "--velocity unf --unit-hidden 64 --unit-activation sinkhorn --steps 3000")
    p.add_argument("--zoo", required=True, help="zoo directory (the store format of `unf zoo build`)")
    p.add_argument("--out", required=True, help="run directory: checkpoints and flow.safetensors")
    p.add_argument("--where", action="append", default=[], metavar="COL=VAL",
                   help="keep rows whose metadata column COL equals VAL (repeatable)")
    p.add_argument("--epoch", default=None, help="the rows of this saved epoch (default: the last one)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of networks held out, never trained on (default 0.2)")
    p.add_argument("--velocity", choices=("unf", "mlp"), default=None,
                   help="unf: equivariant UNF field; mlp: DeepWeightFlow's flat MLP (default: the best recipe "
                        "measured for the zoo's architecture kind, unf.flow.recipe: today mlp for MLPs and CNNs; "
                        "unf when a --unit-* option is given)")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="training steps (default: the recipe's, 1000, for the recipe's field; else 3000)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="networks per step and process (default 64)")
    p.add_argument("--lr", type=positive_float, default=None, help="AdamW learning rate (default: 2e-3 unf, 5e-4 mlp)")
    p.add_argument("--condition", action="append", default=[], metavar="COL",
                   help="metadata column to condition on (repeatable), e.g. train_acc (not test_acc: generated "
                        "networks are scored on the test split)")
    p.add_argument("--canonicalize", choices=("auto", "none", "reference", "barycentre"), default="auto",
                   help="align the zoo's networks before fitting (reference: to the one most accurate on the "
                        "training split); auto (default): reference for the mlp field, which sees units by "
                        "position, none for the equivariant unf field")
    p.add_argument("--no-ot", action="store_true", help="independent coupling instead of minibatch OT")
    p.add_argument("--align-source", action="store_true",
                   help="permute each noise sample towards its target (weight matching)")
    p.add_argument("--align-target", action="store_true",
                   help="permute each target network towards its noise sample (equivariant OT flow matching; "
                        "works with either --source)")
    p.add_argument("--source", choices=("normal", "gaussian"), default="normal",
                   help="normal: N(0, I) (default); gaussian: the per-entry Gaussian of the (canonicalised) zoo, "
                        "a source whose hidden units are told apart")
    p.add_argument("--prediction", choices=("data", "velocity"), default=None,
                   help="what the field's network outputs: the clean weights (data; default for mlp) or the "
                        "velocity (default for unf)")
    p.add_argument("--ot-candidates", type=at_least(0), default=0, metavar="K",
                   help="with --align-target: choose the minibatch OT pairs on aligned distances, each target matched "
                        "against its K nearest noise samples (K * batch weight matchings per step; default 0: raw "
                        "distances)")
    p.add_argument("--cooldown", type=at_least(0), default=0, metavar="N",
                   help="decay the learning rate linearly to 0 over the last N of --steps (default 0: constant after "
                        "the warm-up). A run trained at a constant rate can be resumed with more --steps and a "
                        "--cooldown to anneal it")
    p.add_argument("--time-sampling", choices=["uniform", "logit-normal"], default="uniform",
                   help="how training draws the path time t: uniform (default) or sigmoid of a standard normal "
                        "(logit-normal, as Stable Diffusion 3: more steps mid-path, where a field must decide what "
                        "the network becomes)")
    p.add_argument("--hidden", type=at_least(1), default=None, metavar="W",
                   help="the field's width: channels per weight of the unf field (default 16), hidden units of the "
                        "mlp field (default 512)")
    p.add_argument("--depth", type=at_least(1), default=None, metavar="D",
                   help="the field's depth: residual blocks of the unf field (default 2), hidden layers of the mlp "
                        "field (default 3)")
    p.add_argument("--unit-hidden", type=_unit_width, default=0, metavar="W|units",
                   help="unf field only: add to every block a per-unit MLP of width W over all weights a unit "
                        "touches (a memory of unit prototypes; 'units': as many as each layer has units, the best "
                        "measured with --unit-activation sinkhorn; default 0: none)")
    p.add_argument("--unit-activation", choices=["silu", "softmax", "sinkhorn"], default=None,
                   help="with --unit-hidden: the unit MLP's hidden activation; softmax: a memory of W prototypes; "
                        "sinkhorn: the same, the units of a network competing so that no two take one prototype "
                        "(default silu)")
    p.add_argument("--unit-rank", type=at_least(0), default=0, metavar="R",
                   help="with --unit-hidden: rank-R tables of unit pairs for the weights between hidden layers "
                        "(default 0: none)")
    p.add_argument("--unit-attention", type=at_least(0), default=0, metavar="L",
                   help="with --unit-hidden: L self-attention layers across the units of each layer, so that a "
                        "network's units decide together (default 0: each unit alone)")
    p.add_argument("--unit-channels", type=at_least(0), default=0, metavar="U",
                   help="with --unit-hidden: the unit MLPs read and write a U-channel projection of a wider field's "
                        "channels, which keeps their parameters those of a U-wide field (default 0: all channels)")
    p.add_argument("--compile", action="store_true",
                   help="compile the training step with torch.compile (a one-time compile of 1-3 minutes, then "
                        "1.5-3.8x the steps per second of the UNF field on MLP zoos; falls back to eager with a "
                        "warning)")
    p.add_argument("--select-every", type=at_least(0), default=None, metavar="K",
                   help="every K steps sample --select-num networks and keep the flow whose samples are most "
                        "accurate on the zoo's training split (no test data; default: the recipe's, 50, for the "
                        "recipe's field; else 0: keep the last)")
    p.add_argument("--select-num", type=at_least(2), default=None,
                   help="networks sampled per selection (default 100, at least 2: their agreement with each other "
                        "is measured; needs --select-every)")

    p = add_command(flow, "sample", run=run_sample, seed=True, device=True,
                    help="generate networks from a trained flow and store them as a zoo (with test accuracy)",
                    example="unf flow sample runs/flow --num 1000 --out zoos/generated --nfe 20 --solver heun")
    p.add_argument("run", help="run directory of `unf flow train` (or its flow.safetensors)")
    p.add_argument("--num", type=at_least(1), required=True, help="networks to generate")
    p.add_argument("--out", required=True, help="new zoo directory")
    p.add_argument("--nfe", type=at_least(1), default=20, help="velocity evaluations per network (default 20)")
    p.add_argument("--solver", choices=("euler", "midpoint", "heun", "rk4"), default="heun",
                   help="fixed-step solver (default heun)")
    p.add_argument("--condition", action="append", default=[], metavar="COL=VAL",
                   help="value of a conditioning column (repeatable); unset columns are left open")
    p.add_argument("--batch-size", type=at_least(1), default=1000, help="networks per solver batch (default 1000)")
    p.add_argument("--churn", type=float, default=0.0,
                   help="stochastic sampling: the SDE with the flow's marginals, whose fresh noise breaks ties between "
                        "units that an equivariant field keeps (default 0: the ODE). At most 0.2 x the solver's "
                        "steps; BENCHMARKS.md gives the measured effect (with churn, a network depends on "
                        "--batch-size too)")
    p.add_argument("--compile", action="store_true",
                   help="evaluate the field through torch.compile: about a minute of compiling at the first "
                        "evaluation (less when inductor's on-disk cache already holds it), then about 1.9x faster "
                        "for the UNF field on a CPU; the same networks to float rounding")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="scale of the source noise (default 1, as trained). The equivariant field is sharply "
                        "tuned to it (0.95 gained 1.7 points, 0.8 gave chance; BENCHMARKS.md): choose it on the "
                        "training split with benchmarks/flow_temperature.py, never on test accuracy")

    p = add_command(flow, "eval", run=run_eval,
                    help="accuracy and novelty of a generated zoo against the flow's training and held-out networks",
                    example="unf flow eval zoos/generated --zoo zoos/digits-mlp --json")
    p.add_argument("dir", help="generated zoo directory (from `unf flow sample`)")
    p.add_argument("--zoo", required=True, help="the zoo the flow was trained on")
    p.add_argument("--no-l2", action="store_true", help="skip the aligned L2 distance (the slowest metric)")


def _flow_path(run: str) -> Path:
    p = Path(run)
    return p / "flow.safetensors" if p.is_dir() else p


def run_train(args) -> int:
    import warnings

    import torch

    from unf.distributed import dist_info, init_distributed
    from unf.flow import CheckpointError, FlowConfig, train_flow
    from unf.flow.canonical import reference_index
    from unf.flow.recipe import resolve as resolve_recipe
    from unf.flow.zoo import holdout_split, model_factory, parse_where, select_rows, zoo_data
    from unf.io import atomic_write
    from unf.zoo import Zoo, ZooFormatError

    if not 0 <= args.holdout < 1:
        raise UserError(f"--holdout {args.holdout}: must be in [0, 1)")
    if args.select_num is not None and args.select_every == 0:
        raise UserError(f"--select-num {args.select_num}: networks sampled per selection, but there is no selection "
                        "without --select-every K (K > 0)")
    if args.velocity is None and (args.unit_hidden or args.unit_activation or args.unit_rank or args.unit_attention
                                  or args.unit_channels):
        args.velocity = "unf"  # options of the unf field name it
    if args.unit_hidden and args.velocity not in (None, "unf"):
        raise UserError(f"--unit-hidden {args.unit_hidden}: only the unf field has unit MLPs (--velocity unf)")
    for flag, value in (("--unit-activation", args.unit_activation), ("--unit-rank", args.unit_rank),
                        ("--unit-attention", args.unit_attention), ("--unit-channels", args.unit_channels)):
        if value and not args.unit_hidden:
            raise UserError(f"{flag} {value}: it sets the unit MLPs, which need --unit-hidden W (W > 0)")
    if args.ot_candidates and (args.no_ot or not args.align_target):
        raise UserError(f"--ot-candidates {args.ot_candidates}: aligned OT pairs need --align-target (and OT, so "
                        "not --no-ot)")
    if args.align_source and args.align_target:
        raise UserError("--align-source and --align-target both remove the symmetry's path length: choose one")
    check_output(args.out, "--out", directory=True)
    init_distributed(str(args.device))
    _, rank, _ = dist_info()
    with user_error("--zoo", (ZooFormatError, OSError)):
        zoo = Zoo(args.zoo)
    with user_error("--where", (ValueError,)):
        where = parse_where(args.where)
    with user_error(None, (ValueError,)):  # the messages name --where or --epoch
        picked = select_rows(zoo, where, args.epoch)
    columns = [c for c in zoo.metadata[0] if c not in ("chunk", "model_id")]
    for name in args.condition:
        if name not in columns:
            raise UserError(f"--condition {name!r} is not a column of {args.zoo}/metadata.csv; columns: "
                            f"{', '.join(columns)}")
    with user_error("--zoo", (ValueError,)):
        data_name, split_seed = zoo_data(zoo.manifest.get("info", {}))
        model_factory(zoo.manifest.get("info", {}))
    recipe = resolve_recipe(zoo.spec, args.velocity, args.steps, args.select_every)
    args.velocity, args.steps, args.select_every = recipe["velocity"], recipe["steps"], recipe["select_every"]
    if args.select_num is not None and not args.select_every:
        raise UserError(f"--select-num {args.select_num}: networks sampled per selection, but there is no selection "
                        "without --select-every K (K > 0)")
    rows = [zoo.metadata[i] for i in picked]
    train_ids, held = holdout_split([r["model_id"] for r in rows], args.holdout, args.seed)
    keep = set(train_ids)
    train_rows = [i for i, r in zip(picked, rows) if str(r["model_id"]) in keep]
    if len(train_rows) < 2:
        raise UserError(f"only {len(train_rows)} training networks after --where/--epoch/--holdout; a flow needs >= 2")
    meta = [zoo.metadata[i] for i in train_rows]
    ws = zoo.weight_space(train_rows)
    if args.cooldown > args.steps:
        raise UserError(f"--cooldown {args.cooldown} is longer than --steps {args.steps}")
    cfg = FlowConfig(velocity=args.velocity, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                     lr=args.lr if args.lr is not None else (2e-3 if args.velocity == "unf" else 5e-4),
                     canonicalize=(args.canonicalize if args.canonicalize != "auto" else
                                   "reference" if args.velocity == "mlp" else "none"), ot=not args.no_ot, align_source=args.align_source,
                     align_target=args.align_target, ot_candidates=args.ot_candidates,
                     condition=list(args.condition), select_every=args.select_every, source=args.source,
                     time_sampling=args.time_sampling, cooldown=args.cooldown,
                     velocity_config={**({} if args.prediction is None else {"prediction": args.prediction}),
                                      **({} if args.hidden is None else {"hidden": args.hidden}),
                                      **({} if args.depth is None else
                                         {"depth" if args.velocity == "unf" else "layers": args.depth}),
                                      **({"unit_hidden": args.unit_hidden} if args.unit_hidden else {}),
                                      **({"unit_activation": args.unit_activation} if args.unit_activation else {}),
                                      **({"unit_rank": args.unit_rank} if args.unit_rank else {}),
                                      **({"unit_attention": args.unit_attention} if args.unit_attention else {}),
                                      **({"unit_channels": args.unit_channels} if args.unit_channels else {})})
    reference = 0
    if cfg.canonicalize == "reference":  # the network best on its training split (test accuracy is for reports)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reference = reference_index(meta)
        for w in caught:
            warn(str(w.message))
    epoch = str(meta[0]["epoch"])
    # columns that every training network shares (an activation chosen by --where, hyperparameters held fixed):
    # generated networks carry them, so they are evaluated with the right architecture
    fixed = {c: v for c, v in meta[0].items() if c not in ("chunk", "model_id") and all(r.get(c) == v for r in meta)
             and c not in cfg.condition}
    mixed = sorted({r["activation"] for r in meta}) if "activation" in meta[0] and "activation" not in fixed else []
    if mixed and "activation" not in cfg.condition:
        raise UserError(f"the training networks mix activations {mixed}: a generated network would have none; "
                        "train on one (--where activation=relu) or condition on it (--condition activation)")
    run_info = {"fixed": fixed, "zoo": str(Path(args.zoo).resolve()), "zoo_name": zoo.manifest.get("name"),
                "zoo_info": zoo.manifest.get("info", {}), "where": where, "epoch": epoch, "data": data_name,
                "split_seed": split_seed, "holdout": held, "holdout_fraction": args.holdout,
                "train_ids": train_ids, "seed": args.seed, "recipe": recipe,
                "canonical_reference": str(meta[reference]["model_id"]) if cfg.canonicalize == "reference" else None}
    info(f"{len(train_rows)} training networks ({len(held)} held out) from {args.zoo}, epoch {epoch}; "
         f"{cfg.velocity} velocity, {cfg.steps} steps"
         + (f" ({', '.join(recipe['from_recipe'])} from the recipe for {recipe['kind'].upper()} zoos, "
            "unf.flow.recipe)" if recipe["from_recipe"] else ""))
    select = None
    if cfg.select_every:
        if cfg.condition:
            raise UserError("--select-every scores unconditioned samples; it cannot be combined with --condition")
        from unf.flow.evaluate import train_split_scorer

        select = train_split_scorer(model_factory(zoo.manifest.get("info", {})), meta[0], data_name, split_seed,
                                    num=args.select_num or 100, seed=args.seed, reference=ws)
    with user_error("--out", (CheckpointError, OSError)):
        flow, history = train_flow(ws, meta, cfg, out=args.out, device=args.device, progress=args.progress,
                                   info=run_info, reference=reference, select=select, compile=args.compile)
    if rank == 0:
        atomic_write(Path(args.out) / "history.json", lambda tmp: Path(tmp).write_text(json.dumps(history)))
        chosen = (f"; kept step {flow.info['selected_step']} (training-split accuracy of its samples "
                  f"{flow.info['selected_score']:.4f})" if "selected_step" in flow.info else "")
        if any("select" in h for h in history) and "selected_step" not in flow.info:
            warn("no snapshot's samples were as diverse as the training networks (agreement within 0.03 of "
                 "theirs): kept the last one; train longer or check the samples' agreement in `unf flow eval`")
        info(f"final loss {history[-1]['loss']:.4f}{chosen}; flow in {Path(args.out) / 'flow.safetensors'}")
        emit({"out": args.out, "velocity": cfg.velocity, "parameters": flow.info["velocity_parameters"],
              "selected_step": flow.info.get("selected_step"),
              "train_networks": len(train_rows), "holdout_networks": len(held), "steps": len(history),
              "loss": history[-1]["loss"], "seconds": history[-1]["seconds"], "seed": args.seed,
              "device": str(args.device)})
    del torch
    return 0


def run_sample(args) -> int:
    import time

    from unf.flow import WeightFlow
    from unf.flow.evaluate import evaluate_networks
    from unf.flow.zoo import model_factory, parse_where, write_generated

    check_output(args.out, "--out", directory=True)
    with user_error("RUN", (ValueError, OSError)):
        flow = WeightFlow.load(_flow_path(args.run))
    with user_error("--condition", (ValueError,)):
        condition = parse_where(args.condition)
        for k, v in condition.items():
            if k not in flow.conditioning.names:
                raise ValueError(f"{k!r}: the flow was trained on {flow.conditioning.names or 'no conditions'}")
            flow.conditioning.index(k, v)
    if (Path(args.out) / "manifest.json").exists():
        raise UserError(f"--out {args.out}: a zoo is already there; choose a new directory")
    run = flow.info
    start = time.perf_counter()
    with user_error("--nfe/--churn/--temperature", (ValueError,)):
        ws, nfe = flow.sample(args.num, args.nfe, args.solver, condition, seed=args.seed,
                              batch_size=args.batch_size, device=args.device, progress=args.progress,
                              churn=args.churn, compile=args.compile, temperature=args.temperature)
    seconds = time.perf_counter() - start
    info(f"{args.num} networks in {seconds:.2f} s ({nfe} velocity evaluations per batch, {args.solver}"
         + (f", churn {args.churn:g}" if args.churn else "")
         + (f", temperature {args.temperature:g})" if args.temperature != 1.0 else ")"))
    if "activation" in flow.conditioning.names and "activation" not in condition:
        raise UserError("the flow is conditioned on activation: pass --condition activation=VALUE, so that the "
                        "generated networks are built and evaluated with it")
    keep = ("activation", "epoch")  # the architecture's choices; other fixed columns are the source runs' metrics
    base = {**{k: v for k, v in run.get("fixed", {}).items() if k in keep}, **run.get("where", {}), **condition}
    rows = [{"model_id": f"gen{args.seed}-{i:05d}", "epoch": run.get("epoch", 0), **base,
             "flow_seed": args.seed} for i in range(args.num)]
    zoo_info = dict(run.get("zoo_info", {}))
    with user_error("the flow's zoo", (ValueError, ImportError, AttributeError)):
        factory = model_factory(zoo_info)
    ws, metrics = evaluate_networks(factory, ws, rows, run["data"], run["split_seed"], device=args.device)
    for r, m in zip(rows, metrics):
        r.update(m)
    out_info = {**zoo_info, "data": run["data"], "split_seed": run["split_seed"], "generated": True,
                "source_zoo": run.get("zoo"), "flow": str(_flow_path(args.run).resolve()), "flow_seed": args.seed,
                "nfe": nfe, "solver": args.solver, "churn": args.churn, "temperature": args.temperature,
                "condition": condition, "where": run.get("where", {}),
                "epoch": run.get("epoch"), "holdout": run.get("holdout", []), "train_ids": run.get("train_ids", []),
                "sample_seconds": seconds}
    with user_error("--out", (OSError, FileExistsError)):
        zoo = write_generated(args.out, ws, rows, name=f"{run.get('zoo_name') or 'zoo'}-generated", info=out_info)
    accs = [m["test_acc"] for m in metrics]
    mean = sum(accs) / len(accs)
    info(f"stored in {args.out}; test accuracy mean {mean:.4f}")
    emit({"out": args.out, "networks": len(zoo), "seconds": seconds, "nfe": nfe, "solver": args.solver,
          "churn": args.churn, "temperature": args.temperature, "seed": args.seed, "test_acc_mean": mean,
          "device": str(args.device)})
    return 0


def run_eval(args) -> int:
    from unf.flow.evaluate import evaluate_generated
    from unf.zoo import Zoo, ZooFormatError

    with user_error("DIR", (ZooFormatError, OSError)):
        gen = Zoo(args.dir)
    with user_error("--zoo", (ZooFormatError, OSError)):
        src = Zoo(args.zoo)
    bar = progress(total=2, desc="novelty", unit="set")  # held-out networks, then the generated ones
    with user_error("DIR", (ValueError, KeyError)):
        result = evaluate_generated(gen, src, l2=not args.no_l2,
                                    progress=lambda name: (bar.set_postfix_str(name), bar.update(1)))
    bar.close()
    for name in ("train", "heldout", "generated"):
        s = result[name]
        line = f"{name:>9}: n={s['n']:4d}  accuracy mean {s['accuracy']['mean']:.4f} median {s['accuracy']['q50']:.4f}"
        if "iou" in s:
            line += (f"  copies {s['copy_fraction']:.1%}  IoU median {s['iou']['q50']:.3f}  derivedness median "
                     f"{s['derivedness']['q50']:.3f}")
            if "l2" in s:
                line += f"  aligned L2 median {s['l2']['q50']:.3f}"
        if "agreement" in s:  # within the set: samples that all agree on everything are one network, many times
            line += f"  agreement median {s['agreement']['q50']:.3f}"
        info(line)
    emit({"dir": args.dir, "zoo": args.zoo, **result})
    return 0
