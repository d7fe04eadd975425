"""Loaders for public model-zoo formats: read them in place, or convert them into ``unf`` zoos.

Two formats are supported. Each has a lazy reader with the read interface of :class:`unf.zoo.Zoo` (``root``,
``spec``, ``metadata``, ``len()``, ``state_dict(model_id, epoch)``, plus ``model(model_id, epoch)``), so it can feed
:class:`unf.zoo.WeightDataset` directly, and a converter that writes a ``unf`` zoo with :class:`unf.zoo.ZooWriter`,
chunk by chunk (progress bar via tqdm; resumable: stopped conversions continue where they stopped).

    load_small_cnn_zoo(path)                         -> SmallCNNZoo   (lazy; weights memory-mapped)
    convert_small_cnn_zoo(src, dst)                  -> Zoo
    load_model_zoos(path, make_model, example_input) -> ModelZoos     (lazy; checkpoints loaded on demand)
    convert_model_zoos(src, dst, make_model, example_input) -> Zoo

Metadata rows hold strings, as the rows of a stored :class:`Zoo` do (``model_id``, ``epoch`` and every source column;
a column missing for a row is ``""``), so a reader's rows equal the converted zoo's rows apart from its ``chunk``
column. Source columns named ``model_id``, ``epoch``, ``chunk``, ``run_id`` or ``trial`` are renamed ``source.<name>``.
Every problem raises :class:`unf.zoo.ZooFormatError` (a ``ValueError``) naming the file, and the row/line and
column where there is one.

1. Small CNN Zoo (Unterthiner, Keysers, Gelly, Bousquet, Tolstikhin 2020, "Predicting Neural Network Accuracy from
   Weights", arXiv:2002.11448), the released per-dataset archives (``mnist``, ``fashion_mnist``, ``cifar10``,
   ``svhn_cropped``), each unpacked to one directory holding:

   - ``weights.npy``: float32 ``[N, 4970]``, one flattened network checkpoint per row. Opened with
     ``np.load(mmap_mode="r", allow_pickle=False)``; any float dtype is accepted and read as float32.
   - ``metrics.csv.gz`` (or an uncompressed ``metrics.csv``): a header and one row per row of ``weights.npy``.
     Columns documented by the authors: ``config.activation``, ``config.b_init``, ``config.dataset``,
     ``config.dnn_architecture`` (always ``cnn``), ``config.dropout``, ``config.epochs``,
     ``config.epochs_between_checkpoints``, ``config.init_std``, ``config.l2reg``, ``config.learning_rate``,
     ``config.num_layers``, ``config.num_units``, ``config.optimizer``, ``config.random_seed``,
     ``config.train_fraction``, ``config.w_init``, ``modeldir``, ``step``, ``test_accuracy``, ``test_loss``,
     ``train_accuracy``, ``train_loss``. All columns are kept as they are; none is required. A header cell left
     empty (a pandas index) becomes the column ``index``.
   - ``layout.csv``: columns ``varname``, ``start_idx``, ``end_idx``, ``shape`` (other columns are ignored); one row
     per TF variable: ``sequential/conv2d/kernel:0`` (shape ``(3, 3, 1, 16)``), ``sequential/conv2d/bias:0``,
     ``sequential/conv2d_1/...``, ``sequential/conv2d_2/...``, ``sequential/dense/kernel:0`` (``(16, 10)``),
     ``sequential/dense/bias:0``; ``shape`` is a Python tuple literal; ``[start_idx, end_idx)`` is the slice of a
     weight row holding the variable, flattened in C order of its TF shape (bias before kernel in the released
     files; any order is accepted as long as the slices tile the row exactly).

   Rows: ``model_id`` = row index, ``epoch`` = the ``step`` column (it counts epochs: checkpoints are taken at epochs
   0, 1, 2, 3, 20, 40, 60, 80, 86, and nfn selects the final ones by ``step == 86``) or 0 if there is none, plus
   ``run_id`` (networks numbered by distinct ``modeldir``, in order of first appearance; only if ``modeldir``
   exists), for :func:`unf.zoo.split_by_run` with ``run_key="run_id"``. Rows whose
   weights are not finite (diverged runs) are kept as they are.

   The network (Keras ``build_cnn`` in ``train_network.py``): ``num_layers`` x [``Conv2D(16, 3, strides=2)``,
   default ``padding="valid"``, activation], an optional ``Dropout`` (no parameters), ``GlobalAveragePooling2D``,
   ``Dense(10)`` on 1-channel (grayscale) 28x28 (MNIST, Fashion-MNIST) or 32x32 (CIFAR-10, SVHN) images. It is
   rebuilt as :class:`SmallCNN` (``Conv2d(stride=2, padding=0)``, activation, mean over H and W, ``Linear``; dropout is
   the identity at inference and left out). Layer sizes come from ``layout.csv`` (checked to chain), so the layout
   decides the architecture. Conversion: conv kernels TF HWIO ``[kh, kw, in, out]`` -> PyTorch OIHW
   (``permute(3, 2, 0, 1)``), dense kernels ``[in, out]`` -> ``[out, in]``, biases unchanged. Both frameworks compute
   cross-correlations and "valid" stride-2 convolutions identically, so the network is the same function of an NCHW
   image as the TF one of the NHWC image. The spec does not depend on the activation (``config.activation`` varies:
   relu, tanh); :meth:`SmallCNNZoo.model` builds each network with its own activation.

   Sources: google-research/google-research ``dnn_predict_accuracy/README.md`` (files, columns, 4970 parameters,
   checkpoint epochs), ``dnn_predict_accuracy/train_network.py`` (``build_cnn``, flags ``cnn_stride=2``,
   ``grayscale=True``), ``dnn_predict_accuracy/colab/dnn_predict_accuracy.ipynb`` (per-layer slices of the flat
   vector: bias ``[0, 16)``, kernel ``[16, 160)``, ...); AllanYangZhou/nfn ``experiments/data_utils.py`` (reads
   ``weights.npy``, ``metrics.csv.gz`` and ``layout.csv`` with columns ``varname/start_idx/end_idx/shape``, kernels
   ending ``kernel:0`` transposed with axes ``(0, 4, 3, 1, 2)`` / ``(0, 2, 1)``, final checkpoints at ``step == 86``);
   the ``sequential/conv2d*/kernel:0`` variable names as used by several public Small-CNN-Zoo loaders.
   Not supported: the TF checkpoints of the training runs (``permanent_ckpt-*``, not distributed), ``fc``/``cnnbn``
   architectures (the released zoo is ``cnn`` only; a BatchNorm or other variable in ``layout.csv`` is an error).

2. Model Zoos (Schurholt, Taskiran, Knyazev, Giro-i-Nieto, Borth 2022, "Model Zoos: A Dataset of Diverse Populations
   of Neural Network Models", NeurIPS Datasets & Benchmarks), the *raw* zoos (Zenodo zip files), which are Ray Tune
   experiment directories with one directory per trained model:

   - ``<model dir>/params.json``: the model's configuration (JSON object, e.g. ``model::nlin``, ``model::init_type``,
     ``optim::lr``, ``seed``, ...). Each key becomes a column (nested values as JSON text).
   - ``<model dir>/result.json``: JSON lines, one object per training iteration (``training_iteration``,
     ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, Ray bookkeeping). The line whose
     ``training_iteration`` equals a checkpoint's epoch gives that row's metrics (no line: empty metrics). Ray
     bookkeeping (timestamps, host, pid, ``config``, ...) and non-scalar values are dropped unless named in
     ``result_keys``; a result key that is also a params key is stored as ``result.<key>``.
   - ``<model dir>/checkpoint_<epoch>/checkpoints`` (``<epoch>`` with or without zero padding, e.g.
     ``checkpoint_000050``): the model's ``state_dict`` saved with ``torch.save``. Loaded only with
     ``torch.load(..., weights_only=True)``; a file that needs any other unpickling is refused with an error naming
     it (never loaded unsafely). ``optimizer`` files next to it are ignored.

   ``path`` is the experiment directory (every sub-directory with a ``params.json`` or a ``checkpoint_*`` directory
   is a model; other files - ``config.json``, ``dataset.pt``, Ray state - are ignored) or a single model directory.
   Rows: ``model_id`` = index of the model directory in sorted order, ``epoch`` = the checkpoint's epoch, ``trial`` =
   the directory name, then the params and metrics. The architecture is given by the caller (``make_model``: a
   module or a zero-argument callable, e.g. ``lambda: CNN(channels_in=1, nlin="tanh", dropout=0.0)`` from the zoo's
   ``def_net.py``) and its spec inferred with ``example_input``. State-dict keys are matched exactly; with
   ``keys="auto"`` (default) a checkpoint whose keys differ but whose sequence of shapes equals the model's is
   matched by position (Model Zoos networks built with ``dropout > 0`` have extra ``Dropout`` entries in their
   ``module_list``, which shifts the indices in their keys).

   Sources: ModelZoos/ModelZooDataset ``README.md`` (raw zips and preprocessed ``.pt`` files on Zenodo),
   ``code/model_definitions/def_NN_experiment.py`` (``save_checkpoint``: ``torch.save(model.state_dict(),
   <checkpoint dir>/checkpoints)``; result keys ``train_loss/train_acc/test_loss/test_acc``; initial checkpoint),
   ``code/checkpoints_to_datasets/dataset_base.py`` (``checkpoint_{e}`` or ``checkpoint_{e:06d}`` /``checkpoints``;
   ``result.json`` read as JSON lines and matched by ``training_iteration``), ``code/model_definitions/def_net.py``
   (``module_list`` CNNs, dropout modules), ``code/zoo_generators/*.py`` (Ray Tune 1.8 ``tune.run`` with
   ``checkpoint_freq=1``). Not supported: the preprocessed ``.pt`` dataset files and Ray's ``params.pkl`` (pickled
   Python objects: reading them would need unsafe unpickling).
"""
from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..spec import WeightSpaceSpec
from .store import Zoo, ZooFormatError, ZooWriter

