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


def test_lopt_family_tables_regenerate(bench, tmp_path, capsys):
    """Issue 29's per-family tables are what ``lopt_family.py table`` prints from the committed results."""
    f = RESULTS / "lopt_family.jsonl"
    if not f.exists():
        pytest.skip(f"{f.name} is not committed")
    shutil.copy(f, tmp_path / f.name)
    bench("lopt_family").main(["table", "--out", str(tmp_path / f.name)])
    _assert_in_benchmarks(_table_rows(capsys.readouterr().out))
    assert (tmp_path / "lopt_family.png").stat().st_size > 0


def test_zoo_prediction_table_regenerates(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["zoo_prediction.py", "--table-only", "--results",
                                      str(RESULTS / "zoo_prediction.jsonl"), "--figure", str(tmp_path / "z.png")])
    bench("zoo_prediction").main()
    _assert_in_benchmarks(_table_rows(capsys.readouterr().out))


def test_results_lines_survive_a_torn_line_and_reruns(bench, tmp_path, capsys):
    io = bench("results_io")
    path = tmp_path / "r.jsonl"
    io.append_jsonl(path, {"k": 1, "v": "a"})
    with path.open("a") as f:
        f.write('{"k": 2, "v": "tor')  # an interrupted write
    io.append_jsonl(path, {"k": 2, "v": "b"})  # the rerun: on a line of its own
    io.append_jsonl(path, {"k": 1, "v": "c"})  # a rerun of k=1: the last line wins
    rows = io.load_jsonl(path, key=lambda r: r["k"])
    assert sorted((r["k"], r["v"]) for r in rows) == [(1, "c"), (2, "b")]
    assert "skipping an incomplete line" in capsys.readouterr().err
    assert io.load_jsonl(tmp_path / "none.jsonl", key=lambda r: r["k"]) == []
