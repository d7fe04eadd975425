"""What every ``unf`` command shares: options, output, errors, progress bars, model and checkpoint loading.

A command module (``unf/cli/<use>.py``, or a plugin registered under the entry-point group ``unf.commands``)
defines ``register(sub)``, which calls :func:`add_command` (or :func:`add_group` for ``unf <group> <command>``), and
a ``run(args) -> int``. Inside ``run``:

- raise :class:`UserError` for anything the user can fix (a missing file, a bad value): ``unf`` prints one line
  ``unf: error: ...`` and exits 2; anything else is a bug: a traceback and exit 1;
- wrap library calls that read user-named files in :func:`user_error` so their errors become user errors;
- print human text with :func:`info` and results with :func:`emit` (``--json``: one JSON object per line on stdout,
  human text on stderr);
- pass ``args.progress`` to library functions that take ``progress``, or wrap loops in :func:`progress`;
- ``args.seed`` and ``args.device`` (a ``torch.device``) exist when the command was added with ``seed=True`` /
  ``device=True``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence


class UserError(Exception):
    """A mistake the user can fix. The message is the one line shown: name the argument or file and what to do."""


class Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line shape as every other error (argparse already exits 2)."""

    def error(self, message: str):
        self.exit(2, f"unf: error: {message} (see '{self.prog} --help')\n")


@dataclass
class Context:
    """How the running command was asked to report (set by ``unf.cli.main`` from the parsed options)."""

    json: bool = False
    quiet: bool = False
    debug: bool = False
    seed: Optional[int] = None
    argv: list = field(default_factory=list)

    @property
    def progress(self) -> bool:
        """Progress bars: on unless ``--quiet`` or stderr (where tqdm writes) is not a terminal."""
        return not self.quiet and _isatty(sys.stderr)