PathLike = Union[str, Path]

__all__ = ["ACTIVATIONS", "LayoutEntry", "ModelZoos", "SMALL_CNN_ZOO_INPUT_SHAPES", "SMALL_CNN_ZOO_LAYOUT", "SmallCNN",
           "SmallCNNZoo", "convert_model_zoos", "convert_small_cnn_zoo", "load_model_zoos", "load_small_cnn_zoo",
           "read_layout"]

_RESERVED = ("model_id", "epoch", "chunk", "run_id", "trial")
# default rows per shard: at most 8192 tensors and 64 MiB of float32 weights per shard. Reading one network from a
# stored zoo parses its shard's header and scans its keys, so the time per read grows with the tensors in a shard.
_CHUNK_KEYS, _CHUNK_BYTES = 8192, 64 << 20


# -- shared ------------------------------------------------------------------------------------------------------------
def _cell(value) -> str:
    """A value as the zoo's metadata.csv stores it."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _json_normal(obj):
    return json.loads(json.dumps(obj))


def _complete_rows(rows: list[dict]) -> list[dict]:
    """Give every row every column (missing -> ""), as rows read back from metadata.csv have."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "") for k in fields} for r in rows]


def _progress(items: list, desc: str, initial: int, total: int, enabled: bool) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return items
    return tqdm(items, desc=desc, unit="chunk", initial=initial, total=total)


