"""CUTS: the label-free alpha selection on synthetic cases with a known answer, the score's anchors, the CLI."""
import json
import math

import pytest
import torch
import torch.nn as nn

from unf.cli import main
from unf.merge import TaskVector, cuts, knn_agreement, last_linear_input, select_alpha


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


def test_cuts_end_to_end_unlearns_a_fitted_proxy():
    x, y = _clusters(n=30, seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
    from unf.training import train_classifier

    train_classifier(model, x, y, epochs=30, lr=1e-2)
    feats = last_linear_input(model, x)
    assert feats.shape == (len(x), 32)
    proxy_y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(0))
    res = cuts(model, x[:30], proxy_y, x[30:], kind="noise", alphas=[0.0, 0.5, 1.0], epochs=5, lr=1e-3, proxies=2)
    assert res.alpha in (0.0, 0.5, 1.0) and len(res.curve) == 3
    moved = res.task_vector.apply(model.state_dict(), -res.alpha)
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, moved[k])
    with pytest.raises(ValueError, match="inputs"):
        cuts(model, x[:30], proxy_y, None, kind="noise")
    with pytest.raises(ValueError, match="kind"):
        cuts(model, x[:30], proxy_y, x, kind="poison")


def test_cli_cuts_demo_json_keys(capsys):
    assert main(["merge", "cuts-demo", "--kind", "backdoor", "--epochs", "1", "--proxy-epochs", "1", "--proxies",
                 "1", "--seed", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("seed", "corrupted_acc", "cuts_acc", "random_acc", "clean_ft_acc", "clean_acc", "alpha",
                "alpha_curve", "corrupted_asr", "cuts_asr", "random_asr"):
        assert key in rec, key
    assert rec["seed"] == 2 and {"alpha", "acc", "asr"} <= set(rec["alpha_curve"][0])


def test_cli_cuts_demo_user_errors(capsys):
    assert main(["merge", "cuts-demo", "--kind", "backdoor", "--noise-rate", "0.3"]) == 2
    assert "--noise-rate applies to --kind noise" in capsys.readouterr().err
    assert main(["merge", "cuts-demo", "--noise-rate", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unf: error:") and "noise-rate" in err
