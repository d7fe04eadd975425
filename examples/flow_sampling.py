"""Generate networks: fit a weight-space flow (the MLP field with the README's recipe) to a small zoo of ReLU digits
MLPs (the snapshot kept is the one whose samples are best on the zoo's training split), sample new networks and
measure their test accuracy.

    python examples/flow_sampling.py [--quick]
"""
import argparse
import tempfile

from unf.flow import FlowConfig, train_flow
from unf.flow.canonical import reference_index
from unf.flow.evaluate import evaluate_networks, train_split_scorer
from unf.flow.zoo import model_factory, select_rows
from unf.zoo import build_builtin


def main(quick: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        zoo = build_builtin("digits-mlp", tmp, num_models=20 if quick else 120, seed=0, progress=False)
        rows = select_rows(zoo, {"activation": "relu"})  # the last saved epoch
        meta = [zoo.metadata[i] for i in rows]
        factory = model_factory(zoo.manifest["info"])
        # 80 steps, the snapshot of step 40 or 80 kept: about 15 s of the example's 40-50 s (the zoo is most of it)
        cfg = FlowConfig(velocity="mlp", steps=5 if quick else 80, lr=5e-4, canonicalize="reference", seed=0,
                         select_every=0 if quick else 40)
        select = train_split_scorer(factory, meta[0], "digits-flat", 0, num=50, seed=0)
        flow, history = train_flow(zoo.weight_space(rows), meta, cfg, reference=reference_index(meta), select=select)
        num = 10 if quick else 100
        ws, nfe = flow.sample(num, nfe=16, solver="euler", seed=0)
        _, metrics = evaluate_networks(factory, ws, [{"activation": "relu"}] * num, "digits-flat", 0)
        zoo_acc = sum(float(r["test_acc"]) for r in meta) / len(meta)
        gen_acc = sum(m["test_acc"] for m in metrics) / num
        print(f"flow fitted to {len(rows)} networks ({cfg.steps} steps, final loss {history[-1]['loss']:.3f}); "
              f"{num} sampled networks ({nfe} evaluations each): mean test accuracy {gen_acc:.3f} (zoo {zoo_acc:.3f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke test)")
    main(p.parse_args().quick)
