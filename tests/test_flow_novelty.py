"""Novelty metrics and baseline generators: known answers, copies recognised as copies, seeded determinism."""
import pytest
import torch
import torch.nn as nn

import unf
from unf.flow.baselines import (averages, dominated, frontier_accuracy, gaussian, interpolations, memorisers,
                                noise_frontier, train_split_accuracy)
from unf.flow.novelty import (_align, _permute, _stacked, aligned_l2, derivedness, error_iou, novelty_report,
                              probe_set, stacked_logits, take)
from unf.weights import WeightSpace
from unf.zoo import Member, make_population, train_population


def make():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def zoo():
    """12 independently trained MLPs on digits: 8 as the reference (training) set, 4 held out."""
    split = unf.data.load("digits-flat")
    pop = make_population(make, [Member(seed=s, lr=1e-2) for s in range(12)])
    train_population(pop, split.x_train, split.y_train, epochs=3, batch_size=64, seed=0)
    model = make()
    spec = unf.spec_from_module(model, split.x_train[:2])
    nets = WeightSpace.from_state_dicts(spec, pop.state_dicts())
    ref, other = take(nets, torch.arange(8)), take(nets, torch.arange(8, 12))
    x = probe_set(split.x_test, copies=2, seed=0)
    ref_logits = stacked_logits(model, spec, ref, x)
    acc = (ref_logits[:, :len(split.y_test)].argmax(2) == split.y_test).double().mean(1)
    return dict(model=model, spec=spec, ref=ref, other=other, x=x, y=split.y_test, split=split,
                ref_logits=ref_logits, acc=acc)


def permuted(spec, ws, seed):
    return ws.permute(spec.sample_permutation(torch.Generator().manual_seed(seed)))


# -- stacked_logits, probe_set ---------------------------------------------------------------------------------------
def test_stacked_logits_equal_a_loop_of_module_calls(zoo):
    model, spec, ref, x = zoo["model"], zoo["spec"], zoo["ref"], zoo["x"][:50]
    model.train()
    out = stacked_logits(model, spec, ref.to(dtype=torch.float64), x, batch=3)  # blocks of 3, in float64
    assert out.shape == (8, 50, 10) and out.dtype == torch.float64 and model.training
    for i, sd in enumerate(ref.to_state_dicts()):
        net = make().double()
        net.load_state_dict(sd)
        assert torch.allclose(out[i], net(x.double()), atol=1e-10)
    from_dicts = stacked_logits(model, spec, ref.to_state_dicts(), x)
    assert torch.allclose(from_dicts, out.float(), atol=1e-5)


def test_probe_set_is_the_test_set_then_seeded_noised_copies():
    x = torch.rand(20, 5)
    x[:, 0] = 0.5  # a constant feature gets no noise
    p = probe_set(x, copies=2, noise=0.3, seed=1)
    assert p.shape == (60, 5) and torch.equal(p[:20], x)
    assert torch.equal(p, probe_set(x, copies=2, noise=0.3, seed=1))
    assert not torch.equal(p, probe_set(x, copies=2, noise=0.3, seed=2))
    assert torch.equal(p[:, 0], torch.full((60,), 0.5))
    ratio = (p[20:] - x.repeat(2, 1))[:, 1:].std(0) / x[:, 1:].std(0, unbiased=False)
    assert ((ratio > 0.15) & (ratio < 0.45)).all()


# -- error_iou -------------------------------------------------------------------------------------------------------
def test_error_iou_known_answers():
    y = torch.tensor([0, 1, 2, 3])
    pred = torch.tensor([[0, 1, 2, 3],    # no errors
                         [1, 1, 2, 0]])   # errors {0, 3}
    ref = torch.tensor([[1, 1, 2, 3],     # errors {0}
                        [0, 0, 0, 3]])    # errors {1, 2}
    assert torch.allclose(error_iou(pred, y, ref), torch.tensor([0.0, 0.5]))
    perfect = torch.cat([ref, y[None]])   # a reference without errors: equal (empty) error sets -> 1
    assert torch.allclose(error_iou(pred, y, perfect), torch.tensor([1.0, 0.5]))
    assert torch.allclose(error_iou(ref, y, ref), torch.ones(2))  # a copy of a reference
    # within the reference set: {0} vs {1, 2} share nothing
    assert torch.allclose(error_iou(ref, y, ref, exclude_self=True), torch.zeros(2))
    three = torch.tensor([[1, 1, 2, 3], [1, 0, 2, 3], [0, 0, 0, 3]])  # {0}, {0, 1}, {1, 2}
    assert torch.allclose(error_iou(three, y, three, exclude_self=True), torch.tensor([0.5, 0.5, 1 / 3]))


