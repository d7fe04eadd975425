"""The learned optimizer: torch.optim contract, exact equivariance, its base, meta-weights files, meta-training."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unf
from unf.nn.shared import SharedPlan, SharedUNFLinear
from unf.optim import LearnedRule, RuleConfig, UNFOptimizer, init_state, load_rule, step_direction
from unf.optim import optimizer as optimizer_module
from unf.optim.meta import MetaConfig, es_gradient, meta_train


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _random_rule(seed=0, spec=None, **kw) -> LearnedRule:
    """A rule whose output layer is not zero (so that ``f`` matters)."""
    torch.manual_seed(seed)
    rule = LearnedRule(spec=spec, **kw)
    with torch.no_grad():
        if rule.spec is not None:
            rule.out.table.normal_(0, 0.5)
        else:
            rule.out.w2.normal_(0, 0.5)
            rule.out.b2.normal_(0, 0.5)
    return rule.requires_grad_(False)


def _lstm_spec():
    """The spec of examples/models.py's LSTM classifier (hidden 5, one layer)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "models.py"
    mod_spec = importlib.util.spec_from_file_location("unf_example_models_optim", path)
    models = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(models)
    return unf.spec_from_module(models.lstm(hidden=5, layers=1), torch.zeros(2, 4, dtype=torch.long))


