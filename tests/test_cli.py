"""The ``unf`` console command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unf
from unf.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_spec_prints_groups_and_axes(capsys):
    assert main(["spec", f"{ROOT}/examples/models.py:resnet20", "--input-shape", "1,3,16,16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("WeightSpaceSpec: 12 groups")
    assert any(line.startswith("blocks.0.conv1.weight") for line in out.splitlines())


def test_spec_json_round_trips(capsys):
    assert main(["spec", f"{ROOT}/examples/models.py:mlp", "--input-shape", "2,64", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1  # one JSON object per line
    spec = unf.WeightSpaceSpec.from_json(captured.out)
    assert sorted(spec.groups.values()) == [128, 128]
    assert captured.err.startswith("WeightSpaceSpec: 2 groups")  # the human text goes to stderr


def test_spec_factory_kwargs_and_long_inputs(capsys):
    assert main(["spec", f"{ROOT}/examples/models.py:lstm", "--input-shape", "2,5", "--input-dtype", "long",
                 "--arg", "hidden=16", "--arg", "layers=1"]) == 0
    spec_text = capsys.readouterr().out
    assert "lstm.hidden_l0=16" in spec_text


def test_console_script_is_installed():
    import shutil

    r = _unf("spec", f"{ROOT}/examples/models.py:small_cnn", "--input-shape", "1,1,8,8", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["format"] == "unf.WeightSpaceSpec"
    script = shutil.which("unf")  # the console script: `unf = "unf.cli:main"` passes main's status to sys.exit
    if script:
        r = subprocess.run([script, "zoo", "info", "/no/such/zoo"], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("unf: error: ")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An architecture file and two checkpoints of it trained from different seeds."""
    from unf.io import save_state_dict
    from unf.training import train_classifier

    tmp_path = tmp_path_factory.mktemp("checkpoints")
    split = unf.data.load("digits-flat")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        train_classifier(net, split.x_train, split.y_train, epochs=2, seed=seed)
        paths.append(tmp_path / f"net{seed}.safetensors")
        save_state_dict(net.state_dict(), paths[-1])
    factory = tmp_path / "arch.py"
    factory.write_text("import torch\n"
                       "def net():\n"
                       "    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))\n")
    return factory, paths


