"""Zoo building under torchrun: chunks split over 2 CPU processes give the rows and weights of one process's build,
into the same resumable store, and `unf zoo build` runs under torchrun with rank 0 alone reporting."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from unf.zoo import Zoo
from unf.zoo.builtin import build_builtin

# 6 networks in chunks of 2: 3 chunks, so 2 ranks do one round of 2 chunks and one of 1 (rank 1 idle). The script
# builds (or resumes) each zoo it is given, asks for the first with other settings (every rank must get the error),
# then runs `unf zoo build` of 1 network (in the same launch: starting torchrun costs more than the build).
SCRIPT = r"""
import sys, torch
from pathlib import Path
from unf.distributed import dist_info, init_distributed
from unf.zoo import ZooFormatError
from unf.zoo.builtin import build_builtin
torch.set_num_threads(1)
init_distributed("cpu")
import unf.zoo.store as store
write_shard = store._write_shard
def logged(root, spec, chunk, *rest):  # which rank made which chunk
    with open(Path(root).with_name(f"made-{dist_info()[1]}"), "a") as f:
        f.write(f"{Path(root).name} {chunk}\n")
    return write_shard(root, spec, chunk, *rest)
store._write_shard = logged
for out in sys.argv[1:]:
    build_builtin("digits-mlp", out, num_models=6, chunk_size=2, progress=False)
try:
    build_builtin("digits-mlp", sys.argv[1], num_models=6, chunk_size=2, seed=1, progress=False)
except ZooFormatError as e:
    Path(sys.argv[1]).with_name(f"refused-{dist_info()[1]}").write_text(str(e))
from unf.cli import main
out = str(Path(sys.argv[1]).with_name("cli"))
sys.exit(main(["zoo", "build", "digits-mlp", "--out", out, "--num-models", "1", "--json"]))
"""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run(argv):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_zoo(a: Zoo, b: Zoo):
    """The same (model_id, epoch) rows with the same metadata and weights, to float tolerance, order aside."""
    rows_a = {(r["model_id"], r["epoch"]): r for r in a.metadata}
    rows_b = {(r["model_id"], r["epoch"]): r for r in b.metadata}
    assert len(rows_a) == len(a) and rows_a.keys() == rows_b.keys()
    for key, ra in rows_a.items():
        rb = rows_b[key]
        assert ra.keys() == rb.keys()
        for col in ra:
            try:
                x, y = float(ra[col]), float(rb[col])
            except ValueError:
                assert ra[col] == rb[col], (key, col)
                continue
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y)), (key, col)
        sa, sb = a.state_dict(*key), b.state_dict(*key)
        for k in sa:
            assert (sa[k] - sb[k]).abs().max() <= 1e-6 * sa[k].abs().max(), (key, k)


def build_one(out):
    """The 1-process build, here in the test process, with the threads of the 2-process one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_builtin("digits-mlp", str(out), num_models=6, chunk_size=2, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    """``one``: 1 process; under 2 processes in one torchrun: ``two`` from scratch, and ``part`` resumed from a copy
    of ``one`` interrupted with only chunk 1 listed (chunk 0's shard gone, a stray truncated shard of chunk 2)."""
    tmp = tmp_path_factory.mktemp("zoo_dist")
    one = build_one(tmp / "one")
    part = tmp / "part"
    shutil.copytree(tmp / "one", part)
    manifest = json.loads((part / "manifest.json").read_text())
    kept = [s for s in manifest["shards"] if s["chunk"] == 1]
    (part / "manifest.json").write_text(json.dumps({**manifest, "shards": kept, "complete": False}))
    (part / "weights/shard-00000.safetensors").unlink()
    (part / "weights/shard-00002.safetensors").write_bytes(b"truncated")
    script = tmp / "build.py"
    script.write_text(SCRIPT)
    r = run(TORCHRUN + [str(script), str(tmp / "two"), str(part)])
    return tmp, one, kept[0], r.stdout


def test_chunks_dealt_over_ranks(zoos):
    """Fresh: chunks 0, 2 on rank 0 and 1 on rank 1; resumed: only the chunks still to do (0, 2), one per rank."""
    tmp = zoos[0]
    made = [(tmp / f"made-{rank}").read_text().split("\n") for rank in (0, 1)]
    assert made[0] == ["two 0", "two 2", "part 0", "cli 0", ""] and made[1] == ["two 1", "part 2", ""]


def test_two_processes_equal_one(zoos):
    tmp, one, _, _ = zoos
    two = Zoo(tmp / "two", verify=True)
    assert two.complete and len(two) == 6 * 3 and sorted(two.shards) == [0, 1, 2]
    assert_same_zoo(one, two)


def test_two_processes_resume(zoos):
    """Chunks 0 and 2 are redone, one per rank, and chunk 1 is kept as it was."""
    tmp, one, kept, _ = zoos
    resumed = Zoo(tmp / "part", verify=True)
    assert resumed.complete and sorted(resumed.shards) == [0, 1, 2]
    assert resumed.shards[1]["sha256"] == kept["sha256"]
    assert_same_zoo(one, resumed)


def test_other_settings_refused_on_every_rank(zoos):
    tmp, _, _, _ = zoos
    for rank in (0, 1):
        assert "other settings" in (tmp / f"refused-{rank}").read_text()


def test_cli_under_torchrun(zoos):
    tmp, _, _, stdout = zoos
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["rows"] == 3 and lines[0]["complete"]  # rank 0 alone reports
    assert Zoo(tmp / "cli").complete
