"""The ``unf`` command line.

    unf spec examples/models.py:resnet18 --input-shape 1,3,32,32 [--json] [--strict]
    unf align examples/models.py:mlp --a a.safetensors --b b.safetensors --data digits-flat --out b_aligned.safetensors
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch


def load_factory(ref: str) -> Callable:
    """``path/to/file.py:name`` or ``package.module:name`` -> the callable ``name``."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise SystemExit(f"unf: model reference {ref!r} must look like 'file.py:factory' or 'package.module:factory'")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise SystemExit(f"unf: model file {str(path)!r} does not exist")
        name = f"unf_user_model_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # dataclasses, pickling and tracing look modules up by name
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        module = importlib.import_module(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise SystemExit(f"unf: {target!r} has no callable {attr!r}; available: {', '.join(names)}")
    return factory


def _parse_kwargs(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"unf: --arg {item!r} must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_spec(args) -> int:
    import unf

    model = load_factory(args.model)(**_parse_kwargs(args.arg))
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"unf: {args.model} returned {type(model).__name__}, not a torch.nn.Module")
    try:
        shape = tuple(int(n) for n in args.input_shape.split(","))
    except ValueError:
        raise SystemExit(f"unf: --input-shape {args.input_shape!r} must be comma-separated integers, e.g. 1,3,32,32")
    dtype = getattr(torch, args.input_dtype)
    example = torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", unf.UnprovenSymmetryWarning)
        try:
            spec = unf.spec_from_module(model, example, strict=args.strict)
        except unf.SpecInferenceError as e:
            print(f"unf: {e}", file=sys.stderr)
            return 1
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(spec.to_json(indent=2) if args.json else spec)
    return 0


def _cmd_align(args) -> int:
    import unf
    from unf.align import activation_matching, loss_barrier, weight_matching
    from unf.io import load_state_dict, save_state_dict
    from unf.training import evaluate

    if args.points < 2:
        raise SystemExit("unf: --points must be at least 2 (the two endpoints)")
    split = unf.data.load(args.data, seed=args.split_seed)
    factory, kwargs = load_factory(args.model), _parse_kwargs(args.arg)
    model = factory(**kwargs)
    spec = unf.spec_from_module(model, split.x_train[:1])
    a, b = load_state_dict(args.a), load_state_dict(args.b)
    for path, sd in ((args.a, a), (args.b, b)):
        try:
            spec.validate(sd)
        except ValueError as e:
            raise SystemExit(f"unf: {path}: {e}")
    if args.method == "weight":
        perm = weight_matching(spec, a, b, seed=args.seed)
    else:
        ma, mb = factory(**kwargs), factory(**kwargs)
        ma.load_state_dict(a)
        mb.load_state_dict(b)
        perm = activation_matching(ma, mb, spec, split.x_train.split(256), seed=args.seed)
    aligned = spec.permute(b, perm)
    ts = [i / (args.points - 1) for i in range(args.points)]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bn_batches = (lambda: split.x_train.split(256)) if has_bn else None  # training data only
    curves = {}
    for name, end in (("naive", b), ("aligned", aligned)):
        accs = []

        def test_loss(net):
            loss, acc = evaluate(net, split.x_test, split.y_test)
            accs.append(acc)
            return loss

        res = loss_barrier(model, a, end, test_loss, ts, bn_batches)
        curves[name] = (res["values"], accs, res["barrier"])
    naive, al = curves["naive"][2], curves["aligned"][2]
    print(f"test-loss barrier: naive {naive:.4f}, aligned {al:.4f} "
          f"({100 * (1 - al / naive) if naive > 0 else 0:.1f}% lower)")
    for name, (losses, accs, _) in curves.items():
        print(f"{name:>8}: " + "  ".join(f"t={t:.2f} loss={v:.3f} acc={acc:.3f}" for t, v, acc in
                                         zip(ts[::max(1, len(ts) // 5)], losses[::max(1, len(ts) // 5)],
                                             accs[::max(1, len(ts) // 5)])))
    if args.out:
        save_state_dict(aligned, args.out)
        print(f"aligned state_dict written to {args.out}")
    if args.plot:
        _plot_lmc(ts, curves, args.plot, f"{args.model} on {args.data}")
        print(f"plot written to {args.plot}")
    return 0


def _cmd_demo(args) -> int:
    """The main job on embedded data: spec -> two trained MLPs -> alignment -> loss barrier and a PNG."""
    from pathlib import Path

    import unf
    from unf import _demo_model
    from unf.io import save_state_dict
    from unf.training import evaluate, train_classifier

    out = Path(args.out)
    split = unf.data.load("digits-flat")
    print(f"data: {split}")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = _demo_model.mlp(args.width)
        train_classifier(net, split.x_train, split.y_train, epochs=args.epochs, seed=seed)
        loss, acc = evaluate(net, split.x_test, split.y_test)
        print(f"MLP 64-{args.width}-{args.width}-10, seed {seed}: test loss {loss:.3f}, accuracy {acc:.3f}")
        paths.append(out / f"mlp_seed{seed}.safetensors")
        save_state_dict(net.state_dict(), paths[-1])
    print(unf.spec_from_module(net, split.x_train[:1]))
    return _cmd_align(argparse.Namespace(
        model="unf._demo_model:mlp", a=str(paths[0]), b=str(paths[1]), data="digits-flat", split_seed=0, method="weight",
        points=11, seed=0, arg=[f"width={args.width}"], out=str(out / "mlp_seed1_aligned.safetensors"),
        plot=str(out / "lmc.png")))


def _cmd_zoo_build(args) -> int:
    from unf.zoo.builtin import build_builtin

    zoo = build_builtin(args.name, args.out, args.num_models, args.seed, progress=not args.quiet)
    print(f"{args.name}: {len(zoo)} stored networks (rows) in {args.out}")
    return 0


def _cmd_zoo_info(args) -> int:
    from statistics import mean

    from unf.zoo import Zoo

    zoo = Zoo(args.dir)
    m = zoo.manifest
    runs = {r["model_id"] for r in zoo.metadata}
    print(f"zoo {m['name']!r} at {args.dir}: {len(runs)} networks, {len(zoo)} rows (network x epoch), "
          f"{len(zoo.shards)} shards, {'complete' if zoo.complete else 'INCOMPLETE (rerun the build to resume)'}")
    print(f"spec: {len(zoo.spec.groups)} groups, {len(zoo.spec)} tensors, "
          f"{sum(torch.Size(zoo.spec[n].shape).numel() for n in zoo.spec.parameter_names)} parameters per network")
    for k, v in m.get("info", {}).items():
        print(f"  {k}: {v}")
    numeric = [c for c in zoo.metadata[0] if c not in ("chunk", "model_id")] if zoo.metadata else []
    for c in numeric:
        try:
            vals = [float(r[c]) for r in zoo.metadata]
        except ValueError:
            print(f"  {c}: {sorted({r[c] for r in zoo.metadata})}")
            continue
        print(f"  {c}: mean {mean(vals):.4g}, min {min(vals):.4g}, max {max(vals):.4g}")
    return 0


def _cmd_predict_fit(args) -> int:
    from unf.zoo import Zoo
    from unf.zoo.predict import fit_predictor

    result = fit_predictor(Zoo(args.zoo), args.model, args.target, args.seed, args.epochs, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} on {args.zoo}, target {args.target}, seed {args.seed}: Kendall tau "
              f"{result['kendall_tau']:.4f}, R^2 {result['r2']:.4f}, MAE {result['mae']:.4f} "
              f"(test split, {result['n_test']} rows)")
    return 0


def _plot_lmc(ts, curves, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unf.io import atomic_write

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, (losses, accs, barrier) in curves.items():
        ax1.plot(ts, losses, marker="o", label=f"{name} (barrier {barrier:.3f})")
        ax2.plot(ts, accs, marker="o", label=name)
    ax1.set(xlabel="interpolation t (0 = model A, 1 = model B)", ylabel="test loss")
    ax2.set(xlabel="interpolation t", ylabel="test accuracy")
    ax1.legend()
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unf", description="Learning on neural-network weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("spec", help="infer and print the permutation-symmetry spec of a model")
    p.add_argument("model", help="'file.py:factory' or 'package.module:factory' returning an nn.Module")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32")
    p.add_argument("--input-dtype", default="float32", help="example input dtype (float32, long, ...)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the factory (value parsed as JSON when possible); repeatable")
    p.add_argument("--json", action="store_true", help="print the spec as JSON")
    p.add_argument("--strict", action="store_true", help="fail instead of fixing axes of ops without a rule")
    p.set_defaults(func=_cmd_spec)

    p = sub.add_parser("align", help="align checkpoint B to checkpoint A by permutation; report the loss barrier")
    p.add_argument("model", help="'file.py:factory' or 'package.module:factory' building the architecture")
    p.add_argument("--a", required=True, help="reference checkpoint (.safetensors, or .pt state_dict)")
    p.add_argument("--b", required=True, help="checkpoint to align to --a")
    p.add_argument("--data", default="digits-flat", help="embedded dataset for the barrier (unf.data.available())")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the dataset's train/test split")
    p.add_argument("--method", choices=["weight", "activation"], default="weight")
    p.add_argument("--points", type=int, default=11, help="points along the linear path (>= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="factory keyword argument")
    p.add_argument("--out", help="write the aligned B here (.safetensors)")
    p.add_argument("--plot", help="write a PNG of test loss and accuracy along both paths here")
    p.set_defaults(func=_cmd_align)

    p = sub.add_parser("demo", help="the main job on embedded data: train two MLPs on digits, infer their spec, "
                                    "align them, report the loss barrier, write a PNG")
    p.add_argument("--out", default="unf_demo", help="folder for checkpoints and the plot")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10)
    p.set_defaults(func=_cmd_demo)

    zoo = sub.add_parser("zoo", help="build and inspect model zoos").add_subparsers(dest="zoo_command", required=True)
    p = zoo.add_parser("build", help="build (or resume) a built-in zoo on embedded data")
    p.add_argument("name", help="digits-mlp or digits-cnn")
    p.add_argument("--out", required=True, help="zoo directory")
    p.add_argument("--num-models", type=int, default=None, help="networks to train (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_zoo_build)
    p = zoo.add_parser("info", help="summarise a zoo directory")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_zoo_info)

    pred = sub.add_parser("predict", help="predict network properties from weights").add_subparsers(
        dest="predict_command", required=True)
    p = pred.add_parser("fit", help="train a predictor on a zoo's train split, report test-split metrics")
    p.add_argument("--zoo", required=True)
    p.add_argument("--model", choices=["unf", "statnn", "deepsets", "gmn"], default="unf")
    p.add_argument("--target", default="test_acc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_predict_fit)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
