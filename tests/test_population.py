"""Population training (groundwork for model zoos): members are independent, match torch's optimizers, and load."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unf
from unf.training import evaluate
from unf.zoo import builtin, population
from unf.zoo import (Member, MemberDropout, MixedActivation, evaluate_population, make_population,
                     train_population)


def make():
    return nn.Sequential(nn.Linear(64, 16), MixedActivation(), MemberDropout(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def split():
    return unf.data.load("digits-flat")


def test_a_member_trains_the_same_alone_or_in_a_population(split):
    members = [Member(seed=1, lr=2e-3, activation="tanh", train_fraction=0.5),
               Member(seed=2, lr=0.05, optimizer="sgd", activation="gelu"),
               Member(seed=3, init_scale=0.5, weight_decay=1e-2, activation="sigmoid")]
    x, y = split.x_train[:256], split.y_train[:256]
    together = make_population(make, members)
    train_population(together, x, y, epochs=2, batch_size=32, seed=7)
    for i, m in enumerate(members):
        alone = make_population(make, [m])
        train_population(alone, x, y, epochs=2, batch_size=32, seed=7)
        for k, v in alone.params.items():
            assert torch.allclose(v[0], together.params[k][i], atol=1e-5), (i, k)
    loss, acc = evaluate_population(together, split.x_test, split.y_test)
    assert loss.shape == acc.shape == (3,)
    # nobody uses dropout, so no masks are drawn; drawing them (all ones at p = 0) gives the same training
    drops = [mod for mod in together.base.modules() if isinstance(mod, MemberDropout)]
    assert drops and all(mod.off for mod in drops)
    masked = make_population(make, members)
    for mod in masked.base.modules():
        if isinstance(mod, MemberDropout):
            mod.off = False
    train_population(masked, x, y, epochs=2, batch_size=32, seed=7)
    assert all(torch.allclose(masked.params[k], v, atol=1e-6) for k, v in together.params.items())
    mixed = make_population(make, members + [Member(seed=4, dropout=0.3)])
    assert not any(mod.off for mod in mixed.base.modules() if isinstance(mod, MemberDropout))


def test_adam_member_matches_torch_adamw(split):
    member = Member(seed=0, lr=1e-3, weight_decay=0.01, activation="relu")
    pop = make_population(make, [member])
    x, y = split.x_train[:64], split.y_train[:64]
    torch.manual_seed(0)
    ref = make()
    train_population(pop, x, y, epochs=3, batch_size=64, seed=5)
    _assert_trains_like(pop, ref, torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01), x, y)


def _assert_trains_like(pop, ref, opt, x, y, i=0):
    """Member ``i`` of ``pop`` (trained 3 epochs of 64, seed 5) equals ``ref`` trained by ``opt`` on the same
    batches: train_population's batch order for that member."""
    seed = pop.members[i].seed
    order_gen = torch.Generator().manual_seed(5 * 1_000_003 + seed)
    subset = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:64]
    for _ in range(3):
        idx = subset[torch.randperm(64, generator=order_gen)]
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    sd = pop.state_dicts()[i]
    for k, v in ref.state_dict().items():
        assert torch.allclose(sd[k], v, atol=1e-5), k


def test_adam_population_steps_match_a_per_model_loop(split, monkeypatch):
    """An all-Adam population takes torch's fused kernel with each member's own rate and decoupled weight decay:
    every member equals its own torch.optim.AdamW loop, and the generic (unfused) step gives the same result."""
    members = [Member(seed=s, lr=lr, weight_decay=wd)
               for s, lr, wd in ((0, 1e-3, 0.0), (1, 5e-3, 0.01), (2, 2e-2, 0.0))]
    x, y = split.x_train[:64], split.y_train[:64]
    pop = train_population(make_population(make, members), x, y, epochs=3, batch_size=64, seed=5)
    for i, m in enumerate(members):
        torch.manual_seed(m.seed)
        ref = make()
        opt = torch.optim.AdamW(ref.parameters(), lr=m.lr, weight_decay=m.weight_decay)
        _assert_trains_like(pop, ref, opt, x, y, i)
    # one rate and decay for all (AdamW's kernel on the parameters themselves)
    same = [Member(seed=s, lr=5e-3, weight_decay=0.01) for s in range(3)]
    pop_same = train_population(make_population(make, same), x, y, epochs=3, batch_size=64, seed=5)
    for i, m in enumerate(same):
        torch.manual_seed(m.seed)
        ref = make()
        _assert_trains_like(pop_same, ref, torch.optim.AdamW(ref.parameters(), lr=5e-3, weight_decay=0.01), x, y, i)
    monkeypatch.setattr(population, "_fused_adam_fits", lambda *args: False)
    for members, fused in ((members, pop), (same, pop_same)):
        generic = train_population(make_population(make, members), x, y, epochs=3, batch_size=64, seed=5)
        assert torch.allclose(generic.flat, fused.flat, atol=1e-6)
        assert all(torch.allclose(generic.opt_state[k], fused.opt_state[k], atol=1e-7) for k in ("m", "v"))


