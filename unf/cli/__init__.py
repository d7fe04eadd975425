"""The ``unf`` command line: one module per use, one set of conventions (see ``unf/cli/common.py`` and the README's
"Command line" section).

    unf spec examples/models.py:resnet18 --input-shape 1,3,32,32 [--json] [--strict]
    unf align examples/models.py:mlp --a a.safetensors --b b.safetensors --data digits-flat --out b_aligned.safetensors
    unf zoo build digits-cnn --out zoos/digits-cnn;  unf zoo info zoos/digits-cnn
    unf predict fit --zoo zoos/digits-cnn --model unf --json
    unf merge cuts-demo --kind noise --noise-rate 0.4 --seed 0 --json
    unf demo --out unf_demo

Exit status: 0 success, 1 a bug (with a traceback), 2 a user error (one line; ``--debug`` adds the traceback).
Packages add commands through the entry-point group ``unf.commands``: a function ``register(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Optional, Sequence

from . import common
from ..io import load_factory  # noqa: F401  (public here too)
from .common import Parser, UserError, configure, warn  # noqa: F401

# Built-in commands, in the order ``unf --help`` lists them: each is a module ``unf/cli/<name>.py`` with
# ``register(sub)`` and ``run(args)``. A new use adds its module and its name here.
COMMANDS = ("spec", "align", "zoo", "predict", "lopt", "flow", "merge", "demo")

PLUGIN_GROUP = "unf.commands"


def _plugins():
    from importlib.metadata import entry_points

    return sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="unf", description="Learning on neural-network weights.",
                    epilog="Run 'unf COMMAND --help' for a command's options and an example. Exit status: 0 success, "
                           "1 a bug (traceback), 2 a user error (one line; --debug adds the traceback).")
    parser.add_argument("--version", action="version", version=f"unf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for ep in _plugins():  # a broken plugin costs its command, never the others
        try:
            ep.load()(sub)
        except Exception as e:
            warn(f"plugin command {ep.name!r} ({ep.value}, entry point group {PLUGIN_GROUP}) could not be added: "
                 f"{type(e).__name__}: {e}")
    return parser


def _one_line(message: str) -> str:
    out = ""
    for line in filter(None, (" ".join(line.split()) for line in message.splitlines())):
        out += (line if not out else f" {line}" if out[-1] in ".;:,!?" else f"; {line}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``unf`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        configure(args, argv)
        return args.func(args)
    except UserError as e:
        if common.ctx.debug:
            traceback.print_exc()
        print(f"unf: error: {_one_line(str(e))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("unf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `unf ... | head`: the reader left; say nothing more
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception:
        traceback.print_exc()
        print("unf: internal error: this is a bug in unf (or in a plugin command); please report it with the "
              "traceback above", file=sys.stderr, flush=True)
        return 1