ctx = Context()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Set :data:`ctx` from the parsed options; give ``args`` a ``progress`` flag and a resolved ``device``."""
    ctx.json, ctx.quiet = getattr(args, "json", False), getattr(args, "quiet", False)
    ctx.debug, ctx.seed, ctx.argv = getattr(args, "debug", False), getattr(args, "seed", None), list(argv)
    args.progress = ctx.progress
    if getattr(args, "device", None) is not None:
        args.device = resolve_device(args.device)


# ---------------------------------------------------------------------------------------------------------- options

def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (a bad value is a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a learning rate, a scale); NaN, infinities and <= 0 are usage
    errors (exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


positive_float.__name__ = "positive number"


def add_common(parser: argparse.ArgumentParser, *, seed: bool = False, device: bool = False,
               json: bool = True) -> None:
    """The options every command takes (``--quiet``, ``--debug``, ``--json``), and ``--seed`` / ``--device`` for
    commands with randomness / computation."""
    group = parser.add_argument_group("common options")
    if json:
        group.add_argument("--json", action="store_true",
                           help="print results as JSON, one object per line, on stdout (human text goes to stderr)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # SUPPRESS: an unset sub-command --debug must not overwrite a top-level `unf --debug ...`
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    if seed:
        group.add_argument("--seed", type=at_least(0), default=0,
                           help="random seed (default 0); recorded in the JSON output and in output directories")
    if device:
        group.add_argument("--device", default="cpu", metavar="{cpu,cuda}",
                           help="where to compute (default cpu; cuda or cuda:N needs a CUDA GPU)")


def add_command(sub, name: str, *, help: str, example: str, run: Callable[[argparse.Namespace], int],
                description: Optional[str] = None, seed: bool = False, device: bool = False,
                json: bool = True) -> argparse.ArgumentParser:
    """Add command ``name`` to the subparsers ``sub``: its ``--help`` shows ``example`` (one or more lines of
    shell), it takes the common options, and ``unf`` calls ``run(args)``. Add the command's own arguments to the
    parser this returns."""
    parser = sub.add_parser(name, help=help, description=description or help, epilog=_examples(example),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser, seed=seed, device=device, json=json)
    parser.set_defaults(func=run)
    return parser


def add_group(sub, name: str, *, help: str, example: str):
    """Add ``unf <name> <command> ...``; returns the subparsers to :func:`add_command` the group's commands to."""
    parser = sub.add_parser(name, help=help, description=help, epilog=_examples(example),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.add_subparsers(dest=f"{name}_command", metavar="command", required=True)


def _examples(example: str) -> str:
    lines = [line.strip() for line in example.strip().splitlines()]
    return ("example:\n" if len(lines) == 1 else "examples:\n") + "\n".join(f"  {line}" for line in lines)


def resolve_device(name) -> "torch.device":
    """``--device`` -> ``torch.device``; a device that is not there is a user error."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name!r}: not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: unsupported; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs")
    return device


# ----------------------------------------------------------------------------------------------------------- output

def info(text: str = "") -> None:
    """Human-readable text: on stdout, or on stderr under ``--json`` (so stdout holds JSON lines only)."""
    print(text, file=sys.stderr if ctx.json else sys.stdout, flush=True)


def warn(text: str) -> None:
    print(f"unf: warning: {text}", file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    """Under ``--json``, one JSON object on one line of stdout, with the command's ``seed`` when it has one
    (NaN and infinities become null); otherwise nothing (the command says it with :func:`info`)."""
    if not ctx.json:
        return
    if ctx.seed is not None:
        obj = {**obj, "seed": obj.get("seed", ctx.seed)}
    print(json.dumps(_strict(obj), default=str, allow_nan=False), flush=True)


def _strict(value):
    """NaN and infinities (an R^2 of constant targets, a diverged loss) -> null: strict JSON, as jq reads it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr, disabled by ``--quiet`` or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not ctx.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


def run_record(**extra: Any) -> dict:
    """What an output directory records about the run that wrote it (``run.json``): command line, seed, version."""
    from .. import __version__

    return {"command": " ".join(["unf", *ctx.argv]), "seed": ctx.seed, "unf_version": __version__, **extra}


# ----------------------------------------------------------------------------------------------------------- errors

@contextmanager
def user_error(prefix: Optional[str] = None, types: tuple = (OSError, ValueError)) -> Iterator[None]:
    """Turn ``types`` raised inside into a :class:`UserError` (message prefixed with ``prefix``, e.g. the option).

    Keep the block narrow (a load or a validation of something the user named), so that bugs elsewhere still
    surface with a traceback."""
    try:
        yield
    except types as e:
        raise UserError(f"{prefix}: {e}" if prefix else str(e)) from e


# ------------------------------------------------------------------------------------------- models and checkpoints

def parse_kwargs(items: Sequence[str]) -> dict:
    """``--arg key=value`` items -> keyword arguments (values parsed as JSON when possible)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--arg {item!r} must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_model(ref: str, arg_items: Sequence[str]):
    """The model of ``ref`` built with the ``--arg`` keyword arguments: ``(factory, kwargs, model)``."""
    import torch

    from ..io import load_factory

    try:
        factory = load_factory(ref)
    except ValueError as e:  # a failed import keeps its cause: --debug shows where
        raise UserError(f"{e}; rerun with --debug for the traceback" if e.__cause__ else str(e)) from e
    kwargs = parse_kwargs(arg_items)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"--arg: {ref} does not take these keyword arguments ({e})") from None
    except ValueError:  # no signature to check (a builtin); the call will tell
        pass
    model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
    return factory, kwargs, model


def check_output(path, option: str, directory: bool = False) -> None:
    """Fail before any work when ``path`` cannot be written later: a file where a directory is wanted (or the other
    way round), or a parent that is a file or not writable. Missing parents are fine (they are created)."""
    import os
    from pathlib import Path

    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise UserError(f"{option} {path}: exists and is {'not ' if directory else ''}a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is not a directory")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise UserError(f"{option} {path}: not writable")


def load_checkpoint(path: str, option: str) -> dict:
    """A state_dict from ``path`` (safetensors, or a ``.pt`` state_dict); a missing or unreadable file is a user
    error naming ``option``."""
    from ..io import load_state_dict

    with user_error(option):
        return load_state_dict(path)
