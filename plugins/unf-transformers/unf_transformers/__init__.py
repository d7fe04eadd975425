"""The unf-transformers plugin: symmetry specs of Hugging Face ``transformers`` models with one call,
``unf.spec_from_module(model, input_ids)``.

Hugging Face forwards (shape-dependent mask code, ``**kwargs``, caches) defeat torch.fx's symbolic trace, so this
plugin registers a *front end* for ``transformers.PreTrainedModel`` (:mod:`unf_transformers.frontend`): the model is
run once on the example inputs under ``make_fx`` (a dispatcher-level trace; Python control flow runs for real) and
inference walks the resulting graph of ATen ops, for which :mod:`unf_transformers.aten` registers rules (mostly the
core's own rules, adapted to ATen signatures). No rule is written per model class or per building block: attention
heads, grouped-query attention, rotary embeddings, RMSNorm/LayerNorm, gated MLPs, tied and positional embeddings
come out of the ops they are made of.
"""
from __future__ import annotations

from . import aten, frontend


def register() -> None:
    """Entry point (group ``unf.spec_rules``): register the front end and the ATen rules."""
    aten.register()
    frontend.register()