def test_update_is_pluggable(split):
    """A learned optimizer plugs in as ``update``: here plain SGD, against torch.optim.SGD on the same batches."""
    member = Member(seed=0, activation="relu")
    pop = make_population(make, [member])
    x, y = split.x_train[:64], split.y_train[:64]

    def sgd(pop, members, grad):
        with torch.no_grad():
            pop.flat[members] -= 0.1 * grad

    train_population(pop, x, y, epochs=3, batch_size=64, seed=5, update=sgd)
    torch.manual_seed(0)
    ref = make()
    _assert_trains_like(pop, ref, torch.optim.SGD(ref.parameters(), lr=0.1), x, y)


def test_state_dicts_load_into_plain_models(split):
    members = [Member(seed=s, activation=a, dropout=d) for s, a, d in ((0, "relu", 0.1), (1, "tanh", 0.0))]
    pop = make_population(make, members)
    train_population(pop, split.x_train, split.y_train, epochs=1, batch_size=64)
    _, acc = evaluate_population(pop, split.x_test, split.y_test)
    for m, sd, a in zip(members, pop.state_dicts(), acc):
        net = make()
        net.load_state_dict(sd)
        assert net[1].choice.argmax().item() == ["relu", "tanh", "gelu", "sigmoid"].index(m.activation)
        assert evaluate(net, split.x_test, split.y_test)[1] == pytest.approx(a.item(), abs=1e-6)


def make_cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), MixedActivation(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), MixedActivation(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), MemberDropout(), nn.Linear(4, 10))


class ViewCNN(nn.Module):
    """Flattens with ``.view``, which a channels-last activation does not allow."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, 4, 3, padding=1), MixedActivation(), nn.Linear(4 * 64, 10)

    def forward(self, x):
        h = self.act(self.conv(x.view(len(x), 1, 8, 8)))
        return self.fc(h.view(len(h), -1))


def test_blocks_and_layout_do_not_change_training(split, monkeypatch):
    """Members run in blocks, convolutional ones with the member axis innermost in memory and pooling over members
    as channels: the result is the same for any block size, and a member trains as it would alone."""
    members = [Member(seed=s, lr=lr, activation=a, optimizer=o)
               for s, lr, a, o in ((0, 3e-3, "relu", "adam"), (1, 0.05, "tanh", "sgd"), (2, 1e-3, "gelu", "adam"),
                                   (3, 0.1, "relu", "sgd"), (4, 2e-3, "tanh", "adam"))]
    x, y = split.x_train[:192], split.y_train[:192]
    runs = {}
    for block in (None, 1, 2, 5):
        pop = make_population(make_cnn, members)
        assert pop.channels_last
        runs[block] = train_population(pop, x, y, epochs=2, batch_size=32, seed=3, block_size=block).params
    for block in (1, 2, 5):
        for k, v in runs[None].items():
            assert torch.allclose(runs[block][k], v, atol=1e-5), (block, k)
    alone = train_population(make_population(make_cnn, members[3:4]), x, y, epochs=2, batch_size=32, seed=3).params
    assert all(torch.allclose(v[0], runs[None][k][3], atol=1e-5) for k, v in alone.items())
    with pytest.raises(ValueError, match="block_size 0"):
        train_population(pop, x, y, epochs=1, block_size=0)
    # evaluation in blocks: force one member per block, compare with the plain model
    monkeypatch.setattr(population, "_BLOCK_BYTES", 1)
    _, acc = evaluate_population(pop, split.x_test, split.y_test, batch_size=100)
    for sd, a in zip(pop.state_dicts(), acc):
        net = make_cnn()
        net.load_state_dict(sd)
        assert evaluate(net, split.x_test, split.y_test)[1] == pytest.approx(a.item(), abs=1e-6)


def test_view_after_a_convolution_falls_back_to_the_default_layout(split):
    members = [Member(seed=s, activation=a) for s, a in ((0, "relu"), (1, "tanh"), (2, "gelu"))]
    x, y = split.x_train[:96], split.y_train[:96]
    pop = make_population(ViewCNN, members)
    assert pop.channels_last
    train_population(pop, x, y, epochs=1, batch_size=32)
    assert not pop.channels_last  # the channels-last attempt failed on .view; training went on without it
    alone = train_population(make_population(ViewCNN, members[1:2]), x, y, epochs=1, batch_size=32)
    assert all(torch.allclose(v[0], pop.params[k][1], atol=1e-5) for k, v in alone.params.items())


def test_pooling_wrapper_outside_vmap_matches_the_pool():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    for pool in (nn.MaxPool2d(2), nn.AvgPool2d(3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1)):
        out = population._PoolMembersAsChannels(pool)(x)
        assert torch.equal(out, pool(x))
        g = torch.randn_like(out)
        assert torch.allclose(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(pool(x), x, g)[0])


def test_block_size_keeps_the_largest_activation_under_the_budget(split):
    # digits CNN: the first conv's output, 64 images x 8 channels x 8 x 8 floats = 128 KiB per member -> 64 per 8 MiB
    pop = make_population(lambda: builtin.cnn(population=True), [Member(seed=s) for s in range(100)])
    assert population._block_size(pop, split.x_train[:64], train=True) == 64
    assert population._block_size(pop, split.x_train[:1024], train=False) == 4
    small = make_population(lambda: builtin.cnn(population=True), [Member(seed=s) for s in range(3)])
    assert population._block_size(small, split.x_train[:64], train=True) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_population_trains_the_same_on_cuda(split):
    members = [Member(seed=s, activation=a, optimizer=o) for s, a, o in ((0, "relu", "adam"), (1, "tanh", "sgd"))]
    x, y = split.x_train[:128], split.y_train[:128]
    cpu = train_population(make_population(make_cnn, members), x, y, epochs=1, batch_size=32)
    gpu = train_population(make_population(make_cnn, members).to("cuda"), x.cuda(), y.cuda(), epochs=1,
                           batch_size=32)
    assert all(torch.allclose(gpu.params[k].cpu(), v, atol=1e-4) for k, v in cpu.params.items())
    _, acc = evaluate_population(gpu, split.x_test.cuda(), split.y_test.cuda())
    assert acc.device.type == "cuda" and acc.shape == (2,)


def test_mixed_dtypes_are_named():
    def mixed():
        return nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 10).double())

    with pytest.raises(ValueError, match=r"'0.weight' is torch.float32, '1.weight' is torch.float64"):
        make_population(mixed, [Member(seed=0)])


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="activation 'swish'"):
        Member(activation="swish")
    with pytest.raises(ValueError, match="train_fraction"):
        Member(train_fraction=0)


def test_fused_convolutions_train_and_evaluate_like_plain_models(split):
    """With one activation, ReLU, each convolution of the digits CNN runs its members as the groups of one oneDNN
    convolution with the bias and ReLU inside: every member still equals its own torch.optim.AdamW loop on the plain
    model, and evaluation (one input for all members) equals the plain model's."""
    members = [Member(seed=s, lr=lr) for s, lr in ((0, 1e-3), (1, 4e-3), (2, 1e-2))]
    x, y = split.x_train[:64], split.y_train[:64]
    pop = make_population(lambda: builtin.cnn(population=True), members)
    assert len(pop.fused) == 3 and pop.channels_last
    train_population(pop, x, y, epochs=3, batch_size=64, seed=5)
    for i, m in enumerate(members):
        torch.manual_seed(m.seed)
        ref = builtin.cnn()
        _assert_trains_like(pop, ref, torch.optim.AdamW(ref.parameters(), lr=m.lr, weight_decay=0.0), x, y, i)
    _, acc = evaluate_population(pop, split.x_test, split.y_test)
    for sd, a in zip(pop.state_dicts(), acc):
        net = builtin.cnn(population=True)
        net.load_state_dict(sd)
        assert evaluate(net, split.x_test, split.y_test)[1] == pytest.approx(a.item(), abs=1e-6)
    mixed = make_population(lambda: builtin.cnn(population=True), members + [Member(seed=3, activation="tanh")])
    assert not mixed.fused  # the blend of activations is not a ReLU: nothing to fuse