class _ZooReader:
    """Read interface shared with :class:`unf.zoo.Zoo`; subclasses set the attributes and ``_load(i)``."""

    root: Path
    spec: WeightSpaceSpec
    metadata: list[dict]
    info: dict
    complete = True

    def _index_rows(self) -> None:
        self._row = {(r["model_id"], r["epoch"]): i for i, r in enumerate(self.metadata)}

    def __len__(self) -> int:
        return len(self.metadata)

    def _lookup(self, model_id, epoch) -> int:
        key = (str(model_id), str(epoch))
        if key not in self._row:
            raise KeyError(f"no network {model_id!r} at epoch {epoch!r} in {self.root}")
        return self._row[key]

    def state_dict(self, model_id, epoch) -> dict[str, torch.Tensor]:
        """The network's state_dict in PyTorch layout, keys in spec order."""
        return self._load(self._lookup(model_id, epoch))

    def _load(self, i: int) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_space(self, rows: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32):
        """All (or the given) rows of ``metadata`` as one ``WeightSpace`` ``[N, 1, ...]`` (float entries)."""
        from ..weights import WeightSpace

        rows = list(range(len(self.metadata))) if rows is None else list(rows)
        names = self.spec.float_names
        out = {n: torch.empty(len(rows), 1, *self.spec[n].shape, dtype=dtype) for n in names}
        for j, i in enumerate(rows):
            sd = self._load(i)
            for n in names:
                out[n][j, 0] = sd[n]
        return WeightSpace(self.spec, out)

    def save(self, dst: PathLike, chunk_size: Optional[int] = None, progress: bool = True,
             name: Optional[str] = None) -> Zoo:
        """Write this zoo as a ``unf`` zoo at ``dst`` (resumable) and return it opened.

        ``chunk_size``: rows per shard (default: as many as keep a shard within 8192 tensors and 64 MiB of float32
        weights; 1024 rows for the Small CNN Zoo). A stopped conversion continues where it stopped when called again
        with the same source and options; another source or other options raise.
        """
        n_params = sum(math.prod(t.shape) for t in self.spec.values())
        if chunk_size is None:
            chunk_size = max(1, min(_CHUNK_KEYS // max(1, len(self.spec)), _CHUNK_BYTES // max(1, 4 * n_params)))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        name = name or self.root.name
        info = _json_normal({"source": self.info, "chunk_size": chunk_size})
        writer = ZooWriter(dst, self.spec, name, info)  # refuses a directory started from another source or options
        n_chunks = math.ceil(len(self.metadata) / chunk_size)
        todo = [c for c in range(n_chunks) if c not in writer.done]
        for c in _progress(todo, f"converting {name}", n_chunks - len(todo), n_chunks, progress):
            rows = range(c * chunk_size, min(len(self.metadata), (c + 1) * chunk_size))
            writer.write_chunk(c, [self.metadata[i] for i in rows], [self._load(i) for i in rows])
        writer.finish()
        return Zoo(dst)


# -- Small CNN Zoo -----------------------------------------------------------------------------------------------------
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "selu": nn.SELU, "elu": nn.ELU, "linear": nn.Identity,
    "softplus": nn.Softplus, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU,
}
"""Keras activation names (``config.activation``) -> the equivalent PyTorch module."""

SMALL_CNN_ZOO_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (1, 32, 32), "svhn_cropped": (1, 32, 32)}
"""``config.dataset`` -> input shape (C, H, W); the zoo's images are grayscale."""


