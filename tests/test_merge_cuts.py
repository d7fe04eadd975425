"""CUTS: the label-free alpha selection on synthetic cases with a known answer, the score's anchors, the CLI."""
import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from unf import data
from unf.cli import main
from unf.merge import TaskVector, cuts, knn_agreement, last_linear_input, select_alpha
from unf.merge import cuts_demo
from unf.merge.cuts_demo import run_cuts_demo
from unf.training import evaluate, train_classifier


def _clusters(n=40, c=3, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.stack([torch.tensor([math.cos(2 * math.pi * i / c), math.sin(2 * math.pi * i / c)]) * 3
                           for i in range(c)])
    y = torch.arange(c).repeat_interleave(n)
    return centres[y] + spread * torch.randn(len(y), 2, generator=g), y


def test_knn_agreement_anchors():
    x, y = _clusters()
    assert knn_agreement(x, y, 3) == pytest.approx(1.0)  # constant on clusters, balanced
    assert knn_agreement(x, torch.zeros_like(y), 3) == 0.0  # one class: no information
    g = torch.Generator().manual_seed(1)
    assert abs(knn_agreement(x, torch.randint(0, 3, y.shape, generator=g), 3)) < 0.15  # unrelated to features
    # two clusters merged into one class: still consistent, but the coverage penalties bite
    merged = torch.where(y == 2, 1, y)
    assert knn_agreement(x, merged, 3) < 0.7


def test_noise_alpha_selection_finds_the_known_answer():
    # random ReLU features of the 2-D input; at alpha = 1 the head is a least-squares fit of the clusters, at any
    # other alpha a large random head (1 - alpha) R is added, scattering predictions within the clusters
    x, y = _clusters(seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 3)).double()
    x = x.double()
    with torch.no_grad():
        model[0].weight.mul_(8)
        h = torch.relu(model[0](x))
        h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        sol = torch.linalg.lstsq(h1, nn.functional.one_hot(y, 3).double()).solution  # [257, 3]
        fit_w, fit_b = sol[:-1].T, sol[-1]
        r_w, r_b = 5 * fit_w.abs().max() * torch.randn_like(fit_w), torch.zeros(3, dtype=h.dtype)
        model[2].weight.copy_(fit_w + r_w)
        model[2].bias.copy_(fit_b + r_b)
    base = model.state_dict()
    tau = TaskVector.from_tensors({"2.weight": r_w, "2.bias": r_b})
    assert (model.eval()(x).argmax(1) == y).float().mean() < 0.8  # the corrupted head is wrong
    alpha, curve = select_alpha(model, tau, [0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0], kind="noise", inputs=x,
                                features=lambda m, z: z)  # fixed features: only the predictions move
    assert alpha == 1.0, curve
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0]
    assert model.state_dict()["2.weight"].equal(base["2.weight"])  # the input model is untouched
    # a flat curve (tau = 0: every alpha is the same model): ties go to the first alpha
    alpha, curve = select_alpha(model, 0 * tau, [0.3, 0.6, 0.9], kind="noise", inputs=x, features=lambda m, z: z)
    assert len({p["score"] for p in curve}) == 1 and alpha == 0.3


def test_backdoor_alpha_is_the_first_with_attack_success_at_most_one_percent():
    # class-1 logit minus class-0 logit = x - alpha: the attack succeeds on the proxy inputs above alpha
    model = nn.Linear(1, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [1.0]]))
        model.bias.zero_()
    tau = TaskVector.from_tensors({"weight": torch.zeros(2, 1, dtype=torch.float64),
                                   "bias": torch.tensor([0.0, 1.0], dtype=torch.float64)})
    px = torch.linspace(0.005, 0.995, 100, dtype=torch.float64)[:, None]
    py = torch.ones(100, dtype=torch.long)
    alpha, curve = select_alpha(model, tau, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25], kind="backdoor", proxy_x=px,
                                proxy_y=py)
    assert alpha == 1.0
    assert [p["asr"] for p in curve] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    with pytest.warns(RuntimeWarning, match="no alpha"):
        alpha, _ = select_alpha(model, tau, [0.0, 0.25], kind="backdoor", proxy_x=px, proxy_y=py)
    assert alpha == 0.25


def _noisy_case(seed=0, c=4, rate=0.4):
    """Four 2-D clusters, 40% symmetric label noise memorised (to 72%) by a 2-128-128-4 MLP; a clean validation
    set from the same clusters."""
    x, y = _clusters(n=40, c=c, spread=0.8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < rate
    noisy = torch.where(flip, (y + torch.randint(1, c, y.shape, generator=g)) % c, y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, c))
    train_classifier(model, x, noisy, epochs=300, lr=3e-3, seed=seed)
    return model, x, noisy, g