def _train(model, opt, steps, seed=0, closure_style=True):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g, dtype=next(model.parameters()).dtype)
        y = torch.randint(3, (16,), generator=g)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def test_untrained_rule_is_adam():
    a, b = _mlp(), _mlp()
    la = _train(a, UNFOptimizer(a.named_parameters(), spec=unf.spec_from_module(a, torch.randn(1, 6)),
                                weights=LearnedRule()), 20)
    lb = _train(b, torch.optim.Adam(b.parameters(), lr=1e-3), 20)
    assert la == pytest.approx(lb, rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def _step_inputs(spec, rule, gen):
    """Random float64 parameters and gradients ``[2, 1]`` and a random optimizer state for ``rule`` on ``spec``."""
    p = unf.WeightSpace(spec, {n: torch.randn(2, 1, *spec[n].shape, dtype=torch.float64, generator=gen)
                               for n in spec.float_names})
    g = p.map(lambda t: torch.randn(t.shape, dtype=t.dtype, generator=gen))
    state = init_state(p, len(rule.config.decays))
    state = {"m": state["m"].map(lambda t: torch.randn(t.shape, dtype=t.dtype, generator=gen)),
             "v": state["v"].map(lambda t: torch.rand(t.shape, dtype=t.dtype, generator=gen))}
    return p, g, state


@pytest.mark.parametrize("variant", ["unf", "deepsets", "mlp", "unf-exact"])
def test_step_is_exactly_equivariant(variant):
    model = _mlp(dtype=torch.float64)
    spec = unf.spec_from_module(model, torch.randn(1, 6, dtype=torch.float64))
    exact = variant == "unf-exact"
    rule = _random_rule(variant=variant, spec=spec if exact else None).double()
    plan = rule.plan(spec)
    gen = torch.Generator().manual_seed(3)
    p, g, state = _step_inputs(spec, rule, gen)
    perm = spec.sample_permutation(gen)
    d1, s1 = step_direction(rule, plan, p, g, state, 7)
    d2, s2 = step_direction(rule, plan, p.permute(perm), g.permute(perm),
                            {k: v.permute(perm) for k, v in state.items()}, 7)
    d1p = d1.permute(perm)
    assert max(float((d1p[n] - d2[n]).abs().max()) for n in spec.float_names) < 1e-12
    assert max(float((d1[n]).abs().max()) for n in spec.float_names) > 1e-4  # the step is not trivially zero
    # the learned part really differs from the base: compare with an untrained rule
    d0, _ = step_direction(LearnedRule(variant=variant, spec=spec if exact else None).double().requires_grad_(False),
                           plan, p, g, state, 7)
    assert any(not torch.allclose(d0[n], d1[n]) for n in spec.float_names)


def test_shared_layer_handles_diagonal_terms_of_recurrent_weights():
    """An LSTM's hidden-to-hidden weight has one group on both axes: diagonal terms, still exactly equivariant."""
    spec = _lstm_spec()
    plan = SharedPlan(spec)
    assert any(d[-3] or d[-2] for d in plan.descriptors)  # diagonal reductions or embeddings occur
    _assert_equivariant(SharedUNFLinear(2, 3).double(), spec, plan)


@torch.no_grad()
def _assert_equivariant(layer, spec, plan):
    """``layer`` commutes with a sampled permutation of ``spec`` on random float64 input (to 1e-12)."""
    gen = torch.Generator().manual_seed(0)
    ws = unf.WeightSpace(spec, {k: torch.randn(2, layer.in_channels, *spec[k].shape, dtype=torch.float64,
                                               generator=gen) for k in spec.float_names})
    perm = spec.sample_permutation(gen)
    a, b = layer(ws.permute(perm), plan), layer(ws, plan).permute(perm)
    assert max(float((a[k] - b[k]).abs().max()) for k in spec.float_names) < 1e-12


@pytest.mark.parametrize("basis", ["unf", "deepsets", "pointwise"])
def test_shared_layer_constant_channels_equal_written_ones(basis):
    """``const``: channels constant over every tensor, applied without writing them, give the same output as the
    same channels written out in full (float64), for an MLP and a CNN spec, one coefficient set or one per member;
    a plan with diagonal embeddings (an LSTM) refuses them with a clear error."""
    from torch.func import functional_call, stack_module_state

    gen = torch.Generator().manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    for model, x in ((_mlp(), torch.randn(1, 6)), (cnn, torch.randn(1, 1, 8, 8))):
        spec = unf.spec_from_module(model, x)
        plan = SharedPlan(spec, basis)
        assert plan.constant_channels
        names = spec.float_names
        ws = unf.WeightSpace(spec, {k: torch.randn(3, 2, *spec[k].shape, dtype=torch.float64, generator=gen)
                                    for k in names})
        const = torch.randn(3, 2, len(names), dtype=torch.float64, generator=gen)  # [B, S, T]
        full = unf.WeightSpace(spec, {k: torch.cat([ws[k], const[:, :, i].reshape(3, 2, *[1] * len(spec[k].shape)
                                                                                    ).expand_as(ws[k])], 1)
                                      for i, k in enumerate(names)})
        layers = [SharedUNFLinear(4, 3, basis, hyper_hidden=8).double() for _ in range(3)]
        for layer in layers:
            torch.nn.init.normal_(layer.b2, generator=gen)  # a nonzero bias term too
        with torch.no_grad():
            a, b = layers[0](full, plan), layers[0](ws, plan, const)
            assert max(float((a[k] - b[k]).abs().max()) for k in names) < 1e-12
            assert max(float(a[k].abs().max()) for k in names) > 1e-3
            one = layers[0](ws, plan, const[:1])  # one constant set for every member
            ref = layers[0](unf.WeightSpace(spec, {k: torch.cat(
                [ws[k], const[:1, :, i].reshape(1, 2, *[1] * len(spec[k].shape)).expand_as(ws[k])], 1)
                for i, k in enumerate(names)}), plan)
            assert max(float((one[k] - ref[k]).abs().max()) for k in names) < 1e-12
            stacked = stack_module_state(layers)[0]  # [B, ...]: one coefficient set per member
            a = functional_call(layers[0], stacked, (full, plan))
            b = functional_call(layers[0], stacked, (ws, plan, const))
            assert max(float((a[k] - b[k]).abs().max()) for k in names) < 1e-12
        with pytest.raises(ValueError, match=r"const has shape \(3, 2, 1\); expected"):
            layers[0](ws, plan, const[:, :, :1])
    lstm = _lstm_spec()
    ws = unf.WeightSpace(lstm, {k: torch.randn(1, 1, *lstm[k].shape) for k in lstm.float_names})
    with pytest.raises(ValueError, match="diagonal"):
        SharedUNFLinear(2, 3)(ws, SharedPlan(lstm), torch.zeros(1, 1, len(lstm.float_names)))


def test_shared_layer_parameter_count_does_not_depend_on_the_model():
    layer = SharedUNFLinear(3, 4).double()
    n = sum(p.numel() for p in layer.parameters())
    for model, x in [(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), torch.randn(1, 5)),
                     (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                                    nn.Linear(5 * 4 * 4, 3)), torch.randn(1, 1, 8, 8))]:
        spec = unf.spec_from_module(model, x)
        _assert_equivariant(layer, spec, SharedPlan(spec))
        assert sum(p.numel() for p in layer.parameters()) == n