@pytest.mark.parametrize("dtype,groups,dilation", [(torch.float32, 1, 1), (torch.float64, 1, 1),
                                                    (torch.float32, 2, 2), (torch.float64, 2, 1)])
def test_fused_convolution_outside_vmap_and_off_onednn_matches_conv_relu(dtype, groups, dilation):
    """Outside vmap the fused module is relu(conv); under vmap, per-member or shared input, in float32 (oneDNN's
    epilogue) and float64 (the same fold with autograd's own ops), grouped and dilated, it equals each member's own."""
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=groups, dilation=dilation).to(dtype)
    fused = population._ConvReLU(conv)
    x = torch.randn(4, 2, 7, 7, dtype=dtype, requires_grad=True)
    out = fused(x)
    assert torch.allclose(out, F.relu(conv(x)))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(F.relu(conv(x)), (x, conv.weight, conv.bias), g)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    # under vmap: three members with their own weights, members innermost in memory (the population's layout)
    w = torch.randn(3, 4, 2 // groups, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    xs = population._members_inner(torch.randn(3, 4, 2, 7, 7, dtype=dtype))

    def one(w, b, x):
        return torch.func.functional_call(fused, {"weight": w, "bias": b}, (x,))

    for x_dim, inputs in ((0, xs), (None, xs[0]), (0, xs[:, 0])):  # per member, shared, one image per member
        out = torch.func.vmap(one, in_dims=(0, 0, x_dim))(w, b, inputs)
        want = torch.stack([F.relu(F.conv2d(inputs if x_dim is None else inputs[i], w[i], b[i], 2, 1, dilation,
                                            groups)) for i in range(3)])
        assert torch.allclose(out, want, atol=1e-5), x_dim
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (w, b), g)
        ref = torch.autograd.grad(want, (w, b), g)
        assert all(torch.allclose(a, c, atol=1e-4) for a, c in zip(got, ref)), x_dim
