"""``unf spec``: infer and print the permutation-symmetry spec of a model."""
from __future__ import annotations

import json
import warnings

from .common import UserError, add_command, build_model, emit, info, warn


def register(sub) -> None:
    p = add_command(sub, "spec", run=run, help="infer and print the permutation-symmetry spec of a model",
                    example="unf spec examples/models.py:resnet20 --input-shape 1,3,32,32 --json | jq .groups")
    p.add_argument("model", help="'file.py:factory' or 'package.module:factory' returning an nn.Module")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32")
    p.add_argument("--input-dtype", default="float32", help="example input dtype (float32, long, ...)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the factory (value parsed as JSON when possible); repeatable")
    p.add_argument("--strict", action="store_true", help="fail instead of fixing axes of ops without a rule")


def run(args) -> int:
    import torch

    import unf

    try:
        shape = tuple(int(n) for n in args.input_shape.split(","))
        if any(n < 1 for n in shape):
            raise ValueError
    except ValueError:
        raise UserError(f"--input-shape {args.input_shape!r} must be comma-separated positive integers, "
                        "e.g. 1,3,32,32") from None
    dtype = getattr(torch, args.input_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"--input-dtype {args.input_dtype!r} is not a torch dtype; e.g. float32, float64, long")
    _, _, model = build_model(args.model, args.arg)
    example = torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", unf.UnprovenSymmetryWarning)
        try:
            spec = unf.spec_from_module(model, example, strict=args.strict)
        except unf.SpecInferenceError as e:
            raise UserError(str(e)) from e
    for w in caught:
        warn(str(w.message))
    emit(json.loads(spec.to_json()))
    info(str(spec))
    return 0
