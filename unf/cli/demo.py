"""``unf demo``: the main job on embedded data: spec -> two trained MLPs -> alignment -> loss barrier and a PNG."""
from __future__ import annotations

import argparse
import json

from .common import add_command, at_least, emit, info, progress, run_record, user_error


def register(sub) -> None:
    p = add_command(sub, "demo", run=run, seed=True,
                    help="the main job on embedded data: train two MLPs on digits, infer their spec, align them, "
                         "report the loss barrier, write a PNG",
                    example="unf demo --out unf_demo --seed 0")
    p.add_argument("--out", default="unf_demo", help="folder for checkpoints, the plot and run.json")
    p.add_argument("--width", type=at_least(1), default=128, help="hidden width of the two MLPs")
    p.add_argument("--epochs", type=at_least(1), default=10)


def run(args) -> int:
    from pathlib import Path

    import torch

    import unf
    from unf import _demo_model
    from unf.io import atomic_write, save_state_dict
    from unf.training import evaluate, train_classifier

    from .align import align_and_report

    out = Path(args.out)
    record = run_record(width=args.width, epochs=args.epochs, model_seeds=[args.seed, args.seed + 1])
    with user_error("--out", (OSError,)):  # a file there, or not writable: fail before training
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    split = unf.data.load("digits-flat")
    info(f"data: {split}")
    paths = []
    for seed in progress(record["model_seeds"], desc="training", unit="net", leave=False):
        torch.manual_seed(seed)
        net = _demo_model.mlp(args.width)
        train_classifier(net, split.x_train, split.y_train, epochs=args.epochs, seed=seed)
        loss, acc = evaluate(net, split.x_test, split.y_test)
        info(f"MLP 64-{args.width}-{args.width}-10, seed {seed}: test loss {loss:.3f}, accuracy {acc:.3f}")
        paths.append(out / f"mlp_seed{seed}.safetensors")
        save_state_dict(net.state_dict(), paths[-1])
        emit({"stage": "train", "model_seed": seed, "test_loss": loss, "test_acc": acc, "checkpoint": str(paths[-1])})
    info(str(unf.spec_from_module(net, split.x_train[:1])))
    result = align_and_report(argparse.Namespace(
        model="unf._demo_model:mlp", a=str(paths[0]), b=str(paths[1]), data="digits-flat", split_seed=0,
        method="weight", points=11, seed=args.seed, arg=[f"width={args.width}"],
        out=str(out / f"mlp_seed{args.seed + 1}_aligned.safetensors"), plot=str(out / "lmc.png")))
    emit({"stage": "align", **result})
    return 0
