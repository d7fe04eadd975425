"""The recipe ``unf flow train`` runs when the user names none: the best one measured, by architecture kind.

Chosen on the zoos' training splits (BENCHMARKS.md, "Weight generator: choices without the test split" and "part 2:
the diagnostic ladder"); the test split only reports. Today both kinds get DeepWeightFlow's flat MLP field on the
canonicalised zoo with checkpoint selection under the agreement guard: on digits-mlp its samples reach the zoo's
accuracy (0.905-0.916 against 0.882) and on digits-cnn 0.38-0.48 (zoo 0.76), where every equivariant field measured
on those zoos stays near chance. A recipe changes here, with its figures, when a field beats it.
"""
from __future__ import annotations

from ..spec import WeightSpaceSpec

RECIPES = {
    "mlp": dict(velocity="mlp", steps=1000, select_every=50),
    "cnn": dict(velocity="mlp", steps=1000, select_every=50),
}
GENERIC = dict(steps=3000, select_every=0)  # a field the user names, with no recipe measured for it


def architecture_kind(spec: WeightSpaceSpec) -> str:
    """``"cnn"`` if any weight tensor has more than two axes (a convolution's kernel), else ``"mlp"``."""
    return "cnn" if any(len(spec[n].shape) > 2 for n in spec.float_names) else "mlp"


def resolve(spec: WeightSpaceSpec, velocity: str | None = None, steps: int | None = None,
            select_every: int | None = None) -> dict:
    """Fill the settings the user left unset (``None``) from the recipe of ``spec``'s kind: the recipe's field, and
    its steps and selection when the field is the recipe's (else ``GENERIC``). Returns ``kind``, ``velocity``,
    ``steps``, ``select_every`` and ``from_recipe`` (the names taken from the recipe)."""
    kind = architecture_kind(spec)
    recipe = RECIPES[kind]
    out, taken = {"velocity": velocity, "steps": steps, "select_every": select_every}, []
    if velocity is None:
        out["velocity"] = recipe["velocity"]
        taken.append("velocity")
    fallback = recipe if out["velocity"] == recipe["velocity"] else GENERIC
    for name in ("steps", "select_every"):
        if out[name] is None:
            out[name] = fallback[name]
            taken += [name] if fallback is recipe else []
    return {"kind": kind, **out, "from_recipe": taken}


__all__ = ["GENERIC", "RECIPES", "architecture_kind", "resolve"]
