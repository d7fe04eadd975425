"""``unf flow train`` with no recipe flags runs the recipe measured best for the zoo's architecture kind."""
import pytest
import torch

from unf.flow.recipe import GENERIC, RECIPES, architecture_kind, resolve
from unf.spec import spec_from_module
from unf.zoo.builtin import cnn, mlp


@pytest.fixture(scope="module")
def specs():
    x = torch.randn(2, 64)
    return {"mlp": spec_from_module(mlp(), x), "cnn": spec_from_module(cnn(), x)}


def test_the_kind_is_read_from_the_spec(specs):
    assert architecture_kind(specs["mlp"]) == "mlp" and architecture_kind(specs["cnn"]) == "cnn"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_unset_settings_come_from_the_kinds_recipe_and_set_ones_win(specs, kind):
    r = resolve(specs[kind])
    assert r["kind"] == kind and r["from_recipe"] == ["velocity", "steps", "select_every"]
    assert {k: r[k] for k in ("velocity", "steps", "select_every")} == RECIPES[kind]
    r = resolve(specs[kind], steps=7, select_every=0)
    assert (r["velocity"], r["steps"], r["select_every"], r["from_recipe"]) == (RECIPES[kind]["velocity"], 7, 0,
                                                                               ["velocity"])
    other = "unf" if RECIPES[kind]["velocity"] == "mlp" else "mlp"  # a field the recipe is not for: generic settings
    r = resolve(specs[kind], velocity=other)
    assert (r["steps"], r["select_every"], r["from_recipe"]) == (GENERIC["steps"], GENERIC["select_every"], [])