def test_optimizer_contract_state_dict_resume_is_bit_identical():
    rule = _random_rule()
    spec = unf.spec_from_module(_mlp(), torch.randn(1, 6))
    a = _mlp()
    opt = UNFOptimizer(a.named_parameters(), spec=spec, weights=rule)
    _train(a, opt, 5)
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt.state_dict())
    cont = _train(a, opt, 5, seed=1)
    b = _mlp()
    b.load_state_dict(saved_model)
    opt_b = UNFOptimizer(b.named_parameters(), spec=spec, weights=rule)
    opt_b.load_state_dict(saved_opt)
    assert _train(b, opt_b, 5, seed=1) == cont
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_lr_scheduler_scales_the_step_and_params_without_grad_are_skipped():
    model = _mlp()
    spec = unf.spec_from_module(model, torch.randn(1, 6))
    model[4].bias.requires_grad_(False)
    opt = UNFOptimizer(model.named_parameters(), spec=spec, weights=_random_rule(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    deltas = []
    for _ in range(2):
        before = model[0].weight.detach().clone()
        _train(model, opt, 1)
        deltas.append((model[0].weight - before).norm().item())
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.25
    assert deltas[1] < 0.8 * deltas[0]  # halved learning rate: a clearly smaller step
    assert model[4].bias not in opt.state


def test_plain_parameters_warn_and_still_train():
    model = _mlp()
    with pytest.warns(UserWarning, match="named_parameters"):
        opt = UNFOptimizer(model.parameters(), weights=_random_rule())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(3, (32,), generator=g)  # one fixed batch to fit

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(30)]
    final = float(F.cross_entropy(model(x), y).detach())
    assert all(b < a for a, b in zip(losses, losses[1:] + [final]))  # falls at every step
    assert final < 0.97 * losses[0]  # here: 1.093 -> 1.040


def test_uncovered_parameters_use_fixed_axes():
    model = _mlp()
    spec = unf.spec_from_module(model, torch.randn(1, 6)).subset(["0.weight", "0.bias", "2.weight", "2.bias"])
    opt = UNFOptimizer(model.named_parameters(), spec=spec, weights=_random_rule())
    before = model[4].weight.detach().clone()
    _train(model, opt, 2)
    assert not torch.equal(before, model[4].weight)
    (used, _), = opt._plans.values()
    assert used["4.weight"].axes == (None, None) and used["0.weight"].axes == spec["0.weight"].axes


def test_named_param_groups_added_later_and_scalar_parameters():
    model = _mlp()
    temperature = nn.Parameter(torch.tensor(1.5))
    spec = unf.spec_from_module(model, torch.randn(1, 6))
    opt = UNFOptimizer(list(model.named_parameters())[:4], spec=spec, weights=_random_rule())
    opt.add_param_group({"params": [*list(model.named_parameters())[4:], ("temperature", temperature)], "lr": 0.5})
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    before = temperature.detach().clone(), model[4].weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(x) / temperature, y).backward()
    opt.step()
    assert not torch.equal(before[0], temperature) and not torch.equal(before[1], model[4].weight)
    assert opt.param_groups[1]["lr"] == 0.5


def test_spec_of_another_module_is_refused():
    model = _mlp()
    spec = unf.spec_from_module(model, torch.randn(1, 6))
    wrapped = nn.Sequential(model)  # names gain a "0." prefix, as DDP's "module."
    with pytest.raises(ValueError, match="no parameter name is in the spec"):
        UNFOptimizer(wrapped.named_parameters(), spec=spec, weights=LearnedRule())