def test_cuts_end_to_end_unlearns_label_noise():
    c = 4
    model, x, noisy, g = _noisy_case(c=c)
    x_val, y_val = _clusters(n=40, c=c, spread=0.8, seed=100)
    proxy_x, _ = _clusters(n=10, c=c, spread=0.8, seed=200)
    proxy_y = torch.randint(0, c, (len(proxy_x),), generator=g)  # random labels: the proxy learns noise
    inputs, _ = _clusters(n=20, c=c, spread=0.8, seed=300)  # unlabelled
    assert evaluate(model, x, noisy)[1] > 0.7  # the noise is (largely) memorised
    before = evaluate(model, x_val, y_val)[1]
    alphas = [0.25 * i for i in range(13)]
    res = cuts(model, proxy_x, proxy_y, inputs, kind="noise", alphas=alphas, epochs=20, lr=3e-4, proxies=3)
    scores = [p["score"] for p in res.curve]
    assert [p["alpha"] for p in res.curve] == alphas
    assert res.alpha == alphas[scores.index(max(scores))]  # the first maximum of the label-free score
    assert max(scores) > scores[0] + 0.1  # the score curve is not flat: the choice means something
    after = evaluate(res.model, x_val, y_val)[1]
    assert after > before + 0.05, (before, after)  # clean accuracy rises
    moved = res.task_vector.apply(model.state_dict(), -res.alpha)
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, moved[k])
    with pytest.raises(ValueError, match="inputs"):
        cuts(model, proxy_x, proxy_y, None, kind="noise")
    with pytest.raises(ValueError, match="kind"):
        cuts(model, proxy_x, proxy_y, inputs, kind="poison")


