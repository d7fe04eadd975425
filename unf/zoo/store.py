"""Zoo storage: a directory of safetensors shards, a metadata table, the spec and a manifest.

    ZOO/
      manifest.json                      format, version, name, info, shards (file, rows, sha256), complete
      spec.json                          the WeightSpaceSpec of the architecture
      metadata.csv                       one row per stored network and epoch: model_id, epoch, hyperparameters, metrics
      weights/shard-00000.safetensors    tensors keyed "<model_id>/<epoch>/<state_dict key>"

Nothing is pickled: a zoo cannot execute code when read. Every file is written atomically (temporary file, then
rename), and the manifest is written last: a shard or rows of a chunk that the manifest does not list are simply
redone on resume, so a generation stopped at any point continues with nothing lost or duplicated. Shards carry a
SHA-256 in the manifest; a truncated or altered file is reported by name.

Under ``torchrun`` (a process group is running) :func:`build` splits the chunks still to do over the ranks: every
rank writes the shards of its own chunks, and rank 0 alone writes ``metadata.csv`` and the manifest, so the store is
the same as one process's and resumes the same way.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from ..distributed import dist_info
from ..io import atomic_write
from ..spec import WeightSpaceSpec

FORMAT, VERSION = "unf.zoo", 1
PathLike = Union[str, Path]


class ZooFormatError(ValueError):
    """A zoo file is missing, truncated, altered or not in the expected format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class ZooWriter:
    """Create a zoo, or reopen one to continue it. Chunks are the unit of work and of atomicity."""

    def __init__(self, root: PathLike, spec: WeightSpaceSpec, name: str = "zoo", info: Optional[dict] = None):
        self.root = Path(root)
        self.spec = spec
        manifest = self.root / "manifest.json"
        if manifest.exists():
            self.manifest = _read_manifest(self.root)
            stored = WeightSpaceSpec.from_json((self.root / "spec.json").read_text())
            if stored != spec:
                raise ZooFormatError(f"{self.root}: the zoo holds networks of another spec; use a new directory")
            want = json.loads(json.dumps(info)) if info is not None else None
            have = self.manifest.get("info", {})
            if want is not None and want != have:
                keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
                shown = ", ".join(f"{k}: stored {have.get(k)!r}, asked {want.get(k)!r}"
                                  if len(repr(have.get(k))) + len(repr(want.get(k))) <= 80 else k for k in keys)
                raise ZooFormatError(f"{self.root}: the zoo was built with other settings ({shown}); continuing "
                                     "would mix them, so use a new directory")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_text(self.root / "spec.json", spec.to_json(indent=1))
            self.manifest = {"format": FORMAT, "version": VERSION, "name": name, "info": info or {},
                             "shards": [], "complete": False}
            _write_text(manifest, json.dumps(self.manifest, indent=1))
        done = self.done  # rows of chunks the manifest lists (rows of an interrupted attempt are dropped)
        self.rows = [r for r in _read_rows(self.root) if int(r["chunk"]) in done]

    @property
    def done(self) -> set[int]:
        """Chunks already stored."""
        return {s["chunk"] for s in self.manifest["shards"]}

    def write_chunk(self, chunk: int, records: Sequence[dict], state_dicts: Sequence[dict]) -> None:
        """Store one chunk: ``records[i]`` (must hold ``model_id`` and ``epoch``) describes ``state_dicts[i]``."""
        if chunk in self.done:
            raise ValueError(f"chunk {chunk} is already stored in {self.root}")
        self.commit(chunk, records, _write_shard(self.root, self.spec, chunk, records, state_dicts))

    def commit(self, chunk: int, records: Sequence[dict], rel: str) -> None:
        """List a chunk whose shard ``rel`` is already on disk: its rows, then the manifest (written last, so the
        chunk counts as stored only once everything it needs is in place)."""
        self.rows += [{"chunk": chunk, **rec} for rec in records]
        _write_rows(self.root, self.rows)
        self.manifest["shards"].append({"chunk": chunk, "file": rel, "rows": len(records),
                                        "sha256": _sha256(self.root / rel)})
        _write_text(self.root / "manifest.json", json.dumps(self.manifest, indent=1))

    def finish(self) -> None:
        self.manifest["complete"] = True
        _write_text(self.root / "manifest.json", json.dumps(self.manifest, indent=1))


def _write_shard(root: Path, spec: WeightSpaceSpec, chunk: int, records: Sequence[dict],
                 state_dicts: Sequence[dict]) -> str:
    """Write one chunk's shard atomically (replacing a stray one of an interrupted run); its path in the zoo."""
    from safetensors.torch import save_file

    if len(records) != len(state_dicts):
        raise ValueError(f"{len(records)} records for {len(state_dicts)} state_dicts")
    tensors = {}
    for rec, sd in zip(records, state_dicts):
        if "model_id" not in rec or "epoch" not in rec:
            raise ValueError(f"record {rec} needs 'model_id' and 'epoch'")
        spec.validate(sd)
        for k, v in sd.items():
            tensors[f"{rec['model_id']}/{rec['epoch']}/{k}"] = v.detach().to("cpu").contiguous().clone()
    rel = f"weights/shard-{chunk:05d}.safetensors"
    atomic_write(root / rel, lambda tmp: save_file(tensors, tmp))
    return rel


