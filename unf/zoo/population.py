"""Train a population of networks of one architecture at once (torch.func: stacked parameters, vmap).

Every member has its own seed, initialisation scale, learning rate, weight decay, dropout rate, activation, optimizer
(SGD with momentum or Adam) and training fraction. Differences in activation and dropout are carried by per-member
buffers of :class:`MixedActivation` and :class:`MemberDropout`, so one vmapped graph serves the whole population.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")
_ACT_FNS = (F.relu, torch.tanh, F.gelu, torch.sigmoid)


class MixedActivation(nn.Module):
    """The activation chosen by a one-hot buffer ``choice`` (so that it can differ between vmapped members)."""

    def __init__(self, name: str = "relu"):
        super().__init__()
        self.register_buffer("choice", F.one_hot(torch.tensor(ACTIVATIONS.index(name)), len(ACTIVATIONS)).float())
        self.only: Optional[int] = None  # set when every member uses one activation: skip the blend (4x less work)
        self.fused = False  # set when the convolution before it applies this ReLU (see _ConvReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return x
        if self.only is not None:
            return _ACT_FNS[self.only](x)
        return sum(w * f(x) for w, f in zip(self.choice, _ACT_FNS))


class MemberDropout(nn.Module):
    """Dropout whose rate is a buffer ``p`` (so that it can differ between vmapped members)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))
        self.off = False  # set when no member uses dropout: skip drawing masks that would keep everything

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.off:
            return x
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p).clamp_min(1e-6)


class _MembersAsChannels(torch.autograd.Function):
    """A channel-wise module (pooling) whose vmap rule folds the members into the channels, ``[B, N * C, H, W]``.

    vmap's own pooling rules fold them into the batch, which copies channels-last activations back to NCHW and leaves
    the backward of the layer before in mixed layouts (unstrided digits CNN with a max-pool: 1.35x slower steps)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x, module):
        return module(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.module = inputs[1]

    @staticmethod
    def backward(ctx, grad):  # outside vmap only; under vmap autograd records the rule's own ops
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.module(x), x, grad)
        return gx, None

    @staticmethod
    def vmap(info, in_dims, x, module):
        if in_dims[0] is None:
            return module(x), None
        if x.dim() == 4:  # each member sees one image [C, H, W]: the members are the batch
            return module(x.movedim(in_dims[0], 0)), 0
        x = x.movedim(in_dims[0], 1)  # [B, N, C, H, W]
        return module(x.reshape(x.shape[0], -1, *x.shape[3:])).unflatten(1, x.shape[1:3]), 1


class _PoolMembersAsChannels(nn.Module):
    """Wraps a pooling module of a population's base model (see :class:`_MembersAsChannels`)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MembersAsChannels.apply(x, self.pool)


_CHANNELWISE_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def _fused_conv_relu_available(x: torch.Tensor) -> bool:
    """oneDNN's convolution with the bias and ReLU in its epilogue runs here (CPU, float32)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


class _ConvReLUFn(torch.autograd.Function):
    """``relu(conv2d(x, weight, bias))`` of one (folded) convolution in one oneDNN call; backward: the ReLU's mask,
    then one ``convolution_backward`` that also gives the bias gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, "relu", [],
                                                      "")
        ctx.save_for_backward(x, weight, out)
        ctx.conf = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        if out.is_contiguous(memory_format=torch.channels_last):
            # a pooling's backward may hand back NCHW: mixed layouts made the last layer's mask 7x slower
            grad = grad.contiguous(memory_format=torch.channels_last)
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], stride, padding, dilation, False, [0, 0], groups,
            list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None, None, None