def test_stacked_meta_parameters_equal_separate_rules():
    """Meta-training runs B rules at once with stacked parameters: each member gets what its own rule gives."""
    model = _mlp(dtype=torch.float64)
    spec = unf.spec_from_module(model, torch.randn(1, 6, dtype=torch.float64))
    rules = [_random_rule(seed=s).double() for s in range(3)]
    gen = torch.Generator().manual_seed(1)
    p = unf.WeightSpace(spec, {n: torch.randn(3, 1, *spec[n].shape, dtype=torch.float64, generator=gen)
                               for n in spec.float_names})
    g = p.map(lambda t: torch.randn(t.shape, dtype=t.dtype, generator=gen))
    state = init_state(p, 3)
    stacked = {k: torch.stack([dict(r.named_parameters())[k] for r in rules]) for k, _ in rules[0].named_parameters()}
    plan = rules[0].plan(spec)
    together, _ = step_direction(rules[0], plan, p, g, state, 4, params=stacked)
    for i, r in enumerate(rules):
        one = lambda ws: unf.WeightSpace(spec, {n: ws[n][i:i + 1] for n in spec.float_names})  # noqa: E731
        alone, _ = step_direction(r, plan, one(p), one(g), {k: one(v) for k, v in state.items()}, 4)
        assert max(float((together[n][i] - alone[n][0]).abs().max()) for n in spec.float_names) < 1e-12


@torch.no_grad()
def test_per_parameter_basis_has_no_swapped_axes():
    """The "mlp" variant maps each entry to itself: on a square recurrent weight no transposed term sneaks in."""
    spec = _lstm_spec()
    layer = SharedUNFLinear(1, 1, basis="pointwise").double()
    plan = SharedPlan(spec, "pointwise")
    ws = unf.WeightSpace(spec, {k: torch.zeros(1, 1, *spec[k].shape, dtype=torch.float64) for k in spec.float_names})
    name = "lstm.weight_hh_l0"
    base = layer(ws, plan)[name]
    ws[name][0, 0, 3, 1] = 1.0  # one entry: the output may change there (and by the constant) only
    delta = layer(ws, plan)[name] - base
    delta[0, 0, 3, 1] = 0
    assert float(delta.abs().max()) == 0.0


@pytest.mark.parametrize("task", sorted(__import__("unf.optim.tasks", fromlist=["TASKS"]).TASKS))
def test_every_evaluation_task_trains(task):
    from unf.optim.tasks import TASKS, train_curve

    r = train_curve(TASKS[task], lambda m, x: UNFOptimizer.for_model(m, x, weights=_random_rule()), 0, eval_every=1,
                    steps=5)
    assert len(r["train"]) == 6 and all(v is not None for v in r["train"]) and 0 <= r["test_acc"] <= 1
    assert all(b < a for a, b in zip(r["train"], r["train"][1:]))  # the full-batch training loss falls every step


def test_spec_shape_mismatch_names_the_parameter():
    spec = unf.spec_from_module(_mlp(), torch.randn(1, 6))
    other = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        UNFOptimizer(other.named_parameters(), spec=spec, weights=LearnedRule())


def test_state_lives_in_one_flat_buffer_and_survives_a_changing_parameter_set():
    model = _mlp()
    opt = UNFOptimizer.for_model(model, torch.randn(1, 6), weights=_random_rule())
    _train(model, opt, 2)
    ms = [opt.state[p]["m"] for p in model.parameters()]
    assert len({m.untyped_storage().data_ptr() for m in ms}) == 1  # views of one buffer
    assert [tuple(m.shape) for m in ms] == [(3, *p.shape) for p in model.parameters()]
    # a step without the last layer's gradients rebuilds the buffer and keeps every state
    before = {k: v.clone() for k, v in opt.state[model[4].weight].items()}
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    model[4].weight.grad = None
    opt.step()
    assert all(torch.equal(opt.state[model[4].weight][k], v) for k, v in before.items())
    assert float(opt.state[model[0].weight]["step"]) == 3 and float(opt.state[model[4].weight]["step"]) == 2
    losses = _train(model, opt, 2)  # and back to every tensor
    assert float(opt.state[model[4].weight]["step"]) == 4 and all(math.isfinite(v) for v in losses)


