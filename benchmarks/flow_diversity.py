"""Accuracy against diversity of generated networks and baselines, from committed ``flow_eval.py`` results.

    python benchmarks/flow_diversity.py --panel digits-mlp benchmarks/results/flow_mlp_euler16-s{0,1,2}.jsonl \
        --panel digits-cnn benchmarks/results/flow_cnn_euler16-s{0,1,2}.jsonl --out benchmarks/results/flow_diversity.png

Reads the ``"kind": "set"`` lines (each a set of networks: the held-out zoo, a generated set, a baseline) and plots
mean test accuracy against the median *agreement* (the fraction of probe inputs on which two networks of the set
predict the same class, median over pairs): up is accurate, left is diverse. Independently trained networks (the
held-out zoo) mark where a generator should be; noisy copies of the best training networks (memorisers, one curve
per k, noise growing along it) and Gaussians mark what is cheap. Runs nothing; prints the points as a table.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _sets(files: list[str]) -> list[dict]:
    rows = []
    for f in files:
        for line in Path(f).read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "set" and r.get("agreement"):
                rows.append({"file": Path(f).stem, "name": r["name"], "acc": r["accuracy"]["mean"],
                             "agreement": r["agreement"]["q50"]})
    return rows


def _style(name: str):
    if name == "heldout":
        return "held-out zoo (independent networks)", dict(marker="*", s=220, color="black", zorder=5)
    if name.startswith("memoriser"):
        return None, None  # drawn as curves
    if name.startswith("gaussian"):
        return name, dict(marker="x", s=60, color="grey")
    if name == "interpolation":
        return "interpolations of aligned pairs", dict(marker="D", s=40, color="tab:brown")
    return f"generated: {name}", dict(marker="o", s=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--panel", nargs="+", action="append", required=True, metavar=("TITLE", "FILE"),
                    help="a panel title and the flow_eval.py results files drawn in it")
    ap.add_argument("--out", default="benchmarks/results/flow_diversity.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.panel), figsize=(6.5 * len(args.panel), 5.2), squeeze=False)
    print("| panel | results file | set | mean test accuracy | agreement (median) |")
    print("|---|---|---|---|---|")
    for ax, (title, *files) in zip(axes[0], args.panel):
        rows = _sets(files)
        for r in rows:
            print(f"| {title} | {r['file']} | {r['name']} | {r['acc']:.3f} | {r['agreement']:.3f} |")
        curves: dict[str, list] = {}
        for r in rows:
            m = re.match(r"memoriser k=(\d+) sigma=([\d.]+)", r["name"])
            if m:
                curves.setdefault(m.group(1), []).append((float(m.group(2)), r["agreement"], r["acc"]))
        for i, (k, pts) in enumerate(sorted(curves.items(), key=lambda kv: int(kv[0]))):
            pts = sorted(set(pts))  # the seeds' files hold the same memorisers of one zoo: drawn once per point
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "-", color=f"C{i + 4}", alpha=0.6,
                    label=f"memorisers: best {k} training nets + noise" if files else None)
        seen = set()
        for r in rows:
            label, style = _style(r["name"])
            if style is None:
                continue
            ax.scatter(r["agreement"], r["acc"], label=None if label in seen else label, **style)
            seen.add(label)
        ax.set_xlabel("agreement of the set's networks (median over pairs; lower = more diverse)")
        ax.set_ylabel("mean test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
