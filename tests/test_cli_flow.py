"""``unf flow train | sample | eval`` end to end on a tiny built-in zoo, its errors, and training under torchrun."""
import json
import subprocess
import sys

import pytest
import torch

from unf.cli import main
from unf.zoo import Zoo
from unf.zoo.builtin import build_builtin

from test_cli import _user_error


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowzoo") / "z"
    build_builtin("digits-mlp", str(root), num_models=12, seed=0, chunk_size=12, progress=False)
    return root


def _json(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_train_sample_eval_round_trip(zoo, tmp_path, capsys):
    run, gen = tmp_path / "run", tmp_path / "gen"
    relu = sum(r["activation"] == "relu" and r["epoch"] == "10" for r in Zoo(zoo).metadata)
    assert main(["flow", "train", "--zoo", str(zoo), "--out", str(run), "--steps", "4", "--batch-size", "4",
                 "--where", "activation=relu", "--holdout", "0.25", "--json", "--quiet"]) == 0
    out = _json(capsys)[-1]
    held = round(0.25 * relu)
    assert out["train_networks"] == relu - held and out["holdout_networks"] == held and out["steps"] == 4
    assert main(["flow", "sample", str(run), "--num", "5", "--out", str(gen), "--nfe", "4", "--solver", "heun",
                 "--seed", "7", "--json", "--quiet"]) == 0
    assert _json(capsys)[-1]["nfe"] == 4
    z = Zoo(gen)  # the store's reader, checksums verified
    assert z.complete and len(z) == 5
    info = z.manifest["info"]
    assert info["data"] == "digits-flat" and info["split_seed"] == 0 and info["flow_seed"] == 7
    assert len(info["holdout"]) == held and not set(info["holdout"]) & set(info["train_ids"])
    source_ids = {r["model_id"] for r in Zoo(zoo).metadata}
    assert not {r["model_id"] for r in z.metadata} & source_ids  # new model ids
    assert all(r["epoch"] == "10" and r["activation"] == "relu" and 0 <= float(r["test_acc"]) <= 1 for r in z.metadata)
    ws = z.weight_space()
    assert ws.batch_size == 5 and all(torch.isfinite(t).all() for t in ws.values())
    assert main(["zoo", "info", str(gen), "--json"]) == 0
    assert _json(capsys)[-1]["networks"] == 5
    assert main(["flow", "eval", str(gen), "--zoo", str(zoo), "--no-l2", "--json"]) == 0
    res = _json(capsys)[-1]
    assert res["generated"]["n"] == 5 and res["heldout"]["n"] == held and res["train"]["n"] == relu - held
    assert 0 <= res["generated"]["copy_fraction"] <= 1


def test_flow_commands_report_user_errors(zoo, tmp_path, capsys):
    _user_error(capsys, ["flow", "train", "--zoo", str(tmp_path / "none"), "--out", str(tmp_path / "r")],
                "manifest.json")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where", "depth=3"],
                "no column 'depth'")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--epoch", "7"],
                "saved epochs")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r")], "mix activations")
    _user_error(capsys, ["flow", "sample", str(tmp_path / "none"), "--num", "2", "--out", str(tmp_path / "g")],
                "no flow file")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--condition",
                         "activation", "--select-every", "2"], "cannot be combined with --condition")


def test_train_with_selection_keeps_a_scored_snapshot(zoo, tmp_path, capsys):
    run = tmp_path / "sel"
    assert main(["flow", "train", "--zoo", str(zoo), "--out", str(run), "--steps", "4", "--batch-size", "4",
                 "--where", "activation=relu", "--velocity", "mlp", "--select-every", "2", "--select-num", "3",
                 "--json", "--quiet"]) == 0
    out = _json(capsys)[-1]
    hist = json.loads((run / "history.json").read_text())
    scores = {h["step"]: h["select"] for h in hist if "select" in h}
    assert sorted(scores) == [2, 4] and all(0 <= v <= 1 for v in scores.values())
    assert out["selected_step"] == max(scores, key=lambda k: (scores[k], -k))
    from unf.flow import WeightFlow

    flow = WeightFlow.load(run / "flow.safetensors")
    assert flow.info["selected_step"] == out["selected_step"]
    assert flow.info["config"]["canonicalize"] == "reference"  # auto: the mlp field gets an aligned zoo
    assert flow.velocity.prediction == "data"


SCRIPT = """
import sys, torch
import torch.distributed as dist
from unf.distributed import init_distributed
from unf.flow import FlowConfig, train_flow
from unf.spec import spec_from_module
from unf.weights import WeightSpace
torch.set_num_threads(1)
init_distributed("cpu")
world = dist.get_world_size() if dist.is_initialized() else 1
net = lambda: torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
spec = spec_from_module(net(), torch.randn(2, 3))
torch.manual_seed(0)
ws = WeightSpace.from_module(spec, [net() for _ in range(10)])
cfg = FlowConfig(velocity_config=dict(hidden=4, depth=1, emb=8), steps=5, batch_size=8 // world, ot=False,
                 checkpoint_every=5)
flow, hist = train_flow(ws, None, cfg, out=sys.argv[1])
vec = torch.nn.utils.parameters_to_vector(flow.velocity.parameters()).detach()
if dist.is_initialized():  # DDP keeps every rank's weights equal
    other = [torch.zeros_like(vec) for _ in range(world)]
    dist.all_gather(other, vec)
    assert all(torch.equal(o, vec) for o in other)
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({"vec": vec, "loss": torch.tensor([h["loss"] for h in hist])}, sys.argv[1] + "/result.pt")
"""


def test_training_under_torchrun_equals_one_process(tmp_path):
    script = tmp_path / "flow.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, str(script), str(one)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(two)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(one / "result.pt", weights_only=True)
    b = torch.load(two / "result.pt", weights_only=True)
    # the global batch of 8 split over 2 ranks is the step of one process with 8
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-5)
    assert (a["vec"] - b["vec"]).abs().max() <= 1e-5 * a["vec"].abs().max()
    assert (two / "flow.safetensors").is_file() and (two / "checkpoint.safetensors").is_file()
