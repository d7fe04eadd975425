"""Predict a network's test accuracy from its weights: build a small zoo, fit the UNF predictor and StatNN.

    python examples/predict_on_a_zoo.py [--quick] [--out zoos/example]
"""
import argparse
import tempfile

from unf.zoo import build_builtin, fit_predictor


def main(quick: bool = False, out: str = "") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        zoo = build_builtin("digits-mlp", out or tmp, num_models=16 if quick else 120, seed=0, progress=False)
        print(f"{len(zoo)} stored networks (networks x saved epochs) in {zoo.root}")
        for model in ("unf", "statnn"):
            r = fit_predictor(zoo, model, target="test_acc", seed=0, epochs=1 if quick else 4,
                              hidden=4 if quick else 8)
            print(f"{model:>6}: Kendall tau {r['kendall_tau']:.3f}, R^2 {r['r2']:.3f} on {r['n_test']} held-out rows")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke test)")
    p.add_argument("--out", default="", help="keep the zoo in this directory (default: a temporary one)")
    a = p.parse_args()
    main(a.quick, a.out)
