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
    assert all(r["epoch"] == "10" and r["activation"] == "relu" for r in z.metadata)
    ws = z.weight_space()
    from unf import data as datasets
    from unf.flow import WeightFlow
    from unf.flow.novelty import stacked_logits
    from unf.zoo.builtin import mlp

    sampled, _ = WeightFlow.load(run / "flow.safetensors").sample(5, 4, "heun", seed=7)  # the stored networks
    assert all(torch.allclose(ws[n], sampled[n], atol=1e-6) for n in ws.names)
    split = datasets.load("digits-flat", seed=0)  # their test accuracy, recomputed
    acc = (stacked_logits(mlp(), z.spec, ws, split.x_test).argmax(2) == split.y_test).double().mean(1)
    assert torch.allclose(torch.tensor([float(r["test_acc"]) for r in z.metadata], dtype=torch.float64), acc,
                          atol=1e-6)
    assert main(["zoo", "info", str(gen), "--json"]) == 0
    assert _json(capsys)[-1]["networks"] == 5
    # stochastic sampling: the stored networks are the library's, for the same seed and batch size
    assert main(["flow", "sample", str(run), "--num", "5", "--out", str(tmp_path / "churned"), "--nfe", "10",
                 "--solver", "euler", "--churn", "1.5", "--seed", "7", "--json", "--quiet"]) == 0
    assert _json(capsys)[-1]["churn"] == 1.5
    zc = Zoo(tmp_path / "churned")
    assert zc.manifest["info"]["churn"] == 1.5
    churned, _ = WeightFlow.load(run / "flow.safetensors").sample(5, 10, "euler", seed=7, churn=1.5)
    assert all(torch.allclose(zc.weight_space()[n], churned[n], atol=1e-6) for n in ws.names)
    _user_error(capsys, ["flow", "sample", str(run), "--num", "2", "--out", str(tmp_path / "g2"), "--nfe", "10",
                         "--solver", "euler", "--churn", "3"], "--churn", "churn=3")
    # a sampling temperature is recorded and gives the library's networks; a negative one is refused
    assert main(["flow", "sample", str(run), "--num", "3", "--out", str(tmp_path / "cool"), "--nfe", "10",
                 "--solver", "euler", "--temperature", "0.9", "--seed", "7", "--json", "--quiet"]) == 0
    assert _json(capsys)[-1]["temperature"] == 0.9 and Zoo(tmp_path / "cool").manifest["info"]["temperature"] == 0.9
    cool, _ = WeightFlow.load(run / "flow.safetensors").sample(3, 10, "euler", seed=7, temperature=0.9)
    assert all(torch.allclose(Zoo(tmp_path / "cool").weight_space()[n], cool[n], atol=1e-6) for n in ws.names)
    _user_error(capsys, ["flow", "sample", str(run), "--num", "2", "--out", str(tmp_path / "g3"), "--nfe", "10",
                         "--temperature", "-1"], "--temperature", "temperature -1")
    assert main(["flow", "eval", str(gen), "--zoo", str(zoo), "--no-l2", "--json"]) == 0
    res = _json(capsys)[-1]
    assert res["generated"]["n"] == 5 and res["heldout"]["n"] == held and res["train"]["n"] == relu - held
    # a "generated" zoo of training networks, each permuted: every one is a copy, at derived-ness 1
    from unf.flow.canonical import permute_stacked
    from unf.flow.zoo import write_generated

    src = Zoo(zoo)
    picked = [i for i, r in enumerate(src.metadata) if r["model_id"] in set(info["train_ids"]) and r["epoch"] == "10"]
    g = torch.Generator().manual_seed(0)
    perms = [{k: torch.randperm(n, generator=g) for k, n in src.spec.groups.items()} for _ in range(3)]
    copies = permute_stacked(src.weight_space(picked[:3]), perms)
    rows = [{"model_id": f"copy{i}", "epoch": "10", "activation": "relu"} for i in range(3)]
    write_generated(tmp_path / "copies", copies, rows, name="copies", info=info)
    assert main(["flow", "eval", str(tmp_path / "copies"), "--zoo", str(zoo), "--json"]) == 0
    res = _json(capsys)[-1]["generated"]
    assert res["copy_fraction"] == 1.0 and res["derivedness"]["q05"] > 0.999 and res["l2"]["q95"] < 1e-3


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
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--velocity", "mlp", "--steps", "1", "--select-num", "5",
                         "--select-every", "0"], "--select-num 5", "--select-every")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--velocity", "unf", "--steps", "1", "--select-num", "5"],
                "--select-num 5", "--select-every")  # no recipe for this field: no selection unless asked
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--condition", "depth"], "--condition 'depth' is not a column")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--velocity", "mlp", "--unit-hidden", "8"], "--unit-hidden 8")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--align-source", "--align-target"], "choose one")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--ot-candidates", "4"], "--ot-candidates 4")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--velocity", "unf", "--steps", "3", "--cooldown", "5"],
                "--cooldown 5", "--steps 3")
    assert not (tmp_path / "r").exists()


