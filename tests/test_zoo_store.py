"""Zoo storage: round trip, resume after interruption, corrupt files, no pickle."""
import json

import pytest
import torch
import torch.nn as nn

import unf
from unf.zoo import Zoo, ZooFormatError, ZooWriter, build


def net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


SPEC = unf.spec_from_module(net(), torch.randn(2, 4))


def make_chunk(i, per_chunk=3):
    records, sds = [], []
    for j in range(per_chunk):
        model_id = i * per_chunk + j
        torch.manual_seed(model_id)
        for epoch in (1, 2):
            records.append({"model_id": model_id, "epoch": epoch, "lr": 0.01 * (j + 1), "test_acc": 0.5 + j / 10})
            sds.append(net().state_dict())
    return records, sds


def test_round_trip(tmp_path):
    zoo = build(tmp_path / "z", SPEC, chunks=2, make_chunk=make_chunk, progress=False)
    assert zoo.complete and len(zoo) == 12 and zoo.spec == SPEC
    torch.manual_seed(4)
    want = net().state_dict()
    got = zoo.state_dict(4, 1)  # epoch 1 is the first network drawn after seeding model 4
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    row = [r for r in zoo.metadata if r["model_id"] == "4" and r["epoch"] == "2"][0]
    assert float(row["lr"]) == pytest.approx(0.02)
    with pytest.raises(KeyError, match="no network 99"):
        zoo.state_dict(99, 1)


def test_resume_after_interruption_loses_and_duplicates_nothing(tmp_path):
    root = tmp_path / "z"
    calls = []

    def flaky(i):
        calls.append(i)
        if i == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt  # the machine stops half way
        return make_chunk(i)

    with pytest.raises(KeyboardInterrupt):
        build(root, SPEC, chunks=4, make_chunk=flaky, progress=False)
    assert sorted(ZooWriter(root, SPEC).done) == [0, 1]
    # a chunk whose shard was written but not yet listed in the manifest is redone, not duplicated
    from safetensors.torch import save_file
    save_file({"junk": torch.zeros(1)}, str(root / "weights" / "shard-00002.safetensors"))
    zoo = build(root, SPEC, chunks=4, make_chunk=flaky, progress=False)
    assert calls == [0, 1, 2, 2, 3] and zoo.complete
    ids = [(r["model_id"], r["epoch"]) for r in zoo.metadata]
    assert len(ids) == len(set(ids)) == 24


def test_truncated_shard_is_named(tmp_path):
    root = tmp_path / "z"
    build(root, SPEC, chunks=1, make_chunk=make_chunk, progress=False)
    shard = root / "weights" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ZooFormatError, match=r"shard-00000.safetensors: contents do not match"):
        Zoo(root)


def test_bad_manifest_and_other_spec(tmp_path):
    with pytest.raises(ZooFormatError, match="missing; is .* a zoo directory"):
        Zoo(tmp_path)
    root = tmp_path / "z"
    build(root, SPEC, chunks=1, make_chunk=make_chunk, progress=False)
    other = unf.spec_from_module(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), torch.randn(2, 4))
    with pytest.raises(ZooFormatError, match="another spec"):
        ZooWriter(root, other)
    # resuming with other build settings would mix two zoos in one directory
    root2 = tmp_path / "z2"
    build(root2, SPEC, chunks=1, make_chunk=make_chunk, info={"grid": 1, "seed": 0}, progress=False)
    assert ZooWriter(root2, SPEC, info={"seed": 0, "grid": 1}).done == {0}
    with pytest.raises(ZooFormatError, match=r"other settings \(grid: stored 1, asked 2\)"):
        ZooWriter(root2, SPEC, info={"grid": 2, "seed": 0})
    (root / "manifest.json").write_text("{broken")
    with pytest.raises(ZooFormatError, match="manifest.json: not valid JSON"):
        Zoo(root)


def test_files_are_not_pickles(tmp_path):
    root = tmp_path / "z"
    build(root, SPEC, chunks=1, make_chunk=make_chunk, progress=False)
    assert json.loads((root / "manifest.json").read_text())["format"] == "unf.zoo"
    for f in root.rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f  # pickle protocol header


def test_split_by_run_keeps_runs_together():
    from unf.zoo import split_by_run

    rows = [{"model_id": m, "epoch": e} for m in range(20) for e in (1, 2, 3)]
    splits = split_by_run(rows, (0.6, 0.2, 0.2), seed=1)
    assert sorted(i for s in splits for i in s) == list(range(60))
    runs = [{rows[i]["model_id"] for i in s} for s in splits]
    assert [len(r) for r in runs] == [12, 4, 4] and not (runs[0] & runs[1] or runs[0] & runs[2] or runs[1] & runs[2])
    assert split_by_run(rows, (0.6, 0.2, 0.2), seed=1) == splits
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_run(rows, (0.5, 0.2))


def test_weight_dataset_batches_normalises_and_augments(tmp_path):
    from unf.zoo import WeightDataset, collate

    zoo = build(tmp_path / "z", SPEC, chunks=2, make_chunk=make_chunk, progress=False)
    ds = WeightDataset(zoo, "test_acc")
    ws, y = collate(zoo.spec)([ds[i] for i in range(4)])
    assert ws.batch_size == 4 and ws.channels == 1 and y.shape == (4,)
    stats = ws.tensor_stats()
    norm = WeightDataset(zoo, "test_acc", rows=[0], stats=stats)[0][0]
    mean, std = stats["0.weight"]
    assert torch.allclose(norm["0.weight"], (ds[0][0]["0.weight"] - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))
    clipped = WeightDataset(zoo, "test_acc", rows=[0], stats=stats, clip=0.5)[0][0]
    assert torch.equal(clipped["0.weight"], norm["0.weight"].clamp(-0.5, 0.5))
    assert not torch.equal(clipped["0.weight"], norm["0.weight"])
    aug = WeightDataset(zoo, "test_acc", augment=True, seed=0)[0][0]
    assert not torch.equal(aug["0.weight"], ds[0][0]["0.weight"])
    assert torch.allclose(aug["0.weight"].sort(dim=-1).values.sum(), ds[0][0]["0.weight"].sort(dim=-1).values.sum())
    with pytest.raises(ValueError, match="target 'nope' is missing"):
        WeightDataset(zoo, "nope")


def test_regression_metrics_known_values():
    from unf.zoo import regression_metrics

    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = regression_metrics(y * 2, y)
    assert m["kendall_tau"] == pytest.approx(1.0) and m["mae"] == pytest.approx(2.5)
    assert m["r2"] == pytest.approx(1 - ((y * 2 - y) ** 2).sum().item() / 5.0)
    assert regression_metrics(-y, y)["kendall_tau"] == pytest.approx(-1.0)
