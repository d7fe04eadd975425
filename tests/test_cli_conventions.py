"""Every ``unf`` command follows the command-line conventions (README, "Command line"). The commands are found by
walking the argparse tree, so a new command, a plugin's included, is checked without editing this file:

- it takes ``--json``;
- it takes ``--seed`` unless it draws nothing at random (``DETERMINISTIC``, each with the reason);
- a bad input (a path that does not exist, a file where a directory is wanted) exits 2 with one line
  ``unf: error: ...`` on stderr, no traceback, and nothing on stdout under ``--json``, before any work is done;
  so do the bad option values in ``BAD_VALUES`` (values argparse alone lets through).
"""
import argparse
import time

import pytest

from unf.cli import build_parser, main

# Commands that draw nothing at random: the same inputs give the same output, so a --seed would do nothing.
DETERMINISTIC = {
    ("spec",): "traces the model; the example input's values do not change the spec",
    ("zoo", "info"): "reads a zoo's files",
    ("flow", "eval"): "probe inputs are seeded by the zoo's split seed, alignment is deterministic",
}

MISSING = "/nonexistent/unf-conventions"
# A cheap bad input per command, failing on a path before any work; {file} is an existing regular file. A command
# not listed here gets every positional argument and required option set to a path that does not exist.
BAD_INPUT = {
    ("spec",): [f"{MISSING}/model.py:net", "--input-shape", "1,64"],
    ("align",): ["unf._demo_model:mlp", "--a", f"{MISSING}/a.safetensors", "--b", f"{MISSING}/b.safetensors"],
    ("zoo", "build"): ["digits-mlp", "--out", "{file}"],
    ("lopt", "meta-train"): ["--out", "{file}"],
    ("lopt", "eval"): ["--weights", f"{MISSING}/rule.safetensors"],
    ("flow", "train"): ["--zoo", MISSING, "--out", "{file}"],
    ("flow", "sample"): [MISSING, "--num", "1", "--out", "{tmp}/generated"],
    ("merge", "cuts-demo"): ["--plot", "{file}/curves.png"],
    ("demo",): ["--out", "{file}"],
}

# Bad option values that argparse alone would let through to the library (which raised, with a traceback).
BAD_VALUES = [
    ["flow", "train", "--zoo", MISSING, "--out", "{tmp}/run", "--lr", "nan"],
    ["flow", "train", "--zoo", MISSING, "--out", "{tmp}/run", "--holdout", "1.5"],
    ["lopt", "meta-train", "--out", "{tmp}/run", "--sigma", "0"],
    ["lopt", "meta-train", "--out", "{tmp}/run", "--widths", "0,0"],
    ["lopt", "eval", "--adam-lrs", "nan"],
    ["merge", "cuts-demo", "--noise-rate", "1"],
    ["demo", "--out", "{tmp}/demo", "--only", "nope"],
]


def _commands(parser, path=()):
    """(path, parser) of every leaf command: ``("zoo", "build")`` for ``unf zoo build``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _commands(sub, path + (name,))


COMMANDS = dict(_commands(build_parser()))
IDS = [" ".join(path) for path in COMMANDS]


def _options(parser):
    return {o for a in parser._actions for o in a.option_strings}


def _generic_bad_input(parser):
    argv = []
    for a in parser._actions:
        if not a.option_strings and a.dest != "help":
            argv.append(MISSING)
        elif a.required:
            value = MISSING
            if callable(a.type) and a.type is not str:
                try:
                    a.type("1")
                    value = "1"
                except Exception:
                    pass
            argv += [a.option_strings[-1], value]
    return argv


def test_the_tree_has_every_built_in_command():
    assert {("spec",), ("align",), ("zoo", "build"), ("zoo", "info"), ("predict", "fit"), ("lopt", "meta-train"),
            ("lopt", "eval"), ("flow", "train"), ("flow", "sample"), ("flow", "eval"), ("merge", "cuts-demo"),
            ("demo",)} <= set(COMMANDS)
    assert set(DETERMINISTIC) <= set(COMMANDS) and set(BAD_INPUT) <= set(COMMANDS)  # no stale entries


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_command_takes_json_and_seed(path):
    options = _options(COMMANDS[path])
    assert "--json" in options, f"unf {' '.join(path)}: no --json (add_command(..., json=True))"
    if path not in DETERMINISTIC:
        assert "--seed" in options, (f"unf {' '.join(path)}: no --seed; add_command(..., seed=True), or add it to "
                                     "DETERMINISTIC with the reason it draws nothing at random")
    else:
        assert "--seed" not in options, f"unf {' '.join(path)} takes --seed: remove it from DETERMINISTIC"


def _fails_at_once(argv, capsys):
    start = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2, f"unf {' '.join(argv)}: exit {status}, stderr {err[-2000:]}"
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("unf: error: "), err
    assert out == "", out  # under --json stdout holds results only
    assert seconds < 5, f"unf {' '.join(argv)} took {seconds:.1f} s to fail: check the input before the work"


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_bad_input_exits_2_with_one_line(path, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not what the command wants\n")
    args = BAD_INPUT.get(path) or _generic_bad_input(COMMANDS[path])
    _fails_at_once([*path, *(a.format(file=a_file, tmp=tmp_path) for a in args), "--json"], capsys)


@pytest.mark.parametrize("argv", BAD_VALUES, ids=[" ".join(a) for a in BAD_VALUES])
def test_bad_value_exits_2_with_one_line(argv, tmp_path, capsys):
    _fails_at_once([a.format(tmp=tmp_path) for a in argv] + ["--json"], capsys)
    assert not (tmp_path / "run").exists()  # nothing written
