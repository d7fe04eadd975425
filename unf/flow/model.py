"""``WeightFlow``: a trained generator -- velocity field, standardisation, conditioning vocabulary and spec -- that
samples weight spaces, and saves to / loads from one safetensors file (no pickle).

Coordinates: every tensor is standardised by one mean and one std over all its entries in the training rows (a
scalar pair per tensor, so the map commutes with every permutation and keeps an equivariant field equivariant). The
source distribution is N(0, I) in these coordinates.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from ..io import atomic_write
from ..spec import WeightSpaceSpec
from ..weights import WeightSpace
from .solvers import integrate
from .velocity import VelocityField, build_velocity

FORMAT = "unf.flow"


class Standardizer:
    """Per-tensor scalar mean and std: ``to_std(ws)`` and ``from_std(ws)``."""

    def __init__(self, mean: Mapping[str, float], std: Mapping[str, float]):
        self.mean, self.std = dict(mean), dict(std)

    @classmethod
    def fit(cls, ws: WeightSpace) -> "Standardizer":
        mean = {n: float(t.double().mean()) for n, t in ws.items()}
        std = {n: max(float(t.double().std()), 1e-8) if t.numel() > 1 else 1.0 for n, t in ws.items()}
        return cls(mean, std)

    def to_std(self, ws: WeightSpace) -> WeightSpace:
        return WeightSpace(ws.spec, {n: (t - self.mean[n]) / self.std[n] for n, t in ws.items()}, ws.extras)

    def from_std(self, ws: WeightSpace) -> WeightSpace:
        return WeightSpace(ws.spec, {n: t * self.std[n] + self.mean[n] for n, t in ws.items()}, ws.extras)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


class Source:
    """The flow's source distribution in standardised coordinates, flat ``[B, D]``.

    ``Source()`` is N(0, I): invariant under every permutation of the spec, so an equivariant field produces every
    permutation of what it learned and must break that symmetry itself, from the noise alone. ``Source.fit(x)`` is a
    diagonal Gaussian with the per-entry mean and std of the training rows ``x`` (canonicalised first, so that
    entries correspond): its mean is a network whose hidden units are told apart, and the field only carries samples
    from near that Gaussian to the zoo. The field stays exactly equivariant: a permuted source gives the permuted
    networks."""

    def __init__(self, mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None):
        if (mean is None) != (std is None):
            raise ValueError("Source needs both mean and std, or neither")
        self.mean, self.std = mean, std

    @property
    def kind(self) -> str:
        return "normal" if self.mean is None else "gaussian"

    @classmethod
    def fit(cls, flat: torch.Tensor, floor: float = 1e-2) -> "Source":
        """Per-entry mean and std of ``flat`` ``[N, D]`` (std at least ``floor``, so no entry is frozen)."""
        flat = flat.double()
        return cls(flat.mean(0).float(), flat.std(0, unbiased=False).clamp_min(floor).float())

    def draw(self, noise: torch.Tensor) -> torch.Tensor:
        """Source samples from standard normal ``noise`` ``[B, D]``."""
        if self.mean is None:
            return noise
        return self.mean.to(noise) + self.std.to(noise) * noise


class Conditioning:
    """Metadata columns the flow is conditioned on and their values: ``encode`` rows -> ``[B, K]`` indices (0 =
    unknown). Numeric columns are binned by training-row quantiles (``bins`` edges), categorical ones by value."""

    def __init__(self, columns: Mapping[str, dict]):
        self.columns = dict(columns)  # name -> {"values": [...]} or {"edges": [...]}

    @classmethod
    def fit(cls, rows: Sequence[Mapping], names: Sequence[str], bins: int = 8) -> "Conditioning":
        cols = {}
        for name in names:
            missing = [i for i, r in enumerate(rows) if name not in r]
            if missing:
                raise ValueError(f"condition column {name!r} is missing in {len(missing)} rows (first: row "
                                 f"{missing[0]}); choose columns of the zoo's metadata")
            vals = [r[name] for r in rows]
            try:
                nums = torch.tensor([float(v) for v in vals], dtype=torch.float64)
            except ValueError:
                cols[name] = {"values": sorted({str(v) for v in vals})}
                continue
            if len(set(nums.tolist())) <= bins:
                cols[name] = {"values": sorted({str(v) for v in vals})}
            else:
                q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
                cols[name] = {"edges": sorted(set(torch.quantile(nums, q).tolist()))}
        return cls(cols)

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    @property
    def vocab(self) -> list[int]:
        return [len(c["values"]) if "values" in c else len(c["edges"]) + 1 for c in self.columns.values()]

    def index(self, name: str, value) -> int:
        """The embedding index of ``value`` in column ``name`` (1-based; 0 is "unknown")."""
        col = self.columns[name]
        if "values" in col:
            value = str(value)
            if value not in col["values"]:
                # numeric values written differently ("10" vs "10.0") still match
                for i, v in enumerate(col["values"]):
                    try:
                        if float(v) == float(value):
                            return i + 1
                    except ValueError:
                        pass
                raise ValueError(f"condition {name}={value!r}: not a value seen in training; known: "
                                 f"{', '.join(col['values'])}")
            return col["values"].index(value) + 1
        return int(torch.searchsorted(torch.tensor(col["edges"], dtype=torch.float64),
                                      torch.tensor(float(value), dtype=torch.float64), right=True)) + 1

    def encode(self, rows: Sequence[Mapping], device=None) -> Optional[torch.Tensor]:
        """``[B, K]`` long indices of the rows' values (a column absent from a row is 0, unknown)."""
        if not self.columns:
            return None
        out = [[self.index(n, r[n]) if n in r and r[n] is not None else 0 for n in self.columns] for r in rows]
        return torch.tensor(out, dtype=torch.long, device=device)


