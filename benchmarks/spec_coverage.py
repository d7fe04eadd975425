"""One coverage table of inferred specs across torchvision, timm and Hugging Face transformers (issue 14, item 5).

    python benchmarks/spec_coverage.py [--libraries torchvision,timm,transformers] [--models levit_128s,gpt2-lm]
                                       [--full-size] [--out benchmarks/results/spec_coverage.jsonl]

Per model: parameters, the group count derived by hand (``-`` where a spec cannot express the whole symmetry, named
in the note), groups found, fully fixed tensors, UnprovenSymmetryWarnings, soundness (worst relative output change
over three sampled permutations, float64, eval mode), spec time (wall and CPU seconds of this process, one call, after
a first call in the process has paid torch's one-time set-up), and whether ``UNFLinear(spec, 1, 1)`` builds and runs
one forward on the model's weights (models up to 5M parameters, default ``fold_max``).

Random weights from each library's own constructor, nothing downloaded; parameters a constructor sets to zero
(classifier heads, residual scales) get small random values, so that no output is constant. The torchvision and transformers models and
their hand counts are those of ``torchvision_specs.py`` and ``transformers_specs.py``; the timm models are listed here
(hand counts derived as in ``plugins/unf-timm/tests``). Needs the plugins installed (``make install``). A summary line
at the end counts sound, maximal and <= 2 s models. Each row is appended to ``--out`` as a JSON line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import unf
from unf.spec.registry import load_plugins

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl  # noqa: E402
from timing import code_version, provenance, timed_spec, unf_linear_runs as unf_runs  # noqa: E402

UNF_MAX_PARAMS = 5_000_000

# timm name: (constructor overrides, input size, hand count, how the count is made)
TIMM = {
    "levit_128s": (dict(img_size=64), 64, 181, "stem 4; 2 per head (Q/K, V) over 82 heads; 11 MLP; 2 streams"),
    "levit_conv_128s": (dict(img_size=64), 64, 181, "as levit_128s, 1x1 convolutions"),
    "resnet18": ({}, 64, 12, "stem; 2 per stage; 3 new streams"),
    "convnext_atto": ({}, 64, 16, "12 MLP widths, 4 streams"),
    "vit_tiny_patch16_224": (dict(img_size=64), 64, 49, "stream + 12 x (heads, Q/K, V, MLP)"),
    "deit_tiny_distilled_patch16_224": (dict(img_size=64), 64, 49, "as ViT; two heads"),
    "swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=4), 64, 52, "12 x 4 + 4 streams"),
    "efficientnet_b0": ({}, 64, 40, "as torchvision's"),
    "mobilenetv3_small_050": ({}, 64, 26, "stem; 10 expanded, 9 SE; 4 streams; 2 head convs"),
    "regnetx_002": ({}, 64, 44, "stem; 13 x (groups, in, out) + 4 streams"),
    "mixer_s16_224": (dict(img_size=64), 64, 17, "stream + 8 x (token, channel MLP)"),
    "resmlp_12_224": (dict(img_size=64), 64, 13, "stream + 12 MLP widths"),
    "poolformer_s12": ({}, 64, 16, "12 MLP widths, 4 streams"),
    "pvt_v2_b0": ({}, 64, 40, "stage 1 has 1 head; spatial-reduction conv widths"),
}


def _timm_build(name: str):
    import timm

    kwargs, size, _, _ = TIMM[name]
    model = timm.create_model(name, pretrained=False, **kwargs).double().eval()
    return model, torch.randn(1, 3, size, size, dtype=torch.float64)


def cases(libraries: list[str]):
    """``(library, name, build, hand, note, soundness)`` per model; ``build()`` gives ``(model, input)``."""
    out = []
    if "torchvision" in libraries:
        import torchvision_specs as tv

        for name in tv.MODELS:
            out.append(("torchvision", name, lambda name=name: tv.build(name), tv.HAND.get(name), "",
                        tv.soundness))
    if "timm" in libraries:
        for name, (_, _, hand, note) in TIMM.items():
            out.append(("timm", name, lambda name=name: _timm_build(name), hand, note,
                        lambda m, s, x: unf.spec.symmetry_error(m, s, x, num_permutations=3)))
    if "transformers" in libraries:
        import transformers_specs as hf

        for name, (ctor, kind, hand, note) in hf.MODELS.items():
            out.append(("transformers", name,
                        lambda ctor=ctor, kind=kind: (ctor().double().eval(), hf._inputs(kind)), hand, note,
                        hf.soundness))
    return out


def full_size_cases():
    """BERT-base and GPT-2 small at full size (float64 as the rest, input ids 1x16; hand count 1 + 4 x 12 = 49
    each)."""
    import transformers as tr
    import transformers_specs as hf

    ids = lambda: torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))  # noqa: E731
    return [("transformers", "bert-base-full", lambda: (tr.BertForMaskedLM(tr.BertConfig()).double().eval(), ids()),
             49, "full size", hf.soundness),
            ("transformers", "gpt2-small-full", lambda: (tr.GPT2LMHeadModel(tr.GPT2Config()).double().eval(), ids()),
             49, "full size", hf.soundness)]


@torch.no_grad()
def nonzero_init(model) -> None:
    """Give parameters that their constructor sets to zero (classifier heads of torchvision's ViT, timm's Mixer and
    ResMLP, zero-init residual scales) small random values: with a zero head the output is constant and the soundness
    check would be vacuous. The spec does not depend on the values."""
    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 1 and not p.any():
            p.normal_(0, 0.02)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--libraries", default="torchvision,timm,transformers")
    ap.add_argument("--models", default="", help="comma-separated names (default: all of the libraries)")
    ap.add_argument("--full-size", action="store_true", help="add BERT-base and GPT-2 small at full size")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "spec_coverage.jsonl"))
    args = ap.parse_args()
    plugins = load_plugins()
    todo = cases(args.libraries.split(",")) + (full_size_cases() if args.full_size else [])
    if args.models:
        keep = set(args.models.split(","))
        todo = [c for c in todo if c[1] in keep]
    stamp = {**provenance(), "code": code_version(), "plugins": sorted(plugins)}
    print(f"{stamp['date']}, {stamp['machine']}, torch {stamp['torch']}, plugins {plugins or 'none'}, "
          f"{torch.get_num_threads()} thread(s), float64, eval")
    # the first call in a process pays torch's one-time fake-tensor set-up: pay it here, outside the table
    unf.spec_from_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2))
    print("| library | model | params | hand | groups | fully fixed tensors | warnings | sound | spec s (CPU s) "
          "| UNFLinear | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for lib, name, build, hand, note, sound_fn in todo:
        torch.manual_seed(0)
        model, x = build()
        nonzero_init(model)
        params = sum(p.numel() for p in model.parameters())
        cpu = time.process_time()
        spec, wall, n_warn, fixed = timed_spec(model, x)
        cpu = time.process_time() - cpu
        err = sound_fn(model, spec, x)
        runs = unf_runs(model, spec) if params <= UNF_MAX_PARAMS else "n/a (> 5M)"
        row = dict(stamp, library=lib, model=name, params=params, hand=hand, groups=len(spec.groups),
                   fixed=fixed, tensors=len(spec), warnings=n_warn, sound=err, spec_s=wall, spec_cpu_s=cpu,
                   unf_linear=runs, note=note)
        append_jsonl(Path(args.out), row)
        rows.append(row)
        print(f"| {lib} | {name} | {params / 1e6:.2f}M | {hand if hand is not None else '-'} | {len(spec.groups)} "
              f"| {fixed} of {len(spec)} | {n_warn} | {err:.1e} | {wall:.2f} ({cpu:.2f}) | {runs} | {note} |",
              flush=True)
    counted = [r for r in rows if r["hand"] is not None]
    maximal = sum(r["groups"] == r["hand"] for r in counted)
    print(f"\n{len(rows)} models; sound (<= 1e-6): {sum(r['sound'] <= 1e-6 for r in rows)}; maximal: {maximal} of "
          f"{len(counted)} with a hand count ({100 * maximal / max(len(counted), 1):.0f}%); spec <= 2 s wall: "
          f"{sum(r['spec_s'] <= 2 for r in rows)}, CPU: {sum(r['spec_cpu_s'] <= 2 for r in rows)}; UNFLinear runs: "
          f"{sum(r['unf_linear'] == 'yes' for r in rows)} of {sum(r['params'] <= UNF_MAX_PARAMS for r in rows)} "
          f"up to 5M parameters")


if __name__ == "__main__":
    main()