@dataclass(frozen=True)
class LayoutEntry:
    """One row of ``layout.csv``: TF variable ``varname`` occupies ``[start, end)`` of a weight row, shape ``shape``."""
    varname: str
    start: int
    end: int
    shape: tuple[int, ...]


def _published_layout() -> list[LayoutEntry]:
    out, pos = [], 0
    for layer, kshape in [("conv2d", (3, 3, 1, 16)), ("conv2d_1", (3, 3, 16, 16)), ("conv2d_2", (3, 3, 16, 16)),
                          ("dense", (16, 10))]:
        for kind, shape in (("bias", kshape[-1:]), ("kernel", kshape)):
            n = math.prod(shape)
            out.append(LayoutEntry(f"sequential/{layer}/{kind}:0", pos, pos + n, tuple(shape)))
            pos += n
    return out


SMALL_CNN_ZOO_LAYOUT: list[LayoutEntry] = _published_layout()
"""The layout of the released Small CNN Zoo (4970 parameters), for reference; loaders read ``layout.csv``."""


class SmallCNN(nn.Module):
    """The Small CNN Zoo network in PyTorch: stride-2 "valid" convs with an activation, global mean, linear head.

    ``channels``: (input channels, conv1 out, conv2 out, ...); ``kernel_sizes``: one (kh, kw) per conv (default 3x3).
    Keys: ``convs.<i>.weight`` (OIHW), ``convs.<i>.bias``, ``fc.weight`` ``[classes, channels[-1]]``, ``fc.bias``.
    """

    def __init__(self, channels: Sequence[int] = (1, 16, 16, 16), num_classes: int = 10, activation: str = "relu",
                 kernel_sizes: Optional[Sequence[tuple[int, int]]] = None, stride: int = 2):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        kernel_sizes = list(kernel_sizes) if kernel_sizes is not None else [(3, 3)] * (len(channels) - 1)
        if len(kernel_sizes) != len(channels) - 1:
            raise ValueError(f"{len(kernel_sizes)} kernel sizes for {len(channels) - 1} conv layers")
        self.convs = nn.ModuleList([nn.Conv2d(a, b, tuple(k), stride=stride)
                                    for a, b, k in zip(channels, channels[1:], kernel_sizes)])
        self.act = ACTIVATIONS[activation]()
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.act(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return open(path, newline="", encoding="utf-8")


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV (``.gz`` decompressed); malformed input raises naming the file and line."""
    if not path.is_file():
        raise ZooFormatError(f"{path}: missing")
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise ZooFormatError(f"{path}: empty (no header line)")
            rows = []
            for row in reader:
                if None in row:
                    raise ZooFormatError(f"{path}: line {reader.line_num} has {len(header) + len(row[None])} fields, "
                                         f"the header has {len(header)}")
                if any(v is None for v in row.values()):
                    n = sum(v is not None for v in row.values())
                    raise ZooFormatError(f"{path}: line {reader.line_num} has {n} fields, the header has "
                                         f"{len(header)}")
                rows.append(row)
    except ZooFormatError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise ZooFormatError(f"{path}: cannot be read as {'gzip-compressed ' if path.suffix == '.gz' else ''}CSV "
                             f"({type(e).__name__}: {e})") from None
    dup = [h for h in header if header.count(h) > 1]
    if dup:
        raise ZooFormatError(f"{path}: duplicate column(s) {sorted(set(dup))} in the header")
    return list(header), rows


def read_layout(path: PathLike) -> list[LayoutEntry]:
    """Parse a Small CNN Zoo ``layout.csv`` (columns ``varname, start_idx, end_idx, shape``), in file order."""
    path = Path(path)
    header, rows = _read_csv(path)
    missing = [c for c in ("varname", "start_idx", "end_idx", "shape") if c not in header]
    if missing:
        raise ZooFormatError(f"{path}: missing column(s) {missing} (columns: {header})")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1} ({row['varname']!r})"
        try:
            start, end = int(row["start_idx"]), int(row["end_idx"])
        except ValueError:
            raise ZooFormatError(f"{where}: start_idx/end_idx {row['start_idx']!r}/{row['end_idx']!r} are not "
                                 "integers") from None
        try:
            shape = ast.literal_eval(row["shape"].strip())
        except (ValueError, SyntaxError):
            raise ZooFormatError(f"{where}: column 'shape' {row['shape']!r} is not a tuple such as (3, 3, 1, 16)") \
                from None
        shape = (shape,) if isinstance(shape, int) else shape
        if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ZooFormatError(f"{where}: column 'shape' {row['shape']!r} is not a tuple of positive integers")
        shape = tuple(shape)
        if start < 0 or end - start != math.prod(shape):
            raise ZooFormatError(f"{where}: [start_idx, end_idx) = [{start}, {end}) holds {end - start} values, "
                                 f"shape {shape} needs {math.prod(shape)}")
        out.append(LayoutEntry(row["varname"], start, end, shape))
    if not out:
        raise ZooFormatError(f"{path}: no rows")
    return out


_VAR = re.compile(r"^(?P<layer>.+)/(?P<kind>kernel|bias):0$")


def _layout_plan(layout: Sequence[LayoutEntry], where: str, n_values: int, weights_file: Path):
    """Check a layout against the architecture; return (channels, kernel sizes, classes, plan).

    ``plan``: (state_dict key, start, end, TF shape, permutation to PyTorch layout or None), in state_dict order.
    """
    names = [e.varname for e in layout]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ZooFormatError(f"{where}: variable(s) {dup} listed twice")
    pos = 0
    for e in sorted(layout, key=lambda e: e.start):
        if e.start != pos:
            what = (f"overlaps the previous one at {e.start}" if e.start < pos
                    else f"leaves [{pos}, {e.start}) uncovered")
            raise ZooFormatError(f"{where}: variable {e.varname!r} {what}")
        pos = e.end
    if pos != n_values:
        raise ZooFormatError(f"{weights_file}: rows hold {n_values} values, {where} describes {pos}")
    layers: dict[str, dict[str, LayoutEntry]] = {}
    for e in layout:
        m = _VAR.match(e.varname)
        if m is None:
            raise ZooFormatError(f"{where}: variable {e.varname!r} is not supported (only '<layer>/kernel:0' and "
                                 "'<layer>/bias:0' of conv and dense layers)")
        layers.setdefault(m["layer"], {})[m["kind"]] = e
    for layer, ents in layers.items():
        if set(ents) != {"kernel", "bias"}:
            raise ZooFormatError(f"{where}: layer {layer!r} has no {'bias' if 'kernel' in ents else 'kernel'}:0")
    order = sorted(layers, key=lambda l: min(e.start for e in layers[l].values()))
    kernels = [layers[l]["kernel"].shape for l in order]
    if len(kernels) < 2 or any(len(k) != 4 for k in kernels[:-1]) or len(kernels[-1]) != 2:
        raise ZooFormatError(f"{where}: expected conv layers (4-d HWIO kernels) then one dense layer (2-d kernel), "
                             f"found kernels {dict(zip(order, kernels))}")
    channels = [kernels[0][2]]
    for layer, k in zip(order, kernels):
        fan_in, fan_out = k[-2], k[-1]
        if fan_in != channels[-1]:
            raise ZooFormatError(f"{where}: layer {layer!r} takes {fan_in} inputs, the layer before gives "
                                 f"{channels[-1]}")
        if layers[layer]["bias"].shape != (fan_out,):
            raise ZooFormatError(f"{where}: layer {layer!r} has bias shape {layers[layer]['bias'].shape}, its "
                                 f"kernel has {fan_out} outputs")
        channels.append(fan_out)
    plan = []
    for i, layer in enumerate(order):
        key = f"convs.{i}" if i < len(order) - 1 else "fc"
        k, b = layers[layer]["kernel"], layers[layer]["bias"]
        plan.append((f"{key}.weight", k.start, k.end, k.shape, (3, 2, 0, 1) if len(k.shape) == 4 else (1, 0)))
        plan.append((f"{key}.bias", b.start, b.end, b.shape, None))
    return channels[:-1], [tuple(k[:2]) for k in kernels[:-1]], channels[-1], plan


class SmallCNNZoo(_ZooReader):
    """A Small CNN Zoo directory read in place (see the module docstring for the format). Use
    :func:`load_small_cnn_zoo`; ``save(dst)`` converts it into a ``unf`` zoo."""

    def __init__(self, path: PathLike, dataset_shape: Optional[Sequence[int]] = None):
        from ..spec import spec_from_module

        self.root = root = Path(path)
        if not root.is_dir():
            raise ZooFormatError(f"{root}: not a directory (expected a Small CNN Zoo directory with weights.npy, "
                                 "metrics.csv.gz and layout.csv)")
        wfile = root / "weights.npy"
        if not wfile.is_file():
            raise ZooFormatError(f"{wfile}: missing")
        try:
            self._weights = np.load(wfile, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ZooFormatError(f"{wfile}: cannot be read as a .npy array ({e})") from None
        if self._weights.ndim != 2 or not np.issubdtype(self._weights.dtype, np.floating):
            raise ZooFormatError(f"{wfile}: expected a 2-d float array [networks, parameters], found "
                                 f"{self._weights.dtype} {tuple(self._weights.shape)}")
        mfile = next((root / n for n in ("metrics.csv.gz", "metrics.csv") if (root / n).is_file()), None)
        if mfile is None:
            raise ZooFormatError(f"{root / 'metrics.csv.gz'}: missing (nor is there a metrics.csv)")
        header, rows = _read_csv(mfile)
        if len(rows) != self._weights.shape[0]:
            raise ZooFormatError(f"{mfile}: {len(rows)} rows, but {wfile} holds {self._weights.shape[0]} networks")
        lfile = root / "layout.csv"
        self.layout = read_layout(lfile)
        channels, ksizes, classes, self._plan = _layout_plan(self.layout, str(lfile), self._weights.shape[1], wfile)

        dataset = rows[0].get("config.dataset", "") if rows else ""
        if dataset_shape is None:
            h, w = SMALL_CNN_ZOO_INPUT_SHAPES.get(dataset, (1, 28, 28))[1:]
            dataset_shape = (channels[0], h, w)
        dataset_shape = tuple(int(d) for d in dataset_shape)
        if len(dataset_shape) != 3 or dataset_shape[0] != channels[0]:
            raise ValueError(f"dataset_shape {dataset_shape} must be (C, H, W) with C = {channels[0]}, the input "
                             f"channels of the first conv kernel in {lfile}")
        self.input_shape = dataset_shape
        self.architecture = {"channels": list(channels), "kernel_sizes": [list(k) for k in ksizes],
                             "num_classes": classes}
        example = SmallCNN(channels, classes, "relu", ksizes)
        self.spec = spec_from_module(example, torch.zeros(1, *dataset_shape))

        def source_name(col: str) -> str:
            col = col or "index"
            return f"source.{col}" if col in _RESERVED else col

        has_step, has_dir = "step" in header, "modeldir" in header
        runs: dict[str, int] = {}
        meta = rows  # rows are replaced by their records in place (one copy of the table in memory)
        for i, row in enumerate(rows):
            epoch = "0"
            if has_step:
                step = row["step"].strip()
                try:
                    f = float(step)
                except ValueError:
                    raise ZooFormatError(f"{mfile}: row {i + 1} (line {i + 2}), column 'step': {row['step']!r} is "
                                         "not a number") from None
                epoch = str(int(f)) if f.is_integer() else step
            rec = {"model_id": str(i), "epoch": epoch}
            if has_dir:
                rec["run_id"] = str(runs.setdefault(row["modeldir"], len(runs)))
            rec.update({source_name(k): v for k, v in row.items()})
            meta[i] = rec
        self.metadata = meta
        self._index_rows()
        self.info = {"format": "small-cnn-zoo", "name": root.name, "networks": len(meta),
                     "parameters": int(self._weights.shape[1]), "input_shape": list(dataset_shape),
                     "architecture": self.architecture,
                     "layout": [[e.varname, e.start, e.end, list(e.shape)] for e in self.layout]}

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        vec = torch.from_numpy(np.array(self._weights[i], dtype=np.float32))  # a copy out of the memory map
        out = {}
        for key, start, end, shape, perm in self._plan:
            t = vec[start:end].reshape(shape)
            out[key] = (t.permute(perm) if perm else t).contiguous()
        return {k: out[k] for k in self.spec.names}

    def model(self, model_id, epoch) -> SmallCNN:
        """The network as a :class:`SmallCNN` with its own ``config.activation`` (ReLU if the column is absent), in
        eval mode. Input: ``[B, C, H, W]`` images preprocessed as in training (grayscale, scaled to [-1, 1])."""
        i = self._lookup(model_id, epoch)
        act = self.metadata[i].get("config.activation", "relu") or "relu"
        a = self.architecture
        net = SmallCNN(a["channels"], a["num_classes"], act, [tuple(k) for k in a["kernel_sizes"]])
        net.load_state_dict(self._load(i))
        return net.eval()


def load_small_cnn_zoo(path: PathLike, dataset_shape: Optional[Sequence[int]] = None) -> SmallCNNZoo:
    """Open a Small CNN Zoo directory (``weights.npy``, ``metrics.csv.gz``, ``layout.csv``) in place.

    ``dataset_shape``: input (C, H, W) used to infer the spec; default from ``config.dataset`` (28x28 for MNIST and
    Fashion-MNIST, 32x32 for CIFAR-10 and SVHN; 28x28 if unknown). The spec does not depend on it (global pooling).
    """
    return SmallCNNZoo(path, dataset_shape)


def convert_small_cnn_zoo(src: PathLike, dst: PathLike, dataset_shape: Optional[Sequence[int]] = None,
                          chunk_size: Optional[int] = None, progress: bool = True,
                          name: Optional[str] = None) -> Zoo:
    """Convert a Small CNN Zoo directory into a ``unf`` zoo at ``dst`` (PyTorch layout; resumable) and open it."""
    return load_small_cnn_zoo(src, dataset_shape).save(dst, chunk_size, progress, name)


# -- Model Zoos (Schurholt et al. 2022) --------------------------------------------------------------------------------
_RAY_BOOKKEEPING = frozenset({
    "config", "done", "timesteps_total", "episodes_total", "experiment_id", "experiment_tag", "date", "timestamp",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "timesteps_since_restore",
    "iterations_since_restore", "warmup_time", "should_checkpoint", "perf", "episode_reward_max",
    "episode_reward_min", "episode_reward_mean", "episode_len_mean", "episodes_this_iter"})
_CKPT_DIR = re.compile(r"^checkpoint_(\d+)$")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        raise ZooFormatError(f"{path}: missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ZooFormatError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ZooFormatError(f"{path}: cannot be read ({e})") from None
    if not isinstance(obj, dict):
        raise ZooFormatError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_results(path: Path) -> dict[int, dict]:
    """``result.json`` (JSON lines) -> training_iteration -> result (the last line wins if one repeats)."""
    if not path.is_file():
        raise ZooFormatError(f"{path}: missing")
    out = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ZooFormatError(f"{path}: cannot be read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZooFormatError(f"{path}: line {n} is not valid JSON (column {e.colno}: {e.msg})") from None
        if not isinstance(obj, dict):
            raise ZooFormatError(f"{path}: line {n} is not a JSON object")
        it = obj.get("training_iteration")
        if isinstance(it, bool) or not isinstance(it, (int, float)) or not float(it).is_integer():
            raise ZooFormatError(f"{path}: line {n} has no integer 'training_iteration' (found {it!r})")
        out[int(it)] = obj
    return out


def _load_checkpoint(path: Path) -> dict:
    """``torch.load(path, weights_only=True)``; anything else is refused with an error naming the file."""
    if not path.is_file():
        raise ZooFormatError(f"{path}: missing")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported by file
        msg = str(e)
        m = _UNSAFE_GLOBAL.search(msg) or _UNSAFE_GLOBAL.search(str(e.__context__ or ""))
        if m:
            raise ZooFormatError(f"{path}: refused: loading it needs unsafe unpickling (it references {m[1]}); unf "
                                 "loads checkpoints only with torch.load(weights_only=True). Re-save it as a plain "
                                 "state_dict (torch.save(model.state_dict(), ...)) from a trusted environment") \
                from None
        detail = str(e.__context__) if e.__context__ is not None and "Weights only" in msg else msg.splitlines()[0]
        raise ZooFormatError(f"{path}: cannot be read as a weights-only torch checkpoint (truncated or not a "
                             f"torch.save file; {detail[:200]})") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if isinstance(obj, Mapping):
            kind = "a dict with non-tensor values at " + str(sorted(str(k) for k, v in obj.items()
                                                                    if not isinstance(v, torch.Tensor))[:5])
        else:
            kind = type(obj).__name__
        raise ZooFormatError(f"{path}: expected a state_dict (a dict of tensors), found {kind}")
    return dict(obj)


class ModelZoos(_ZooReader):
    """A raw Model Zoos experiment directory read in place (see the module docstring for the format). Use
    :func:`load_model_zoos`; ``save(dst)`` converts it into a ``unf`` zoo."""

    def __init__(self, path: PathLike, make_model: Union[nn.Module, Callable[[], nn.Module]], example_input,
                 epochs: Optional[Iterable[int]] = None, keys: str = "auto",
                 result_keys: Optional[Sequence[str]] = None):
        from ..spec import spec_from_module

        if keys not in ("auto", "exact"):
            raise ValueError(f"keys must be 'auto' or 'exact', got {keys!r}")
        self.root = root = Path(path)
        if not root.is_dir():
            raise ZooFormatError(f"{root}: not a directory")
        self._make_model = make_model
        self.keys = keys
        module = self.new_model()
        self.spec = spec_from_module(module, example_input)
        self._shapes = [tuple(self.spec[k].shape) for k in self.spec.names]

        def is_model_dir(d: Path) -> bool:
            return (d / "params.json").is_file() or any(_CKPT_DIR.match(c.name) and c.is_dir() for c in d.iterdir())

        dirs = [root] if (root / "params.json").is_file() else \
            sorted((d for d in root.iterdir() if d.is_dir() and is_model_dir(d)), key=lambda d: d.name)
        if not dirs:
            raise ZooFormatError(f"{root}: no model directories (sub-directories with params.json and "
                                 "checkpoint_<epoch>/checkpoints)")
        wanted = None if epochs is None else {int(e) for e in epochs}
        meta, self._files = [], []
        for model_id, d in enumerate(dirs):
            params = _read_json_object(d / "params.json")
            results = _read_results(d / "result.json")
            ckpts = sorted((int(m[1]), c) for c in d.iterdir() if c.is_dir() and (m := _CKPT_DIR.match(c.name)))
            seen: dict[int, Path] = {}
            for epoch, c in ckpts:
                if epoch in seen:
                    raise ZooFormatError(f"{c}: a second checkpoint of epoch {epoch} (also {seen[epoch]})")
                seen[epoch] = c
            if not ckpts:
                raise ZooFormatError(f"{d}: no checkpoint_<epoch> directories")
            pcols = {self._column(k, ()): _cell(v) for k, v in params.items()}
            for epoch, c in ckpts:
                if wanted is not None and epoch not in wanted:
                    continue
                f = c / "checkpoints"
                if not f.is_file():
                    raise ZooFormatError(f"{f}: missing (every checkpoint_<epoch> directory holds the state_dict in "
                                         "a file named 'checkpoints')")
                row = {"model_id": str(model_id), "epoch": str(epoch), "trial": d.name, **pcols}
                res = results.get(epoch, {})
                for k, v in res.items():
                    if result_keys is not None:
                        if k not in result_keys:
                            continue
                    elif k in _RAY_BOOKKEEPING or isinstance(v, (dict, list)):
                        continue
                    row[self._column(k, params)] = _cell(v)
                if result_keys is not None:
                    for k in result_keys:
                        row.setdefault(self._column(k, params), "")
                meta.append(row)
                self._files.append(f)
        if not meta:
            raise ZooFormatError(f"{root}: no checkpoints of epochs {sorted(wanted or [])}")
        self.metadata = _complete_rows(meta)
        self._index_rows()
        self.info = {"format": "model-zoos", "name": root.name, "models": len(dirs), "rows": len(meta),
                     "epochs": None if wanted is None else sorted(wanted), "keys": keys,
                     "result_keys": None if result_keys is None else list(result_keys),
                     "input_shape": list(getattr(example_input, "shape", []))}

    @staticmethod
    def _column(key: str, params) -> str:
        if key in _RESERVED:
            return f"source.{key}"
        return f"result.{key}" if key in params else key

    def new_model(self) -> nn.Module:
        """A fresh instance of the zoo's architecture (``make_model``)."""
        m = self._make_model
        if isinstance(m, nn.Module):
            import copy

            return copy.deepcopy(m)
        module = m()
        if not isinstance(module, nn.Module):
            raise TypeError(f"make_model returned {type(module).__name__}, not an nn.Module")
        return module

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        path = self._files[i]
        sd = _load_checkpoint(path)
        names = self.spec.names
        if set(sd) == set(names):
            bad = [f"{k}: {tuple(sd[k].shape)} (expected {tuple(self.spec[k].shape)})" for k in names
                   if tuple(sd[k].shape) != tuple(self.spec[k].shape)]
            if bad:
                raise ZooFormatError(f"{path}: tensor shapes do not fit the model: {bad}")
            return {k: sd[k] for k in names}
        if self.keys == "auto" and [tuple(v.shape) for v in sd.values()] == self._shapes:
            return dict(zip(names, sd.values()))
        missing, extra = [k for k in names if k not in sd], [k for k in sd if k not in names]
        raise ZooFormatError(f"{path}: state_dict does not fit the model: missing keys {missing}, unexpected keys "
                             f"{extra}" + ("" if self.keys == "exact" else
                                          "; nor do its shapes in order match the model's"))

    def model(self, model_id, epoch) -> nn.Module:
        """The network (``make_model()`` with the checkpoint loaded), in eval mode."""
        net = self.new_model()
        net.load_state_dict(self.state_dict(model_id, epoch))
        return net.eval()


def load_model_zoos(path: PathLike, make_model: Union[nn.Module, Callable[[], nn.Module]], example_input,
                    epochs: Optional[Iterable[int]] = None, keys: str = "auto",
                    result_keys: Optional[Sequence[str]] = None) -> ModelZoos:
    """Open a raw Model Zoos experiment directory (or one model directory) in place.

    ``make_model``: the zoo's architecture (a module, or a zero-argument callable returning one); ``example_input``:
    a batch for spec inference. ``epochs``: only these checkpoints (default all). ``keys``: ``"auto"`` (exact key
    match, else by position when the shapes agree) or ``"exact"``. ``result_keys``: the ``result.json`` keys to keep
    (default: all scalars except Ray bookkeeping). Checkpoints are read with ``torch.load(weights_only=True)`` only.
    """
    return ModelZoos(path, make_model, example_input, epochs, keys, result_keys)


def convert_model_zoos(src: PathLike, dst: PathLike, make_model: Union[nn.Module, Callable[[], nn.Module]],
                       example_input, epochs: Optional[Iterable[int]] = None, keys: str = "auto",
                       result_keys: Optional[Sequence[str]] = None, chunk_size: Optional[int] = None,
                       progress: bool = True, name: Optional[str] = None) -> Zoo:
    """Convert a raw Model Zoos experiment directory into a ``unf`` zoo at ``dst`` (resumable) and open it."""
    return load_model_zoos(src, make_model, example_input, epochs, keys, result_keys).save(
        dst, chunk_size, progress, name)
