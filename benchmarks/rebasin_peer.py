"""Speed peer: weight matching with the PyPI package ``rebasin`` (snimu's Git Re-Basin, traced with ``torchview``).

    python benchmarks/rebasin_peer.py [--repeats 3] [--cases resnet20x4 ...] [--json out.json]
        [--out benchmarks/results/rebasin_peer.jsonl]

Install without touching the installed torch (every package with ``--no-deps``)::

    pip install --no-deps rebasin==0.0.47 torchview==0.2.7 graphviz==0.21 tqdm==4.70.1

(numpy and scipy, its other requirements, are already here.)

What is timed (one untimed warm-up run, then the median over ``repeats`` runs, each on a fresh copy of ``model_b``, same RNG seed each time so every
repeat does the same work):

* ``construct_s``: ``PermutationCoordinateDescent(model_a, model_b, input_data_b=x)``. This traces both models with
  torchview, builds rebasin's path graph and ties permutations together (``enforce_identity``).
* ``match_s``: ``pcd.calculate_permutations(max_iterations)``, the coordinate descent (cost matrices and
  ``scipy.optimize.linear_sum_assignment``).
* ``apply_s``: ``pcd.apply_permutations()``, which permutes ``model_b`` in place.
* ``total_s``: the sum of the three, i.e. construction + ``pcd.rebasin()``.

Also reported: how many permutations rebasin found (and their sizes), how many coordinate-descent sweeps it ran,
how many cost terms its permutation lists hold against how many distinct (parameter, axis) pairs they name,
whether ``model_b`` computes the same function after matching (max abs output difference, eval and train mode),
and how much the parameter distance ``||theta_a - theta_b||`` went down.

Notes found reading rebasin 0.0.47:

* ``OneDimModule`` (used for BatchNorm) permutes ``weight`` and ``bias`` but not ``running_mean``/``running_var``,
  so in eval mode the function is only kept while the running statistics are the fresh-init 0/1 (rebasin expects
  you to call ``rebasin.utils.recalculate_batch_norms`` afterwards). The ``bn_randomized`` case shows this.
* A permutation is only carried across a module boundary when the producer's output shape equals the consumer's
  input shape, so a permutation cannot cross pooling/flatten/reshape/concat: the last ResNet stage's residual stream
  (feeding ``avg_pool -> flatten -> head``) stays unpermuted; in the ViT only the MLP hidden units are matched (no
  residual stream, no attention heads, no QKV), even with ``nn.MultiheadAttention``.
* ``LinearPath/ParallelPaths/PathSequence.permutation_to_info`` extend a list with itself, so the same cost term is
  summed several times (reported as ``cost_terms`` vs ``distinct_cost_terms``); that property is also rebuilt for
  every permutation visited in every sweep.

The unf side (``unf.align.weight_matching(spec, ref_sd, other_sd)``) is not timed here; ``make_case`` gives the
model pairs and input to time it on.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from results_io import append_jsonl  # noqa: E402
from timing import code_version, provenance  # noqa: E402

try:
    import rebasin  # noqa: F401
    from rebasin import PermutationCoordinateDescent
    _REBASIN_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a broken torchview/graphviz install
    PermutationCoordinateDescent = None  # type: ignore[assignment,misc]
    _REBASIN_ERROR = exc


def rebasin_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("rebasin")
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------- models

def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics, as a trained net has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


CASES: dict[str, Callable[[], nn.Module]] = {
    "resnet20x4": lambda: models.resnet20(width=64),
    "resnet20x4_bn_randomized": lambda: models.resnet20(width=64),
    "vit_d2_w64_h4": lambda: models.vit(depth=2, dim=64, heads=4),
    "vit_d2_w64_h4_torch_mha": lambda: models.vit(depth=2, dim=64, heads=4, torch_attention=True),
}


def make_case(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Two independently initialised models (seeds 0 and 1) and an input ``torch.randn(1, 3, 32, 32)`` (seed 2)."""
    torch.manual_seed(0)
    model_a = CASES[name]()
    torch.manual_seed(1)
    model_b = CASES[name]()
    if name.endswith("_bn_randomized"):
        randomize_batchnorm(model_a, 10)
        randomize_batchnorm(model_b, 11)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32)
    return model_a.eval(), model_b.eval(), x


# --------------------------------------------------------------------------------------------------------- helpers

def param_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """``||theta_a - theta_b||_2`` over all parameters (buffers excluded)."""
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    return float(torch.sqrt(sum(((pa[k].detach() - pb[k].detach()) ** 2).sum() for k in pa)))


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"eval": copy.deepcopy(model).eval()(x)}
    train_model = copy.deepcopy(model).train()  # batch statistics; the copy keeps running stats of `model` untouched
    out["train"] = train_model(x)
    return out


