"""``unf align``: align checkpoint B to checkpoint A by permutation; report the loss barrier before and after."""
from __future__ import annotations

from .common import (UserError, add_command, at_least, build_model, check_output, emit, info, load_checkpoint,
                     progress, user_error)


def register(sub) -> None:
    p = add_command(sub, "align", run=run, seed=True,
                    help="align checkpoint B to checkpoint A by permutation; report the loss barrier",
                    example="unf align examples/models.py:mlp --a a.safetensors --b b.safetensors --data digits-flat "
                            "--out b_aligned.safetensors --plot lmc.png")
    p.add_argument("model", help="'file.py:factory' or 'package.module:factory' building the architecture")
    p.add_argument("--a", required=True, help="reference checkpoint (.safetensors, or .pt state_dict)")
    p.add_argument("--b", required=True, help="checkpoint to align to --a")
    p.add_argument("--data", default="digits-flat", help="embedded dataset for the barrier (unf.data.available())")
    p.add_argument("--split-seed", type=at_least(0), default=0, help="seed of the dataset's train/test split")
    p.add_argument("--method", choices=["weight", "activation"], default="weight")
    p.add_argument("--points", type=at_least(2), default=11, help="points along the linear path (>= 2)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="factory keyword argument")
    p.add_argument("--out", help="write the aligned B here (.safetensors)")
    p.add_argument("--plot", help="write a PNG of test loss and accuracy along both paths here")


def run(args) -> int:
    bar = progress(total=1 + 2 * args.points, desc="align", unit="step")  # the matching, then each path's points
    emit(align_and_report(args, say=lambda text: (bar.close(), info(text)),  # the bar ends before the report
                          tick=lambda text: (bar.set_postfix_str(text), bar.update(1))))
    bar.close()
    return 0


def align_and_report(args, say=info, tick=None) -> dict:
    """Align ``args.b`` to ``args.a``, print the barriers with ``say`` (and write ``--out`` / ``--plot``); the JSON
    result. ``tick(text)``, if given, is called after the matching and after each point of each path."""
    tick = tick or (lambda text: None)
    import torch

    import unf
    from unf.align import activation_matching, loss_barrier, weight_matching
    from unf.io import save_state_dict
    from unf.training import evaluate

    for option, path in (("--out", args.out), ("--plot", args.plot)):  # fail before any work
        if path:
            check_output(path, option)
    a, b = load_checkpoint(args.a, "--a"), load_checkpoint(args.b, "--b")
    if args.data not in unf.data.available():
        raise UserError(f"--data {args.data!r}: unknown dataset; available: {', '.join(unf.data.available())}")
    with user_error(f"--data {args.data}", (ImportError, OSError, ValueError)):
        split = unf.data.load(args.data, seed=args.split_seed)
    factory, kwargs, model = build_model(args.model, args.arg)
    try:
        spec = unf.spec_from_module(model, split.x_train[:1])
    except unf.SpecInferenceError as e:
        raise UserError(f"{args.model} on --data {args.data}: {e}") from e
    for option, path, sd in (("--a", args.a, a), ("--b", args.b, b)):
        with user_error(f"{option} {path}", (ValueError,)):
            spec.validate(sd)
    if args.method == "weight":
        perm = weight_matching(spec, a, b, seed=args.seed)
    else:
        ma, mb = factory(**kwargs), factory(**kwargs)
        ma.load_state_dict(a)
        mb.load_state_dict(b)
        perm = activation_matching(ma, mb, spec, split.x_train.split(256), seed=args.seed)
    aligned = spec.permute(b, perm)
    tick("matched")
    ts = [i / (args.points - 1) for i in range(args.points)]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bn_batches = (lambda: split.x_train.split(256)) if has_bn else None  # training data only
    curves = {}
    for name, end in (("naive", b), ("aligned", aligned)):
        accs = []

        def test_loss(net):
            loss, acc = evaluate(net, split.x_test, split.y_test)
            accs.append(acc)
            tick(f"{name} path, point {len(accs)}")
            return loss

        res = loss_barrier(model, a, end, test_loss, ts, bn_batches)
        curves[name] = (res["values"], accs, res["barrier"])
    naive, al = curves["naive"][2], curves["aligned"][2]
    say(f"test-loss barrier: naive {naive:.4f}, aligned {al:.4f} "
         f"({100 * (1 - al / naive) if naive > 0 else 0:.1f}% lower)")
    step = max(1, len(ts) // 5)
    for name, (losses, accs, _) in curves.items():
        say(f"{name:>8}: " + "  ".join(f"t={t:.2f} loss={v:.3f} acc={acc:.3f}"
                                        for t, v, acc in zip(ts[::step], losses[::step], accs[::step])))
    if args.out:
        with user_error("--out", (OSError,)):
            save_state_dict(aligned, args.out)
        say(f"aligned state_dict written to {args.out}")
    if args.plot:
        with user_error("--plot", (OSError,)):
            _plot_lmc(ts, curves, args.plot, f"{args.model} on {args.data}")
        say(f"plot written to {args.plot}")
    return {"model": args.model, "a": args.a, "b": args.b, "data": args.data, "split_seed": args.split_seed,
            "method": args.method, "seed": args.seed, "t": ts,
            **{name: {"barrier": barrier, "test_loss": losses, "test_acc": accs}
               for name, (losses, accs, barrier) in curves.items()},
            "out": args.out, "plot": args.plot}


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
