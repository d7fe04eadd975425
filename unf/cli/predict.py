"""``unf predict fit``: predict network properties from weights."""
from __future__ import annotations

from .common import UserError, add_command, add_group, at_least, emit, info, user_error


def register(sub) -> None:
    pred = add_group(sub, "predict", help="predict network properties from weights",
                     example="unf predict fit --zoo zoos/digits-cnn --model unf --target test_acc --json")
    p = add_command(pred, "fit", run=run_fit, seed=True, device=True,
                    help="train a predictor on a zoo's train split, report test-split metrics",
                    example="unf predict fit --zoo zoos/digits-cnn --model statnn --target test_acc --seed 1 --json")
    p.add_argument("--zoo", required=True, help="zoo directory (unf zoo build, or a converted public zoo)")
    p.add_argument("--model", choices=["unf", "statnn", "deepsets", "gmn"], default="unf", help="predictor")
    p.add_argument("--target", default="test_acc", help="metadata column to predict (default test_acc)")
    p.add_argument("--epochs", type=at_least(1), default=20)


def run_fit(args) -> int:
    from unf.zoo import Zoo
    from unf.zoo.predict import fit_predictor

    with user_error("--zoo"):
        zoo = Zoo(args.zoo)
    columns = [c for c in zoo.metadata[0] if c not in ("chunk", "model_id")] if zoo.metadata else []
    if not columns:
        raise UserError(f"--zoo {args.zoo}: the zoo holds no networks yet; build it first (unf zoo build)")
    if args.target not in columns:
        raise UserError(f"--target {args.target!r} is not a column of {args.zoo}/metadata.csv; "
                        f"columns: {', '.join(columns)}")
    try:
        [float(r[args.target]) for r in zoo.metadata]
    except ValueError:
        raise UserError(f"--target {args.target!r} is not a numeric column; choose a metric such as test_acc") from None
    result = fit_predictor(zoo, args.model, args.target, args.seed, args.epochs, progress=args.progress,
                           device=args.device)
    info(f"{args.model} on {args.zoo}, target {args.target}, seed {args.seed}: Kendall tau "
         f"{result['kendall_tau']:.4f}, R^2 {result['r2']:.4f}, MAE {result['mae']:.4f} "
         f"(test split, {result['n_test']} rows)")
    emit({**result, "zoo": args.zoo, "device": str(args.device)})
    return 0
