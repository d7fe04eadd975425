"""``benchmarks/flow_eval.py`` chooses without the test split: its NFE sweep, the sampler it picks and the
memorisers' ranking are the same when the test split's inputs are NaN and its labels -1."""
import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import unf.data
import unf.flow.baselines
from unf.cli import main as unf_main

from test_cli_flow import zoo  # noqa: F401  (the module-scoped tiny digits-mlp zoo)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULT_KEYS = ("kind", "split", "run", "solver", "nfe", "num", "acc_mean", "acc_median", "best", "tolerance")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def flow_run(zoo, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("flow_eval") / "tiny"
    assert unf_main(["flow", "train", "--zoo", str(zoo), "--out", str(run), "--steps", "4", "--batch-size", "4",
                     "--where", "activation=relu", "--holdout", "0.25", "--json", "--quiet"]) == 0
    return run


def _blind(load):
    def blind_load(*args, **kwargs):
        split = load(*args, **kwargs)
        return dataclasses.replace(split, x_test=torch.full_like(split.x_test, math.nan),
                                   y_test=torch.full_like(split.y_test, -1))
    return blind_load


def _flow_eval(monkeypatch, argv):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["flow_eval.py", *argv])
    importlib.import_module("flow_eval").main()


def _sweep_and_ranking(monkeypatch, capsys, zoo, run, out, blind):  # noqa: F811
    """The sweep's lines and its choice (written and printed), and the accuracies the memorisers rank by."""
    with monkeypatch.context() as m:
        if blind:
            m.setattr(unf.data, "load", _blind(unf.data.load))
        _flow_eval(m, ["--zoo", str(zoo), "--run", str(run), "--sweep", "1,2,4", "--sweep-num", "4",
                       "--sweep-only", "--out", str(out)])
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("choice:")]
        lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
        ranks = []

        def memorisers(train, acc, *args, **kwargs):
            ranks.append(acc.clone())
            raise _Stop  # the ranking is all this test needs: no novelty report

        m.setattr(unf.flow.baselines, "memorisers", memorisers)
        with pytest.raises(_Stop):
            _flow_eval(m, ["--zoo", str(zoo), "--run", str(run), "--sweep=", "--num", "4", "--nfe", "2",
                           "--baseline-num", "4", "--out", str(out.with_name(out.name + "-full"))])
        capsys.readouterr()
    return [{k: x[k] for k in RESULT_KEYS if k in x} for x in lines], printed, ranks[0]


def test_flow_eval_chooses_the_sampler_and_memorisers_without_the_test_split(zoo, flow_run, tmp_path,  # noqa: F811
                                                                              monkeypatch, capsys):
    lines, printed, rank = _sweep_and_ranking(monkeypatch, capsys, zoo, flow_run, tmp_path / "seen", blind=False)
    blind_lines, blind_printed, blind_rank = _sweep_and_ranking(monkeypatch, capsys, zoo, flow_run,
                                                                tmp_path / "blind", blind=True)
    sweep = [x for x in blind_lines if x["kind"] == "sweep"]
    assert len(sweep) == 3 + 2 + 1 and all(x["split"] == "train" for x in sweep)  # euler 1,2,4; heun 2,4; rk4 4
    # scored against labels of -1, every accuracy would be 0: these were scored on the training split
    assert all(x["acc_mean"] > 0 for x in sweep)
    assert [x["kind"] for x in blind_lines].count("choice") == 1 and len(blind_printed) == 1
    assert blind_lines == lines and blind_printed == printed  # the sweep and its choice, line for line
    assert torch.equal(blind_rank, rank)  # the memorisers' "best": the metadata's train_acc, never test data
    assert rank.unique().numel() > 1 and not torch.isnan(rank).any()
