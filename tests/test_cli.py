"""The ``unf`` console command."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    spec = unf.WeightSpaceSpec.from_json(capsys.readouterr().out)
    assert sorted(spec.groups.values()) == [128, 128]


def test_spec_factory_kwargs_and_long_inputs(capsys):
    assert main(["spec", f"{ROOT}/examples/models.py:lstm", "--input-shape", "2,5", "--input-dtype", "long",
                 "--arg", "hidden=16", "--arg", "layers=1"]) == 0
    spec_text = capsys.readouterr().out
    assert "lstm.hidden_l0=16" in spec_text


def test_spec_bad_references():
    with pytest.raises(SystemExit, match="has no callable 'nope'"):
        main(["spec", f"{ROOT}/examples/models.py:nope", "--input-shape", "1"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["spec", "missing_file.py:f", "--input-shape", "1"])
    with pytest.raises(SystemExit, match="must look like"):
        main(["spec", "no_colon", "--input-shape", "1"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        main(["spec", f"{ROOT}/examples/models.py:mlp", "--input-shape", "2x64"])


def test_spec_untraceable_model_fails_cleanly(tmp_path, capsys):
    f = tmp_path / "branchy.py"
    f.write_text("import torch\n"
                 "class M(torch.nn.Module):\n"
                 "    def __init__(self):\n"
                 "        super().__init__(); self.a = torch.nn.Linear(3, 3)\n"
                 "    def forward(self, x):\n"
                 "        return self.a(x) if x.sum() > 0 else x\n")
    assert main(["spec", f"{f}:M", "--input-shape", "2,3"]) == 1
    err = capsys.readouterr().err
    assert "could not trace M" in err and "from_axes" in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "unf.cli", "spec", f"{ROOT}/examples/models.py:small_cnn",
                          "--input-shape", "1,1,8,8", "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["format"] == "unf.WeightSpaceSpec"
