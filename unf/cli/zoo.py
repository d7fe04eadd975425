"""``unf zoo build`` and ``unf zoo info``: build and inspect model zoos."""
from __future__ import annotations

from .common import UserError, add_command, add_group, at_least, check_output, emit, info, user_error


def register(sub) -> None:
    zoo = add_group(sub, "zoo", help="build and inspect model zoos",
                    example="unf zoo build digits-mlp --out zoos/digits-mlp --num-models 100\n"
                            "unf zoo info zoos/digits-mlp")
    p = add_command(zoo, "build", run=run_build, seed=True, device=True,
                    help="build (or resume) a built-in zoo on embedded data",
                    example="unf zoo build digits-cnn --out zoos/digits-cnn --num-models 2000 --seed 0")
    p.add_argument("name", help="digits-mlp or digits-cnn")
    p.add_argument("--out", required=True, help="zoo directory (an interrupted build resumes there)")
    p.add_argument("--num-models", type=at_least(1), default=None, help="networks to train (default 2000)")
    p = add_command(zoo, "info", run=run_info, help="summarise a zoo directory",
                    example="unf zoo info zoos/digits-cnn --json | jq .networks")
    p.add_argument("dir", help="zoo directory")


def run_build(args) -> int:
    """Under ``torchrun`` the chunks are split over the ranks (``unf.zoo.store.build``) and rank 0 reports; with
    ``--device cuda`` (no index) each rank trains on ``cuda:LOCAL_RANK``, one GPU per process."""
    import os

    import torch

    from unf.distributed import dist_info, init_distributed
    from unf.zoo.builtin import ZOOS, build_builtin
    from unf.zoo.store import ZooFormatError

    if args.name not in ZOOS:
        raise UserError(f"unknown zoo {args.name!r}; built-in zoos: {', '.join(sorted(ZOOS))}")
    check_output(args.out, "--out", directory=True)
    device = args.device
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device cuda: rank {device.index} on this node, but only {torch.cuda.device_count()} "
                            "CUDA GPUs; start at most one process per GPU")
        torch.cuda.set_device(device)  # before init, so that nccl binds each rank to its own GPU
    init_distributed(str(device))
    _, rank, _ = dist_info()
    with user_error("--out", (ZooFormatError, OSError)):  # another zoo there, or not writable
        zoo = build_builtin(args.name, args.out, args.num_models, args.seed, progress=args.progress,
                            device=device)
    if rank != 0:  # rank 0 reports for all
        return 0
    networks = len({r["model_id"] for r in zoo.metadata})
    info(f"{args.name}: {len(zoo)} stored networks (rows) in {args.out}")
    emit({"name": args.name, "dir": args.out, "networks": networks, "rows": len(zoo), "complete": zoo.complete,
          "device": str(args.device)})
    return 0


def run_info(args) -> int:
    from statistics import mean

    import torch

    from unf.zoo import Zoo

    with user_error():  # the zoo's errors name the file and say what is wrong
        zoo = Zoo(args.dir)
    m = zoo.manifest
    runs = {r["model_id"] for r in zoo.metadata}
    parameters = sum(torch.Size(zoo.spec[n].shape).numel() for n in zoo.spec.parameter_names)
    info(f"zoo {m['name']!r} at {args.dir}: {len(runs)} networks, {len(zoo)} rows (network x epoch), "
         f"{len(zoo.shards)} shards, {'complete' if zoo.complete else 'INCOMPLETE (rerun the build to resume)'}")
    info(f"spec: {len(zoo.spec.groups)} groups, {len(zoo.spec)} tensors, {parameters} parameters per network")
    for k, v in m.get("info", {}).items():
        info(f"  {k}: {v}")
    columns = {}
    for c in [c for c in zoo.metadata[0] if c not in ("chunk", "model_id")] if zoo.metadata else []:
        try:
            vals = [float(r[c]) for r in zoo.metadata]
        except ValueError:
            columns[c] = {"values": sorted({r[c] for r in zoo.metadata})}
            info(f"  {c}: {columns[c]['values']}")
            continue
        columns[c] = {"mean": mean(vals), "min": min(vals), "max": max(vals)}
        info(f"  {c}: mean {columns[c]['mean']:.4g}, min {min(vals):.4g}, max {max(vals):.4g}")
    emit({"name": m["name"], "dir": args.dir, "networks": len(runs), "rows": len(zoo), "shards": len(zoo.shards),
          "complete": zoo.complete, "groups": len(zoo.spec.groups), "tensors": len(zoo.spec),
          "parameters": parameters, "info": m.get("info", {}), "columns": columns})
    return 0
