"""The report of ``unf demo``: one PNG per stage, and ``report.md`` / ``report.html`` (offline: no JavaScript, no
network; images beside them, referenced by relative path). Every file is written atomically."""
from __future__ import annotations

import html
from pathlib import Path

from ..io import atomic_write

TITLES = {"spec": "1. Spec: the symmetries of an architecture", "zoo": "2. Zoo: a population of trained networks",
          "predict": "3. Predict: a network's accuracy from its weights",
          "align": "4. Align: re-basin and the loss barrier",
          "generate": "5. Generate: new networks from a weight-space flow",
          "optimize": "6. Optimize: the learned optimizer on an unseen task",
          "edit": "7. Edit: task-vector merging and CUTS unlearning"}
WHAT = {
    "spec": "unf.spec_from_module traces a model and says which permutation group acts on each axis of each "
            "tensor; everything else builds on it.",
    "zoo": "unf.zoo.builtin trains many small networks at once (torch.func.vmap), each with its own hyperparameters, "
           "and stores them as safetensors shards with a metadata table.",
    "predict": "A UNFEncoder (invariant to every permutation in the spec) and the StatNN baseline read a network's "
               "weights and predict its test accuracy; split by network, epoch chosen on the validation split, "
               "scored on the held-out test split.",
    "align": "Two MLPs trained from different seeds: the straight path between them crosses a loss barrier; "
             "weight matching permutes the second into the first's basin.",
    "generate": "A flow-matching generator (the README's working recipe: MLP field, canonicalised zoo, data "
                "prediction, checkpoint chosen on the training split) samples new networks. Novelty is 1 - median "
                "derived-ness against the training zoo; memorisers (best networks plus noise) give the noise "
                "frontier a generator must beat; held-out zoo networks show the level of a new network.",
    "optimize": "The shipped learned optimizer (UNFOptimizer, meta-weights in the package) against Adam with its "
                "learning rate picked from a grid by training loss, on a task it was never meta-trained on.",
    "edit": "unf.merge: task vectors of two experts added to their common base; CUTS subtracts a task vector "
            "fine-tuned on triggered proxy inputs to remove a backdoor (alpha chosen on the proxy set).",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_predict(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharex=True, sharey=True)
    for ax, (name, label) in zip(axes, (("unf", "UNF predictor"), ("statnn", "StatNN"))):
        r = results[name]
        ax.scatter(r["targets"], r["predictions"], s=10, alpha=0.6)
        lo, hi = min(r["targets"]), max(r["targets"])
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--")
        ax.set(title=f"{label}: Kendall tau {r['kendall_tau']:.3f}", xlabel="true test accuracy")
    axes[0].set_ylabel("predicted test accuracy")
    fig.suptitle("held-out zoo networks (test split of the zoo)")
    _save(fig, path)


def plot_generate(points: dict, frontier: list, zoo_acc: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    mem = [p for k, p in points.items() if k.startswith("memoriser")]
    ax.scatter(*zip(*mem), s=14, c="0.6", label="memorisers (best zoo nets + noise)")
    if frontier:
        ax.plot(*zip(*frontier), c="0.4", lw=1, label="noise frontier")
    ax.scatter(*points["heldout"], marker="s", s=50, c="tab:green", label="held-out zoo networks")
    ax.scatter(*points["generated"], marker="*", s=160, c="tab:red", label="generated networks")
    ax.axhline(zoo_acc, c="tab:green", lw=0.8, ls=":", label="training zoo mean accuracy")
    ax.set(xlabel="novelty: 1 - median derived-ness vs the training zoo", ylabel="mean test accuracy")
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)


def plot_optimize(adam: dict, best, learned: dict, path: Path, task: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for lr, r in adam.items():
        steps = [i * r["eval_every"] for i in range(len(r["train"]))]
        ax.plot(steps, r["train"], lw=2 if lr == best else 0.8, alpha=1 if lr == best else 0.45,
                label=f"Adam lr={lr:g}" + (" (chosen)" if lr == best else ""))
    steps = [i * learned["eval_every"] for i in range(len(learned["train"]))]
    ax.plot(steps, learned["train"], lw=2.5, c="k", label="learned (UNFOptimizer, shipped weights)")
    ax.set(yscale="log", xlabel="step", ylabel="training loss (full batch)", title=task)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_edit(merged: dict, cuts: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    names = ["base", "expert_0_4", "expert_5_9", "merged"]
    xs = range(len(names))
    for off, key, label in ((-0.2, "classes_0_4", "classes 0-4"), (0.2, "classes_5_9", "classes 5-9")):
        ax1.bar([x + off for x in xs], [merged[n][key] for n in names], width=0.4, label=label)
    ax1.set_xticks(list(xs), ["base", "expert 0-4", "expert 5-9", f"merged\n(lambda {merged['lambda']})"])
    ax1.set(ylabel="test accuracy", ylim=(0, 1.18), title="task-vector merge")
    ax1.legend(fontsize=8, loc="upper center", ncol=2)
    kinds = ["corrupted", "cuts", "random", "clean_ft"]
    xs = range(len(kinds))
    ax2.bar([x - 0.2 for x in xs], [cuts[f"{k}_acc"] for k in kinds], width=0.4, label="test accuracy")
    ax2.bar([x + 0.2 for x in xs], [cuts[f"{k}_asr"] for k in kinds], width=0.4, label="attack success")
    ax2.set_xticks(list(xs), ["backdoored", f"CUTS\n(alpha {cuts['alpha']})", "random\nvector", "clean\nfine-tune"])
    ax2.set(ylim=(0, 1.18), title="CUTS removing a backdoor")
    ax2.legend(fontsize=8, loc="upper center", ncol=2)
    _save(fig, path)


# ------------------------------------------------------------------------------------------------------ the report

def _blocks(results: dict) -> list:
    """The report as blocks ``(kind, ...)``, rendered to Markdown and HTML alike."""
    run = results["run"]
    blocks = [("h1", "unf demo"),
              ("p", f"`{run['command']}`: unf {run['unf_version']}, torch {run['torch_version']}, device "
                    f"{run['device']}, seed {run['seed']}{', --quick sizes' if run['quick'] else ''}; "
                    f"{run['seconds']:.0f} s in all on {run['machine']}."),
              ("table", [("stage", "result", "seconds")] + [
                  (name, results[name].get("line") or f"skipped: {results[name]['skipped']}",
                   f"{run['timings'].get(name, 0):.1f}") for name in run["stages"]])]
    for name in run["stages"]:
        r = results[name]
        blocks.append(("h2", TITLES[name]))
        blocks.append(("p", WHAT[name]))
        if "skipped" in r:
            blocks.append(("p", f"Skipped: {r['skipped']}"))
            continue
        blocks.append(("p", f"**Result.** {r['line']}"))
        if name == "spec":
            blocks += [("pre", r["mlp"]["text"]), ("pre", r["cnn"]["text"])]
        if r.get("figure"):
            blocks.append(("img", r["figure"], TITLES[name]))
    blocks.append(("p", "All numbers, curves and settings are in `results.json`."))
    return blocks


def _inline_html(text: str) -> str:
    out, parts = "", text.split("`")
    for i, part in enumerate(parts):  # `code` and **bold**, the only markup the blocks use
        esc = html.escape(part)
        if i % 2:
            out += f"<code>{esc}</code>"
        else:
            bold = esc.split("**")
            out += "".join(f"<b>{b}</b>" if j % 2 else b for j, b in enumerate(bold))
    return out


def to_markdown(blocks: list) -> str:
    lines = []
    for kind, *rest in blocks:
        if kind == "h1":
            lines.append(f"# {rest[0]}")
        elif kind == "h2":
            lines.append(f"## {rest[0]}")
        elif kind == "p":
            lines.append(rest[0])
        elif kind == "pre":
            lines.append(f"```\n{rest[0]}\n```")
        elif kind == "img":
            lines.append(f"![{rest[1]}]({rest[0]})")
        elif kind == "table":
            head, *body = rest[0]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
        lines.append("")
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}"
         "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}img{max-width:100%}code{background:#f4f4f4}")


def to_html(blocks: list) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(rest[0])}</p>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(rest[0])}</pre>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}"></p>')
        elif kind == "table":
            head, *rows = rest[0]
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            trs = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><tr>{cells}</tr>{trs}</table>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>unf demo</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(results: dict, out: Path) -> None:
    """``report.md`` and ``report.html`` in ``out`` from the demo's ``results``."""
    blocks = _blocks(results)
    for name, text in (("report.md", to_markdown(blocks)), ("report.html", to_html(blocks))):
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