def test_train_without_recipe_flags_runs_the_measured_recipe(zoo, tmp_path, capsys):
    from unf.flow import WeightFlow
    from unf.flow.recipe import RECIPES

    run = tmp_path / "default"
    assert main(["flow", "train", "--zoo", str(zoo), "--out", str(run), "--steps", "2", "--batch-size", "4",
                 "--where", "activation=relu", "--compile"]) == 0
    assert "velocity, select_every from the recipe for MLP zoos" in capsys.readouterr().out  # human output
    history = json.loads((run / "history.json").read_text())
    assert "compile_seconds" in history[0] and "compile_seconds" not in history[1]  # --compile reached training
    flow = WeightFlow.load(run / "flow.safetensors")
    assert flow.info["recipe"]["kind"] == "mlp" and flow.velocity.kind == RECIPES["mlp"]["velocity"]
    assert flow.info["config"]["select_every"] == RECIPES["mlp"]["select_every"]


def test_train_with_unit_mlps_and_aligned_targets(zoo, tmp_path, capsys):
    run = tmp_path / "units"  # --unit-* options name the unf field
    assert main(["flow", "train", "--zoo", str(zoo), "--out", str(run), "--steps", "2", "--batch-size", "4",
                 "--where", "activation=relu", "--unit-hidden", "units", "--align-target", "--ot-candidates", "2",
                 "--unit-activation", "sinkhorn", "--unit-rank", "2", "--unit-attention", "1", "--hidden", "6",
                 "--unit-channels", "4", "--depth", "3", "--time-sampling", "logit-normal", "--json", "--quiet"]) == 0
    from unf.flow import WeightFlow

    flow = WeightFlow.load(run / "flow.safetensors")
    assert flow.velocity.config["unit_hidden"] == "units" and flow.info["config"]["align_target"] is True
    assert flow.velocity.config["unit_activation"] == "sinkhorn" and flow.velocity.config["unit_rank"] == 2
    assert flow.info["config"]["ot_candidates"] == 2
    assert all(b.unit is not None and b.unit.activation == "sinkhorn" and b.unit.rank == 2 and len(b.unit.mix)
               for b in flow.velocity.blocks)
    assert flow.velocity.config["unit_attention"] == 1 and flow.velocity.config["unit_channels"] == 4
    assert all(b.down.weight.shape == (len(b.names), 4, 6) for b in flow.velocity.blocks)  # reloaded as trained
    assert flow.velocity.config["hidden"] == 6 and len(flow.velocity.blocks) == 3
    assert flow.info["config"]["time_sampling"] == "logit-normal"
    capsys.readouterr()
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--unit-activation", "sinkhorn"], "--unit-activation sinkhorn")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--unit-attention", "2"], "--unit-attention 2", "--unit-hidden")
    _user_error(capsys, ["flow", "train", "--zoo", str(zoo), "--out", str(tmp_path / "r"), "--where",
                         "activation=relu", "--unit-channels", "8"], "--unit-channels 8", "--unit-hidden")


