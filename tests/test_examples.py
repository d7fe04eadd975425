"""Every script in examples/ runs end to end in its reduced mode (``--quick``) and prints its result."""
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECT = {"spec_of_your_model.py": "largest output change after a random permutation",
          "equivariant_layer.py": "output change under a permutation",
          "predict_on_a_zoo.py": "statnn: Kendall tau",
          "learned_optimizer.py": "cosine-annealed lr",
          "flow_sampling.py": "sampled networks",
          "merging.py": "ties: lambda",
          "spec_rule_plugin.py": "with the rule: largest output change"}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "models.py") == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example_runs_quick(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--quick"])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert EXPECT[name] in capsys.readouterr().out