class _MembersAsGroups(torch.autograd.Function):
    """``relu(conv2d(x, weight, bias))`` whose vmap rule runs the members as the groups of one convolution with the
    bias and the ReLU inside it (:class:`_ConvReLUFn`).

    vmap's own rule runs the convolution without its bias, then adds the bias and applies the ReLU as two more passes
    over the activations, which on the digits CNN's first layer (64 members: 8 MB) cost as much as the convolution.
    The fused convolution took 4.5 against 8.6 ms for that layer's forward (64 members, batch 64, channels-last)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x, weight, bias, conv):
        return F.relu(conv._conv_forward(x, weight, bias))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.conv = inputs[3]

    @staticmethod
    def backward(ctx, grad):  # outside vmap only; under vmap autograd records the rule's own ops
        with torch.enable_grad():
            x, weight, bias = (t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
            out = F.relu(ctx.conv._conv_forward(x, weight, bias))
            need = [t for t in (x, weight, bias) if t.requires_grad]
            got = iter(torch.autograd.grad(out, need, grad))
        return (*(next(got) if t.requires_grad else None for t in (x, weight, bias)), None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, conv):
        n = info.batch_size
        weight = weight.movedim(in_dims[1], 0) if in_dims[1] is not None else weight.expand(n, *weight.shape)
        bias = bias.movedim(in_dims[2], 0) if in_dims[2] is not None else bias.expand(n, *bias.shape)
        groups = n * conv.groups
        if in_dims[0] is None and conv.groups == 1:  # one input for all (evaluation): one convolution, N * C_out maps
            groups = 1
            unbatched = x.dim() == 3
        else:
            if in_dims[0] is None:  # one input for all, grouped convolution: each member's groups read a copy
                x = x.unsqueeze(-4).expand(*x.shape[:-3], n, *x.shape[-3:])
            else:
                x = x.movedim(in_dims[0], -4)
            unbatched = x.dim() == 4  # each member sees one image [C, H, W]
            x = x.reshape(*x.shape[:-4], -1, *x.shape[-2:])  # [B, N * C, H, W]: channels-last if members are inner
        x = x.unsqueeze(0) if unbatched else x
        w, b = weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1)
        args = (list(conv.stride), list(conv.padding), list(conv.dilation), groups)
        if _fused_conv_relu_available(x):
            out = _ConvReLUFn.apply(x, w, b, *args)
        else:  # elsewhere the same fold, with autograd's own convolution and ReLU
            out = F.relu(F.conv2d(x, w, b, *args))
        out = out.squeeze(0) if unbatched else out
        return out.unflatten(-3, (n, -1)), out.dim() - 3


class _ConvReLU(nn.Module):
    """A population's ``Conv2d`` followed by a ReLU (:class:`_MembersAsGroups`). It holds the convolution's own
    ``weight`` and ``bias`` under the same names, so the state_dict keys stay the same."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = [conv]  # a list: not a submodule, so its parameters are not listed twice
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MembersAsGroups.apply(x, self.weight, self.bias, self.conv[0])


def _fuse_conv_relu(base: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """Replace each ``Conv2d`` (zero padding, with a bias) that a ``Sequential`` follows with a ReLU-only
    :class:`MixedActivation` by a :class:`_ConvReLU`, and mark the activation as applied. Returns what was replaced
    (parent, name, convolution, activation)."""
    done = []
    for parent in base.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for name, after in zip(names, names[1:]):
            conv, act = parent._modules[name], parent._modules[after]
            if (type(conv) is nn.Conv2d and conv.bias is not None and conv.padding_mode == "zeros"
                    and isinstance(conv.padding, tuple) and isinstance(act, MixedActivation)
                    and act.only == ACTIVATIONS.index("relu")):
                setattr(parent, name, _ConvReLU(conv))
                act.fused = True
                done.append((parent, name, conv, act))
    return done


@dataclass
class Member:
    """Hyperparameters of one population member."""
    seed: int = 0
    lr: float = 1e-3
    init_scale: float = 1.0
    weight_decay: float = 0.0
    dropout: float = 0.0
    activation: str = "relu"
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    train_fraction: float = 1.0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: choose from {ACTIVATIONS}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r}: choose 'adam' or 'sgd'")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction {self.train_fraction} must be in (0, 1]")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


def build_member(make_model: Callable[[], nn.Module], member: Member) -> nn.Module:
    """Instantiate one member: seeded initialisation scaled by ``init_scale``, its activation and dropout rate."""
    torch.manual_seed(member.seed)
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(member.init_scale)
    for m in model.modules():
        if isinstance(m, MixedActivation):
            m.choice.copy_(F.one_hot(torch.tensor(ACTIVATIONS.index(member.activation)), len(ACTIVATIONS)))
        elif isinstance(m, MemberDropout):
            m.p.fill_(member.dropout)
    return model


