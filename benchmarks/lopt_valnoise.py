"""How chaotic is a learned rule's validation score near tuned Adam? (issue 29)

    OMP_NUM_THREADS=1 python benchmarks/lopt_valnoise.py [--family digits-mlp] [--beta 1.0] [--floors 1e-6,1e-3]
                                                         [--scales 0,1e-6,1e-6,1e-4,1e-4,1e-3,1e-2]

The rule is a new one at Adam's learning rate 0.01 (a zero learned term: it *is* Adam; ``beta`` scales the learned
term). Each scale adds Gaussian noise of that std to every meta-parameter (seeded, a new draw per row) and scores the
rule as ``meta_train``'s validation does (two held-out family seeds, whole horizon, mean log loss ratio floored at each
floor). Scale 0 is the rule itself. A score that moves by tenths for a 1e-6 perturbation is trajectory chaos, not a
better or worse rule: it sets how much a validation-based choice can be trusted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_jsonl  # noqa: E402

from unf.optim import LearnedRule, MetaConfig, RuleConfig  # noqa: E402
from unf.optim.meta import _stack, validation_loss, validation_tasks  # noqa: E402
from unf.optim.rule import CompiledRule  # noqa: E402
from unf.optim.tasks import FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="digits-mlp", choices=sorted(FAMILIES))
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--floors", default="1e-6,1e-3")
    ap.add_argument("--scales", default="0,1e-6,1e-6,1e-4,1e-4,1e-3,1e-2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lopt_valnoise.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    family = FAMILIES[args.family]
    torch.manual_seed(0)
    rule = LearnedRule(RuleConfig(variant="unf", alpha=args.alpha, beta=args.beta))
    names, shapes = [n for n, _ in rule.named_parameters()], [p.shape for p in rule.parameters()]
    theta = parameters_to_vector(rule.parameters()).detach()
    compiled, gen = CompiledRule(), torch.Generator().manual_seed(1)
    for scale in (float(v) for v in args.scales.split(",")):
        params = _stack((theta + scale * torch.randn(theta.shape, generator=gen))[None], names, shapes)
        row = {"family": args.family, "beta": args.beta, "alpha": args.alpha, "scale": scale}
        t0 = time.perf_counter()
        for floor in (float(v) for v in args.floors.split(",")):
            cfg = MetaConfig(steps=1, rule={"variant": "unf"}, loss_floor=floor, validate_every=1)
            row[f"score_floor_{floor:g}"] = validation_loss(cfg, rule, params, validation_tasks(cfg, family), compiled)
        row.update(seconds=time.perf_counter() - t0, torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(json.dumps(row), flush=True)
        append_jsonl(Path(args.out), row)


if __name__ == "__main__":
    main()