def test_train_with_selection_keeps_a_scored_snapshot(zoo, tmp_path, capsys):
    run = tmp_path / "sel"
    assert main(["flow", "train", "--zoo", str(zoo), "--out", str(run), "--steps", "4", "--batch-size", "4",
                 "--where", "activation=relu", "--velocity", "mlp", "--select-every", "2", "--select-num", "3",
                 "--hidden", "32", "--depth", "1", "--json", "--quiet"]) == 0
    out = _json(capsys)[-1]
    hist = json.loads((run / "history.json").read_text())
    scores = {h["step"]: h["select"] for h in hist if "select" in h}
    assert sorted(scores) == [2, 4]
    # only snapshots whose samples are as diverse as the training networks may be kept
    assert all("select_agreement" in h and "eligible" in h for h in hist if "select" in h)
    eligible = [k for k in scores if next(h for h in hist if h["step"] == k)["eligible"]]
    assert eligible  # a 4-step field's samples are not yet collapsed (each predicts its own way)
    expect = max(eligible, key=lambda k: (scores[k], -k))
    assert out["selected_step"] == expect
    from unf.flow import WeightFlow
    from unf.flow.evaluate import train_split_scorer
    from unf.zoo.builtin import mlp

    flow = WeightFlow.load(run / "flow.safetensors")
    assert flow.velocity.config["hidden"] == 32 and flow.velocity.config["layers"] == 1
    assert flow.info["selected_step"] == out["selected_step"]
    # the score of the kept flow, recomputed from the saved file and the run's seed, is the one logged
    again = train_split_scorer(mlp, {"activation": "relu"}, "digits-flat", 0, num=3, seed=0)(flow)
    assert again == pytest.approx(scores[out["selected_step"]], abs=1e-9)
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


def _rewrite_metadata(src, dst, change):
    """A copy of zoo ``src`` at ``dst`` with every metadata row passed through ``change``."""
    import csv
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "metadata.csv", newline="") as f:
        rows = [change(r) for r in csv.DictReader(f)]
    with open(dst / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_canonicalisation_reference_never_reads_test_accuracy(zoo, tmp_path, capsys):
    """The reference network of ``--canonicalize reference`` is the best by train_acc: unchanged when every
    test_acc is NaN; without train_acc, the first training network and a warning."""
    from unf.flow import WeightFlow

    def reference(z, name):
        assert main(["flow", "train", "--zoo", str(z), "--out", str(tmp_path / name), "--steps", "1", "--batch-size",
                     "2", "--where", "activation=relu", "--velocity", "mlp", "--json", "--quiet"]) == 0
        capsys.readouterr()
        info = WeightFlow.load(tmp_path / name / "flow.safetensors").info
        return info["canonical_reference"], info["train_ids"]

    _rewrite_metadata(zoo, tmp_path / "blind", lambda r: {**r, "test_acc": "nan"})
    _rewrite_metadata(zoo, tmp_path / "bare", lambda r: {k: v for k, v in r.items() if k != "train_acc"})
    ref, train_ids = reference(zoo, "plain")
    rows = [r for r in Zoo(zoo).metadata if r["model_id"] in set(train_ids) and r["epoch"] == "10"]
    assert ref == max(rows, key=lambda r: float(r["train_acc"]))["model_id"] != rows[0]["model_id"]
    assert reference(tmp_path / "blind", "blind")[0] == ref
    assert main(["flow", "train", "--zoo", str(tmp_path / "bare"), "--out", str(tmp_path / "b"), "--steps", "1",
                 "--batch-size", "2", "--where", "activation=relu", "--velocity", "mlp", "--quiet"]) == 0
    assert "unf: warning: the zoo's metadata has no train_acc column" in capsys.readouterr().err
    info = WeightFlow.load(tmp_path / "b" / "flow.safetensors").info
    assert info["canonical_reference"] == info["train_ids"][0]
