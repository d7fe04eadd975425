"""Merge two experts with task vectors: a base MLP, one expert fine-tuned on digits 0-4 and one on 5-9, merged by
task arithmetic and by TIES; the merge scale chosen on a validation split, the test split only reported.

    python examples/merging.py [--quick]
"""
import argparse
import copy

import torch
import torch.nn as nn

import unf
import unf.merge as um
from unf.training import evaluate, train_classifier


def main(quick: bool = False) -> None:
    split = unf.data.load("digits-flat")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(split.y_train), generator=g)
    n = len(order)
    pre, val, ft = order[:n // 2], order[n // 2:n * 65 // 100], order[n * 65 // 100:]
    x, y = split.x_train, split.y_train
    torch.manual_seed(0)
    base = train_classifier(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), x[pre], y[pre],
                            epochs=1 if quick else 3)
    vectors = []
    for mask in (y[ft] < 5, y[ft] >= 5):
        expert = train_classifier(copy.deepcopy(base), x[ft[mask]], y[ft[mask]], epochs=2 if quick else 20, seed=1)
        vectors.append(um.TaskVector(base.state_dict(), expert.state_dict()))
    net = copy.deepcopy(base)
    print(f"base: test accuracy {evaluate(base, split.x_test, split.y_test)[1]:.3f}")
    for method, kw in (("task_arithmetic", {}), ("ties", {"density": 0.2})):
        def accuracy(lam, xs, ys):
            net.load_state_dict(um.merge(vectors, method, lam=lam, **kw).apply(base.state_dict()))
            return evaluate(net, xs, ys)[1]

        lam = max((0.2, 0.4, 0.6, 0.8, 1.0, 1.2), key=lambda v: accuracy(v, x[val], y[val]))
        print(f"{method}: lambda {lam} (validation), test accuracy {accuracy(lam, split.x_test, split.y_test):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke test)")
    main(p.parse_args().quick)
