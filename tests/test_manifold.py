"""unf.manifold: layers against explicit per-example weights (float64), the closed-form metric against numerical
integrals, the metric-corrected step against a numerical inverse-metric step, wrap, and errors."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import integrate

from unf.manifold import (ManifoldConv2d, ManifoldLinear, MetricCorrected, coefficients, metric, metric_inverse,
                          num_basis, wrap)

D = torch.float64


def _s(manifold, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 2, generator=g, dtype=D) if manifold == "torus" else torch.rand(batch, generator=g,
                                                                                                dtype=D)


def test_coefficients_by_hand():
    assert torch.allclose(coefficients("line", torch.tensor([0.25])), torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(coefficients("circle", torch.tensor([0.25, 0.5])),
                          torch.tensor([[1.0, 0.0, 1.0], [1.0, -1.0, 0.0]]), atol=1e-7)
    c = coefficients("torus", torch.tensor([[0.25, 0.5]]))[0]  # a = (1, 0, 1), b = (1, -1, 0); c[3i + j] = a_i b_j
    assert torch.allclose(c, torch.tensor([1.0, -1, 0, 0, 0, 0, 1, -1, 0]), atol=1e-7)


@pytest.mark.parametrize("manifold", ["line", "circle", "torus"])
def test_linear_equals_explicit_per_example_weights(manifold):
    torch.manual_seed(0)
    layer = ManifoldLinear(5, 4, manifold).to(D)
    assert layer.basis.shape == (num_basis(manifold), 4, 5) and layer.basis_bias.shape == (num_basis(manifold), 4)
    s = _s(manifold, 6)
    c = layer.coefficients(s)
    weight = torch.einsum("bk,koi->boi", c, layer.basis)  # W(s) per example, built explicitly here only
    bias = c @ layer.basis_bias
    x = torch.randn(6, 5, dtype=D)
    torch.testing.assert_close(layer(x, s), torch.einsum("boi,bi->bo", weight, x) + bias, rtol=0, atol=1e-13)
    x3 = torch.randn(6, 2, 5, dtype=D)  # extra dims between batch and features
    torch.testing.assert_close(layer(x3, s), torch.einsum("boi,bti->bto", weight, x3) + bias[:, None],
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("manifold", ["line", "circle", "torus"])
@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 1), (2, 2, 0)])
def test_conv_equals_explicit_per_example_weights(manifold, groups, stride, padding):
    torch.manual_seed(0)
    layer = ManifoldConv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, manifold=manifold).to(D)
    s = _s(manifold, 3)
    c = layer.coefficients(s)
    x = torch.randn(3, 4, 7, 7, dtype=D)
    ref = torch.stack([F.conv2d(x[b:b + 1], torch.einsum("k,k...->...", c[b], layer.basis), c[b] @ layer.basis_bias,
                                stride, padding, 1, groups)[0] for b in range(3)])
    torch.testing.assert_close(layer(x, s), ref, rtol=0, atol=1e-12)


def _numerical_metric(manifold):
    k = num_basis(manifold)
    if manifold != "torus":
        f = lambda s, i, j: float(coefficients(manifold, torch.tensor([s], dtype=D))[0, i] *  # noqa: E731
                                  coefficients(manifold, torch.tensor([s], dtype=D))[0, j])
        return torch.tensor([[integrate.quad(f, 0, 1, args=(i, j))[0] for j in range(k)] for i in range(k)], dtype=D)
    nodes, weights = np.polynomial.legendre.leggauss(24)  # on [-1, 1]; exact far beyond these trig degrees
    s1 = torch.tensor((nodes + 1) / 2, dtype=D)
    w1 = torch.tensor(weights / 2, dtype=D)
    grid = torch.cartesian_prod(s1, s1)
    w = torch.cartesian_prod(w1, w1).prod(1)
    c = coefficients("torus", grid)
    return torch.einsum("n,ni,nj->ij", w, c, c)


@pytest.mark.parametrize("manifold", ["line", "circle", "torus"])
def test_metric_closed_form_against_numerical_integral(manifold):
    g = _numerical_metric(manifold)
    torch.testing.assert_close(metric(manifold), g, rtol=0, atol=1e-10)
    torch.testing.assert_close(metric_inverse(manifold), torch.linalg.inv(g), rtol=0, atol=1e-8)
    if manifold == "line":
        assert torch.equal(metric_inverse("line"), torch.tensor([[4.0, -2.0], [-2.0, 4.0]], dtype=D))


@pytest.mark.parametrize("manifold", ["line", "circle", "torus"])
def test_metric_corrected_step_equals_numerical_inverse_metric_step(manifold):
    torch.manual_seed(0)
    model = wrap(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), manifold).to(D)
    with torch.no_grad():  # off the constant manifold
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, s, y = torch.randn(8, 4, dtype=D), _s(manifold, 8), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x, s), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    MetricCorrected(torch.optim.SGD(model.parameters(), lr=0.1), model).step()
    g_inv = torch.linalg.inv(_numerical_metric(manifold))
    for n, p in model.named_parameters():
        g = grads[n]
        if n.endswith("basis") or n.endswith("basis_bias"):
            g = (g_inv @ g.reshape(g.shape[0], -1)).reshape(g.shape)
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g, rtol=0, atol=1e-9, msg=n)


def test_wrap_keeps_the_function_for_every_context_and_trains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    x = torch.randn(5, 36)
    for manifold in ("line", "circle", "torus"):
        model = wrap(net, manifold)
        assert isinstance(model.module[1], ManifoldConv2d) and isinstance(model.module[4], ManifoldLinear)
        torch.testing.assert_close(model(x, _s(manifold, 5).float()), net(x), rtol=1e-5, atol=1e-6)
    model = wrap(net, "circle")
    opt = MetricCorrected(torch.optim.SGD(model.parameters(), lr=0.1), model)
    s, y = torch.rand(5), torch.randint(0, 4, (5,))
    first = F.cross_entropy(model(x, s), y).item()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x, s), y).backward()
        opt.step()
    assert F.cross_entropy(model(x, s), y).item() < first
    assert model.module[4]._context is None  # not left behind after the call


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, s, y = torch.randn(8, 4, generator=g, dtype=D), torch.rand(8, generator=g, dtype=D), \
            torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x, s), y).backward()
        opt.step()


def test_state_dict_round_trip_resumes_the_same_steps_and_outputs():
    def make(seed):
        torch.manual_seed(seed)
        model = wrap(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), "circle").to(D)
        return model, MetricCorrected(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)

    model, opt = make(0)
    _steps(model, opt, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _steps(model, opt, 4, seed=2)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    other, opt2 = make(7)  # other weights, no momentum yet
    other.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert all(torch.equal(opt2.state[q]["momentum_buffer"], ck["opt"]["optimizer"]["state"][i]["momentum_buffer"])
               for i, q in enumerate(other.parameters()))
    _steps(other, opt2, 4, seed=2)
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n
    x, s = torch.randn(5, 4, dtype=D), torch.rand(5, dtype=D)
    assert torch.equal(model(x, s), other(x, s))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="manifold"):
        ManifoldLinear(3, 2, "sphere")
    with pytest.raises(ValueError, match="manifold"):
        metric_inverse("sphere")
    with pytest.raises(ValueError, match="manifold"):
        wrap(nn.Sequential(nn.Linear(3, 2)), "sphere")
    layer, torus = ManifoldLinear(3, 2, "line"), ManifoldLinear(3, 2, "torus")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"s: .*\[batch\]"):
        layer(x, torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"s: .*\[batch, 2\]"):
        torus(x, torch.rand(4))
    with pytest.raises(ValueError, match="s: 3 contexts for a batch of 4"):
        layer(x, torch.rand(3))
    with pytest.raises(ValueError, match="s: .*context"):
        layer(x)
    with pytest.raises(ValueError, match="model: it has no manifold layer"):
        MetricCorrected(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), nn.Linear(2, 2))
    half = F.linear(x, layer.basis.mean(0), layer.basis_bias.mean(0))  # W(0.5) on the line: (P1 + P2) / 2
    torch.testing.assert_close(layer(x, 0.5), half, rtol=1e-6, atol=1e-6)  # one number is every example's context
    assert math.isclose(float(metric("circle")[1, 1]), 0.5)