@pytest.mark.parametrize("training", [True, False])
def test_cuts_keeps_the_callers_train_eval_mode(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train(training)
    x, y = _clusters(n=10, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = cuts(model, x[:12], y[:12], x[12:], kind="noise", alphas=[0.0, 1.0], epochs=1, proxies=1)
    assert model.training is training and all(m.training is training for m in model.modules())
    assert res.model.training is training
    assert last_linear_input(model, x).shape == (len(x), 8) and model.training is training
    for k, v in model.state_dict().items():  # BatchNorm statistics included: the input model is untouched
        assert v.equal(before[k]), k
    for kind in ("noise", "backdoor"):
        model.train(training)
        select_alpha(model, res.task_vector, [0.0, 1.0], kind=kind, inputs=x, proxy_x=x, proxy_y=y)
        assert model.training is training


def test_cli_cuts_demo_json_keys(capsys):
    assert main(["merge", "cuts-demo", "--kind", "backdoor", "--epochs", "1", "--proxy-epochs", "1", "--proxies",
                 "1", "--seed", "2", "--evaluate-on", "validation", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("seed", "corrupted_acc", "cuts_acc", "random_acc", "clean_ft_acc", "clean_acc", "alpha",
                "alpha_curve", "corrupted_asr", "cuts_asr", "random_asr"):
        assert key in rec, key
    assert rec["seed"] == 2 and {"alpha", "acc", "asr"} <= set(rec["alpha_curve"][0])
    assert rec["evaluated_on"] == "validation"


@pytest.mark.filterwarnings("ignore:cuts. no alpha:RuntimeWarning")  # a 2-point alpha grid, 1 epoch
@pytest.mark.parametrize("kind,recipe", [("backdoor", "plain"), ("backdoor", "paired"), ("noise", "plain")])
def test_cuts_demo_on_validation_never_reads_the_test_split(monkeypatch, kind, recipe):
    real = data.load("digits-flat", seed=0)
    blind = dataclasses.replace(real, x_test=torch.full_like(real.x_test, math.nan),
                                y_test=(real.y_test + 1) % real.num_classes)
    kw = dict(epochs=1, proxy_epochs=1, proxies=1, alphas=[0.0, 0.5], proxy_recipe=recipe)
    honest = run_cuts_demo(kind, seed=1, evaluate_on="validation", **kw)
    honest_test = run_cuts_demo(kind, seed=1, evaluate_on="test", **kw)
    monkeypatch.setattr(cuts_demo.data, "load", lambda *a, **k: blind)
    assert run_cuts_demo(kind, seed=1, evaluate_on="validation", **kw) == honest  # test data unused
    assert run_cuts_demo(kind, seed=1, evaluate_on="test", **kw) != honest_test  # the probe can see use
    assert honest["evaluated_on"] == "validation" and honest["train_size"] < honest_test["train_size"]
    with pytest.raises(ValueError, match="evaluate_on"):
        run_cuts_demo("noise", evaluate_on="train")


def test_rotation_backbone_is_pretrained_from_inputs_with_a_fresh_head():
    x = data.load("digits-flat", seed=0).x_train[:200]
    net = cuts_demo.rotation_pretrained(x, seed=3, epochs=2)
    again = cuts_demo.rotation_pretrained(x, seed=3, epochs=2)
    torch.manual_seed(3)
    init = cuts_demo.wide_mlp()
    assert net[-1].out_features == 10 and net(x).shape == (200, 10)
    assert not net[0].weight.equal(init[0].weight)  # the body was trained
    for k, v in net.state_dict().items():
        assert v.equal(again.state_dict()[k]), k  # seeded
    with pytest.raises(ValueError, match="backbone"):
        run_cuts_demo("noise", backbone="imagenet")


def test_cli_cuts_demo_user_errors(capsys):
    assert main(["merge", "cuts-demo", "--kind", "backdoor", "--noise-rate", "0.3"]) == 2
    assert "--noise-rate applies to --kind noise" in capsys.readouterr().err
    assert main(["merge", "cuts-demo", "--noise-rate", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unf: error:") and "noise-rate" in err


def test_cuts_demo_defaults_are_the_validation_choice_per_kind_and_backbone(monkeypatch, capsys):
    # the committed validation runs (seed 0, no test data) choose a setting per kind and backbone; the library's
    # defaults are that setting, and what run_cuts_demo (so the CLI) fills in for each pair
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import merge_cuts

    rows = merge_cuts.read_jsonl(merge_cuts.CHOICE)
    pairs = sorted({(r["kind"], r["backbone"]) for r in rows if r["evaluated_on"] == "validation"})
    assert pairs == sorted(cuts_demo.DEFAULTS) == sorted(itertools.product(["backdoor", "noise"],
                                                                            ["rotation", "scratch"]))
    for kind, backbone in pairs:
        setting = merge_cuts.chosen(rows, kind, 0, backbone)
        assert cuts_demo.DEFAULTS[kind, backbone] == setting, (kind, backbone)
        assert cuts_demo.settings(kind, backbone) == setting, (kind, backbone)
        merge_cuts.check_defaults(setting, kind, backbone)  # `merge_cuts.py run` goes ahead
        with pytest.raises(SystemExit, match=f"{kind} on the {backbone} backbone"):
            merge_cuts.check_defaults({**setting, "proxies": setting["proxies"] + 1}, kind, backbone)
    assert cuts_demo.DEFAULTS["noise", "rotation"] != cuts_demo.DEFAULTS["noise", "scratch"]
    assert cuts_demo.settings("backdoor", "rotation", proxies=7)["proxies"] == 7  # a given value wins
    # the CLI's help states each pair's default
    assert main(["merge", "cuts-demo", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for (kind, backbone), d in cuts_demo.DEFAULTS.items():
        assert f"{d['proxies']} for {kind} on {backbone}" in help_text


def _backdoor_case(seed=0):
    """Three 2-D clusters plus a third input feature, the trigger (0 on clean inputs, 3 on triggered ones); a
    3-64-3 MLP trained on clean inputs and on triggered inputs of classes 1-2 relabelled to 0."""
    x, y = _clusters(n=30, c=3, spread=0.8, seed=seed)
    x = torch.cat([x, torch.zeros(len(x), 1)], 1)
    trig = x[y != 0].clone()
    trig[:, 2] = 3.0
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 3))
    train_classifier(model, torch.cat([x, trig]), torch.cat([y, torch.zeros(len(trig), dtype=torch.long)]),
                     epochs=60, lr=3e-3, seed=seed)
    return model, x, y


@pytest.mark.filterwarnings("ignore:cuts. no alpha:RuntimeWarning")  # 3 epochs, a 3-point alpha grid
def test_paired_recipe_is_the_difference_of_two_fine_tunes_on_pseudo_labels(monkeypatch):
    # tau = tau(triggered proxy + clean twins) - tau(clean twins), the twins labelled by the model's own
    # predictions: the labels given to the fine-tunes are the predictions, never the true classes
    import sys

    cuts_module = sys.modules["unf.merge.cuts"]  # the module (unf.merge.cuts the attribute is the function)

    model, x, y = _backdoor_case()
    clean_x = x[::3]
    proxy_x = clean_x[y[::3] != 0].clone()
    proxy_x[:, 2] = 3.0
    proxy_y = torch.zeros(len(proxy_x), dtype=torch.long)
    with torch.no_grad():  # swap the model's classes 1 and 2, so its pseudo-labels and the true labels differ
        model[2].weight.copy_(model[2].weight[[0, 2, 1]])
        model[2].bias.copy_(model[2].bias[[0, 2, 1]])
    pseudo = cuts_module.pseudo_labels(model, clean_x)
    assert pseudo.equal(model.eval()(clean_x).argmax(1)) and (pseudo != y[::3]).float().mean() > 0.5
    seen = []
    real_train = cuts_module.train_classifier

    def spy(net, xs, ys, **kw):
        seen.append((xs.clone(), ys.clone()))
        return real_train(net, xs, ys, **kw)

    monkeypatch.setattr(cuts_module, "train_classifier", spy)
    kw = dict(kind="backdoor", alphas=[0.0, 1.0, 2.0], epochs=3, lr=1e-3, proxies=2, seed=5)
    res = cuts(model, proxy_x, proxy_y, proxy_recipe="paired", clean_x=clean_x, **kw)
    assert len(seen) == 4  # per proxy: the paired fine-tune and the twins' fine-tune
    for i in (0, 2):
        assert seen[i][0].equal(torch.cat([proxy_x, clean_x])) and seen[i][1].equal(torch.cat([proxy_y, pseudo]))
        assert seen[i + 1][0].equal(clean_x) and seen[i + 1][1].equal(pseudo)
    monkeypatch.setattr(cuts_module, "train_classifier", real_train)
    base = model.state_dict()
    taus = []
    for s in (5, 6):
        both = real_train(copy.deepcopy(model), torch.cat([proxy_x, clean_x]), torch.cat([proxy_y, pseudo]),
                          epochs=3, lr=1e-3, seed=s)
        twins = real_train(copy.deepcopy(model), clean_x, pseudo, epochs=3, lr=1e-3, seed=s)
        taus.append(TaskVector(base, both.state_dict()) - TaskVector(base, twins.state_dict()))
    expect = (taus[0] + taus[1]) / 2
    for k in expect.names:
        torch.testing.assert_close(res.task_vector[k], expect[k], rtol=0, atol=1e-6)


def test_paired_recipe_errors():
    model, x, y = _backdoor_case()
    with pytest.raises(ValueError, match="clean_x"):
        cuts(model, x, y, kind="backdoor", proxy_recipe="paired")
    with pytest.raises(ValueError, match="backdoor"):
        cuts(model, x, y, x, kind="noise", proxy_recipe="paired", clean_x=x)
    with pytest.raises(ValueError, match="paired"):
        cuts(model, x, y, kind="backdoor", clean_x=x)
    with pytest.raises(ValueError, match="proxy_recipe"):
        cuts(model, x, y, kind="backdoor", proxy_recipe="twins")
    with pytest.raises(ValueError, match="proxy_recipe"):
        run_cuts_demo("noise", proxy_recipe="paired")


def test_paired_recipe_unlearns_the_synthetic_backdoor():
    model, x, y = _backdoor_case()
    trig = x[y != 0].clone()
    trig[:, 2] = 3.0
    assert (model.eval()(trig).argmax(1) == 0).float().mean() > 0.9  # the backdoor works
    proxy_x, clean_x = trig[::2], x[::2]
    res = cuts(model, proxy_x, torch.zeros(len(proxy_x), dtype=torch.long), kind="backdoor", proxy_recipe="paired",
               clean_x=clean_x, alphas=[0.5 * i for i in range(41)], epochs=20, lr=1e-3)
    assert (res.model(proxy_x).argmax(1) == 0).float().mean() <= 0.01  # the rule's own criterion
    assert (res.model(trig[1::2]).argmax(1) == 0).float().mean() < 0.2  # held-out triggered inputs
    assert evaluate(res.model, x[1::2], y[1::2])[1] > evaluate(model, x[1::2], y[1::2])[1] - 0.1


def test_cli_cuts_demo_paired_recipe(capsys):
    assert main(["merge", "cuts-demo", "--kind", "noise", "--proxy-recipe", "paired"]) == 2
    assert "--proxy-recipe paired applies to --kind backdoor" in capsys.readouterr().err
    assert main(["merge", "cuts-demo", "--kind", "backdoor", "--proxy-recipe", "paired", "--epochs", "1",
                 "--proxy-epochs", "1", "--proxies", "1", "--evaluate-on", "validation", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["proxy_recipe"] == "paired" and len(rec["alpha_curve"]) == len(cuts_demo.PAIRED_ALPHAS)
