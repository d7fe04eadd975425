"""``unf merge``: weight-space editing experiments (``unf merge cuts-demo``: CUTS unlearning on digits)."""
from __future__ import annotations

import argparse

from .common import UserError, add_command, add_group, at_least, check_output, emit, info, user_error


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def register(sub) -> None:
    from ..merge.cuts_demo import DEFAULTS

    def default(name: str) -> str:
        return "default " + ", ".join(f"{DEFAULTS[kind, backbone][name]} for {kind} on {backbone}"
                                      for kind, backbone in DEFAULTS) + "; chosen on validation"

    group = add_group(sub, "merge", help="weight-space editing: task vectors, CUTS unlearning",
                      example="unf merge cuts-demo --kind noise --noise-rate 0.4 --seed 0 --json")
    p = add_command(group, "cuts-demo", run=run, seed=True,
                    help="CUTS on digits: unlearn label noise or a backdoor by negating a proxy task vector",
                    example="unf merge cuts-demo --kind noise --noise-rate 0.4 --seed 0 --json\n"
                            "unf merge cuts-demo --kind backdoor --seed 1 --plot cuts_backdoor.png")
    p.add_argument("--kind", choices=["noise", "backdoor"], default="noise",
                   help="symmetric label noise, or a BadNets 2x2 patch backdoor on 5%% of the training set")
    p.add_argument("--noise-rate", type=_rate, default=None, help="label-noise rate (default 0.4; --kind noise only)")
    p.add_argument("--epochs", type=at_least(1), default=None,
                   help=f"training epochs of the corrupted and the clean model ({default('epochs')})")
    p.add_argument("--proxy-epochs", type=at_least(1), default=None,
                   help=f"proxy fine-tuning epochs ({default('proxy_epochs')})")
    p.add_argument("--proxies", type=at_least(1), default=None,
                   help=f"proxy task vectors averaged into tau ({default('proxies')}; 1 is the paper's single proxy)")
    p.add_argument("--proxy-recipe", choices=["plain", "paired"], default=None,
                   help="plain: the proxy fine-tune alone (the paper's); paired (backdoor only): the fine-tune on the "
                        "triggered proxy plus its untriggered twins, labelled by the model's own predictions, minus "
                        f"the fine-tune on the twins alone ({default('proxy_recipe')})")
    p.add_argument("--evaluate-on", choices=["test", "validation"], default="test",
                   help="report on the test split, or on a seeded validation split carved from the training split "
                        "(the test split is then not read: use it to choose settings)")
    p.add_argument("--backbone", choices=["scratch", "rotation"], default="scratch",
                   help="train the corrupted and the clean model from a random initialisation (default), or from a "
                        "backbone pretrained without labels to predict the rotation of the training inputs")
    p.add_argument("--plot", help="write a PNG of test accuracy (and attack success or score) against alpha here")


def run(args) -> int:
    from ..merge.cuts_demo import plot_alpha_curves, run_cuts_demo

    if args.kind == "backdoor" and args.noise_rate is not None:
        raise UserError("--noise-rate applies to --kind noise only; drop it or use --kind noise")
    if args.kind == "noise" and args.proxy_recipe == "paired":
        raise UserError("--proxy-recipe paired applies to --kind backdoor only")
    if args.plot:
        check_output(args.plot, "--plot")  # before the experiment, not after it
    args.noise_rate = 0.4 if args.noise_rate is None else args.noise_rate
    bar = None
    if args.progress:
        from .common import progress

        bar = progress(total=4, desc="cuts-demo")
    rec = run_cuts_demo(args.kind, args.noise_rate, args.seed, epochs=args.epochs, proxy_epochs=args.proxy_epochs,
                        proxies=args.proxies, evaluate_on=args.evaluate_on, backbone=args.backbone,
                        proxy_recipe=args.proxy_recipe,
                        progress=(lambda _: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    info(f"seed {args.seed}, {args.kind}: {args.evaluate_on} accuracy corrupted {rec['corrupted_acc']:.3f}, CUTS "
         f"{rec['cuts_acc']:.3f} (alpha {rec['alpha']}), random vector {rec['random_acc']:.3f}, clean fine-tuning "
         f"{rec['clean_ft_acc']:.3f}, clean training {rec['clean_acc']:.3f}")
    if args.kind == "noise" and rec["gap_recovered"] is not None:
        info(f"CUTS recovers {100 * rec['gap_recovered']:.0f}% of the clean-minus-noisy gap")
    if args.kind == "backdoor":
        info(f"attack success: corrupted {rec['corrupted_asr']:.3f}, CUTS {rec['cuts_asr']:.3f}, random vector "
             f"{rec['random_asr']:.3f}, clean fine-tuning {rec['clean_ft_asr']:.3f}")
    if args.plot:
        with user_error("--plot", (OSError,)):
            plot_alpha_curves([rec], args.plot)
        info(f"plot written to {args.plot}")
    emit(rec)
    return 0
