"""unf.optim.PSG: the scaled gradients against a direct computation, and the torch.optim contract around SGD, Adam,
LBFGS and the learned UNFOptimizer (shared groups, schedulers, closures, loss=, state_dict round trips)."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unf.optim import PSG, UNFOptimizer
from unf.quant import layer_bits, quantize


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(),
                         nn.Linear(7, 3)).to(dtype)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


def _grads(model):
    x, y = _data(model[0].weight.dtype)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("target", ["quant", "zero"])
def test_scaled_gradients_equal_the_direct_computation(target):
    model = _net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model)
    opt = PSG(torch.optim.SGD(model.named_parameters(), lr=1.0), bits=3, scale=50, target=target, skip=["3.weight"])
    opt.step()
    for n, p in model.named_parameters():
        w, g = before[n], grads[n]
        if w.dim() >= 2 and n != "3.weight":
            g = 50 * ((w - quantize(w, 3)).abs() if target == "quant" else w.abs()) * g
        torch.testing.assert_close(p.detach(), w - g, rtol=0, atol=1e-14, msg=n)  # biases, LayerNorm: plain


def test_per_layer_bits_and_unnamed_parameters_with_model():
    model = _net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model)
    bits = layer_bits(model, 2)  # first and last at 8 bits
    assert bits == {"0.weight": 8, "3.weight": 2, "5.weight": 8}
    opt = PSG(torch.optim.SGD(model.parameters(), lr=1.0), bits=bits, scale=30, model=model)
    opt.step()
    for n, b in bits.items():
        w = before[n]
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(),
                                   w - 30 * (w - quantize(w, b)).abs() * grads[n], rtol=0, atol=1e-14)


def test_running_range_is_used_and_kept():
    model = _net()
    opt = PSG(torch.optim.SGD(model.named_parameters(), lr=0.1), bits=4, scale=150, range_momentum=0.5)
    w0 = model[3].weight.detach().clone()
    _grads(model)
    g = model[3].weight.grad.clone()
    opt.step()  # first step: the range is max|w|
    w1 = model[3].weight.detach().clone()
    torch.testing.assert_close(w1, w0 - 0.1 * 150 * (w0 - quantize(w0, 4)).abs() * g, rtol=0, atol=1e-14)
    _grads(model)
    g = model[3].weight.grad.clone()
    r = 0.5 * w0.abs().max() + 0.5 * w1.abs().max()
    opt.step()
    torch.testing.assert_close(model[3].weight.detach(), w1 - 0.1 * 150 * (w1 - quantize(w1, 4, r)).abs() * g,
                               rtol=0, atol=1e-14)
    assert float(opt.state_dict()["wrapper"]["range"][4]) == pytest.approx(float(r))  # 3.weight is the 5th


def _train(model, opt, steps, seed=0, sched=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g, dtype=model[0].weight.dtype)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _make(kind, model):
    if kind == "sgd":
        inner = torch.optim.SGD(model.named_parameters(), lr=0.05, momentum=0.9)
    elif kind == "adam":
        inner = torch.optim.Adam(model.named_parameters(), lr=1e-2)
    else:
        inner = UNFOptimizer.for_model(model, torch.randn(1, 5, dtype=model[0].weight.dtype))
    return PSG(inner, bits=4, scale=150, range_momentum=0.9)


@pytest.mark.parametrize("kind", ["sgd", "adam", "unf"])
def test_state_dict_round_trip_and_scheduler_resume_bit_identically(kind):
    model = _net()
    opt = _make(kind, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    assert opt.param_groups is opt.optimizer.param_groups
    _train(model, opt, 3, seed=0, sched=sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    _train(model, opt, 4, seed=1, sched=sched)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    other = _net(seed=5)
    other.load_state_dict(ck["model"])
    opt2 = _make(kind, other)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    assert opt2.param_groups is opt2.optimizer.param_groups  # still shared after the inner load
    _train(other, opt2, 4, seed=1, sched=sched2)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_scheduler_drives_the_inner_lr_without_warnings():
    model = _net()
    opt = PSG(torch.optim.SGD(model.parameters(), lr=0.1), bits=4, scale=150)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.0 if e >= 1 else 1.0)
        _train(model, opt, 1, sched=sched)
        assert opt.optimizer.param_groups[0]["lr"] == 0.0
        frozen = copy.deepcopy(model.state_dict())
        _train(model, opt, 2, sched=sched)
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())


def test_closure_gets_scaled_gradients():
    a, b = _net(), _net()
    x, y = _data()
    oa = PSG(torch.optim.SGD(a.parameters(), lr=0.1), bits=2, scale=30)
    ob = PSG(torch.optim.SGD(b.parameters(), lr=0.1), bits=2, scale=30)
    oa.zero_grad()
    F.cross_entropy(a(x), y).backward()
    oa.step()

    def closure():
        ob.zero_grad()
        loss = F.cross_entropy(b(x), y)
        loss.backward()
        return loss

    assert torch.is_tensor(ob.step(closure))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


class _RecordingLBFGS(torch.optim.LBFGS):
    """LBFGS that keeps the gradients it sees after each evaluation of the closure it is given."""

    def step(self, closure):
        self.seen = []

        def recorded():
            loss = closure()
            self.seen.append([p.grad.clone() for p in self.param_groups[0]["params"]])
            return loss

        return super().step(recorded)


def test_every_lbfgs_closure_evaluation_sees_scaled_gradients():
    model, (x, y) = _net(), _data()
    names = [n for n, _ in model.named_parameters()]
    opt = PSG(_RecordingLBFGS(model.parameters(), lr=0.5, max_iter=5), bits=4, scale=150, model=model)
    raw = []  # (weights, unscaled gradients) at each evaluation, read inside the user's closure

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        raw.append(([p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()]))
        return loss

    opt.step(closure)
    seen = opt.optimizer.seen
    assert len(seen) == len(raw) >= 3  # LBFGS re-evaluated the closure at new weights
    assert any(not torch.equal(raw[0][0][0], r[0][0]) for r in raw[1:])
    for (ws, gs), got in zip(raw, seen):
        for n, w, g, s in zip(names, ws, gs, got):
            want = 150 * (w - quantize(w, 4)).abs() * g if w.dim() >= 2 else g
            torch.testing.assert_close(s, want, rtol=0, atol=1e-14, msg=n)


class _Recorder(torch.optim.SGD):
    def step(self, closure=None, loss=None):
        self.seen = loss
        return super().step(closure)


def test_loss_is_passed_to_inner_optimizers_that_take_it():
    model = _net()
    opt = PSG(_Recorder(model.parameters(), lr=0.1), bits=4, scale=150)
    _grads(model)
    opt.step(loss=torch.tensor(2.5))
    assert float(opt.optimizer.seen) == 2.5
    plain = PSG(torch.optim.SGD(model.parameters(), lr=0.1), bits=4, scale=150)
    twin = copy.deepcopy(model)
    _grads(model)
    _grads(twin)
    before = model[3].weight.detach().clone()
    plain.step(loss=torch.tensor(2.5))  # SGD.step takes no loss: dropped, and the step is the same as without it
    PSG(torch.optim.SGD(twin.parameters(), lr=0.1), bits=4, scale=150).step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert not torch.equal(before, model[3].weight)  # a step was taken
    inner = UNFOptimizer.for_model(model, torch.randn(1, 5, dtype=torch.float64))
    unf_step, got = inner.step, []
    inner.step = lambda closure=None, loss=None: (got.append(loss), unf_step(closure, loss=loss))[1]
    unf_opt = PSG(inner, bits=4, scale=150)
    _grads(model)
    assert unf_opt.step(loss=torch.tensor(1.0)) is None
    assert len(got) == 1 and float(got[0]) == 1.0  # the learned optimizer's step takes loss=: it reached it


def test_add_param_group_and_zero_grad_go_to_the_inner_optimizer():
    model = _net()
    extra = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    opt = PSG(torch.optim.SGD(model.parameters(), lr=0.1), bits=4, scale=150)
    opt.add_param_group({"params": [extra], "lr": 0.01})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups[1]["params"][0] is extra
    extra.grad = torch.ones(3, 3, dtype=torch.float64)
    opt.zero_grad()
    assert extra.grad is None


def test_bad_arguments_name_themselves():
    model = _net()
    sgd = torch.optim.SGD(model.named_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="target"):
        PSG(sgd, bits=4, scale=1, target="ones")
    with pytest.raises(ValueError, match="bits"):
        PSG(sgd, bits=1, scale=1)
    with pytest.raises(ValueError, match="scale"):
        PSG(sgd, bits=4, scale=-1)
    with pytest.raises(ValueError, match="skip"):
        PSG(sgd, bits=4, scale=1, skip=["9.weight"])
    with pytest.raises(ValueError, match="skip.*named_parameters"):
        PSG(torch.optim.SGD(model.parameters(), lr=0.1), bits=4, scale=1, skip=["0.weight"])
    with pytest.raises(TypeError, match="optimizer"):
        PSG(model, bits=4, scale=1)
    with pytest.raises(ValueError, match="state_dict"):
        PSG(sgd, bits=4, scale=1).load_state_dict(sgd.state_dict())


def test_readme_psg_and_manifold_snippets_run():
    """README's two snippets in the PSG/weight-manifold section, the ``...`` line replaced by three training steps."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("## Training-time weight methods")
    section = text[start:text.index("\n## ", start)]  # up to the next section
    psg_code, manifold_code = re.findall(r"```python\n(.*?)```", section, re.S)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = torch.randn(16, 64), torch.randint(10, (16,))
    loop = "for _ in range(3):\n    opt.zero_grad()\n    F.cross_entropy(model(x), y).backward()\n    opt.step()\n#"
    assert psg_code.count("\n...") == 1
    ns = {"model": model, "x": x, "y": y, "F": F}
    exec(psg_code.replace("\n...", "\n" + loop), ns)
    assert ns["bits"] == {"0.weight": 8, "2.weight": 2, "4.weight": 8}  # the recipe measured in BENCHMARKS.md
    q = ns["qmodel"]
    assert q is not model and torch.unique(q[2].weight).numel() <= 3  # 2 bits: -1, 0, +1 steps
    ns = {"torch": torch, "x": x, "s": torch.rand(16), "y": y}
    exec(manifold_code, ns)
    before = [p.detach().clone() for p in ns["model"].parameters()]
    ns["loss"].backward()
    ns["opt"].step()
    assert any(not torch.equal(a, b) for a, b in zip(before, ns["model"].parameters()))