def test_optimizer_step_equals_the_weight_space_rule():
    """The optimizer's flat path takes exactly the step of ``step_direction`` on weight spaces."""
    model = _mlp(dtype=torch.float64)
    spec = unf.spec_from_module(model, torch.randn(1, 6, dtype=torch.float64))
    rule = _random_rule().double()
    opt = UNFOptimizer(model.named_parameters(), spec=spec, weights=rule, lr=0.7)
    _train(model, opt, 3)
    names = [n for n, _ in model.named_parameters()]
    ws = lambda ts: unf.WeightSpace(spec, {n: t[None, None] for n, t in zip(names, ts)})  # noqa: E731
    params = [p.detach().clone() for p in model.parameters()]
    state = {"m": unf.WeightSpace(spec, {n: opt.state[p]["m"][None].clone() for n, p in model.named_parameters()}),
             "v": ws([opt.state[p]["v"].clone() for p in model.parameters()])}
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 6, dtype=torch.float64)), torch.tensor([0, 1, 2, 0])).backward()
    direction, new = step_direction(rule, rule.plan(spec), ws(params), ws([p.grad for p in model.parameters()]),
                                    state, 4)
    opt.step()
    for n, p, p0 in zip(names, model.parameters(), params):
        assert torch.allclose(p, p0 - 0.7 * direction[n][0, 0], rtol=0, atol=1e-14)
        assert torch.allclose(opt.state[p]["m"], new["m"][n][0], rtol=0, atol=1e-14)


def test_rule_core_traces_as_one_graph():
    """``compile=True`` pays off only if the rule's network is one graph: no graph break on an MLP or a CNN spec."""
    import torch._dynamo as dynamo

    from unf.optim.rule import flat_features, flat_head
    from unf.weights import segment_sizes

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(20, 3))
    for model, x in ((_mlp(), torch.randn(1, 6)), (cnn, torch.randn(1, 1, 6, 6))):
        spec = unf.spec_from_module(model, x)
        rule = _random_rule()
        plan = rule.plan(spec)
        sizes = segment_sizes(spec)
        n = sum(sizes)
        index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        times = torch.rand(3, len(sizes))
        feats, base, base_rms, _, _, _ = flat_features(
            rule, plan, torch.randn(1, n), torch.randn(1, n), torch.randn(1, 3, n), torch.rand(1, n),
            torch.tensor(1.5), torch.tensor(2.0), times, index)
        dynamo.reset()
        explained = dynamo.explain(flat_head)(rule, plan, feats, base, base_rms, index, times=times)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("whole", [True, False], ids=["whole-graph", "raw-features"])