@dataclass
class Population:
    """Stacked state of ``N`` members: ``params``/``buffers`` name -> ``[N, *shape]``.

    The parameters are views into one ``flat`` ``[N, D]`` tensor, so that an optimizer step is a few ops on it."""
    base: nn.Module
    members: list
    flat: torch.Tensor
    params: dict
    buffers: dict
    opt_state: dict = field(default_factory=dict)  # Adam moments "m", "v" (m is SGD's momentum), each [N, D]
    channels_last: bool = False  # inputs with the member axis innermost (see _members_inner); set for conv nets
    step: int = 0
    columns: Optional[tuple] = None  # per-member lr, weight decay, is-Adam (see _columns)
    batched: bool = True  # False once vmap met an op it cannot batch (aten::gru): members then run one by one
    fused: list = field(default_factory=list)  # convolutions run with their ReLU (see _fuse_conv_relu)

    def to(self, device: torch.device | str) -> "Population":
        """This population on ``device`` (parameters, buffers and optimizer state; train it on data there too).
        Like ``Tensor.to``, returns ``self`` when it is already there."""
        flat = self.flat.to(device)
        if flat is self.flat:
            return self
        return replace(self, flat=flat, params=_views(flat, self.params),
                                   buffers={k: v.to(device) for k, v in self.buffers.items()},
                                   opt_state={k: v.to(device) for k, v in self.opt_state.items()}, columns=None)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """One ordinary state_dict per member (parameters and buffers, in the base model's order)."""
        keys = list(self.base.state_dict())
        both = {**self.params, **self.buffers}
        return [{k: both[k][i].detach().clone() for k in keys} for i in range(len(self.members))]


def make_population(make_model: Callable[[], nn.Module], members: Sequence[Member]) -> Population:
    models = [build_member(make_model, m) for m in members]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    one_activation = len({m.activation for m in members}) == 1
    no_dropout = all(m.dropout == 0 for m in members)
    for mod in base.modules():
        if isinstance(mod, MixedActivation) and one_activation:
            mod.only = ACTIVATIONS.index(members[0].activation)
        elif isinstance(mod, MemberDropout) and no_dropout:
            mod.off = True
    by_dtype = {}
    for k, v in params.items():
        by_dtype.setdefault(str(v.dtype), k)
    if len(by_dtype) > 1:
        mixed = ", ".join(f"{k!r} is {d}" for d, k in by_dtype.items())
        raise ValueError(f"a population needs parameters of one dtype; this model mixes them: {mixed}; convert the "
                         "model with .to(dtype)")
    flat = torch.cat([v.detach().reshape(len(members), -1) for v in params.values()], 1)
    channels_last = any(isinstance(mod, nn.modules.conv._ConvNd) for mod in base.modules())
    pools = [(parent, name, child) for parent in base.modules() for name, child in parent.named_children()
             if type(child) in _CHANNELWISE_POOLS and not getattr(child, "return_indices", False)]
    for parent, name, child in pools:  # no parameters or buffers: the state_dict keys stay the same
        setattr(parent, name, _PoolMembersAsChannels(child))
    fused = _fuse_conv_relu(base) if channels_last else []
    return Population(base, list(members), flat, _views(flat, params), buffers, channels_last=channels_last,
                      fused=fused)


def _views(flat: torch.Tensor, like: dict) -> dict:
    """Name -> view of ``flat`` ``[N, D]`` shaped as ``like``'s ``[N, *shape]`` tensors, in order."""
    views, start = {}, 0
    for k, v in like.items():
        size = v[0].numel()
        views[k] = flat[:, start:start + size].view(v.shape)
        start += size
    return views


# Largest module output of one block of members: 8 MB was the fastest budget for the digits CNNs (4 and 16 MB were
# 1.1-1.2x slower per network; see train_population).
_BLOCK_BYTES = 8 << 20


_primed = False


def _prime_allocator(device: torch.device) -> None:
    """Let glibc keep freed blocks of up to 30 MB in its heap rather than unmapping them.

    glibc maps large allocations with mmap and unmaps them on free, so every step page-faults its activations in
    anew, zero-filled. Freeing one mapped block raises glibc's dynamic mmap threshold to that block's size and its
    trim threshold to twice that (mallopt(3)), as any free of such a tensor would; this frees an untouched 30 MB
    block once per process. Steps of 64 digits CNNs ran 1.3x faster. With other allocators it changes nothing.
    """
    global _primed
    if device.type == "cpu" and not _primed:
        torch.empty(30 << 20, dtype=torch.uint8)
        _primed = True