def time_rebasin(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, repeats: int = 3,
                 max_iterations: int = 100, seed: int = 0, no_grad: bool = False) -> dict:
    """Time rebasin's weight matching of ``model_b`` onto ``model_a`` (``model_b`` itself is left untouched).

    One untimed warm-up run first (its total is reported as ``cold_total_s``; the first run in a process was
    sometimes 20x slower, its time going to tensor ``clone``/``reshape`` in rebasin's per-term ``deepcopy``), then
    ``repeats`` timed runs. On a shared machine, time unf and rebasin in the same process, back to back.
    Returns median seconds (``construct_s``, ``match_s``, ``apply_s``, ``total_s``), the permutations found and
    checks of the result of the last repeat (function preserved, distance reduction). ``no_grad=True`` runs rebasin
    under ``torch.no_grad()`` (its documented usage does not; with grad on it records autograd graphs it never uses).
    """
    if PermutationCoordinateDescent is None:
        raise RuntimeError(f"rebasin is not importable: {_REBASIN_ERROR!r}")
    model_a.eval()
    model_b.eval()
    ref_out = _outputs(model_b, x)
    dist_before = param_distance(model_a, model_b)

    times: dict[str, list[float]] = {"construct_s": [], "match_s": [], "apply_s": [], "total_s": []}
    pcd = b = None
    sweeps = 0
    cold = None
    for rep in range(repeats + 1):
        b = copy.deepcopy(model_b)
        torch.manual_seed(seed)  # rebasin visits the permutations in torch.randperm order
        with torch.no_grad() if no_grad else torch.enable_grad():
            t0 = time.perf_counter()
            pcd = PermutationCoordinateDescent(model_a, b, input_data_b=x)
            t1 = time.perf_counter()

            counter = [0]
            step = pcd._calculate_permutations_step

            def counted_step(loop, _step=step, _counter=counter):
                _counter[0] += 1
                return _step(loop)

            pcd._calculate_permutations_step = counted_step  # instance attribute shadows the method: counts sweeps
            pcd.calculate_permutations(max_iterations)
            t2 = time.perf_counter()
            pcd.apply_permutations()
            t3 = time.perf_counter()
        sweeps = counter[0]
        if rep == 0:
            cold = t3 - t0
            continue
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            times[k].append(v)

    perm_to_info = pcd.pinit.model_graph.permutation_to_info
    sizes = [len(p.perm_indices) for p, _ in perm_to_info]
    non_identity = sum(int(not torch.equal(p.perm_indices.cpu(), torch.arange(len(p.perm_indices))))
                       for p, _ in perm_to_info)
    cost_terms = sum(len(infos) for _, infos in perm_to_info)
    distinct_terms = sum(len({(id(i.parameter_b), i.axis) for i in infos}) for _, infos in perm_to_info)

    new_out = _outputs(b, x)
    dist_after = param_distance(model_a, b)
    result = {k: statistics.median(v) for k, v in times.items()}
    result.update({
        "cold_total_s": cold,
        "repeats": repeats,
        "no_grad": no_grad,
        "n_permutations": len(sizes),
        "permutation_sizes": sizes,
        "n_non_identity": non_identity,
        "sweeps": sweeps,
        "cost_terms": cost_terms,
        "distinct_cost_terms": distinct_terms,
        "max_abs_diff_eval": float((new_out["eval"] - ref_out["eval"]).abs().max()),
        "max_abs_diff_train": float((new_out["train"] - ref_out["train"]).abs().max()),
        "output_scale": float(ref_out["eval"].abs().max()),
        "dist_before": dist_before,
        "dist_after": dist_after,
        "dist_reduction": 1.0 - dist_after / dist_before if dist_before > 0 else 0.0,
    })
    return result