def test_compiled_optimizer_matches_eager_and_falls_back(monkeypatch, whole):
    """Both compiled paths (the whole rule with the features normalised in place, for small weight spaces; above
    ``WHOLE_GRAPH_ENTRIES``, with the features raw) take the eager steps, compile once, and fall back to eager on a
    compiler failure."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from unf.optim import rule as rule_module

    if not whole:
        monkeypatch.setattr(rule_module, "WHOLE_GRAPH_ENTRIES", 0)

    a, b = _mlp(), _mlp()
    spec = unf.spec_from_module(a, torch.randn(1, 6))
    la = _train(a, UNFOptimizer(a.named_parameters(), spec=spec, weights=_random_rule()), 4)
    dynamo.reset()
    counters.clear()
    lb = _train(b, UNFOptimizer(b.named_parameters(), spec=spec, weights=_random_rule(), compile=True), 4)
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, not again per step
    assert lb == pytest.approx(la, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    c = _mlp()
    opt = UNFOptimizer(c.named_parameters(), spec=spec, weights=_random_rule(), compile=True)

    def broken(*args, **kw):
        raise RuntimeError("inductor: no C++ compiler")

    opt._compiled.whole.compiled = opt._compiled.head.compiled = broken
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eagerly"):
        lc = _train(c, opt, 4)
    assert lc == pytest.approx(la, rel=1e-6) and opt._compiled.failed


def test_all_finite_flags_each_tensor_across_dtypes():
    from unf.optim.optimizer import _all_finite

    nan, inf = float("nan"), float("inf")
    ts = [torch.ones(3), torch.tensor([1.0, nan]), torch.empty(0), torch.tensor([-inf]),
          torch.ones(2, dtype=torch.float64), torch.tensor([inf], dtype=torch.float64), torch.tensor([3e38, -3e38])]
    assert _all_finite(ts) == [True, False, True, False, True, False, True]
    assert _all_finite([]) == []


def test_non_finite_gradient_skips_that_tensor_and_keeps_its_state():
    model = _mlp()
    opt = UNFOptimizer.for_model(model, torch.randn(1, 6), weights=_random_rule())
    _train(model, opt, 2)
    state_before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    w_before, b_before = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite gradients in \['0.weight'\]"):
        opt.step()
    assert torch.equal(model[0].weight, w_before)
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in state_before.items())
    assert not torch.equal(model[2].weight, b_before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_follows_parameter_dtype(dtype):
    model = _mlp(dtype=dtype)
    opt = UNFOptimizer.for_model(model, torch.randn(1, 6, dtype=dtype), weights=_random_rule())
    losses = _train(model, opt, 3)
    assert all(math.isfinite(v) for v in losses)
    st = opt.state[model[0].weight]
    assert st["m"].dtype == dtype and st["v"].dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda():
    model = _mlp().cuda()
    opt = UNFOptimizer.for_model(model, torch.randn(1, 6, device="cuda"), weights=_random_rule())
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = torch.randn(8, 6, device="cuda", generator=g), torch.zeros(8, dtype=torch.long, device="cuda")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.state[model[0].weight]["m"].is_cuda


def test_exact_variant_is_for_one_architecture(tmp_path):
    model = _mlp()
    spec = unf.spec_from_module(model, torch.randn(1, 6))
    rule = _random_rule(variant="unf-exact", spec=spec)
    shared = LearnedRule()
    assert sum(p.numel() for p in rule.parameters()) > sum(p.numel() for p in shared.parameters())
    rule.save(tmp_path / "exact.safetensors")
    back = LearnedRule.load(tmp_path / "exact.safetensors")
    assert back.spec == spec
    _train(model, UNFOptimizer.for_model(model, torch.randn(1, 6), weights=back), 2)
    other = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="fit only the architecture"):
        UNFOptimizer.for_model(other, torch.randn(1, 6), weights=back)
    with pytest.raises(ValueError, match="pass its spec"):
        LearnedRule(variant="unf-exact")
    cfg = MetaConfig(steps=2, pairs=1, unroll=2, min_horizon=2, max_horizon=4, widths=(8,), datasets=("iris",),
                     rule=dict(variant="unf-exact", hidden=4, depth=1))
    meta_rule, _ = meta_train(cfg)
    assert meta_rule.spec["0.weight"].shape == (8, 4)
    with pytest.raises(ValueError, match="one architecture"):  # the MLP mix needs one architecture for it
        meta_train(MetaConfig(rule=dict(variant="unf-exact")))


def test_weights_file_round_trip_and_errors(tmp_path):
    rule = _random_rule(hidden=4, depth=1)
    rule.save(tmp_path / "r.safetensors")
    back = LearnedRule.load(tmp_path / "r.safetensors")
    assert back.config == rule.config
    assert all(torch.equal(a, b) for a, b in zip(rule.state_dict().values(), back.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        LearnedRule.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a unf learned-optimizer weights file"):
        LearnedRule.load(tmp_path / "other.safetensors")


def test_shipped_weights_load_and_their_hash_is_checked(tmp_path, monkeypatch):
    assert optimizer_module.DEFAULT_SHA256 is not None
    rule = load_rule("default")
    assert isinstance(rule, LearnedRule) and rule.config.variant == "unf"
    bad = tmp_path / "default.safetensors"
    data = bytearray(optimizer_module.DEFAULT_WEIGHTS.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(optimizer_module, "DEFAULT_WEIGHTS", bad)
    with pytest.raises(RuntimeError, match="missing or damaged"):
        load_rule("default")


def test_es_estimator_is_unbiased_on_a_quadratic():
    torch.manual_seed(0)
    theta, c, sigma, n = torch.randn(5), torch.randn(5), 0.1, 200_000
    eps = torch.randn(n, 5)
    loss = lambda t: ((t - c) ** 2).sum(-1)  # noqa: E731
    est = es_gradient(loss(theta + sigma * eps), loss(theta - sigma * eps), eps, sigma, n)
    assert torch.allclose(est, 2 * (theta - c), atol=0.03)
    # split over "processes": the partial sums add up to the same estimate
    half = es_gradient(loss(theta + sigma * eps[:n // 2]), loss(theta - sigma * eps[:n // 2]), eps[:n // 2], sigma, n)
    rest = es_gradient(loss(theta + sigma * eps[n // 2:]), loss(theta - sigma * eps[n // 2:]), eps[n // 2:], sigma, n)
    assert torch.allclose(half + rest, est, atol=1e-5)


def test_tiny_meta_training_lowers_the_meta_loss(tmp_path):
    """A rule started with a far too small step (alpha 1e-5) learns to take larger ones within a few ES steps."""
    cfg = MetaConfig(steps=16, pairs=4, sigma=0.05, unroll=5, min_horizon=10, max_horizon=40, outer_lr=0.1,
                     estimator="es", rule=dict(hidden=4, depth=1, hyper_hidden=4, alpha=1e-5))
    rule, history = meta_train(cfg)
    assert float(rule.log_alpha.detach()) > math.log(1e-5) + 0.5
    # same task, same data: the meta-trained rule reaches a lower training loss than the start
    from unf.optim.meta import _Inner, sample_task

    task = sample_task(torch.Generator().manual_seed(5), cfg)
    scores = []
    for r in (LearnedRule(RuleConfig(**cfg.rule)), rule):
        inner = _Inner(task, cfg, r, 0, 1)
        scores.append(float(inner.unroll(r, None, 20, cfg.loss_clip)[-1]))
    assert scores[1] < scores[0]


def test_meta_training_resumes_from_its_checkpoint(tmp_path):
    cfg = MetaConfig(steps=6, pairs=2, unroll=3, min_horizon=3, max_horizon=6,
                     rule=dict(hidden=4, depth=1, hyper_hidden=4))
    full, hist_full = meta_train(cfg)
    half_cfg = MetaConfig(**{**cfg.__dict__, "steps": 3})
    meta_train(half_cfg, out=tmp_path, checkpoint_every=1)
    resumed, hist = meta_train(cfg, out=tmp_path, checkpoint_every=1)
    assert len(hist) == 6
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    other = MetaConfig(**{**cfg.__dict__, "sigma": 0.5})
    with pytest.raises(ValueError, match="other settings"):
        meta_train(other, out=tmp_path)


@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_meta_train_wires_the_estimator(monkeypatch, estimator):
    """With a linear meta-loss c . theta the recorded meta-gradients are exactly the antithetic estimates: ES uses the
    step's noise, PES the noise accumulated since the task began."""
    from unf.optim import meta

    cfg = MetaConfig(steps=2, pairs=3, sigma=0.1, unroll=2, min_horizon=4, max_horizon=4, grad_clip=1e9,
                     estimator=estimator, rule=dict(hidden=2, depth=1, hyper_hidden=2))
    dim = sum(p.numel() for p in LearnedRule(RuleConfig(**cfg.rule)).parameters())
    c = torch.randn(dim, generator=torch.Generator().manual_seed(0))

    def linear_unroll(self, rule, stacked, steps, loss_clip, log_loss=False, compiled=None, floor=1e-3):
        self.t += steps
        return torch.cat([v.reshape(v.shape[0], -1) for v in stacked.values()], 1) @ c

    monkeypatch.setattr(meta._Inner, "unroll", linear_unroll)
    _, history = meta_train(cfg)
    noise = [torch.stack([meta._noise(cfg, step, i, dim) for i in range(cfg.pairs)]) for step in range(2)]
    for step, h in enumerate(history):
        directions = noise[step] + (noise[0] if estimator == "pes" and step == 1 else 0)
        expected = ((noise[step] @ c)[:, None] * directions).sum(0) / cfg.pairs  # (L+ - L-) = 2 sigma c . eps
        assert h["grad_norm"] == pytest.approx(float(expected.norm()), rel=1e-4)


def test_many_tensor_branch_of_the_features_equals_the_per_slice_one(monkeypatch):
    """``flat_features`` scales the features slice by slice up to ``_SEGMENT_LOOP`` tensors and by one expanded
    multiplication above; both give the same step (forced here on a 6-tensor MLP)."""
    from unf.optim import rule as rule_module

    model = _mlp(dtype=torch.float64)
    spec = unf.spec_from_module(model, torch.randn(1, 6, dtype=torch.float64))
    rule = _random_rule().double()
    plan = rule.plan(spec)
    p, g, state = _step_inputs(spec, rule, torch.Generator().manual_seed(5))
    d1, s1 = step_direction(rule, plan, p, g, state, 4)
    monkeypatch.setattr(rule_module, "_SEGMENT_LOOP", 0)
    d2, s2 = step_direction(rule, plan, p, g, state, 4)
    for n in spec.float_names:
        torch.testing.assert_close(d1[n], d2[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s1["m"][n], s2["m"][n], rtol=0, atol=0)
