"""unf.flow: equivariance of the UNF velocity, the solvers' NFE count, determinism, mode recovery on a synthetic zoo,
checkpoints and resume, conditioning, BatchNorm recalibration on training data only."""
import json
import math

import pytest
import torch
import torch.nn as nn

from unf.flow import (COST, Conditioning, FlowConfig, MLPVelocity, Standardizer, UNFVelocity, WeightFlow,
                      canonicalize, integrate, ot_pairing, steps_for, train_flow)
from unf.flow.canonical import permute_stacked
from unf.flow.coupling import align_source
from unf.flow.zoo import holdout_split, parse_where, recalibrate_bn
from unf.spec import spec_from_module
from unf.weights import WeightSpace


def tiny():
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.fixture(scope="module")
def spec():
    return spec_from_module(tiny(), torch.randn(2, 3))


def _random_ws(spec, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return WeightSpace(spec, {k: torch.randn(n, 1, *spec[k].shape, generator=g, dtype=dtype)
                              for k in spec.float_names})


@pytest.mark.parametrize("fold_max,prediction,unit_hidden,unit_rank,unit_activation,unit_attention,unit_channels", [
    (0, "velocity", 0, 0, "silu", 0, 0), (4, "velocity", 0, 0, "silu", 0, 0), (4, "data", 0, 0, "silu", 0, 0),
    (2, "data", 8, 0, "silu", 0, 0), (2, "velocity", 8, 3, "silu", 0, 0), (2, "velocity", 8, 3, "softmax", 0, 0),
    (2, "velocity", "units", 3, "sinkhorn", 1, 0), (2, "velocity", "units", 3, "sinkhorn", 0, 3)])
def test_unf_velocity_is_equivariant(spec, fold_max, prediction, unit_hidden, unit_rank, unit_activation,
                                     unit_attention, unit_channels):
    torch.manual_seed(0)
    v = UNFVelocity(spec, hidden=6, depth=2, emb=8, vocab=[3], fold_max=fold_max, prediction=prediction,
                    unit_hidden=unit_hidden, unit_rank=unit_rank, unit_activation=unit_activation,
                    unit_attention=unit_attention, unit_channels=unit_channels).double()
    if unit_channels:  # the unit MLPs work on their own narrower channels
        assert all(b.down.weight.shape[1:] == (unit_channels, 6) and b.unit is not None for b in v.blocks)
    with torch.no_grad():  # the output layer (and each unit MLP's last layer) starts at zero: make it non-trivial
        for p in v.out.parameters():
            p.normal_()
        for block in v.blocks:
            for p in (block.unit.parameters() if block.unit is not None else []):
                p.normal_(std=0.3)
    x = _random_ws(spec, 3, torch.float64)
    t = torch.rand(3, dtype=torch.float64)
    c = torch.tensor([[1], [0], [3]])
    perm = spec.sample_permutation()
    a = v(x.permute(perm), t, c)
    b = v(x, t, c).permute(perm)
    assert max((a[n] - b[n]).abs().max().item() for n in a.names) < 1e-10
    assert max(a[n].abs().max().item() for n in a.names) > 1e-3  # not equivariant by being zero
    # the MLP field sees units by position: it is not equivariant
    m = MLPVelocity(spec, hidden=16, layers=2, emb=8).double()
    with torch.no_grad():
        for p in m.out.parameters():
            p.normal_()
    a, b = m(x.permute(perm), t), m(x, t).permute(perm)
    assert max((a[n] - b[n]).abs().max().item() for n in a.names) > 1e-3


def test_unf_velocity_in_chunks_equals_one_batch(spec, monkeypatch):
    """Sampling evaluates the field in cache-sized chunks of the batch: the same numbers as one batch."""
    import unf.flow.velocity as velocity

    torch.manual_seed(0)
    v = UNFVelocity(spec, hidden=6, depth=2, emb=8, vocab=[3]).double()
    with torch.no_grad():
        for p in v.out.parameters():
            p.normal_()
    x = _random_ws(spec, 7, torch.float64)
    t = torch.rand(7, dtype=torch.float64)
    c = torch.tensor([[1], [0], [3], [2], [1], [0], [3]])
    with torch.no_grad():
        whole = v(x, t, c)
        numel = sum(x[n][0].numel() for n in x.names)
        monkeypatch.setattr(velocity, "CHUNK_ENTRIES", 3 * 6 * numel)  # chunks of 3, 3 and 1 networks
        chunked = v(x, t, c)
    assert max((whole[n] - chunked[n]).abs().max().item() for n in x.names) <= 1e-12
    assert max(whole[n].abs().max().item() for n in x.names) > 1e-3


def test_data_prediction_is_the_velocity_of_the_linear_path(spec):
    torch.manual_seed(0)
    m = MLPVelocity(spec, hidden=16, layers=2, emb=8, prediction="data", min_gap=0.1).double()
    with torch.no_grad():
        for p in m.out.parameters():
            p.normal_()
    x = _random_ws(spec, 4, torch.float64)
    t = torch.tensor([0.0, 0.5, 0.95, 1.0], dtype=torch.float64)
    x1 = m.predict(x, t)
    v = m(x, t)
    gap = torch.tensor([1.0, 0.5, 0.1, 0.1], dtype=torch.float64)  # 1 - t, clamped at min_gap
    for n in x.names:
        want = (x1[n] - x[n]) / gap.view((-1,) + (1,) * (x[n].dim() - 1))
        assert torch.allclose(v[n], want, rtol=1e-12, atol=1e-12)
    # one Euler step from t to 1 lands on the predicted clean weights
    assert torch.allclose(x.flatten()[1] + 0.5 * v.flatten()[1], x1.flatten()[1], atol=1e-12)
    with pytest.raises(ValueError, match="prediction 'noise'"):
        MLPVelocity(spec, prediction="noise")
    with pytest.raises(ValueError, match="min_gap"):
        UNFVelocity(spec, prediction="data", min_gap=0.0)
    ws = _random_ws(spec, 4)
    with pytest.raises(ValueError, match="data-predicting field"):
        train_flow(ws, None, FlowConfig(velocity="unf", loss="data", steps=1, batch_size=2,
                                        velocity_config=dict(hidden=4, depth=1, emb=8)))


@pytest.mark.parametrize("solver", sorted(COST))
@pytest.mark.parametrize("nfe", [4, 8, 9, 20])
def test_solvers_spend_exactly_their_budget(spec, solver, nfe):
    calls = []

    def field(x, t):
        calls.append(float(t[0]))
        return x.map(lambda z: -z)  # dx/dt = -x: x(1) = x(0) / e

    x0 = _random_ws(spec, 2, torch.float64)
    x1, n = integrate(field, x0, nfe, solver)
    steps = steps_for(solver, nfe)
    assert n == len(calls) == steps * COST[solver] <= nfe
    assert all(0 <= t <= 1 for t in calls)
    order = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[solver]
    err = max((x1[k] - x0[k] / math.e).abs().max().item() for k in x0.names)
    assert err < 2.0 * (1.0 / steps) ** order  # the solver's order of accuracy


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_solvers_start_at_t0(spec, solver):
    """``integrate(..., t0=...)`` steps over ``[t0, 1]`` only: dx/dt = -x gives x0 exp(-(1 - t0)); churn's bound
    scales with the shorter step; a start outside [0, 1) is refused."""
    calls = []

    def field(x, t):
        calls.append(float(t[0]))
        return x.map(lambda z: -z)

    x0 = _random_ws(spec, 2, torch.float64)
    x1, n = integrate(field, x0, 40, solver, t0=0.75)
    assert n == len(calls) == 40 and min(calls) == 0.75 and max(calls) <= 1.0
    err = max((x1[k] - x0[k] * math.exp(-0.25)).abs().max().item() for k in x0.names)
    assert err < {"euler": 5e-3, "heun": 1e-4}[solver]  # first and second order in h = 1/160
    integrate(field, x0, 20, "euler", 12.0, generator=torch.Generator().manual_seed(0), t0=0.75)  # h = 1/80: allowed
    with pytest.raises(ValueError, match="churn=12"):
        integrate(field, x0, 20, "euler", 12.0)  # h = 1/20: 12 * h > 0.2
    with pytest.raises(ValueError, match="t0=1"):
        integrate(field, x0, 20, "euler", t0=1.0)


def test_solver_rejects_a_budget_below_one_step(spec):
    with pytest.raises(ValueError, match="rk4"):
        integrate(lambda x, t: x, _random_ws(spec, 1), 3, "rk4")
    with pytest.raises(ValueError, match="unknown solver"):
        steps_for("dopri5", 10)


def _gaussian_field(m, sig, mu, s):
    """The exact velocity of independent coupling from source N(mu, s^2) to data N(m, sig^2), entry by entry:
    ``E[x1 - x0 | x_t]`` of jointly Gaussian variables."""
    def field(x, t):
        tt = float(t[0])
        var = tt ** 2 * sig ** 2 + (1 - tt) ** 2 * s ** 2
        flat = x.flatten()
        v = (m - mu) + (tt * sig ** 2 - (1 - tt) * s ** 2) / var * (flat - tt * m - (1 - tt) * mu)
        return WeightSpace.from_flat(x.spec, v)
    return field


@pytest.mark.parametrize("solver,nfe", [("euler", 100), ("heun", 100)])
def test_churn_keeps_the_flows_marginals(spec, solver, nfe):
    """Stochastic sampling (churn > 0) integrates an SDE with the ODE's marginals: from a diagonal Gaussian source to
    a Gaussian target, both ends have the target's per-entry mean and std, for churn 0 and churn > 0 alike."""
    dim = sum(torch.Size(spec[k].shape).numel() for k in spec.float_names)
    g = torch.Generator().manual_seed(0)
    m, sig = torch.randn(dim, generator=g, dtype=torch.float64), 0.2 + torch.rand(dim, generator=g, dtype=torch.float64)
    mu, s = torch.randn(dim, generator=g, dtype=torch.float64), 0.5 + torch.rand(dim, generator=g, dtype=torch.float64)
    x0 = WeightSpace.from_flat(spec, mu + s * torch.randn(4000, dim, generator=g, dtype=torch.float64))
    field = _gaussian_field(m, sig, mu, s)
    for churn in (0.0, 2.0, 8.0):
        x1, n = integrate(field, x0, nfe, solver, churn, mu, s, torch.Generator().manual_seed(1))
        flat = x1.flatten()
        assert n == steps_for(solver, nfe) * COST[solver]  # the correction costs no evaluations
        assert (flat.mean(0) - m).abs().max() < 0.06, churn
        assert ((flat.std(0) / sig) - 1).abs().max() < 0.12, churn
    # churn really moves the samples (a different SDE path), and 0 is the plain ODE to the bit
    plain, _ = integrate(field, x0, nfe, solver)
    zero, _ = integrate(field, x0, nfe, solver, 0.0, mu, s, torch.Generator().manual_seed(1))
    churned, _ = integrate(field, x0, nfe, solver, 2.0, mu, s, torch.Generator().manual_seed(1))
    assert torch.equal(plain.flatten(), zero.flatten())
    assert (churned.flatten() - plain.flatten()).abs().mean() > 0.05


def test_churn_breaks_a_tie_an_equivariant_field_cannot(spec):
    """Two hidden units with equal weights stay equal under any equivariant ODE; the stochastic sampler's fresh noise
    separates them. Field: pull every entry to 1 (equivariant: the same map on every entry)."""
    x0 = _random_ws(spec, 8, torch.float64)
    name = spec.float_names[0]  # first weight [5, 3]: make units 0 and 1 equal, with their biases
    tensors = {k: x0[k].clone() for k in x0.names}
    tensors[name][:, :, 1] = tensors[name][:, :, 0]
    bias = spec.float_names[1]
    tensors[bias][:, :, 1] = tensors[bias][:, :, 0]
    nxt = spec.float_names[2]
    tensors[nxt][:, :, :, 1] = tensors[nxt][:, :, :, 0]
    x0 = WeightSpace(spec, tensors)

    def field(x, t):
        return x.map(lambda z: (1.0 - z) / (1.0 - float(t[0]) + 0.05))

    ode, _ = integrate(field, x0, 20, "euler")
    sde, _ = integrate(field, x0, 20, "euler", 2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ode[name][:, :, 0], ode[name][:, :, 1])
    assert (sde[name][:, :, 0] - sde[name][:, :, 1]).abs().min() > 0


def test_compiled_sampling_matches_eager_and_falls_back(spec, monkeypatch):
    """``sample(compile=True)`` gives eager's networks to float tolerance: the MLP field through inductor, and the UNF
    field in blocks (one compiled block function, compiled once per block shape and layout; here with dynamo's eager
    backend, since inductor's C++ compile of a UNF field takes a minute); a compiler failure warns and samples
    eagerly."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    import unf.flow.velocity as velocity

    std = Standardizer.fit(_random_ws(spec, 6))
    mlp_flow = WeightFlow(spec, MLPVelocity(spec, hidden=8, layers=1, emb=4), std)
    for p in mlp_flow.velocity.out.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a nonzero field
    ref, _ = mlp_flow.sample(5, nfe=4, solver="heun", seed=3)
    out, _ = mlp_flow.sample(5, nfe=4, solver="heun", seed=3, compile=True)
    assert torch.allclose(out.flatten(), ref.flatten(), atol=1e-5) and ref.flatten().std() > 0
    mlp_flow.sample(5, nfe=4, seed=3)  # compile=False again: back to eager
    assert mlp_flow.velocity._inference is None

    unf_flow = WeightFlow(spec, UNFVelocity(spec, hidden=4, depth=1, emb=4, pos_dim=2), std)
    for p in unf_flow.velocity.out.parameters():
        torch.nn.init.normal_(p, std=0.3)
    numel = sum(math.prod(spec[n].shape) for n in spec.float_names)
    monkeypatch.setattr(velocity, "COMPILED_CHUNK_ENTRIES", numel * 4 * 3)  # compiled blocks of 3 networks: 3, 3, 1
    ref, _ = unf_flow.sample(7, nfe=2, solver="euler", seed=3)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    dynamo.reset()
    counters.clear()
    out, _ = unf_flow.sample(7, nfe=2, solver="euler", seed=3, compile=True)
    assert torch.allclose(out.flatten(), ref.flatten(), atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 4  # per block size (3, 1) and input layout (the noise's views, later steps' fresh tensors)
    unf_flow.sample(7, nfe=3, solver="euler", seed=4, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again: not per step, not per call

    def broken(*args):
        raise RuntimeError("inductor: no C++ compiler")

    unf_flow.velocity.compile_inference()
    unf_flow.velocity._inference.compiled = broken
    with pytest.warns(RuntimeWarning, match="sampling: torch.compile failed .*no C\\+\\+ compiler"):
        out, _ = unf_flow.sample(7, nfe=2, solver="euler", seed=3, compile=True)
    assert torch.allclose(out.flatten(), ref.flatten(), atol=1e-6)


def test_churn_is_checked_and_seeded(spec):
    with pytest.raises(ValueError, match="churn=5"):
        integrate(lambda x, t: x, _random_ws(spec, 1), 20, "euler", 5.0)  # 5 / 20 steps > 0.2
    with pytest.raises(ValueError, match="churn=-1"):
        integrate(lambda x, t: x, _random_ws(spec, 1), 20, "euler", -1.0)
    flow = WeightFlow(spec, MLPVelocity(spec, hidden=8, layers=1, emb=4), Standardizer.fit(_random_ws(spec, 6)))
    a, _ = flow.sample(5, nfe=10, solver="euler", seed=3, churn=1.0)
    b, _ = flow.sample(5, nfe=10, solver="euler", seed=3, churn=1.0)
    c, _ = flow.sample(5, nfe=10, solver="euler", seed=3)
    d, _ = flow.sample(5, nfe=10, solver="euler", seed=4, churn=1.0)
    assert torch.equal(a.flatten(), b.flatten())
    assert not torch.allclose(a.flatten(), c.flatten()) and not torch.allclose(a.flatten(), d.flatten())


def test_temperature_scales_the_source_noise(spec):
    """``temperature`` multiplies the source noise: with a zero field (the velocity field's output layer starts at
    zero) a sample is its start, so its standardised entries are ``temperature`` times those at 1; at 0 every network
    starts, and so ends, the same; 1 is the default; a negative or non-finite temperature is refused."""
    std = Standardizer.fit(_random_ws(spec, 6))
    flow = WeightFlow(spec, UNFVelocity(spec, hidden=4, depth=1, emb=4, prediction="velocity"), std)
    base, _ = flow.sample(4, nfe=4, solver="euler", seed=2)
    same, _ = flow.sample(4, nfe=4, solver="euler", seed=2, temperature=1.0)
    assert torch.equal(base.flatten(), same.flatten())
    hot, _ = flow.sample(4, nfe=4, solver="euler", seed=2, temperature=2.5)
    z = lambda ws: std.to_std(ws).flatten()  # noqa: E731
    assert torch.allclose(z(hot), 2.5 * z(base), atol=1e-5) and z(base).abs().max() > 0.1
    cold, _ = flow.sample(4, nfe=4, solver="euler", seed=2, temperature=0.0)
    flat = cold.flatten()
    assert torch.equal(flat, flat[:1].expand_as(flat))
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            flow.sample(2, nfe=2, seed=0, temperature=bad)


def test_ot_pairing_is_the_optimal_permutation():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(6, 4, generator=g)
    perm = torch.randperm(6, generator=g)
    x0 = x1[perm] + 0.01 * torch.randn(6, 4, generator=g)  # the optimal pairing undoes perm
    idx = ot_pairing(x0, x1)
    assert torch.equal(x0[idx], x0[torch.argsort(perm)])


def test_time_sampling_draws_the_path_times_it_names(spec):
    """``time_sampling="logit-normal"``: t = sigmoid(z), z ~ N(0, 1) (73 % of t within (0.25, 0.75), uniform: 50 %);
    the uniform default is the stream of earlier runs; a bad name is refused."""
    from unf.flow.model import Source
    from unf.flow.train import _batch

    data = _random_ws(spec, 10, seed=3)
    times = {}
    for kind in ("uniform", "logit-normal"):
        cfg = FlowConfig(ot=False, batch_size=4000, time_sampling=kind)
        times[kind] = _batch(data, None, cfg, step=1, world=1, rank=0, source=Source())[1]
    mid = {k: float(((t > 0.25) & (t < 0.75)).float().mean()) for k, t in times.items()}
    assert abs(mid["uniform"] - 0.5) < 0.03 and abs(mid["logit-normal"] - 0.728) < 0.03
    g = torch.Generator().manual_seed(0 * 1_000_003 + 1)  # the batch's stream: indices, noise, then times
    torch.randint(10, (4000,), generator=g)
    torch.randn(4000, sum(t[0].numel() for t in data.values()), generator=g)
    assert torch.equal(times["uniform"], torch.rand(4000, generator=g))
    with pytest.raises(ValueError, match="time_sampling 'cosine'"):
        train_flow(data, None, FlowConfig(time_sampling="cosine", steps=1, batch_size=2,
                                          velocity_config=dict(hidden=4, depth=1, emb=8)))


def test_align_target_moves_targets_within_their_orbit_towards_the_noise(spec):
    """Equivariant OT coupling: each target network is replaced by the member of its permutation orbit nearest its
    noise sample -- the same function (outputs equal to float tolerance), never farther from the noise."""
    from unf.flow.model import Source
    from unf.flow.novelty import stacked_logits
    from unf.flow.train import _batch

    data = _random_ws(spec, 10, seed=3)
    cfg = FlowConfig(ot=False, align_target=True, batch_size=6)
    xt, t, _, v = _batch(data, None, cfg, step=5, world=1, rank=0, source=Source())
    x1 = xt.flatten() + (1 - t)[:, None] * v.flatten()  # x_t = (1 - t) x0 + t x1 and v = x1 - x0
    x0 = x1 - v.flatten()
    idx = torch.randint(10, (6,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + 5))
    orig = data.flatten()[idx]
    assert (x1 - orig).abs().amax() > 1e-3  # permuted: not the zoo's own coordinates
    x = torch.randn(7, 3)
    moved = stacked_logits(tiny(), spec, WeightSpace.from_flat(spec, x1), x)
    torch.testing.assert_close(moved, stacked_logits(tiny(), spec, WeightSpace.from_flat(spec, orig), x),
                               rtol=1e-4, atol=1e-4)
    assert ((x1 - x0).norm(dim=1) <= (orig - x0).norm(dim=1) + 1e-4).all()
    with pytest.raises(ValueError, match="choose one"):
        train_flow(data, None, FlowConfig(align_source=True, align_target=True, steps=1))


def test_aligned_ot_pairs_each_target_with_the_noise_it_is_a_permuted_copy_of(spec):
    """Targets are permuted copies of shuffled noise samples: raw-distance OT misses pairs, aligned OT finds all."""
    from unf.flow.coupling import aligned_ot_pairing

    x0 = _random_ws(spec, 8, torch.float64, seed=4)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    perms = [{k: torch.randperm(n, generator=g) for k, n in spec.groups.items()} for _ in range(8)]
    x1 = permute_stacked(WeightSpace(spec, {n: t[order] for n, t in x0.items()}), perms)
    idx = aligned_ot_pairing(x0, x1, candidates=8)
    assert idx.tolist() == order.tolist()
    raw = ot_pairing(x0.flatten(), x1.flatten())
    assert raw.tolist() != order.tolist()
    data = _random_ws(spec, 6)
    with pytest.raises(ValueError, match="align_target"):
        train_flow(data, None, FlowConfig(ot_candidates=4, steps=1))
    flow, hist = train_flow(data, None, FlowConfig(ot_candidates=3, align_target=True, steps=2, batch_size=4,
                                                   velocity_config=dict(hidden=4, depth=1, emb=8)))
    assert len(hist) == 2 and math.isfinite(hist[-1]["loss"])


def test_align_source_recovers_a_permuted_target(spec):
    """200 random networks, each permuted by its own seeded permutation: every exact copy is found, as by
    ``unf.align.weight_matching`` (identity-started descent alone missed 29 of 200 such copies)."""
    x1 = _random_ws(spec, 200, seed=1)
    g = torch.Generator().manual_seed(2)
    perms = [{k: torch.randperm(n, generator=g) for k, n in spec.groups.items()} for _ in range(200)]
    assert sum(any(not torch.equal(p[k], torch.arange(n)) for k, n in spec.groups.items()) for p in perms) > 190
    out = align_source(permute_stacked(x1, perms), x1)
    err = torch.stack([(out[n] - x1[n]).flatten(1).abs().amax(1) for n in x1.names]).amax(0)
    assert (err < 1e-6).all(), f"{int((err >= 1e-6).sum())} of 200 permuted copies not recovered"


def test_canonicalize_keeps_functions_and_aligns_copies(spec):
    nets = [tiny() for _ in range(2)]
    ws = WeightSpace.from_module(spec, nets)
    perm = spec.sample_permutation()
    both = WeightSpace(spec, {n: torch.cat([ws[n][:1], ws[n][:1].clone()]) for n in ws.names})
    both = permute_stacked(both, [{g: torch.arange(k) for g, k in spec.groups.items()}, perm])
    out = canonicalize(both, "reference", reference=0)
    assert max((out[n][1] - out[n][0]).abs().max().item() for n in ws.names) < 1e-6  # the copy is found
    x = torch.randn(7, 3)
    m = tiny()
    sd = out.to_state_dicts()[1]
    m.load_state_dict(sd)
    assert torch.allclose(m(x), nets[0](x), atol=1e-5)
    with pytest.raises(ValueError, match="canonicalize mode"):
        canonicalize(ws, "median")


def _two_mode_zoo(spec, n=40, seed=0):
    """Networks at two points of weight space (plus small noise): a flow must put its samples near both."""
    g = torch.Generator().manual_seed(seed)
    modes = [_random_ws(spec, 1, seed=10), _random_ws(spec, 1, seed=11)]
    label = torch.arange(n) % 2
    ws = WeightSpace(spec, {k: torch.cat([modes[int(i)][k] for i in label]) + 0.05 * torch.randn(
        n, 1, *spec[k].shape, generator=g) for k in spec.float_names})
    return ws, modes, label


def _aligned_distances(spec, gen, mode):
    """Distance of every generated network to ``mode`` after aligning it there by weight matching: an equivariant
    field with a symmetric source generates each mode in all its permutations, so plain distances would not do."""
    from unf.align import align_many

    ref = {n: mode[n][0, 0] for n in spec.float_names}
    perms = align_many(spec, ref, [{n: gen[n][i, 0] for n in spec.float_names} for i in range(gen.batch_size)])
    return (permute_stacked(gen, perms).flatten() - mode.flatten()).norm(dim=1)


@pytest.mark.parametrize("velocity", ["unf", "mlp"])
def test_flow_recovers_the_modes_of_a_synthetic_zoo(spec, velocity):
    ws, modes, label = _two_mode_zoo(spec)
    rows = [{"mode": ["a", "b"][int(i)]} for i in label]
    vcfg = dict(hidden=12, depth=2, emb=16) if velocity == "unf" else dict(hidden=128, layers=2, emb=16)
    cfg = FlowConfig(velocity=velocity, velocity_config=vcfg, steps=600 if velocity == "unf" else 1000,
                     batch_size=32, lr=3e-3, ema=0.99, condition=["mode"], seed=0)
    torch.manual_seed(0)
    flow, hist = train_flow(ws, rows, cfg)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    scale = (modes[0].flatten() - modes[1].flatten()).norm()
    for k, name in enumerate(["a", "b"]):
        gen, nfe = flow.sample(30, nfe=20, solver="heun", condition={"mode": name}, seed=1)
        assert nfe == 20
        d = torch.stack([_aligned_distances(spec, gen, m) for m in modes], 1)  # [30, 2]
        assert (d.argmin(1) == k).float().mean() >= 0.9  # conditioning picks the mode
        # and the samples sit near it. The equivariant field concentrates less on a point mass (it shares its
        # coefficients over units; measured median 0.31-0.33 x the modes' distance at 600 steps, vs < 0.1 for MLP)
        assert d[:, k].median() < (0.45 if velocity == "unf" else 0.25) * scale
        assert d[:, k].median() < 0.6 * d[:, 1 - k].median()
    gen, _ = flow.sample(60, nfe=20, solver="heun", seed=2)  # unconditioned: both modes
    d = torch.stack([_aligned_distances(spec, gen, m) for m in modes], 1)
    assert 0.2 < d.argmin(1).float().mean() < 0.8


def test_sampling_is_deterministic_for_a_seed(spec, tmp_path):
    ws, _, _ = _two_mode_zoo(spec, n=8)
    flow, _ = train_flow(ws, None, FlowConfig(velocity_config=dict(hidden=4, depth=1, emb=8), steps=5,
                                              batch_size=4))
    a, _ = flow.sample(5, nfe=4, seed=3)
    b, _ = flow.sample(5, nfe=4, seed=3)
    c, _ = flow.sample(5, nfe=4, seed=4)
    assert torch.equal(a.flatten(), b.flatten()) and not torch.equal(a.flatten(), c.flatten())
    # batches do not change the networks: sample i is sample i
    d, _ = flow.sample(5, nfe=4, seed=3, batch_size=2)
    assert torch.allclose(a.flatten(), d.flatten(), atol=1e-6)
    flow.save(tmp_path / "f.safetensors")
    e, _ = WeightFlow.load(tmp_path / "f.safetensors").sample(5, nfe=4, seed=3)
    assert torch.equal(a.flatten(), e.flatten())


def test_training_resumes_exactly_from_a_checkpoint(spec, tmp_path):
    ws, _, _ = _two_mode_zoo(spec, n=8)
    cfg = dict(velocity_config=dict(hidden=4, depth=1, emb=8), batch_size=4, checkpoint_every=3, seed=1)
    full, h_full = train_flow(ws, None, FlowConfig(steps=6, **cfg), out=tmp_path / "full")
    train_flow(ws, None, FlowConfig(steps=3, **cfg), out=tmp_path / "part")
    resumed, h_res = train_flow(ws, None, FlowConfig(steps=6, **cfg), out=tmp_path / "part")
    assert [h["loss"] for h in h_res] == pytest.approx([h["loss"] for h in h_full], rel=1e-5)
    a, b = full.velocity.state_dict(), resumed.velocity.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        train_flow(ws, None, FlowConfig(steps=6, lr=1.0, **cfg), out=tmp_path / "part")
    # a checkpoint written before a setting existed (here: align_target) resumes as if it had the default
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "part" / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps({k: v for k, v in json.loads(meta["config"]).items() if k != "align_target"})
    save_file(tensors, str(path), metadata=meta)
    old, _ = train_flow(ws, None, FlowConfig(steps=7, **cfg), out=tmp_path / "part")
    with pytest.raises(ValueError, match="align_target"):
        train_flow(ws, None, FlowConfig(steps=8, align_target=True, **cfg), out=tmp_path / "part")


def test_cooldown_anneals_and_a_constant_run_resumes_into_it(spec, tmp_path):
    """Warmup-stable-decay: ``cooldown`` decays the rate linearly to 0 over the last steps; a constant-rate run resumed
    with more steps and a cooldown is the run trained with that schedule from the start."""
    from unf.flow.train import lr_factor

    cfg = FlowConfig(steps=10, warmup=2, cooldown=4)
    assert [lr_factor(cfg, s) for s in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert [lr_factor(FlowConfig(steps=10, warmup=2), s) for s in (0, 9)] == [0.5, 1.0]
    ws, _, _ = _two_mode_zoo(spec, n=8)
    kw = dict(velocity_config=dict(hidden=4, depth=1, emb=8), batch_size=4, checkpoint_every=3, seed=1, warmup=2)
    full, h_full = train_flow(ws, None, FlowConfig(steps=9, cooldown=3, **kw), out=tmp_path / "full")
    train_flow(ws, None, FlowConfig(steps=6, **kw), out=tmp_path / "part")  # constant rate after the warm-up
    resumed, h_res = train_flow(ws, None, FlowConfig(steps=9, cooldown=3, **kw), out=tmp_path / "part")
    assert [h["loss"] for h in h_res] == pytest.approx([h["loss"] for h in h_full], rel=1e-5)
    a, b = full.velocity.state_dict(), resumed.velocity.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the cooldown changed the last steps: not the constant-rate run
    const, _ = train_flow(ws, None, FlowConfig(steps=9, **kw), out=tmp_path / "const")
    assert not all(torch.allclose(a[k], const.velocity.state_dict()[k]) for k in a)
    with pytest.raises(ValueError, match="cooldown"):
        train_flow(ws, None, FlowConfig(steps=4, cooldown=5, **kw))


def test_compiled_training_matches_eager_resumes_and_falls_back(spec, tmp_path, monkeypatch):
    """``compile=True`` gives eager's losses and weights to float tolerance, compiles once (one graph, no
    recompilation per step), is no setting of the run (an eager checkpoint resumes compiled), and falls back to eager
    with a warning when the compiler fails. (The MLP field: inductor's C++ compile of a UNF field takes minutes; the
    next test checks that the UNF field traces as one graph.)"""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    ws, _, _ = _two_mode_zoo(spec, n=8)
    cfg = dict(velocity="mlp", velocity_config=dict(hidden=8, layers=1, emb=8), batch_size=4, checkpoint_every=2,
               seed=1)
    eager, h_eager = train_flow(ws, None, FlowConfig(steps=4, **cfg), out=tmp_path / "eager")
    dynamo.reset()
    counters.clear()
    train_flow(ws, None, FlowConfig(steps=2, **cfg), out=tmp_path / "mixed")
    mixed, h_mixed = train_flow(ws, None, FlowConfig(steps=4, **cfg), out=tmp_path / "mixed", compile=True)
    assert counters["stats"]["unique_graphs"] == 1  # one graph (forward and backward), compiled once
    assert [h["loss"] for h in h_mixed] == pytest.approx([h["loss"] for h in h_eager], rel=1e-4)
    assert "compile_seconds" in h_mixed[2] and all("compile_seconds" not in h for h in h_mixed[:2] + h_mixed[3:])
    a, b = eager.velocity.state_dict(), mixed.velocity.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    def broken(self, *args, **kw):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(torch._dynamo.eval_frame.OptimizedModule, "__call__", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eagerly"):
        _, h_fell = train_flow(ws, None, FlowConfig(steps=4, **cfg), compile=True)
    assert [h["loss"] for h in h_fell] == pytest.approx([h["loss"] for h in h_eager], rel=1e-5)
    assert all("compile_seconds" not in h for h in h_fell)


def test_unf_training_step_traces_as_one_graph(spec):
    """``train_flow(compile=True)`` pays only if the UNF field's loss is one graph: no graph break, with unit memories
    (Sinkhorn) and pair tables too."""
    import torch._dynamo as dynamo

    from unf.flow.train import _Objective

    ws = _random_ws(spec, 4)
    v = UNFVelocity(spec, hidden=4, depth=1, emb=8, fold_max=2, unit_hidden=4, unit_rank=2,
                    unit_activation="sinkhorn")
    dynamo.reset()
    explained = dynamo.explain(_Objective(v))(ws, torch.rand(4), None, ws * 0.5)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_selection_keeps_the_best_scored_snapshot_and_survives_resume(spec, tmp_path):
    ws, _, _ = _two_mode_zoo(spec, n=8)
    cfg = dict(velocity="mlp", velocity_config=dict(hidden=8, layers=2, emb=8), batch_size=4, checkpoint_every=2,
               seed=2)
    calls = []

    def select(flow):  # a score that peaks at the 2nd selection (step 4)
        calls.append(1)
        return [0.1, 0.9, 0.5][len(calls) - 1]

    best, hist = train_flow(ws, None, FlowConfig(steps=6, select_every=2, **cfg), out=tmp_path / "sel",
                            select=select)
    assert best.info["selected_step"] == 4 and best.info["selected_score"] == 0.9
    assert [h.get("select") for h in hist] == [None, 0.1, None, 0.9, None, 0.5]
    # the kept field is the EMA of step 4: the same as a plain run of 4 steps (batches depend on (seed, step))
    plain, _ = train_flow(ws, None, FlowConfig(steps=4, **cfg))
    a, b = best.velocity.state_dict(), plain.velocity.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    on_disk = WeightFlow.load(tmp_path / "sel" / "flow.safetensors").velocity.state_dict()
    assert all(torch.allclose(a[k], on_disk[k]) for k in a)
    # a resumed run past its best step returns the best one from disk, and extending it scores on
    calls.clear()
    calls.extend([1, 1])  # the next score is the 3rd of the list (0.5): no improvement
    again, _ = train_flow(ws, None, FlowConfig(steps=6, select_every=2, **cfg), out=tmp_path / "sel", select=select)
    assert again.info["selected_step"] == 4
    with pytest.raises(ValueError, match="select function"):
        train_flow(ws, None, FlowConfig(steps=2, select_every=1, **cfg))


def test_gaussian_source_is_fitted_saved_and_sampled_from(spec, tmp_path):
    from unf.flow import Source

    flat = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0]])
    src = Source.fit(flat, floor=0.01)
    assert src.mean.tolist() == [1.0, 2.0, 5.0] and src.std.tolist() == pytest.approx([1.0, 1.0, 0.01])
    assert torch.equal(src.draw(torch.ones(1, 3)), torch.tensor([[2.0, 3.0, 5.01]]))
    assert Source().draw(flat) is flat
    ws, _, _ = _two_mode_zoo(spec, n=8)
    cfg = dict(velocity_config=dict(hidden=4, depth=1, emb=8), steps=3, batch_size=4)
    flow, _ = train_flow(ws, None, FlowConfig(source="gaussian", **cfg))
    assert flow.source.kind == "gaussian" and flow.source.mean.shape == (ws.flatten().shape[1],)
    # with a zero field the samples ARE source samples: the Gaussian of the standardised zoo, mapped back
    with torch.no_grad():
        for p in flow.velocity.out.parameters():
            p.zero_()
    gen, _ = flow.sample(4000, nfe=2, solver="euler", seed=0)
    assert torch.allclose(gen.flatten().mean(0), ws.flatten().mean(0), atol=0.15)
    flow.save(tmp_path / "g.safetensors")
    back = WeightFlow.load(tmp_path / "g.safetensors")
    assert torch.equal(back.source.mean, flow.source.mean) and torch.equal(back.source.std, flow.source.std)
    with pytest.raises(ValueError, match="permutation-invariant source"):
        train_flow(ws, None, FlowConfig(source="gaussian", align_source=True, **cfg))
    with pytest.raises(ValueError, match="source 'uniform'"):
        train_flow(ws, None, FlowConfig(source="uniform", **cfg))


def test_standardizer_and_conditioning_round_trip():
    spec = spec_from_module(tiny(), torch.randn(2, 3))
    ws = _random_ws(spec, 5).map(lambda t: 3 * t + 1)
    st = Standardizer.fit(ws)
    back = st.from_std(st.to_std(ws))
    assert max((back[n] - ws[n]).abs().max().item() for n in ws.names) < 1e-5
    z = st.to_std(ws)
    assert all(abs(z[n].mean().item()) < 1e-5 and abs(z[n].std().item() - 1) < 1e-4 for n in z.names)
    rows = [{"act": a, "acc": str(0.1 * i)} for i, a in enumerate(["relu", "tanh"] * 10)]
    cond = Conditioning.fit(rows, ["act", "acc"], bins=4)
    assert cond.vocab == [2, 4]
    enc = cond.encode(rows)
    assert enc.shape == (20, 2) and enc.min() >= 1
    assert cond.index("act", "tanh") == 2
    with pytest.raises(ValueError, match="not a value seen"):
        cond.index("act", "gelu")
    with pytest.raises(ValueError, match="missing"):
        Conditioning.fit(rows, ["depth"])


def test_holdout_and_where_parsing():
    train, held = holdout_split([str(i) for i in range(10)] * 2, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8 and not set(train) & set(held)
    assert holdout_split([str(i) for i in range(10)], 0.2, seed=0) == (train, held)
    assert parse_where(["activation=relu", "lr = 0.1"]) == {"activation": "relu", "lr": "0.1"}
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        parse_where(["relu"])


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_bn_recalibration_sees_training_data_only():
    torch.manual_seed(0)
    x_train = torch.randn(40, 1, 4, 4)
    x_test = torch.randn(10, 1, 4, 4) + 5.0  # a shifted test split: its statistics would be visible
    net = _BNNet()
    seen = []
    net.conv.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    recalibrate_bn(net, x_train, batch_size=20)  # equal batches: the mean of batch means is the mean
    inputs = torch.cat(seen)
    assert inputs.shape[0] == len(x_train) and torch.equal(inputs, x_train)  # every training input, nothing else
    with torch.no_grad():
        mean = net.conv(x_train).mean((0, 2, 3))
    assert torch.allclose(net.bn.running_mean, mean, atol=1e-5)


def test_generated_bn_networks_are_recalibrated_on_training_inputs_only():
    from unf.flow.evaluate import recalibrated

    torch.manual_seed(0)
    x_train = torch.randn(30, 1, 4, 4)
    seen = []

    def factory():
        net = _BNNet()
        net.conv.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
        return net

    spec = spec_from_module(_BNNet(), x_train[:2])
    ws = WeightSpace.from_module(spec, [_BNNet() for _ in range(3)])  # running stats at their defaults
    out = recalibrated(factory, ws, [{}] * 3, x_train)
    inputs = torch.cat(seen)
    assert len(inputs) == 3 * len(x_train)
    assert all(any(torch.equal(row, t) for t in x_train) for row in inputs)  # no input from outside x_train
    for i, sd in enumerate(out.to_state_dicts()):
        net = _BNNet()
        net.load_state_dict(sd)
        with torch.no_grad():
            mean = net.conv(x_train).mean((0, 2, 3))
        assert torch.allclose(sd["bn.running_mean"], mean, atol=1e-5)


# -- choices never read the test split -------------------------------------------------------------------------------
def test_canonicalisation_reference_is_chosen_by_training_accuracy_only():
    from unf.flow.canonical import reference_index

    rows = [{"train_acc": a, "test_acc": b} for a, b in [(0.7, 0.99), (0.9, 0.5), (0.9, 0.6), (0.8, 0.7)]]
    assert reference_index(rows) == 1  # the best train_acc, ties to the first; test_acc 0.99 is ignored
    assert reference_index([{**r, "test_acc": float("nan")} for r in rows]) == 1
    with pytest.warns(UserWarning, match="no train_acc"):
        assert reference_index([{"test_acc": b} for b in (0.5, 0.99)]) == 0  # not the best test accuracy


def test_selection_never_keeps_an_ineligible_snapshot_and_survives_resume(spec, tmp_path):
    """A ``select`` returning ``{"score", "eligible"}``: the best ELIGIBLE snapshot is kept (a collapsed field's
    higher accuracy does not count), a resumed run keeps the choice, and with none eligible the last one is
    returned without ``selected_step``."""
    ws, _, _ = _two_mode_zoo(spec, n=8)
    cfg = dict(velocity="mlp", velocity_config=dict(hidden=8, layers=2, emb=8), batch_size=4, checkpoint_every=2,
               seed=2)
    results = [{"score": 0.5, "eligible": True, "agreement": 0.8}, {"score": 0.9, "eligible": False, "agreement": 1.0},
               {"score": 0.4, "eligible": True, "agreement": 0.7}]
    calls = []

    def select(flow):
        calls.append(1)
        return results[len(calls) - 1]

    best, hist = train_flow(ws, None, FlowConfig(steps=6, select_every=2, **cfg), out=tmp_path / "sel",
                            select=select)
    assert best.info["selected_step"] == 2 and best.info["selected_score"] == 0.5
    assert [h.get("eligible") for h in hist] == [None, True, None, False, None, True]
    assert [h.get("select_agreement") for h in hist if "select" in h] == [0.8, 1.0, 0.7]
    plain, _ = train_flow(ws, None, FlowConfig(steps=2, **cfg))  # the kept field is the EMA of step 2
    a, b = best.velocity.state_dict(), plain.velocity.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # resumed from step 4 (the ineligible best score is in the log): step 2 stays the choice
    train_flow(ws, None, FlowConfig(steps=4, select_every=2, **cfg), out=tmp_path / "res",
               select=lambda f, it=iter(results): next(it))
    rest = iter(results[2:])
    again, _ = train_flow(ws, None, FlowConfig(steps=6, select_every=2, **cfg), out=tmp_path / "res",
                          select=lambda f: next(rest))
    assert again.info["selected_step"] == 2
    none, _ = train_flow(ws, None, FlowConfig(steps=4, select_every=2, **cfg),
                         select=lambda f: {"score": 1.0, "eligible": False})
    assert "selected_step" not in none.info


def test_agreement_guard_marks_a_collapsed_field_ineligible():
    """With the training networks as ``reference``, a field whose samples are all one network (a zero data
    prediction: every sample is the zoo's mean) agrees with itself everywhere and is not eligible; the training
    networks' own agreement is the level."""
    from unf.flow import Source, build_velocity
    from unf.flow import evaluate
    from unf.zoo.builtin import mlp

    torch.manual_seed(0)
    spec = spec_from_module(mlp(), torch.randn(2, 64))
    ws = WeightSpace.from_module(spec, [mlp() for _ in range(8)])
    velocity = build_velocity("mlp", spec, **FlowConfig(velocity="mlp").velocity_kwargs([]))  # output starts at 0
    flow = WeightFlow(spec, velocity, Standardizer.fit(ws), Conditioning.fit([{}] * 8, []), {}, Source())
    out = evaluate.train_split_scorer(mlp, {"activation": "relu"}, "digits-flat", 0, num=5, nfe=2, solver="euler",
                                      reference=ws)(flow)
    assert out["agreement"] == 1.0 and out["reference_agreement"] < 0.97 and out["eligible"] is False
    plain = evaluate.train_split_scorer(mlp, {"activation": "relu"}, "digits-flat", 0, num=5, nfe=2,
                                        solver="euler")(flow)
    assert plain == out["score"]  # the same samples, the same accuracy
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.train_split_scorer(mlp, {"activation": "relu"}, "digits-flat", 0, reference=WeightSpace(
            spec, {n: t[:1] for n, t in ws.items()}))
    with pytest.raises(ValueError, match="num=1"):
        evaluate.train_split_scorer(mlp, {"activation": "relu"}, "digits-flat", 0, num=1, reference=ws)


def test_selection_score_never_reads_the_test_split(monkeypatch):
    """``train_split_scorer`` is the training-split accuracy of the flow's samples, and is unchanged when the test
    split is replaced by NaN inputs and impossible labels."""
    import dataclasses

    from unf import data as datasets
    from unf.flow import Source, build_velocity
    from unf.flow import evaluate
    from unf.flow.novelty import stacked_logits
    from unf.zoo.builtin import mlp

    torch.manual_seed(0)
    spec = spec_from_module(mlp(), torch.randn(2, 64))
    ws = WeightSpace.from_module(spec, [mlp() for _ in range(8)])
    velocity = build_velocity("mlp", spec, **FlowConfig(velocity="mlp").velocity_kwargs([]))
    with torch.no_grad():
        for p in velocity.parameters():
            p.normal_(std=0.02)
    flow = WeightFlow(spec, velocity, Standardizer.fit(ws), Conditioning.fit([{}] * 8, []), {}, Source())
    load = datasets.load

    def scored(change):
        monkeypatch.setattr(evaluate.datasets, "load", lambda *a, **k: change(load(*a, **k)))
        score = evaluate.train_split_scorer(mlp, {"activation": "relu"}, "digits-flat", 0, num=6, nfe=2,
                                            solver="euler")(flow)
        monkeypatch.setattr(evaluate.datasets, "load", load)
        return score

    honest = scored(lambda s: s)
    split = load("digits-flat", seed=0)  # by hand: the training-split accuracy of the same samples
    samples, _ = flow.sample(6, nfe=2, solver="euler", seed=0)
    logits = stacked_logits(mlp(), spec, samples, split.x_train)
    assert honest == pytest.approx(float((logits.argmax(2) == split.y_train).double().mean()), abs=1e-12)
    blind = scored(lambda s: dataclasses.replace(s, x_test=torch.full_like(s.x_test, float("nan")),
                                                  y_test=torch.full_like(s.y_test, -1)))
    assert blind == honest