def build(root: PathLike, spec: WeightSpaceSpec, chunks: int, make_chunk: Callable[[int], tuple[list, list]],
          name: str = "zoo", info: Optional[dict] = None, progress: bool = True) -> "Zoo":
    """Generate a zoo chunk by chunk (``make_chunk(i) -> (records, state_dicts)``), skipping stored chunks.

    When a process group is running (``torchrun``), every rank must call it with the same arguments: the chunks still
    to do are dealt out over the ranks, and every rank returns the finished zoo."""
    dist, rank, world = dist_info()
    if dist is not None and world > 1:
        return _build_distributed(dist, rank, world, Path(root), spec, chunks, make_chunk, name, info, progress)
    writer = ZooWriter(root, spec, name, info)
    todo: Iterable[int] = [i for i in range(chunks) if i not in writer.done]
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(list(todo), desc=f"building {name}", unit="chunk", initial=len(writer.done), total=chunks)
    for i in todo:
        records, sds = make_chunk(i)
        writer.write_chunk(i, records, sds)
    writer.finish()
    return Zoo(root)


def _build_distributed(dist, rank: int, world: int, root: Path, spec: WeightSpaceSpec, chunks: int,
                       make_chunk: Callable, name: str, info: Optional[dict], progress: bool) -> "Zoo":
    """:func:`build` over ``world`` ranks. Rank 0 alone owns ``metadata.csv`` and the manifest (two writers would
    lose each other's rows); the others only write shard files. Work goes in rounds: each rank makes one chunk and
    writes its shard, then hands its records to rank 0, which lists the round's chunks. A shard is therefore on disk
    before the manifest names it, and an interrupted run leaves at most unlisted shards, which are redone."""
    # Only Python objects travel (records, the list of stored chunks), so they go over gloo even when the default
    # group is nccl: nccl would need each rank's CUDA device set and would copy every pickle through the GPU.
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    writer, box = None, [None]
    if rank == 0:  # opens (or creates) the zoo; a mismatch is raised on every rank rather than leaving them waiting
        try:
            writer = ZooWriter(root, spec, name, info)
            box[0] = sorted(writer.done)
        except (ZooFormatError, OSError) as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], Exception):
        raise box[0]
    done = set(box[0])
    todo = [i for i in range(chunks) if i not in done]  # the same list on every rank
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"building {name}", unit="chunk", initial=len(done), total=chunks)
    # Deal by position in the list still to do (not by chunk index), so a resumed build stays balanced.
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else None
        made = None
        if mine is not None:
            records, sds = make_chunk(mine)
            made = (mine, records, _write_shard(root, spec, mine, records, sds))
        got = [None] * world if rank == 0 else None
        dist.gather_object(made, got, dst=0, group=group)  # every shard of the round is on disk past this point
        if rank == 0:
            for chunk, records, rel in sorted((m for m in got if m is not None), key=lambda m: m[0]):
                writer.commit(chunk, records, rel)
            if bar is not None:
                bar.update(sum(m is not None for m in got))
    if rank == 0:
        writer.finish()
        if bar is not None:
            bar.close()
    dist.barrier(group=group)  # no rank returns before the manifest is complete
    return Zoo(root)


class Zoo:
    """Read a zoo: ``zoo.metadata`` (list of row dicts), ``zoo.state_dict(model_id, epoch)``, ``zoo.spec``."""

    def __init__(self, root: PathLike, verify: bool = True):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        try:
            self.spec = WeightSpaceSpec.from_json((self.root / "spec.json").read_text())
        except (OSError, ValueError) as e:
            raise ZooFormatError(f"{self.root / 'spec.json'}: {e}") from None
        self.shards = {s["chunk"]: s for s in self.manifest["shards"]}
        if verify:
            for s in self.shards.values():
                path = self.root / s["file"]
                if not path.is_file():
                    raise ZooFormatError(f"{path}: missing (listed in the manifest)")
                if _sha256(path) != s["sha256"]:
                    raise ZooFormatError(f"{path}: contents do not match the manifest (truncated or altered)")
        self.metadata = [r for r in _read_rows(self.root) if int(r["chunk"]) in self.shards]
        self._where = {(str(r["model_id"]), str(r["epoch"])): int(r["chunk"]) for r in self.metadata}

    def __len__(self) -> int:
        return len(self.metadata)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def weight_space(self, rows: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32):
        """All (or the given) rows of ``metadata`` as one ``WeightSpace`` ``[N, 1, ...]``, reading each shard once."""
        from safetensors import safe_open

        from ..weights import WeightSpace

        rows = list(range(len(self.metadata))) if rows is None else list(rows)
        names = self.spec.float_names
        out = {n: torch.empty(len(rows), 1, *self.spec[n].shape, dtype=dtype) for n in names}
        by_chunk: dict[int, list[tuple[int, dict]]] = {}
        for j, i in enumerate(rows):
            r = self.metadata[i]
            by_chunk.setdefault(int(r["chunk"]), []).append((j, r))
        for chunk, items in by_chunk.items():
            path = self.root / self.shards[chunk]["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    for j, r in items:
                        for n in names:
                            out[n][j, 0] = f.get_tensor(f"{r['model_id']}/{r['epoch']}/{n}")
            except Exception as e:
                raise ZooFormatError(f"{path}: cannot be read ({e})") from None
        return WeightSpace(self.spec, out)

    def state_dict(self, model_id, epoch) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        key = (str(model_id), str(epoch))
        if key not in self._where:
            raise KeyError(f"no network {model_id!r} at epoch {epoch!r} in {self.root}")
        path = self.root / self.shards[self._where[key]]["file"]
        prefix = f"{model_id}/{epoch}/"
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(prefix + k) for k in self.spec.names}  # state_dict order
        except Exception as e:
            raise ZooFormatError(f"{path}: cannot be read ({e})") from None


def _read_manifest(root: Path) -> dict:
    path = root / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZooFormatError(f"{path}: missing; is {root} a zoo directory?") from None
    except json.JSONDecodeError as e:
        raise ZooFormatError(f"{path}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ZooFormatError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    return m


def _read_rows(root: Path) -> list[dict]:
    path = root / "metadata.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(root: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    _write_text(root / "metadata.csv", buf.getvalue())