def _churn_generator(seed: int, start: int) -> torch.Generator:
    """The stochastic sampler's noise stream of the batch starting at network ``start``: independent of the source
    noise of every seed (a numpy SeedSequence of (seed, start, 1), not ``seed + something``)."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start, 1]).generate_state(1, np.uint64)[0]
                                               >> np.uint64(1)))


class WeightFlow:
    """Velocity field + standardisation + conditioning + spec; ``sample`` draws new weight spaces."""

    def __init__(self, spec: WeightSpaceSpec, velocity: VelocityField, standardizer: Standardizer,
                 conditioning: Optional[Conditioning] = None, info: Optional[dict] = None,
                 source: Optional[Source] = None):
        self.spec, self.velocity, self.standardizer = spec, velocity, standardizer
        self.conditioning = conditioning or Conditioning({})
        self.source = source or Source()
        self.info = dict(info or {})

    @torch.no_grad()
    def sample(self, num: int, nfe: int = 20, solver: str = "heun", condition: Optional[Mapping] = None,
               seed: int = 0, batch_size: int = 1000, device=None, dtype: torch.dtype = torch.float32,
               progress: bool = False, churn: float = 0.0, compile: bool = False,
               temperature: float = 1.0) -> tuple[WeightSpace, int]:
        """``num`` new weight spaces ``[num, 1]`` in the zoo's coordinates, and the velocity evaluations spent per
        batch. The source noise is drawn on the CPU from ``seed``, so a seed gives the same networks on any device
        (to float rounding). ``condition``: column -> value (unset columns are "unknown"). ``churn > 0``: stochastic
        sampling, the SDE with the flow's marginals (:mod:`unf.flow.solvers`); its noise is drawn per batch, so
        with churn a network depends on ``batch_size`` too. ``compile``: evaluate the field through ``torch.compile``
        (the same networks to float rounding; the compile, about a minute for the UNF field on a CPU, is paid at the
        first evaluation and pays off over many: :meth:`VelocityField.compile_inference`). ``temperature``: the
        source noise is scaled by it (as in diffusion models' temperature sampling; 0 gives every network the same
        start). Away from 1 the start leaves the noise the field was trained on: for the equivariant field measured
        in BENCHMARKS.md only values near 1 work."""
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature {temperature}: a finite number >= 0 (1: the source as trained)")
        device = torch.device(device) if device is not None else next(self.velocity.parameters()).device
        self.velocity.to(device).eval()
        if compile != (self.velocity._inference is not None):
            self.velocity.compile_inference(compile)
        cond_row = dict(condition or {})
        unknown = [k for k in cond_row if k not in self.conditioning.names]
        if unknown:
            raise ValueError(f"condition {unknown[0]!r}: the flow was trained on "
                             f"{self.conditioning.names or 'no conditions'}")
        gen = torch.Generator().manual_seed(seed)
        dim = sum(torch.Size(self.spec[n].shape).numel() for n in self.spec.float_names)
        noise = torch.randn(num, dim, generator=gen)  # all at once: network i does not depend on batch_size
        if temperature != 1.0:
            noise = noise * temperature
        chunks, nfe_done = [], 0
        starts = range(0, num, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch")
        for a in starts:
            b = min(batch_size, num - a)
            x0 = WeightSpace.from_flat(self.spec, self.source.draw(noise[a:a + b].to(device, dtype)))
            cond = self.conditioning.encode([cond_row] * b, device) if self.conditioning.names else None
            x1, nfe_done = integrate(lambda x, t: self.velocity(x, t, cond), x0, nfe, solver, churn,
                                     self.source.mean, self.source.std, _churn_generator(seed, a))
            chunks.append(self.standardizer.from_std(x1).to("cpu"))
        out = {n: torch.cat([c[n] for c in chunks]) for n in self.spec.float_names}
        return WeightSpace(self.spec, out), nfe_done

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> None:
        """One safetensors file: the velocity's weights; spec, velocity kind and config, standardisation,
        conditioning and ``info`` in its metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.velocity.state_dict().items()}
        if self.source.mean is not None:
            tensors.update({"source.mean": self.source.mean.cpu().contiguous(),
                            "source.std": self.source.std.cpu().contiguous()})
        meta = {"format": FORMAT, "spec": self.spec.to_json(), "velocity": self.velocity.kind,
                "config": json.dumps(self.velocity.config), "standardizer": json.dumps(self.standardizer.to_dict()),
                "conditioning": json.dumps(self.conditioning.columns), "info": json.dumps(self.info)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Union[str, Path], device=None) -> "WeightFlow":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no flow file (train one with `unf flow train`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            spec = WeightSpaceSpec.from_json(meta["spec"])
            velocity = build_velocity(meta["velocity"], spec, **json.loads(meta["config"]))
            source = Source(tensors.pop("source.mean", None), tensors.pop("source.std", None))
            velocity.load_state_dict(tensors)
            st = json.loads(meta["standardizer"])
            flow = cls(spec, velocity, Standardizer(st["mean"], st["std"]),
                       Conditioning(json.loads(meta["conditioning"])), json.loads(meta["info"]), source)
        except Exception as e:
            raise ValueError(f"{path}: not a readable flow file ({type(e).__name__}: {e})") from None
        if device is not None:
            flow.velocity.to(device)
        return flow
