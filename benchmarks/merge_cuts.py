"""CUTS on digits (unf.merge.cuts_demo): choose the settings on validation, then report on the test split.

    # 1. choose epochs / proxies / proxy epochs per kind on a validation split carved from the training split
    #    (seed 0; the test split is not read): results/merge_cuts_choice.jsonl, a table and the chosen setting
    OMP_NUM_THREADS=1 python benchmarks/merge_cuts.py choose --kind noise --seed 0
    OMP_NUM_THREADS=1 python benchmarks/merge_cuts.py choose --kind backdoor --seed 0
    # 2. the test-split runs with the chosen settings (the library defaults per kind and backbone, which must
    #    match them): results/merge_cuts.jsonl
    OMP_NUM_THREADS=1 python benchmarks/merge_cuts.py run --kinds noise backdoor --seeds 0 1 2 3 4
    # the same with a backbone pretrained without labels (rotation prediction); choose its settings first
    OMP_NUM_THREADS=1 python benchmarks/merge_cuts.py choose --kind noise --seed 0 --backbone rotation
    OMP_NUM_THREADS=1 python benchmarks/merge_cuts.py choose --kind backdoor --seed 0 --backbone rotation
    OMP_NUM_THREADS=1 python benchmarks/merge_cuts.py run --backbone rotation --seeds 0 1 2 3 4
    # 3. the markdown tables (mean +- sample std over seeds) and the alpha-curve figures, from the results only
    python benchmarks/merge_cuts.py table [--backbone rotation] [--plot]

Every finished run is appended at once as one JSON line (atomic rewrite; with the date, machine and torch version),
and runs already in the file are skipped, so an interrupted command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's unf, not an installed one
from unf.io import atomic_write  # noqa: E402
from unf.merge import cuts_demo  # noqa: E402
from timing import provenance  # noqa: E402  (benchmarks/timing.py)

RESULTS = Path(__file__).resolve().parent / "results"
CHOICE = RESULTS / "merge_cuts_choice.jsonl"
RUNS = RESULTS / "merge_cuts.jsonl"
# the settings compared on validation. Label noise 0.4: the largest gap recovered with the label-free alpha. Backdoor
# (the corrupted model trained for 150 epochs, as for noise): the fewest points of clean accuracy lost
# among settings with attack success <= 5%, else the lowest attack success
# (2026-12-07, later: the "paired" proxy recipe joined the backdoor grid; rows without proxy_recipe are "plain")
GRID = {"noise": {"epochs": [60, 150], "proxies": [1, 5, 10], "proxy_epochs": [20, 40], "proxy_recipe": ["plain"]},
        "backdoor": {"epochs": [150], "proxies": [1, 5], "proxy_epochs": [5, 10, 20, 40],
                     "proxy_recipe": ["plain", "paired"]}}
KNOBS = ("epochs", "proxies", "proxy_epochs", "proxy_recipe")
SETTING = ("kind", "seed", "evaluated_on", "backbone", "noise_rate", "epochs", "proxies", "proxy_epochs",
           "proxy_recipe")


def knob(row: dict, k: str):
    """``row[k]``; rows written before the proxy recipe existed are ``"plain"``."""
    return row.get(k, "plain") if k == "proxy_recipe" else row[k]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}: line {i} is not JSON ({e})") from None
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    text = path.read_text() if path.exists() else ""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + json.dumps(row) + "\n"))


def key(row: dict) -> tuple:
    return tuple(knob(row, k) if k == "proxy_recipe" else row.get(k) for k in SETTING)


def run_missing(path: Path, settings: list[dict]) -> list[dict]:
    done = {key(r) for r in read_jsonl(path)}
    for s in settings:
        probe = {**s, "noise_rate": s.get("noise_rate", 0.4) if s["kind"] == "noise" else None}
        if key(probe) in done:
            print(f"skip (already in {path.name}): {s}", flush=True)
            continue
        t0 = time.time()
        row = cuts_demo.run_cuts_demo(**{k: v for k, v in s.items() if k != "evaluated_on"},
                                      evaluate_on=s["evaluated_on"])
        row["seconds"] = round(time.time() - t0, 1)
        row.update(provenance())
        if row["kind"] == "backdoor":
            row["noise_rate"] = None
        append_jsonl(path, row)
        print(f"done in {row['seconds']} s: {s}", flush=True)
    return read_jsonl(path)


def figure_tag(setting: tuple) -> str:
    """``epochs-proxies-proxy_epochs``, then ``-paired`` for the paired recipe (plain figures keep their old names)."""
    values = dict(zip(KNOBS, setting))
    tag = "-".join(str(values[k]) for k in ("epochs", "proxies", "proxy_epochs"))
    return tag if values["proxy_recipe"] == "plain" else f"{tag}-{values['proxy_recipe']}"


def ms(vals, scale=100.0) -> str:
    vals = [scale * v for v in vals]
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} +- {statistics.stdev(vals):.1f}"  # sample std


def merit(row: dict) -> tuple:
    if row["kind"] == "noise":
        return (row["gap_recovered"],)
    lost = row["corrupted_acc"] - row["cuts_acc"]
    return (1, -lost) if row["cuts_asr"] <= 0.05 else (0, -row["cuts_asr"])


def chosen(rows: list[dict], kind: str, seed: int, backbone: str) -> dict:
    """The first setting (in grid order) with the best validation merit: the cheaper one on ties."""
    rows = [r for r in rows if r["evaluated_on"] == "validation" and r["seed"] == seed and r["backbone"] == backbone
            and r["kind"] == kind]
    if not rows:
        raise SystemExit(f"{CHOICE} has no validation runs for {kind}, seed {seed}, backbone {backbone}: run "
                         f"'benchmarks/merge_cuts.py choose --kind {kind} --seed {seed} --backbone {backbone}' first")
    best = max(rows, key=merit)
    return {k: knob(best, k) for k in KNOBS}


def choose(args) -> None:
    grid = GRID[args.kind]
    settings = [{"kind": args.kind, "seed": args.seed, "evaluated_on": "validation", "backbone": args.backbone,
                 **dict(zip(KNOBS, values))} for values in itertools.product(*(grid[k] for k in KNOBS))]
    rows = [r for r in run_missing(CHOICE, settings)
            if r["seed"] == args.seed and r["backbone"] == args.backbone and r["kind"] == args.kind]
    print(f"\n{args.kind}: settings on the validation split of seed {args.seed}, backbone {args.backbone} "
          "(validation %):\n")
    if args.kind == "noise":
        print("| epochs | proxies | proxy epochs | corrupted | CUTS | alpha | clean training | gap recovered |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['epochs']} | {r['proxies']} | {r['proxy_epochs']} | {100 * r['corrupted_acc']:.1f} | "
                  f"{100 * r['cuts_acc']:.1f} | {r['alpha']} | {100 * r['clean_acc']:.1f} | "
                  f"{100 * r['gap_recovered']:.1f}% |")
    else:
        print("| recipe | epochs | proxies | proxy epochs | backdoored acc / attack | alpha | CUTS acc / attack | "
              "points lost |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {knob(r, 'proxy_recipe')} | {r['epochs']} | {r['proxies']} | {r['proxy_epochs']} | "
                  f"{100 * r['corrupted_acc']:.1f} / "
                  f"{100 * r['corrupted_asr']:.1f} | {r['alpha']} | {100 * r['cuts_acc']:.1f} / "
                  f"{100 * r['cuts_asr']:.1f} | {100 * (r['corrupted_acc'] - r['cuts_acc']):.1f} |")
    print(f"\nchosen: {chosen(rows, args.kind, args.seed, args.backbone)}; library defaults for {args.kind} on "
          f"{args.backbone}: {cuts_demo.DEFAULTS[args.kind, args.backbone]}")


def check_defaults(setting: dict, kind: str, backbone: str) -> None:
    """Refuse to run when the library defaults for (kind, backbone) are not ``setting``, the validation choice."""
    default = cuts_demo.DEFAULTS[kind, backbone]
    if setting != default:
        raise SystemExit(f"the library defaults for {kind} on the {backbone} backbone {default} are not the setting "
                         f"chosen on validation {setting}: update DEFAULTS in unf/merge/cuts_demo.py")


def run(args) -> None:
    settings = []
    for kind in args.kinds:
        setting = chosen(read_jsonl(CHOICE), kind, args.choice_seed, args.backbone)
        check_defaults(setting, kind, args.backbone)
        settings += [{"kind": kind, "seed": s, "evaluated_on": "test", "backbone": args.backbone, **setting}
                     for s in args.seeds]
    run_missing(RUNS, settings)
    table(args)


def table(args) -> None:
    rows = [r for r in read_jsonl(RUNS) if r["evaluated_on"] == "test" and r["backbone"] == args.backbone]
    choice = read_jsonl(CHOICE)
    for kind, setting in dict.fromkeys((r["kind"], tuple(knob(r, k) for k in KNOBS)) for r in rows):
        rs = sorted((r for r in rows if r["kind"] == kind and tuple(knob(r, k) for k in KNOBS) == setting),
                    key=lambda r: r["seed"])
        chosen_on = {r["seed"] for r in choice if r["backbone"] == args.backbone and r["kind"] == kind
                     and tuple(knob(r, k) for k in KNOBS) == setting}
        origin = f"chosen on the validation split of seed(s) {sorted(chosen_on)}" if chosen_on else \
            "not in this kind's validation choice (a setting chosen for the other kind)"
        held = [r for r in rs if r["seed"] not in chosen_on]
        groups = [(f"seeds {[r['seed'] for r in held]} (not used for the choice)", held),
                  (f"all seeds {[r['seed'] for r in rs]}", rs)] if held and len(held) < len(rs) else \
            [(f"seeds {[r['seed'] for r in rs]}", rs)]
        print(f"\n{kind}, backbone {args.backbone}, {dict(zip(KNOBS, setting))} ({origin}): test %, mean +- sample "
              f"std over seeds; alphas chosen without labels: {[r['alpha'] for r in rs]}\n")

        def line(name, get):
            print(f"| {name} | " + " | ".join(ms([get(r) for r in g]) for _, g in groups) + " |")

        print("| | " + " | ".join(name for name, _ in groups) + " |\n|---|" + "---|" * len(groups))
        if kind == "noise":
            for name, k in (("corrupted (noise 0.4 memorised)", "corrupted_acc"), ("CUTS", "cuts_acc"),
                            ("random vector, same alpha", "random_acc"),
                            ("fine-tuned on the clean held-out set", "clean_ft_acc"),
                            ("trained on clean labels", "clean_acc")):
                line(f"{name}: accuracy", lambda r, k=k: r[k])
            line("gap recovered by CUTS (label-free alpha), %", lambda r: r["gap_recovered"])
            line("gap recovered at the best alpha in hindsight (not a result), %",
                 lambda r: r["best_alpha_gap_recovered"])
        else:
            for name, k in (("backdoored", "corrupted"), ("CUTS", "cuts"), ("random vector, same alpha", "random"),
                            ("fine-tuned on the clean held-out set", "clean_ft"), ("trained on clean data", "clean")):
                line(f"{name}: clean accuracy", lambda r, k=k: r[k + "_acc"])
                line(f"{name}: attack success", lambda r, k=k: r[k + "_asr"])
            line("points of clean accuracy lost by CUTS", lambda r: r["corrupted_acc"] - r["cuts_acc"])
            met = [r["seed"] for r in rs if r["cuts_asr"] <= 0.05 and r["corrupted_acc"] - r["cuts_acc"] <= 0.10]
            print(f"\nseeds meeting the target (attack success <= 5% with <= 10 points lost): {met}")
            alphas = [p["alpha"] for p in rs[0]["alpha_curve"]]
            step = 5 if len(alphas) <= 81 else 15
            print(f"\nWhole alpha curve (test %, mean over all seeds; every {0.1 * step:g}):\n")
            print("| alpha | " + " | ".join(f"{a:g}" for a in alphas[::step]) + " |")
            print("|---|" + "---|" * len(alphas[::step]))
            for label, k in (("clean accuracy", "acc"), ("attack success", "asr"),
                             ("attack success on the proxy set", "proxy_asr")):
                vals = [statistics.mean(r["alpha_curve"][i][k] for r in rs) for i in range(0, len(alphas), step)]
                print(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |")
        if args.plot:
            path = RESULTS / f"merge_cuts_{kind}_{args.backbone}_{figure_tag(setting)}.png"
            cuts_demo.plot_alpha_curves(rs, str(path))
            print(f"\nfigure: {path}")
    if args.plot and any(r["kind"] == "backdoor" for r in rows):
        plot_tradeoff(args.backbone)


def plot_tradeoff(backbone: str) -> None:
    """Attack success against clean accuracy lost along the alpha curve (test, mean over the seeds of each backdoor
    setting in the results), one line per setting, the chosen alphas marked, the target region shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(RUNS) if r["evaluated_on"] == "test" and r["backbone"] == backbone
            and r["kind"] == "backdoor"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.fill_between([0, 10], 0, 5, color="0.6", alpha=0.35, label="target: <= 5% with <= 10 points lost")
    for setting in dict.fromkeys(tuple(knob(r, k) for k in KNOBS) for r in rows):
        rs = [r for r in rows if tuple(knob(r, k) for k in KNOBS) == setting]
        n = len(rs[0]["alpha_curve"])
        lost = [100 * statistics.mean(r["corrupted_acc"] - r["alpha_curve"][i]["acc"] for r in rs) for i in range(n)]
        asr = [100 * statistics.mean(r["alpha_curve"][i]["asr"] for r in rs) for i in range(n)]
        values = dict(zip(KNOBS, setting))
        line, = ax.plot(lost, asr, lw=1.5, label=f"{values['proxy_recipe']}: {values['proxies']} proxies of "
                        f"{values['proxy_epochs']} epochs (mean of {len(rs)} seeds)")
        ax.scatter([100 * (r["corrupted_acc"] - r["cuts_acc"]) for r in rs], [100 * r["cuts_asr"] for r in rs],
                   color=line.get_color(), s=14, zorder=3)
    ax.set(xlabel="points of clean test accuracy lost", ylabel="attack success on triggered test inputs, %",
           xlim=(-1, 40), ylim=(-2, 100))
    ax.set_title(f"CUTS, backdoor, {backbone} backbone: mean curve over alpha; dots: label-free alpha per seed",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = RESULTS / f"merge_cuts_backdoor_{backbone}_tradeoff.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    print(f"\nfigure: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("choose", help="compare settings on validation (test split not read)")
    c.add_argument("--kind", choices=["noise", "backdoor"], default="noise")
    c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="test-split runs with the setting chosen on validation, then the tables")
    r.add_argument("--kinds", nargs="+", choices=["noise", "backdoor"], default=["noise", "backdoor"])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--choice-seed", type=int, default=0, help="the seed whose validation runs chose the setting")
    t = sub.add_parser("table", help="tables (and figures) from results/merge_cuts.jsonl only")
    for p in (c, r, t):
        p.add_argument("--backbone", choices=["scratch", "rotation"], default="scratch")
    for p in (r, t):
        p.add_argument("--plot", action="store_true",
                       help="also write results/merge_cuts_{kind}_{backbone}_{epochs-proxies-proxy_epochs}"
                            "[-paired].png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"choose": choose, "run": run, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
