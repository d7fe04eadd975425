"""Property prediction on the built-in zoos: every predictor x zoo x seed, then a mean +- std table and a figure.

    python benchmarks/zoo_prediction.py --root zoos                # builds missing zoos, fits, prints the table
    python benchmarks/zoo_prediction.py --root zoos --table-only   # table and figure from the results file
    python benchmarks/zoo_prediction.py --table-only --results benchmarks/results/zoo_prediction.jsonl

Each (zoo, predictor, seed) result is appended to ``ROOT/prediction_results.jsonl`` as soon as it is done, so an
interrupted run resumes where it stopped; results of another target, epoch count or clipping are kept but neither
reused nor tabulated (``--results`` names another results file). The table is mean +- sample std over seeds. Zoos
are built when missing (``unf.zoo.build_builtin`` refuses a directory built on another hyperparameter grid). The
split is by run and seeded by the seed; the predictor's epoch is chosen on the validation split; metrics are on the
test split (``unf.zoo.fit_predictor``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch

from unf.io import atomic_write
from unf.zoo import build_builtin, fit_predictor

METRICS = ("kendall_tau", "r2", "mae")


def load_results(path: str) -> list[dict]:
    """Complete result lines of ``path``; a line torn by an interruption is skipped (and its cell re-run)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}: skipping an incomplete line")
    return out


def append_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        else:
            torn = False
        f.write((("\n" if torn else "") + json.dumps(result) + "\n").encode())


def manifest_sha256(zoo_dir: str) -> str:
    """The zoo's identity: its manifest lists every shard's SHA-256."""
    with open(os.path.join(zoo_dir, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def protocol(r: dict) -> tuple:
    """Results are comparable, and a cell counts as done, only under the same target, epochs and clipping."""
    return r["target"], r["epochs"], r.get("clip")


def sample_std(values: list) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def table(results: list[dict]) -> str:
    lines = ["| zoo | predictor | Kendall tau | R^2 | MAE | seeds | s / fit |", "|---|---|---|---|---|---|---|"]
    cells = {}
    for r in results:
        cells.setdefault((r["zoo"], r["model"]), []).append(r)
    for (zoo, model), rs in sorted(cells.items()):
        stats = [f"{np.mean([r[m] for r in rs]):.3f} +- {sample_std([r[m] for r in rs]):.3f}" for m in METRICS]
        secs = np.mean([r["seconds"] for r in rs])
        lines.append(f"| {zoo} | {model} | {' | '.join(stats)} | {len(rs)} | {secs:.0f} |")
    return "\n".join(lines)


def figure(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoos = sorted({r["zoo"] for r in results})
    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(zoos), figsize=(4.5 * len(zoos), 3.4), squeeze=False)
    for ax, zoo in zip(axes[0], zoos):
        taus = [[r["kendall_tau"] for r in results if r["zoo"] == zoo and r["model"] == m] for m in models]
        ax.bar(models, [np.mean(t) if t else np.nan for t in taus],
               yerr=[sample_std(t) for t in taus], capsize=4, color="tab:blue")
        seen = [v for t in taus for v in t if np.isfinite(v)]
        if seen:  # zoom in on the bars: the differences are a few hundredths
            ax.set_ylim(max(0.0, min(seen) - 0.05), min(1.0, max(seen) + 0.03))
        ax.set_title(zoo)
        ax.set_ylabel("Kendall tau, test split (axis zoomed)")
    fig.suptitle("Predicting test accuracy from weights (mean +- sample std over seeds)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="zoos", help="directory holding the built-in zoos (built when missing)")
    ap.add_argument("--zoos", nargs="+", default=["digits-cnn", "digits-mlp"])
    ap.add_argument("--models", nargs="+", default=["statnn", "deepsets", "unf", "gmn"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--target", default="test_acc")
    ap.add_argument("--clip", type=float, default=10.0, help="clip normalised weights at +-CLIP robust stds")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--results", default=None, help="results file (default ROOT/prediction_results.jsonl)")
    ap.add_argument("--figure", default="benchmarks/figures/zoo_prediction.png")
    args = ap.parse_args()

    path = args.results or os.path.join(args.root, "prediction_results.jsonl")
    want = (args.target, args.epochs, args.clip)
    results = [r for r in load_results(path) if protocol(r) == want]
    if not args.table_only:
        done = {(r["zoo"], r["model"], r["seed"]) for r in results}
        for zoo_name in args.zoos:
            zoo_dir = os.path.join(args.root, zoo_name)
            zoo = build_builtin(zoo_name, zoo_dir)  # resumes or no-ops when complete
            for model in args.models:
                for seed in args.seeds:
                    if (zoo_name, model, seed) in done:
                        continue
                    t0 = time.perf_counter()
                    r = fit_predictor(zoo, model, args.target, seed=seed, epochs=args.epochs, clip=args.clip,
                                      progress=True)
                    r.update(zoo=zoo_name, seconds=time.perf_counter() - t0, threads=torch.get_num_threads(),
                             torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                             manifest_sha256=manifest_sha256(zoo_dir))
                    print(json.dumps(r))
                    append_result(path, r)
                    results.append(r)
    print(table(results))
    if results:
        figure(results, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
