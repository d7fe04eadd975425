"""``unf demo``: the quick run end to end (report files, results.json, the HTML's references), --only, skipped stages
and the error path."""
import json
import re
import subprocess
import sys

import pytest

from unf.cli import main

STAGES = ["spec", "zoo", "predict", "align", "generate", "optimize", "edit"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["demo", "--quick", "--out", str(out), "--seed", "3", "--json"])
    return code, out, [json.loads(line) for line in buf.getvalue().splitlines()]


def test_quick_demo_writes_every_file_and_number(quick):
    code, out, lines = quick
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["run", *STAGES]
    run = results["run"]
    assert run["seed"] == 3 and run["quick"] and run["stages"] == STAGES and run["device"] == "cpu"
    assert run["torch_version"] and run["unf_version"] and set(run["timings"]) == set(STAGES)
    for name in STAGES:  # every feature has landed: nothing may be skipped here
        assert "skipped" not in results[name], (name, results[name])
        assert results[name]["line"]
    assert [o["stage"] for o in lines] == STAGES and all(o["seed"] == 3 for o in lines)
    for name in ("predict", "align", "generate", "optimize", "edit"):
        assert (out / results[name]["figure"]).is_file()
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    # the numbers say what the stages claim
    assert len(results["spec"]["mlp"]["groups"]) == 2 and len(results["spec"]["cnn"]["groups"]) == 3
    assert results["zoo"]["networks"] == 40 and results["zoo"]["rows"] == 120
    for model in ("unf", "statnn"):
        p = results["predict"][model]
        assert -1 <= p["kendall_tau"] <= 1 and len(p["predictions"]) == p["n_test"] == len(p["targets"])
    a = results["align"]
    assert 0 <= a["aligned"]["barrier"] < a["naive"]["barrier"]
    g = results["generate"]
    assert g["sampled"] == 30 and 0 <= g["generated"]["accuracy"]["mean"] <= 1 and g["frontier"]
    o = results["optimize"]
    assert o["best_adam_lr"] in o["adam_lrs"] and o["step_time_ratio"] > 0
    assert o["learned"]["train"][-1] is not None and not o["learned"]["diverged"]
    e = results["edit"]
    assert e["cuts"]["cuts_asr"] < e["cuts"]["corrupted_asr"]
    assert e["merge"]["merged"]["all"] > max(e["merge"]["expert_0_4"]["all"], e["merge"]["expert_5_9"]["all"])


def test_the_report_is_offline_and_references_only_files_that_exist(quick):
    _, out, _ = quick
    page = (out / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sorted(refs) == sorted(f"{n}.png" for n in ("predict", "align", "generate", "optimize", "edit"))
    assert all((out / r).is_file() for r in refs)
    assert "<script" not in page and "http" not in page
    md = (out / "report.md").read_text()
    assert sorted(re.findall(r"\]\(([^)]*)\)", md)) == sorted(refs)
    results = json.loads((out / "results.json").read_text())
    for name in STAGES:  # the same one-line results in both reports
        assert results[name]["line"] in md


def test_only_runs_a_stage_and_what_it_needs_with_the_same_numbers(quick, capsys):
    _, out, _ = quick
    first = json.loads((out / "results.json").read_text())
    assert main(["demo", "--quick", "--out", str(out), "--seed", "3", "--only", "predict"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["run", "zoo", "predict"] and results["run"]["stages"] == ["zoo", "predict"]
    assert results["zoo"]["resumed"]
    for model in ("unf", "statnn"):  # same seed, same numbers
        assert results["predict"][model]["predictions"] == first["predict"][model]["predictions"]
    printed = capsys.readouterr().out
    assert "predict: " in printed and "align: " not in printed


def test_a_failing_stage_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys):
    from unf.cli import demo_stages

    def broken(run, tick):
        raise ImportError("no module named 'missing_feature'")

    monkeypatch.setitem(demo_stages.STAGES, "zoo", broken)
    assert main(["demo", "--quick", "--out", str(tmp_path), "--only", "spec,predict"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["zoo"] == {"skipped": "ImportError: no module named 'missing_feature'"}
    assert results["predict"] == {"skipped": "needs the zoo stage, which was skipped"}
    assert results["spec"]["line"]
    err = capsys.readouterr().err
    assert "unf: warning: demo stage zoo skipped: ImportError" in err
    assert "Skipped: needs the zoo stage" in (tmp_path / "report.md").read_text()


def test_an_unknown_stage_is_a_user_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "unf.cli", "demo", "--out", str(tmp_path), "--only", "spec,bogus"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("unf: error: --only 'spec,bogus': unknown stage 'bogus'")
    assert not (tmp_path / "results.json").exists()


def test_out_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file"), "--only", "spec"]) == 2
    assert capsys.readouterr().err == f"unf: error: --out {tmp_path / 'file'}: exists and is not a directory\n"