def test_agreement_known_answers():
    from unf.flow.novelty import agreement

    pred = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 1, 1]])
    # pairs: (0,1) agree on 3 of 4, (0,2) on 1, (1,2) on 1
    assert agreement(pred, 4).tolist() == pytest.approx([(3 + 1) / 8, (3 + 1) / 8, (1 + 1) / 8])
    assert agreement(torch.zeros(5, 7, dtype=torch.long)).tolist() == [1.0] * 5  # identical networks
    with pytest.raises(ValueError, match="N >= 2"):
        agreement(torch.zeros(1, 3, dtype=torch.long))


def test_error_iou_rejects_bad_shapes():
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="ref_pred"):
        error_iou(torch.zeros(2, 3, dtype=torch.long), y, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exclude_self"):
        error_iou(torch.zeros(2, 3, dtype=torch.long), y, torch.zeros(3, 3, dtype=torch.long), exclude_self=True)


# -- derivedness -----------------------------------------------------------------------------------------------------
def test_derivedness_tells_copies_from_independent_networks(zoo):
    model, spec, ref, x, ref_logits = zoo["model"], zoo["spec"], zoo["ref"], zoo["x"], zoo["ref_logits"]
    noised = memorisers(ref, zoo["acc"], k=8, sigma=0.05, n=8, seed=0)
    copies = stacked_logits(model, spec, noised, x)
    indep = stacked_logits(model, spec, zoo["other"], x)
    d_copy, d_indep = derivedness(copies, ref_logits), derivedness(indep, ref_logits)
    within = derivedness(ref_logits, ref_logits, exclude_self=True)
    assert (d_copy > 0.9).all(), d_copy
    assert d_copy.min() > d_indep.max() + 0.2, (d_copy, d_indep)
    assert d_indep.max() < 0.8 and within.max() < 0.8, (d_indep, within)
    # a permuted network computes the same function: derivedness exactly 1; a rescaled one too (z-scores)
    same = stacked_logits(model, spec, permuted(spec, ref, 0), x)
    assert torch.allclose(derivedness(same * 3 + 1, ref_logits), torch.ones(8), atol=1e-4)
    with pytest.raises(ValueError, match="consensus"):
        derivedness(copies, ref_logits, consensus=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_logits"):
        derivedness(copies, ref_logits[:, :10])


# -- aligned_l2 ------------------------------------------------------------------------------------------------------
def test_aligned_l2_finds_permuted_references_at_zero(zoo):
    spec, ref, other = zoo["spec"], zoo["ref"], zoo["other"]
    copies = take(permuted(spec, ref, 3), torch.tensor([5, 2, 7]))
    # the copies of nets 5, 2 and 7 are unaligned: raw distances are large
    assert (copies.flatten() - take(ref, torch.tensor([5, 2, 7])).flatten()).norm(dim=1).min() > 1
    d_copy = aligned_l2(spec, copies, ref, candidates=3)
    d_other = aligned_l2(spec, other, ref, candidates=3)
    within = aligned_l2(spec, ref, ref, candidates=3, exclude_self=True)
    assert d_copy.max() < 1e-4, d_copy
    assert d_other.min() > 1 and within.min() > 1, (d_other, within)
    # candidates refine the canonical distance, never worsen it
    assert (d_other <= aligned_l2(spec, other, ref, candidates=0) + 1e-5).all()


# -- baselines -------------------------------------------------------------------------------------------------------
def test_memorisers_without_noise_return_the_best_parent(zoo):
    ref, acc = zoo["ref"], zoo["acc"]
    out = memorisers(ref, acc, k=1, sigma=0.0, n=3, seed=0)
    best = take(ref, acc.argmax()[None].repeat(3))
    assert out.batch_size == 3 and torch.equal(out.flatten(), best.flatten())
    a, b = memorisers(ref, acc, k=2, sigma=0.5, n=4, seed=1), memorisers(ref, acc, k=2, sigma=0.5, n=4, seed=1)
    assert torch.equal(a.flatten(), b.flatten())
    assert not torch.equal(a.flatten(), memorisers(ref, acc, k=2, sigma=0.5, n=4, seed=2).flatten())
    with pytest.raises(ValueError, match="acc"):
        memorisers(ref, acc[:3], k=1, sigma=0.0, n=1)


def test_memorisers_rank_by_training_split_accuracy_never_test(zoo):
    ref = zoo["ref"]
    train_acc = torch.tensor([0.5, 0.9, 0.7, 0.95, 0.2, 0.6, 0.8, 0.1])
    rows = [{"train_acc": str(float(a)), "test_acc": str(float(b))} for a, b in zip(train_acc, zoo["acc"])]
    blind = [{**r, "test_acc": "nan"} for r in rows]  # test accuracies unknown: the choice must not change
    rank = train_split_accuracy(rows)
    assert torch.equal(rank, train_split_accuracy(blind)) and torch.allclose(rank, train_acc.double())
    out = memorisers(ref, train_split_accuracy(blind), k=2, sigma=0.0, n=4, seed=0)
    assert torch.equal(out.flatten(), take(ref, torch.tensor([3, 1, 3, 1])).flatten())  # train_acc 0.95, 0.9
    with pytest.raises(ValueError, match="train_acc"):
        train_split_accuracy([{"test_acc": "0.9"}] * 8)


def test_gaussian_matches_the_zoo_statistics(zoo):
    ref = zoo["ref"]
    w = _stacked(ref)
    frames = {False: ref.flatten(),  # aligned: the zoo in the frame of its first network
              True: torch.cat([t.reshape(8, -1) for t in _permute(ref.spec, w, _align(
                  ref.spec, {k: v[:1] for k, v in w.items()}, w)).values()], 1)}
    for align, zoo_flat in frames.items():
        s = gaussian(ref, 4000, seed=0, align=align).flatten()
        mean, std = zoo_flat.mean(0), zoo_flat.std(0, unbiased=False)
        assert ((s.mean(0) - mean).abs() <= 0.1 * std + 1e-6).all()
        assert torch.allclose(s.std(0), std, rtol=0.1, atol=1e-6)
    assert torch.equal(gaussian(ref, 5, seed=3).flatten(), gaussian(ref, 5, seed=3).flatten())


def test_interpolations_at_the_ends_are_parents_and_averages_are_means(zoo):
    model, spec, ref, x = zoo["model"], zoo["spec"], zoo["ref"], zoo["x"][:40]
    logits = stacked_logits(model, spec, ref, x)
    start = interpolations(spec, ref, 6, seed=0, alpha=(0.0, 0.0))  # exactly the first parent
    assert all((start.flatten()[i] == ref.flatten()).all(1).any() for i in range(6))
    end = stacked_logits(model, spec, interpolations(spec, ref, 6, seed=0, alpha=(1.0, 1.0)), x)
    for i in range(6):  # the second parent, permuted: the same function as some reference
        assert ((end[i] - logits).abs().amax((1, 2)) < 1e-4).any()
    mid = interpolations(spec, ref, 6, seed=0)
    assert torch.equal(mid.flatten(), interpolations(spec, ref, 6, seed=0).flatten())
    avg = averages(spec, ref, 3, k=2, seed=0)
    assert torch.equal(avg.flatten(), averages(spec, ref, 3, k=2, seed=0).flatten())
    g = torch.Generator().manual_seed(0)  # the pairs averages() draws: the first two of a permutation per output
    pairs = [torch.randperm(ref.batch_size, generator=g)[:2].tolist() for _ in range(3)]
    assert len({tuple(p) for p in pairs}) == 3
    sds = ref.to_state_dicts()
    for m, (i, j) in enumerate(pairs):  # (w_i + P(w_j)) / 2, P from the main weight matching
        moved = spec.permute(sds[j], unf.align.weight_matching(spec, sds[i], sds[j]))
        for name in spec.float_names:
            assert torch.allclose(avg[name][m, 0], (sds[i][name] + moved[name]) / 2, atol=1e-6)


def test_noise_frontier_and_dominance_on_hand_made_points():
    pts = [(0.1, 0.95), (0.2, 0.90), (0.15, 0.85), (0.3, 0.70), (0.3, 0.60), (0.05, 0.94)]
    f = noise_frontier(pts)
    assert f.tolist() == [[0.1, 0.95], [0.2, 0.90], [0.3, 0.70]]
    assert dominated((0.15, 0.85), f) is True       # (0.2, 0.90) is more novel and more accurate
    assert dominated((0.2, 0.90), f) is True        # ties count
    assert dominated((0.25, 0.80), f) is False
    assert dominated((0.4, 0.10), f) is False       # more novel than any memoriser
    assert dominated(torch.tensor([[0.15, 0.85], [0.25, 0.80]]), f).tolist() == [True, False]
    assert frontier_accuracy(f, torch.tensor([0.0, 0.15, 0.25, 0.5])).tolist() == [0.95, 0.90, 0.70, -float("inf")]


# -- the report ------------------------------------------------------------------------------------------------------
def test_novelty_report_flags_copies_beside_the_heldout_level(zoo):
    model, spec, ref, other = zoo["model"], zoo["spec"], zoo["ref"], zoo["other"]
    copies = take(permuted(spec, ref, 4), torch.tensor([0, 1, 2]))
    rep = novelty_report(model, spec, {"copies": copies}, ref, other, zoo["x"], zoo["y"], candidates=2)
    assert set(rep) == {"heldout", "copies"}
    c, h = rep["copies"], rep["heldout"]
    assert torch.allclose(c["values"]["iou"], torch.ones(3)) and c["summary"]["copy_fraction"] == 1.0
    assert (c["values"]["derivedness"] > 0.999).all() and (c["values"]["l2"] < 1e-4).all()
    assert torch.allclose(c["values"]["accuracy"], zoo["acc"][:3].double())
    assert h["summary"]["n"] == 4 and h["summary"]["copy_fraction"] < 1
    assert h["summary"]["derivedness"]["mean"] < 0.8 and h["summary"]["l2"]["q05"] > 1
    assert set(h["summary"]["iou"]) == {"mean", "std", "q05", "q25", "q50", "q75", "q95"}