def time_unf(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, repeats: int = 3) -> dict:
    """The same measurement for ``unf``: spec inference + ``unf.align.weight_matching`` + applying the permutation."""
    import unf

    def once():
        t0 = time.perf_counter()
        spec = unf.spec_from_module(model_a, x)
        t1 = time.perf_counter()
        perm = unf.align.weight_matching(spec, model_a.state_dict(), model_b.state_dict())
        t2 = time.perf_counter()
        aligned = copy.deepcopy(model_b)
        aligned.load_state_dict(spec.permute(model_b.state_dict(), perm))
        return spec, aligned, (t1 - t0, t2 - t1, time.perf_counter() - t2)

    t0 = time.perf_counter()
    once()
    cold = time.perf_counter() - t0
    runs = [once() for _ in range(repeats)]
    spec, aligned, _ = runs[-1]
    med = [statistics.median(r[2][i] for r in runs) for i in range(3)]
    before, after = _outputs(model_b, x), _outputs(aligned, x)
    return {"construct_s": med[0], "match_s": med[1], "apply_s": med[2], "total_s": sum(med), "cold_total_s": cold,
            "n_groups": len(spec.groups), "group_sizes": sorted(spec.groups.values()),
            "max_abs_diff_eval": float((before["eval"] - after["eval"]).abs().max()),
            "max_abs_diff_train": float((before["train"] - after["train"]).abs().max()),
            "dist_before": param_distance(model_a, model_b), "dist_after": param_distance(model_a, aligned)}


def run_case(name: str, repeats: int = 3, no_grad: bool = False) -> dict:
    """``time_rebasin`` on one entry of ``CASES``; an exception inside rebasin is recorded, not raised."""
    model_a, model_b, x = make_case(name)
    n_params = sum(p.numel() for p in model_a.parameters())
    try:
        res = time_rebasin(model_a, model_b, x, repeats=repeats, no_grad=no_grad)
        res["status"] = "ok" if res["n_permutations"] > 0 else "no permutations found"
    except Exception as exc:
        res = {"status": f"error: {type(exc).__name__}: {exc}"}
    return {"case": name, "n_params": n_params, **res}


def _fmt(r: dict) -> str:
    head = f"{r['case']:<26} params={r['n_params']:>9,d}  "
    if "total_s" not in r:
        return head + r["status"]
    return (head
            + f"total {r['total_s']:.3f}s (construct {r['construct_s']:.3f} + match {r['match_s']:.3f}"
            + f" + apply {r['apply_s']:.4f})  first run {r['cold_total_s']:.3f}s  sweeps={r['sweeps']}\n"
            + f"{'':<28}perms={r['n_permutations']} sizes={r['permutation_sizes']}"
            + f" non-identity={r['n_non_identity']}  cost terms {r['cost_terms']}"
            + f" (distinct {r['distinct_cost_terms']})\n"
            + f"{'':<28}max|dy| eval={r['max_abs_diff_eval']:.2e} train={r['max_abs_diff_train']:.2e}"
            + f" (|y|max {r['output_scale']:.2f})  ||a-b|| {r['dist_before']:.3f} -> {r['dist_after']:.3f}"
            + f" (-{100 * r['dist_reduction']:.2f}%)  [{r['status']}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-grad", action="store_true", help="run rebasin under torch.no_grad()")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rebasin_peer.jsonl"),
                        help="append one JSON line per case (both libraries, their ratio, provenance) here")
    args = parser.parse_args(argv)

    if PermutationCoordinateDescent is None:
        print(f"rebasin is not importable ({_REBASIN_ERROR!r}); skipping the rebasin peer benchmark.\n"
              "Install it without touching torch: pip install --no-deps rebasin==0.0.47 torchview==0.2.7 "
              "graphviz==0.21 tqdm==4.70.1")
        return 0

    print(f"rebasin {rebasin_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}"
          f"  repeats {args.repeats} (median, after 1 warm-up)  no_grad={args.no_grad}")
    results = []
    for name in args.cases:
        r = run_case(name, args.repeats, args.no_grad)
        results.append(r)
        print(_fmt(r), flush=True)
        u = time_unf(*make_case(name), repeats=args.repeats)
        results.append({"case": name, "library": "unf", **u})
        append_jsonl(args.out, {**provenance(), "code": code_version(), "threads": torch.get_num_threads(),
                                "case": name, "repeats": args.repeats, "rebasin_version": rebasin_version(),
                                "rebasin": r, "unf": u,
                                "unf_over_rebasin": u["total_s"] / r["total_s"] if "total_s" in r else None})
        print(f"{'  unf':<28}total {u['total_s']:.3f}s (spec {u['construct_s']:.3f} + match {u['match_s']:.3f} + "
              f"apply {u['apply_s']:.4f})  first run {u['cold_total_s']:.3f}s  groups={u['n_groups']} "
              f"sizes={u['group_sizes']}\n{'':<28}max|dy| eval={u['max_abs_diff_eval']:.2e} "
              f"train={u['max_abs_diff_train']:.2e}  ||a-b|| {u['dist_before']:.3f} -> {u['dist_after']:.3f}  "
              f"ratio unf/rebasin {u['total_s'] / r['total_s']:.2f}" if "total_s" in r else "", flush=True)
    if args.json is not None:
        from unf.io import atomic_write

        text = json.dumps(results, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
