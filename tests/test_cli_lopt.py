"""``unf lopt``: meta-train and eval through the command line, and their user errors."""
import json

import pytest

from test_cli import _user_error  # noqa: E402  (tests/ is on sys.path under pytest)
from unf.cli import main


def test_meta_train_writes_a_resumable_run_and_a_weights_file(tmp_path, capsys):
    from unf.optim import LearnedRule

    out = tmp_path / "run"
    argv = ["lopt", "meta-train", "--out", str(out), "--variant", "mlp", "--pairs", "1", "--unroll", "2",
            "--min-horizon", "2", "--max-horizon", "4", "--json", "--seed", "3"]
    assert main([*argv, "--steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] == 2 and first["seed"] == 3
    assert main([*argv, "--steps", "4"]) == 0  # resumes: 2 more steps
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    assert LearnedRule.load(out / "rule.safetensors").config.variant == "mlp"
    assert json.loads((out / "run.json").read_text())["seed"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    # resuming with other settings is refused, naming --out
    _user_error(capsys, [*argv[:-2], "--seed", "4", "--steps", "5"], "--out", "other settings")


def test_eval_reports_speedup_against_adam(capsys):
    assert main(["lopt", "eval", "--task", "breast-cancer-mlp", "--steps", "20", "--adam-lrs", "1e-3,1e-2",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["task"] == "breast-cancer-mlp" and row["best_adam"].startswith("adam lr=")
    assert row["speedup_train"] >= 0 and 0 <= row["test_acc"] <= 1 and row["seed"] == 0


@pytest.mark.parametrize("argv, needles", [
    (["lopt", "eval", "--adam-lrs", "x"], ["--adam-lrs"]),
    (["lopt", "eval", "--adam-lrs", "-1"], ["--adam-lrs", "positive"]),
    (["lopt", "eval", "--weights", "/no/such.safetensors"], ["--weights", "do not exist"]),
    (["lopt", "meta-train", "--out", "x", "--min-horizon", "5", "--unroll", "10"], ["--min-horizon"]),
    (["lopt", "meta-train", "--out", "x", "--sigma", "0"], ["--sigma"]),
])
def test_user_errors(argv, needles, capsys):
    _user_error(capsys, argv, *needles)


def test_out_that_is_a_file_is_a_user_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _user_error(capsys, ["lopt", "meta-train", "--out", str(f)], "--out", "not a directory")