def test_align_command_writes_aligned_checkpoint_and_plot(checkpoints, tmp_path, capsys):
    from unf.io import load_state_dict

    factory, (a, b) = checkpoints
    out, plot = tmp_path / "aligned.safetensors", tmp_path / "lmc.png"
    assert main(["align", f"{factory}:net", "--a", str(a), "--b", str(b), "--points", "5", "--out", str(out),
                 "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    naive, aligned = (float(v) for v in text.split("naive ")[1].split(", aligned ")[0:1] +
                      [text.split("aligned ")[1].split(" ")[0]])
    assert aligned < naive
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the aligned checkpoint is the same function as B
    net_b, net_al = (torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
                     for _ in range(2))
    net_b.load_state_dict(load_state_dict(b))
    net_al.load_state_dict(load_state_dict(out))
    x = torch.randn(5, 64)
    assert torch.allclose(net_b(x), net_al(x), atol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind
    assert not list(a.parent.glob(".*.tmp"))


def test_checkpoint_errors(tmp_path):
    from unf.io import load_state_dict

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors.*could not be read"):
        load_state_dict(broken)
    pt = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, pt)
    assert torch.equal(load_state_dict(pt)["w"], torch.ones(2))


def test_atomic_writes_keep_usual_permissions(tmp_path):
    import os
    from unf.io import save_state_dict

    save_state_dict({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_model_files_with_dataclasses_load(tmp_path, capsys):
    f = tmp_path / "cfg_model.py"
    f.write_text("from __future__ import annotations\nfrom dataclasses import dataclass\nimport torch\n"
                 "@dataclass\nclass Cfg:\n    width: int = 4\n"
                 "def net():\n    return torch.nn.Sequential(torch.nn.Linear(3, Cfg().width), torch.nn.ReLU(),"
                 " torch.nn.Linear(Cfg().width, 2))\n")
    assert main(["spec", f"{f}:net", "--input-shape", "1,3"]) == 0
    assert "0=4" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- conventions: errors

def _user_error(capsys, argv, *needles):
    """``unf argv`` is a user error: exit 2, one line on stderr naming what is wrong, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("unf: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    (d / "branchy.py").write_text("import torch\n"
                                  "class M(torch.nn.Module):\n"
                                  "    def __init__(self):\n"
                                  "        super().__init__(); self.a = torch.nn.Linear(3, 3)\n"
                                  "    def forward(self, x):\n"
                                  "        return self.a(x) if x.sum() > 0 else x\n")
    (d / "broken.py").write_text("def net(:\n")
    (d / "notamodel.py").write_text("def net():\n    return 3\n")
    (d / "three.py").write_text("import torch\ndef net():\n    return torch.nn.Linear(3, 2)\n")
    return d


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from unf.zoo import build

    spec = unf.spec_from_module(torch.nn.Linear(2, 2), torch.randn(1, 2))

    def make_chunk(i):
        records = [{"model_id": k, "epoch": 1, "activation": "relu", "test_acc": k / 4} for k in range(4)]
        return records, [torch.nn.Linear(2, 2).state_dict() for _ in records]

    return build(tmp_path_factory.mktemp("zoo") / "tiny", spec, 1, make_chunk, name="tiny", progress=False).root


MODELS = f"{ROOT}/examples/models.py"


@pytest.mark.parametrize("argv, needles", [
    (["spec", f"{MODELS}:nope", "--input-shape", "1"], ["has no callable 'nope'", "available: "]),
    (["spec", "missing_file.py:f", "--input-shape", "1"], ["'missing_file.py' does not exist"]),
    (["spec", "no_colon", "--input-shape", "1"], ["must look like 'file.py:factory'"]),
    (["spec", "no_such_package_xyz.models:f", "--input-shape", "1"], ["'no_such_package_xyz.models' cannot be"]),
    (["spec", f"{MODELS}:mlp", "--input-shape", "2x64"], ["--input-shape '2x64'"]),
    (["spec", f"{MODELS}:mlp", "--input-shape", "2,0"], ["--input-shape '2,0'"]),
    (["spec", f"{MODELS}:mlp", "--input-shape", "2,3"], ["example inputs", "2x3"]),  # shape the model rejects
    (["spec", f"{MODELS}:mlp", "--input-shape", "2,64", "--input-dtype", "float99"], ["--input-dtype 'float99'"]),
    (["spec", f"{MODELS}:mlp", "--input-shape", "2,64", "--arg", "width"], ["--arg 'width' must look like"]),
    (["spec", f"{MODELS}:mlp", "--input-shape", "2,64", "--arg", "nope=1"], ["--arg", "nope"]),
    (["spec", "{models}/branchy.py:M", "--input-shape", "2,3"], ["could not trace M", "from_axes"]),
    (["spec", "{models}/broken.py:net", "--input-shape", "2,3"], ["failed to import (SyntaxError", "--debug"]),
    (["spec", "{models}/notamodel.py:net", "--input-shape", "2,3"], ["returned int, not a torch.nn.Module"]),
    (["spec"], ["the following arguments are required", "unf spec --help"]),  # argparse's usage errors
    (["nope"], ["invalid choice: 'nope'"]),
    (["zoo", "info", "/no/such/zoo"], ["/no/such/zoo/manifest.json: missing", "a zoo directory?"]),
    (["zoo", "info", "{models}"], ["manifest.json: missing", "a zoo directory?"]),
    (["zoo", "build", "nope", "--out", "{models}/z"], ["unknown zoo 'nope'", "digits-cnn"]),
    (["zoo", "build", "digits-mlp", "--out", "{models}/z", "--num-models", "0"], ["--num-models", "at least 1"]),
    (["zoo", "build", "digits-mlp", "--out", "{models}/three.py", "--num-models", "1"], ["--out", "three.py"]),
    (["zoo", "build", "digits-mlp", "--out", "{models}/z", "--seed", "-1"], ["--seed", "at least 0"]),
    (["predict", "fit", "--zoo", "/no/such/zoo"], ["--zoo: /no/such/zoo/manifest.json: missing"]),
    (["predict", "fit", "--zoo", "{zoo}", "--target", "nope"], ["--target 'nope' is not a column", "test_acc"]),
    (["predict", "fit", "--zoo", "{zoo}", "--target", "activation"], ["--target 'activation' is not a numeric column"]),
    (["predict", "fit", "--zoo", "{zoo}", "--model", "nope"], ["argument --model: invalid choice"]),
    (["predict", "fit", "--zoo", "{zoo}", "--device", "tpu"], ["--device 'tpu'"]),
])
def test_user_errors_exit_2_with_one_line(argv, needles, model_files, tiny_zoo, capsys):
    argv = [a.format(models=model_files, zoo=tiny_zoo) for a in argv]
    _user_error(capsys, argv, *needles)


@pytest.mark.parametrize("case", ["missing", "broken", "mismatched", "points", "data", "arch"])
def test_align_user_errors(case, checkpoints, model_files, tmp_path, capsys):
    from unf.io import save_state_dict

    factory, (a, b) = checkpoints
    argv, needles = ["align", f"{factory}:net", "--a", str(a), "--b", str(b)], []
    if case == "missing":
        argv[-1], needles = str(tmp_path / "missing.safetensors"), ["--b: checkpoint", "does not exist"]
    elif case == "broken":
        (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
        argv[3], needles = str(tmp_path / "broken.safetensors"), ["--a: checkpoint", "could not be read"]
    elif case == "mismatched":  # a checkpoint of another architecture
        save_state_dict({"0.weight": torch.zeros(3, 3)}, tmp_path / "bad.safetensors")
        argv[-1], needles = str(tmp_path / "bad.safetensors"), ["--b", "bad.safetensors: state_dict does not fit"]
    elif case == "points":
        argv, needles = argv + ["--points", "1"], ["argument --points: must be at least 2"]
    elif case == "data":
        argv, needles = argv + ["--data", "nope"], ["--data 'nope': unknown dataset", "digits-flat"]
    else:  # an architecture that does not take the dataset's inputs
        argv[1], needles = f"{model_files}/three.py:net", ["three.py:net on --data digits-flat"]
    _user_error(capsys, argv, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_gpu_is_a_user_error(tiny_zoo, capsys):
    for argv in (["predict", "fit", "--zoo", str(tiny_zoo)], ["zoo", "build", "digits-mlp", "--out", "z"]):
        line = _user_error(capsys, argv + ["--device", "cuda"])
        assert line == "unf: error: --device cuda: no CUDA GPU is available; use --device cpu"


def test_debug_shows_the_traceback(capsys):
    for argv in (["zoo", "info", "/no/such/zoo", "--debug"], ["--debug", "zoo", "info", "/no/such/zoo"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "ZooFormatError" in err
        assert err.strip().splitlines()[-1].startswith("unf: error: /no/such/zoo/manifest.json: missing")


def test_a_bug_exits_1_with_a_traceback(tiny_zoo, monkeypatch, capsys):
    import unf.zoo

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(unf.zoo, "Zoo", broken)
    assert main(["zoo", "info", str(tiny_zoo)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err and "bug" in err.strip().splitlines()[-1]


def _unf(*argv, env=None):
    """``unf argv`` in a new process: real exit status and streams."""
    return subprocess.run([sys.executable, "-m", "unf.cli", *argv], capture_output=True, text=True, env=env)


def test_real_exit_codes_and_streams():
    r = _unf("zoo", "info", "/no/such/zoo")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "unf: error: /no/such/zoo/manifest.json: missing; is /no/such/zoo a zoo directory?\n"
    r = _unf("align", "unf._demo_model:mlp", "--a", "/no/a.safetensors", "--b", "/no/b.safetensors")
    assert r.returncode == 2 and r.stderr == "unf: error: --a: checkpoint '/no/a.safetensors' does not exist\n"


# ------------------------------------------------------------------------------- conventions: output and options

def test_every_command_has_help_with_an_example(capsys):
    import argparse

    from unf.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield prefix + (name,)
                    yield from commands(sub, prefix + (name,))

    found = list(commands(build_parser()))
    assert {("spec",), ("align",), ("zoo", "build"), ("zoo", "info"), ("predict", "fit"), ("demo",)} <= set(found)
    for cmd in found:
        assert main([*cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert "\nexample" in out and f"  unf {cmd[0]}" in out.split("\nexample")[-1], cmd


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"unf {unf.__version__}"


def test_json_lines_parse_and_carry_the_seed(checkpoints, tiny_zoo, capsys):
    factory, (a, b) = checkpoints
    assert main(["align", f"{factory}:net", "--a", str(a), "--b", str(b), "--points", "3", "--seed", "3",
                 "--json"]) == 0
    captured = capsys.readouterr()
    (obj,) = [json.loads(line) for line in captured.out.splitlines()]
    assert obj["seed"] == 3 and obj["t"] == [0, 0.5, 1] and obj["aligned"]["barrier"] < obj["naive"]["barrier"]
    assert "test-loss barrier: naive" in captured.err  # the human text, on stderr
    assert main(["zoo", "info", str(tiny_zoo), "--json"]) == 0
    (obj,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert obj["networks"] == 4 and obj["columns"]["test_acc"]["max"] == 0.75 and "seed" not in obj


def test_demo_records_its_seed(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--only", "align", "--seed", "5", "--json"]) == 0
    (obj,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert obj["stage"] == "align" and obj["seed"] == 5 and obj["model_seeds"] == [5, 6]
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["seed"] == 5 and run["unf_version"] == unf.__version__ and run["command"].startswith("unf demo ")
    assert run["seeds"] == {"seed": 5, "align_models": [5, 6]}
    assert (out / "align.png").exists() and (out / "mlp_seed6_aligned.safetensors").exists()


def test_json_lines_are_strict_json(monkeypatch, capsys):
    from unf.cli import common

    monkeypatch.setattr(common, "ctx", common.Context(json=True, seed=4))
    common.emit({"r2": float("nan"), "losses": [0.5, float("inf")]})
    out = capsys.readouterr().out
    assert "NaN" not in out and json.loads(out) == {"r2": None, "losses": [0.5, None], "seed": 4}


def test_progress_bars_follow_quiet_and_the_terminal(monkeypatch):
    from unf.cli import common

    monkeypatch.setattr(common, "ctx", common.Context())
    assert common.progress(range(3)).disable  # under pytest stderr is not a terminal
    monkeypatch.setattr(common, "_isatty", lambda stream: True)
    assert not common.progress(range(3)).disable
    common.ctx.quiet = True
    assert common.progress(range(3)).disable


# ------------------------------------------------------------------------------------------------------- plugins

def test_plugin_commands_come_from_entry_points(tmp_path):
    """A package adds ``unf hello`` through the ``unf.commands`` entry-point group; a broken one only warns.
    The package is 'installed' as pip would: a module and a ``.dist-info`` folder on the path."""
    (tmp_path / "unf_hello_cmd.py").write_text(
        "from unf.cli.common import add_command, emit, info\n"
        "def register(sub):\n"
        "    p = add_command(sub, 'hello', help='say hello (test plugin)', example='unf hello --name you',\n"
        "                    run=run, seed=True)\n"
        "    p.add_argument('--name', default='world')\n"
        "def run(args):\n"
        "    info(f'hello {args.name}')\n"
        "    emit({'greeting': f'hello {args.name}'})\n"
        "    return 0\n")
    dist = tmp_path / "unf_hello_cmd-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: unf-hello-cmd\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[unf.commands]\nhello = unf_hello_cmd:register\n"
                                           "broken = unf_no_such_module:register\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    r = _unf("--help", env=env)
    assert r.returncode == 0 and "hello" in r.stdout and "say hello (test plugin)" in r.stdout
    assert "plugin command 'broken'" in r.stderr and "unf_no_such_module" in r.stderr and "Traceback" not in r.stderr
    r = _unf("hello", "--name", "you", "--json", "--seed", "2", env=env)
    assert r.returncode == 0 and json.loads(r.stdout) == {"greeting": "hello you", "seed": 2}
    assert "hello you" in r.stderr
    r = _unf("hello", "--help", env=env)
    assert r.returncode == 0 and "unf hello --name you" in r.stdout
