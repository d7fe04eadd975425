"""Merge protection on digits: a pretrained MLP backbone, two experts fine-tuned on disjoint class subsets (0-4 and
5-9), merged by task arithmetic; expert A unprotected, protected, and attacked (unf.merge.unprotect).

    OMP_NUM_THREADS=1 python benchmarks/merge_protect.py --seeds 0 1 2 3 4

Splits (per seed, carved from the training split of unf.data.load("digits-flat", seed=0)): 50% pretraining pool
(all classes, a short pretraining), 15% validation (chooses lambda for the unprotected merge; that lambda is used for every variant), 35%
fine-tuning pool, divided by class into task A (0-4) and task B (5-9). The test split is only reported.
Writes benchmarks/results/merge_protect.jsonl (one object per seed, with the date, machine and torch version) and
merge_protect.png; with --from-results, only reads the JSON lines and prints the summary and the table (mean +-
sample std) and redraws the figure.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's unf, not an installed one
import unf  # noqa: E402
from unf.merge import TaskVector, align_then_merge, merge, protect, unprotect  # noqa: E402
from unf.spec import homogeneous_groups  # noqa: E402
from unf.training import train_classifier  # noqa: E402
from timing import provenance  # noqa: E402  (benchmarks/timing.py)

RESULTS = Path(__file__).resolve().parent / "results"
PRETRAIN_EPOCHS = 3
LAMS = [round(0.1 * i, 1) for i in range(0, 16)]


def mlp(hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def carve(n: int, fractions, seed: int):
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(f * n) for f in fractions])[:-1]
    return [torch.as_tensor(p) for p in np.split(perm, cuts)]


@torch.no_grad()
def task_accs(model: nn.Module, sd, x, y) -> dict:
    m = copy.deepcopy(model)
    m.load_state_dict(sd)
    m.eval()
    pred = m(x).argmax(1)
    a, b = y < 5, y >= 5
    return {"task_a": float((pred[a] == y[a]).float().mean()), "task_b": float((pred[b] == y[b]).float().mean()),
            "all": float((pred == y).float().mean())}


def run(seed: int) -> dict:
    split = unf.data.load("digits-flat", seed=0)
    pre, val, ft = carve(len(split.y_train), [0.5, 0.15, 0.35], seed)
    x, y = split.x_train, split.y_train
    torch.manual_seed(seed)
    # a generalist backbone, briefly trained on all classes: the experts improve on it, so merging matters
    base_model = train_classifier(mlp(), x[pre], y[pre], epochs=PRETRAIN_EPOCHS, lr=1e-3, seed=seed)
    spec = unf.spec_from_module(base_model, x[:2])
    hom = homogeneous_groups(base_model, x[:2], spec)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    experts = {}
    for name, mask in (("a", y[ft] < 5), ("b", y[ft] >= 5)):
        idx = ft[mask]
        experts[name] = train_classifier(copy.deepcopy(base_model), x[idx], y[idx], epochs=30, lr=1e-3,
                                         seed=seed + 100)
    ea, eb = experts["a"].state_dict(), experts["b"].state_dict()
    prot = protect(experts["a"], x[:64], seed=seed, spec=spec)
    prot_perm = protect(experts["a"], x[:64], seed=seed, spec=spec, scale=None, mix=None)
    variants = {
        "unprotected": ea,
        "protected": prot,
        "attack_full": unprotect(prot, base, spec, homogeneous=hom, seed=seed),
        "attack_perm_only": unprotect(prot, base, spec, seed=seed),  # the attacker ignores rescalings
        "scale_protected": protect(experts["a"], x[:64], seed=seed, spec=spec, permute=False, mix=None),
        "perm_protected": prot_perm,
        "perm_protected_attacked": unprotect(prot_perm, base, spec, seed=seed),
    }
    tb = TaskVector(base, eb, spec)
    out = {"seed": seed, "homogeneous_groups": hom, "lams": LAMS,
           "base": task_accs(base_model, base, split.x_test, split.y_test),
           "expert_a": task_accs(base_model, ea, split.x_test, split.y_test),
           "expert_b": task_accs(base_model, eb, split.x_test, split.y_test)}
    pa = copy.deepcopy(base_model)
    pa.load_state_dict(prot)
    with torch.no_grad():
        out["protected_own"] = task_accs(base_model, prot, split.x_test, split.y_test)
        out["protected_max_logit_diff"] = float((pa(split.x_test) - experts["a"](split.x_test)).abs().max())
    tv_a = TaskVector(base, ea, spec)
    out["tv_relative_distance"] = {
        k: (TaskVector(base, sd, spec) - tv_a).norm() / tv_a.norm() for k, sd in variants.items()}
    curves = {}
    for k, sd in variants.items():
        ta = TaskVector(base, sd, spec)
        curves[k] = {"val": [], "test": []}
        for lam in LAMS:
            merged = merge([ta, tb], "task_arithmetic", lam=lam).apply(base)
            curves[k]["val"].append(task_accs(base_model, merged, x[val], y[val]))
            curves[k]["test"].append(task_accs(base_model, merged, split.x_test, split.y_test))
    best = int(np.argmax([c["all"] for c in curves["unprotected"]["val"]]))
    out["lam"] = LAMS[best]
    out["merged_at_lam"] = {k: c["test"][best] for k, c in curves.items()}
    out["curves"] = {k: [c["all"] for c in v["test"]] for k, v in curves.items()}
    out["curves_task_a"] = {k: [c["task_a"] for c in v["test"]] for k, v in curves.items()}
    # align_then_merge: the unprotected experts align to the identity; the protected one is moved back
    _, perms = align_then_merge([ea, eb], base, spec, lam=LAMS[best])
    out["unprotected_align_identity"] = all(p == spec.identity() for p in perms)
    return out


ROWS = (("A unprotected", "unprotected"), ("A protected (permutation + ReLU rescaling)", "protected"),
        ("A protected, then the full attack (`unprotect`)", "attack_full"),
        ("A protected, attack without scale recovery", "attack_perm_only"),
        ("A protected by rescaling only", "scale_protected"),
        ("A protected by permutation only, then attacked", "perm_protected_attacked"))


def ms(vals) -> str:
    return f"{100 * statistics.mean(vals):.1f} +- {100 * statistics.stdev(vals):.1f}"  # sample std (n - 1)


def summarise(rows: list[dict]) -> None:

    print(f"{len(rows)} seeds; lambda chosen on validation: {[r['lam'] for r in rows]}")
    for key in ("base", "expert_a", "expert_b", "protected_own"):
        print(f"{key:>26}: task A {ms([r[key]['task_a'] for r in rows])}, task B {ms([r[key]['task_b'] for r in rows])},"
              f" all {ms([r[key]['all'] for r in rows])}")
    print(f"protected expert max |logit diff| {max(r['protected_max_logit_diff'] for r in rows):.2e}")
    for k in rows[0]["merged_at_lam"]:
        print(f"merged, A {k:>24}: task A {ms([r['merged_at_lam'][k]['task_a'] for r in rows])}, task B "
              f"{ms([r['merged_at_lam'][k]['task_b'] for r in rows])}, all {ms([r['merged_at_lam'][k]['all'] for r in rows])}"
              f"; |tau_A' - tau_A| / |tau_A| {np.mean([r['tv_relative_distance'][k] for r in rows]):.3f}")
    print(f"unprotected experts align to the identity: {[r['unprotected_align_identity'] for r in rows]}")
    print(f"\nTest accuracy %, mean +- sample std over {len(rows)} seeds:\n")
    print("| A merged with B | all test digits | task A (0-4) |\n|---|---|---|")
    for label, k in ROWS:
        print(f"| {label} | {ms([r['merged_at_lam'][k]['all'] for r in rows])} | "
              f"{ms([r['merged_at_lam'][k]['task_a'] for r in rows])} |")
    restored = [statistics.mean(r["merged_at_lam"][k]["all"] for r in rows)
                for k in ("unprotected", "protected", "attack_full")]
    print(f"\nthe attack restores {100 * (restored[2] - restored[1]) / (restored[0] - restored[1]):.0f}% of what "
          "protection took from the merge (all test digits, means)")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unf.io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"unprotected": "unprotected", "protected": "A protected", "attack_full": "A protected, attacked",
              "attack_perm_only": "A protected, attacked (no scale recovery)"}
    for ax, key, title in ((axes[0], "curves", "all test digits"), (axes[1], "curves_task_a", "task A (0-4)")):
        for k, label in labels.items():
            arr = np.array([r[key][k] for r in rows])
            ax.errorbar(rows[0]["lams"], arr.mean(0), yerr=arr.std(0, ddof=1), marker="o", ms=3, capsize=2,
                        label=label)
        ax.set(xlabel="lambda (merged = base + lambda (tau_A + tau_B))", ylabel="test accuracy", title=title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Task-arithmetic merge of two digits experts, mean +- sample std over {len(rows)} seeds")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--from-results", action="store_true",
                    help="no runs: the summary, the table and the figure from results/merge_protect.jsonl")
    args = ap.parse_args()
    from unf.io import atomic_write

    path = RESULTS / "merge_protect.jsonl"
    if args.from_results:
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run without --from-results first")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        torch.set_num_threads(1)
        rows = [{**run(s), **provenance()} for s in args.seeds]  # date, machine, torch on each new row
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    summarise(rows)
    plot(rows, RESULTS / "merge_protect.png")


if __name__ == "__main__":
    sys.exit(main())
