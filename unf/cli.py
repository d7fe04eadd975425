"""The ``unf`` command line.

    unf spec examples/models.py:resnet18 --input-shape 1,3,32,32 [--json] [--strict]
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
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