def _block_size(pop: Population, xb: torch.Tensor, train: bool) -> int:
    """Members per block such that no module output of a block exceeds ``_BLOCK_BYTES`` (one member's forward pass
    on ``xb`` is traced on the meta device: no compute). Off the CPU, where the budget's reasons (glibc, caches) do
    not apply, all members form one block."""
    if pop.flat.device.type != "cpu":
        return len(pop.members)
    sizes = [xb.numel() * xb.element_size()]

    def record(mod, args, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    hooks = [mod.register_forward_hook(record) for mod in pop.base.modules()]
    try:
        one = {k: v[0].to("meta") for k, v in {**pop.params, **pop.buffers}.items()}
        pop.base.train(train)
        with torch.no_grad():
            functional_call(pop.base, one, (xb.to("meta"),))
    finally:
        for h in hooks:
            h.remove()
    return max(1, min(len(pop.members), _BLOCK_BYTES // max(sizes)))


def _members_inner(xb: torch.Tensor) -> torch.Tensor:
    """``xb`` ``[N, B, *features]`` with the member axis moved innermost in memory (images: next to the channels).

    vmap runs a convolution of stacked members as one grouped convolution over ``N * C`` channels; with this layout
    its input is channels-last, oneDNN's fast layout for many small groups, and so are its outputs, so every later
    convolution gets channels-last input too (steps of 64 digits CNNs 1.3x faster)."""
    order = (1, *range(3, xb.dim()), 0, 2) if xb.dim() >= 4 else (1, *range(2, xb.dim()), 0)
    return xb.permute(order).contiguous().permute([order.index(d) for d in range(xb.dim())])


def _forward(pop: Population, x: torch.Tensor, same_input: bool, train: bool, params: Optional[dict] = None,
             members: slice = slice(None)) -> torch.Tensor:
    """Outputs of the members in ``members`` (``params`` defaults to theirs in ``pop``)."""
    pop.base.train(train)
    if params is None:
        params = {k: v[members] for k, v in pop.params.items()}
    buffers = {k: v[members] for k, v in pop.buffers.items()}

    def run(x):
        def one(params, buffers, xb):
            return functional_call(pop.base, (params, buffers), (xb,))

        with warnings.catch_warnings():
            # functional channels-last adaptive pooling takes vmap's per-member fallback for as_strided_: correct
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return vmap(one, in_dims=(0, 0, None if same_input else 0), randomness="different")(params, buffers, x)

    def loop(x):  # one functional call per member: for models with an op that vmap has no batching rule for
        n = len(next(iter(params.values()))) if params else len(x)
        return torch.stack([functional_call(pop.base, ({k: v[i] for k, v in params.items()},
                                                       {k: v[i] for k, v in buffers.items()}),
                                            (x if same_input else x[i],)) for i in range(n)])

    if not pop.batched:
        return loop(x)
    try:
        if pop.channels_last and not same_input:
            try:
                return run(_members_inner(x))
            except RuntimeError:  # e.g. ``.view`` of a channels-last activation: keep the default layout from now on
                pop.channels_last = False
        return run(x)
    except RuntimeError as e:
        if "Batching rule not implemented" not in str(e):
            raise
        pop.batched = False
        warnings.warn(f"vmap cannot batch this population's model ({str(e).split('.')[0]}); its members run one "
                      "by one from now on (same results, about N times one member's time)", stacklevel=3)
        return loop(x)


def _columns(pop: Population) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-member ``lr``, ``weight_decay`` and is-Adam as ``[N]`` vectors (built once per population)."""
    if pop.columns is None:
        pop.columns = (
            torch.tensor([m.lr for m in pop.members], dtype=pop.flat.dtype, device=pop.flat.device),
            torch.tensor([m.weight_decay for m in pop.members], dtype=pop.flat.dtype, device=pop.flat.device),
            torch.tensor([m.optimizer == "adam" for m in pop.members], device=pop.flat.device))
    return pop.columns


@torch.no_grad()
def _update(pop: Population, members: slice, grad: torch.Tensor) -> None:
    """One optimizer step (number ``pop.step``) for the members in ``members`` with gradient ``grad`` ``[n, D]``
    (``pop.flat``'s layout): Adam or SGD with momentum 0.9, decoupled weight decay, in place."""
    t = pop.step
    lr, wd, adam = (c[members, None] for c in _columns(pop))
    if not pop.opt_state:
        pop.opt_state = {"m": torch.zeros_like(pop.flat), "v": torch.zeros_like(pop.flat)}
    p, m, v = pop.flat[members], pop.opt_state["m"][members], pop.opt_state["v"][members]
    if _fused_adam_fits(pop, members, p, grad):
        _fused_adam(p, grad, m, v, t, lr, wd, pop.members[members])
        return
    m.mul_(0.9).add_(torch.where(adam, 0.1 * grad, grad))
    v.copy_(torch.where(adam, 0.999 * v + 0.001 * grad * grad, v))
    eps = max(1e-8, torch.finfo(p.dtype).tiny)  # 1e-8 is 0 in half precision: 0 / 0 for a zero gradient
    adam_step = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + eps)
    p.mul_(1 - lr * wd).sub_(lr * torch.where(adam, adam_step, m))


def _fused_adam_fits(pop: Population, members: slice, p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the members' step can run on torch's fused Adam kernel: all of them Adam, float32/64 on CPU or CUDA,
    contiguous rows (``pop.flat``'s rows always are), and the kernel present in this torch build."""
    return (hasattr(torch, "_fused_adam_") and p.device.type in ("cpu", "cuda")
            and p.dtype in (torch.float32, torch.float64) and grad.dtype == p.dtype and grad.is_contiguous()
            and all(m.optimizer == "adam" for m in pop.members[members]))


def _fused_adam(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: torch.Tensor,
                wd: torch.Tensor, members: Sequence[Member]) -> None:
    """Adam step ``t`` on rows ``p`` ``[n, D]`` with per-row ``lr`` and decoupled ``wd`` ``[n, 1]``, in place.

    The step of the generic path costs about 20 elementwise passes over ``[n, D]``, half of a digits-MLP population
    step (memory-bound: 256 x 3,466 floats do not stay in cache). torch's fused kernel makes one pass over ``grad``,
    ``m`` and ``v``, but takes one learning rate for all rows; so, unless all rows share one rate and decay, it writes
    the unit-rate step ``-m_hat / (sqrt(v_hat) + eps)`` into a zeroed buffer, which one ``addcmul_`` scales by each
    row's rate."""
    steps = torch.full((), float(t), dtype=torch.float32, device=p.device)
    # decided from the members' hyperparameters on the host: no device synchronisation per step
    if hasattr(torch, "_fused_adamw_") and len({(x.lr, x.weight_decay) for x in members}) == 1:
        # one rate and one decay for the whole block (a population over seeds): AdamW's kernel updates p itself
        torch._fused_adamw_([p], [grad], [m], [v], [], [steps], lr=members[0].lr, beta1=0.9, beta2=0.999,
                            weight_decay=members[0].weight_decay, eps=1e-8, amsgrad=False, maximize=False)
        return
    step = torch.zeros_like(p)
    torch._fused_adam_([step], [grad], [m], [v], [], [steps], lr=1.0, beta1=0.9, beta2=0.999, weight_decay=0.0,
                       eps=1e-8, amsgrad=False, maximize=False)
    if any(x.weight_decay != 0 for x in members):
        p.mul_(1 - lr * wd)
    p.addcmul_(step, lr)


def member_grads(pop: Population, x: torch.Tensor, y: torch.Tensor, members: slice = slice(None),
                 params: Optional[dict] = None, loss: Optional[Callable] = None, same_input: Optional[bool] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the members in ``members`` on their batches and its gradient.

    ``x``: ``[n, B, *features]`` (one batch per member) or ``[B, *features]`` (one batch for all); ``y`` likewise;
    ``same_input`` says which (default: one batch for all when ``y`` is 1-D, as class labels are). ``params``: name ->
    ``[n, *shape]`` (default: the members' own). ``loss(output, target)``: one member's scalar loss, vmapped over the
    members (default and ``F.cross_entropy``: cross-entropy, in one batched call). Returns the losses ``[n]``
    (detached) and the gradients ``[n, D]`` in ``pop.flat``'s layout."""
    if params is None:
        params = {k: v[members] for k, v in pop.params.items()}
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    same = y.dim() == 1 if same_input is None else same_input
    out = _forward(pop, x, same_input=same, train=True, params=params, members=members)
    if loss is None or loss is F.cross_entropy:
        yy = y.expand(out.shape[0], -1) if same else y
        losses = F.cross_entropy(out.transpose(1, 2), yy, reduction="none").mean(1)  # [n]
    else:
        try:
            losses = vmap(loss, in_dims=(0, None if same else 0))(out, y)
        except RuntimeError:  # a loss vmap cannot batch (e.g. one that calls .item()): member by member
            losses = torch.stack([loss(o, y if same else y[i]) for i, o in enumerate(out)])
        if losses.shape != out.shape[:1]:
            raise ValueError(f"the loss returned shape {tuple(losses.shape[1:])} per member; it must be a scalar")
    grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True, materialize_grads=True)
    return losses.detach(), torch.cat([g.reshape(len(g), -1) for g in grads], 1)


def train_population(pop: Population, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64,
                     seed: int = 0, on_epoch: Optional[Callable[[int, Population], None]] = None,
                     progress: bool = False, block_size: Optional[int] = None,
                     update: Optional[Callable[[Population, slice, torch.Tensor], None]] = None) -> Population:
    """Cross-entropy training of every member on its own subset (``train_fraction``) and its own batch order.

    A member's subset comes from its ``seed``, its batch order from ``(seed, member.seed)``, and an epoch is
    ``ceil(len(x) / batch_size)`` steps for everyone (a smaller subset is cycled), so a member without dropout trains
    the same alone or in any population.

    ``on_epoch(epoch, pop)`` is called after each epoch (1-based), e.g. to evaluate and save checkpoints.

    Each step runs the members in blocks of ``block_size`` (forward, backward, update); the result does not depend on
    it, except through dropout: masks come from the global RNG in block order, so with dropout a member's training
    depends on its population and blocks (and is reproducible for the same ones). On CPU the default keeps every
    module output of a block under 8 MB (64 digits CNNs at batch 64): 256 of them in one block ran 1.6x slower per
    network, as their activations no longer fit the allocator's reuse and the caches. On other devices all members
    form one block.

    ``update(pop, members, grad)`` replaces the members' optimizer step (default: their Adam or SGD; ``grad`` is
    ``[n, D]`` in ``pop.flat``'s layout, ``pop.step`` the step number): a learned optimizer plugs in here.
    """
    n = len(pop.members)
    update = _update if update is None else update
    _prime_allocator(pop.flat.device)
    if block_size is None:
        block_size = _block_size(pop, x[:batch_size], train=True)
    elif block_size < 1:
        raise ValueError(f"block_size {block_size} must be >= 1")
    # each member draws its subset and batch order from its own generator: it trains the same in any population
    gens, subsets = [], []
    for m in pop.members:
        g = torch.Generator().manual_seed(m.seed)
        k = max(batch_size, int(round(m.train_fraction * len(x))))
        subsets.append(torch.randperm(len(x), generator=g)[:k])
        gens.append(torch.Generator().manual_seed(seed * 1_000_003 + m.seed))
    steps = math.ceil(len(x) / batch_size)  # the same for every member; smaller subsets are cycled
    pos = torch.arange(steps * batch_size)
    epochs_iter: Iterable[int] = range(1, epochs + 1)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=f"training {n} networks", unit="epoch")
    for epoch in epochs_iter:
        # each member's epoch: its shuffled subset, cycled to steps * batch_size samples
        orders = torch.stack([s[torch.randperm(len(s), generator=g)][pos % len(s)] for s, g in zip(subsets, gens)])
        for i in range(steps):
            idx = orders[:, i * batch_size:(i + 1) * batch_size]  # [N, B]
            pop.step += 1
            for a in range(0, n, block_size):
                members, ib = slice(a, a + block_size), idx[a:a + block_size].reshape(-1).to(x.device)
                # index_select, not x[ib]: 3.5x faster for the [n, B] index of a digits block (0.4 against 1.4 ms)
                xb = x.index_select(0, ib).view(-1, batch_size, *x.shape[1:])
                _, grad = member_grads(pop, xb, y.index_select(0, ib).view(-1, batch_size), members)
                update(pop, members, grad)
        if on_epoch is not None:
            on_epoch(epoch, pop)
    return pop


@torch.no_grad()
def evaluate_population(pop: Population, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member: mean cross-entropy and accuracy on ``(x, y)`` (eval mode), each ``[N]``."""
    n = len(pop.members)
    acc_dtype = torch.promote_types(pop.flat.dtype, torch.float32)
    loss = torch.zeros(n, dtype=acc_dtype, device=pop.flat.device)
    correct = torch.zeros(n, dtype=acc_dtype, device=pop.flat.device)
    _prime_allocator(pop.flat.device)
    block = _block_size(pop, x[:batch_size], train=False)
    for a in range(0, n, block):
        members = slice(a, a + block)
        for i in range(0, len(x), batch_size):
            out = _forward(pop, x[i:i + batch_size], same_input=True, train=False, members=members)  # [n, B, classes]
            yb = y[i:i + batch_size]
            loss[members] += F.cross_entropy(out.transpose(1, 2), yb.expand(len(out), -1), reduction="none").sum(1)
            correct[members] += (out.argmax(2) == yb).sum(1)
    return loss / len(x), correct / len(x)
