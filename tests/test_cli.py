"""The ``unf`` console command."""
import json
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


def _two_checkpoints(tmp_path):
    from unf.io import save_state_dict
    from unf.training import train_classifier

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


def test_align_command_writes_aligned_checkpoint_and_plot(tmp_path, capsys):
    from unf.io import load_state_dict

    factory, (a, b) = _two_checkpoints(tmp_path)
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


def test_align_command_rejects_mismatched_checkpoint(tmp_path):
    from unf.io import save_state_dict

    factory, (a, _) = _two_checkpoints(tmp_path)
    bad = tmp_path / "bad.safetensors"
    save_state_dict({"0.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(SystemExit, match=r"bad.safetensors: state_dict does not fit the spec"):
        main(["align", f"{factory}:net", "--a", str(a), "--b", str(bad)])


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
