"""A symmetry rule for a module that torch.fx cannot trace, as a plugin would register it.

    python examples/spec_rule_plugin.py [--quick]

``SoftClip`` branches on its input's values, so tracing stops at it. Registered as a rule, it becomes one op whose
axes the rule states: elementwise, with a per-channel parameter on the channel (last) axis. The hidden units of the
Linear before it then stay one permutation group, with ``scale`` permuted alike. To ship the rule in a package, put
the ``register_module_rule`` call in a function and name it in your ``pyproject.toml``::

    [project.entry-points."unf.spec_rules"]
    softclip = "my_package.unf_rules:register"
"""
import argparse
import warnings

import torch
import torch.nn as nn

import unf


class SoftClip(nn.Module):
    """``scale * tanh(x / scale)`` per channel, only when the input is large (data-dependent control flow)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        if x.abs().max() > 1:
            return self.scale * torch.tanh(x / self.scale)
        return x


def soft_clip_rule(ctx, x):
    """Elementwise over ``x`` ``[..., C]``: the output has the input's axes, and ``scale`` follows the channel axis."""
    ctx.unify(ctx.param("scale").axes[0], x.axes[-1])
    return ctx.output(list(x.axes))


def main(quick: bool = False) -> None:
    width = 8 if quick else 64
    model = nn.Sequential(nn.Linear(10, width), SoftClip(width), nn.Linear(width, 3))
    x = torch.randn(32, 10) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            unf.spec_from_module(model, x)
        except unf.SpecInferenceError as e:  # without the rule: tracing stops at the branch
            print("without a rule:", str(e).splitlines()[0][:100])
    unf.register_module_rule(SoftClip)(soft_clip_rule)
    spec = unf.spec_from_module(model, x, strict=True)  # strict: any axis fixed for want of a rule would raise
    print("groups:", dict(spec.groups))
    before = model(x)
    model.load_state_dict(spec.permute(model.state_dict(), spec.sample_permutation(torch.Generator().manual_seed(0))))
    print(f"with the rule: largest output change after a random permutation: {(model(x) - before).abs().max():.2e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke test)")
    main(p.parse_args().quick)
