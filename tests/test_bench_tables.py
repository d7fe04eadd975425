"""BENCHMARKS.md tables that name a results file are what their script prints from that file (``--table-only``)."""
import importlib
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return lambda name: importlib.import_module(name)


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")
            and not line.startswith("| model") and not line.startswith("| task") and not line.startswith("| zoo")]


def _assert_in_benchmarks(rows: list[str]) -> None:
    doc = (ROOT / "BENCHMARKS.md").read_text()
    assert rows, "the script printed no table"
    missing = [r for r in rows if r not in doc]
    assert not missing, f"rows not in BENCHMARKS.md (regenerate with --table-only): {missing[:3]}"


@pytest.mark.parametrize("script,files", [("psg", ["psg.jsonl"]), ("manifold", ["manifold.jsonl"]),
                                          ("psg_cnn", ["psg_cnn.jsonl"]),
                                          ("lopt_eval", ["lopt_eval.shard0.jsonl", "lopt_eval.shard1.jsonl"])])
def test_table_regenerates_from_the_committed_results(bench, tmp_path, capsys, script, files):
    for f in files:
        if not (RESULTS / f).exists():
            pytest.skip(f"{f} is not committed")
        shutil.copy(RESULTS / f, tmp_path / f)
    bench(script).main(["--out", str(tmp_path), "--table-only"])
    _assert_in_benchmarks(_table_rows(capsys.readouterr().out))


def test_zoo_prediction_table_regenerates(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["zoo_prediction.py", "--table-only", "--results",
                                      str(RESULTS / "zoo_prediction.jsonl"), "--figure", str(tmp_path / "z.png")])
    bench("zoo_prediction").main()
    _assert_in_benchmarks(_table_rows(capsys.readouterr().out))
