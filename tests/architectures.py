"""Small float64 model zoo for spec-inference tests.

Every factory returns ``(model, example_input)`` with a model in float64 whose parameters *and* buffers have been
re-drawn at random (so that permuting, e.g., a BatchNorm weight of all ones, or a zero bias, cannot hide a wrong axis),
and an example input that is a tensor or a tuple of positional inputs. Batches have >= 4 samples so BatchNorm in train
mode uses meaningful batch statistics.

``ARCHITECTURES``: name -> factory. ``EXPECTED_GROUPS``: name -> sorted list of the group sizes of the maximal
permutation symmetry *in the spec format* (a product ``(heads, per-head)`` for heads / conv groups / GroupNorm groups,
i.e. one within-block permutation shared by all blocks; see the notes at each entry).

Models that contain dropout use ``p > 0``; the tests set every dropout probability to 0 before comparing outputs in
train mode (in eval mode dropout is the identity anyway).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

B = 4  # batch size (>= 4 for BatchNorm batch statistics)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def finalize(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, and every floating parameter/buffer re-drawn (variances positive), deterministically."""
    model = model.double()
    g = _gen(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            leaf = name.rpartition(".")[2]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) / math.sqrt(max(fan_in, 1)))
    return model


def _x(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _ids(*shape, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=_gen(seed))


# ------------------------------------------------------------------------------------------------------------------
# MLPs
# ------------------------------------------------------------------------------------------------------------------
def mlp():
    m = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10), nn.GELU(),
                      nn.Linear(10, 3))
    return finalize(m), _x(B, 5)


def mlp_batchnorm():
    m = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.BatchNorm1d(12),
                      nn.ReLU(), nn.Linear(12, 3))
    return finalize(m), _x(B, 5)


def mlp_layernorm():
    m = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 12), nn.LayerNorm(12), nn.SiLU(),
                      nn.Linear(12, 3))
    return finalize(m), _x(B, 5)


class FunctionalMLP(nn.Module):
    """Raw nn.Parameter attributes used through F.linear."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.empty(16, 5)), nn.Parameter(torch.empty(16))
        self.w2, self.b2 = nn.Parameter(torch.empty(12, 16)), nn.Parameter(torch.empty(12))
        self.w3 = nn.Parameter(torch.empty(3, 12))

    def forward(self, x):
        h = F.relu(F.linear(x, self.w1, self.b1))
        h = torch.tanh(F.linear(h, self.w2, self.b2))
        return F.linear(h, self.w3)


def functional_mlp():
    return finalize(FunctionalMLP()), _x(B, 5)


class FunctionalCNN(nn.Module):
    """Raw nn.Parameter attributes used through F.conv2d and F.linear."""

    def __init__(self):
        super().__init__()
        self.cw1, self.cb1 = nn.Parameter(torch.empty(6, 2, 3, 3)), nn.Parameter(torch.empty(6))
        self.cw2 = nn.Parameter(torch.empty(8, 6, 3, 3))
        self.fw, self.fb = nn.Parameter(torch.empty(3, 8)), nn.Parameter(torch.empty(3))

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.cw1, self.cb1, padding=1))
        h = F.relu(F.conv2d(h, self.cw2, None, 1, 1))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return F.linear(h, self.fw, self.fb)


def functional_cnn():
    return finalize(FunctionalCNN()), _x(B, 2, 6, 6)


class SwiGLU(nn.Module):
    """Gated MLP block with a residual stream; ``fused``: one Linear to 2*hidden, then ``.chunk(2, -1)``."""

    def __init__(self, d_in=5, d=8, hidden=12, d_out=3, fused=False):
        super().__init__()
        self.fused = fused
        self.inp = nn.Linear(d_in, d)
        if fused:
            self.gate_up = nn.Linear(d, 2 * hidden)
        else:
            self.gate, self.up = nn.Linear(d, hidden), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.inp(x)
        if self.fused:
            g, u = self.gate_up(h).chunk(2, -1)
        else:
            g, u = self.gate(h), self.up(h)
        h = h + self.down(F.silu(g) * u)
        return self.head(h)


def swiglu_two_linears():
    return finalize(SwiGLU(fused=False)), _x(B, 5)


def swiglu_fused_chunk():
    return finalize(SwiGLU(fused=True)), _x(B, 5)


class CatBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 4)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))


def cat_branches():
    return finalize(CatBranches()), _x(B, 5)


class ChunkHeads(nn.Module):
    """One Linear, its output chunked in two halves that feed two different Linears."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h1, h2 = F.relu(self.inp(x)).chunk(2, dim=-1)
        return self.a(h1) + self.b(h2)


def chunk_mlp():
    return finalize(ChunkHeads()), _x(B, 5)


# ------------------------------------------------------------------------------------------------------------------
# CNNs
# ------------------------------------------------------------------------------------------------------------------
def cnn_flatten():
    # 6x6 -> conv (pad 1) -> 6x6 -> conv -> 6x6 -> maxpool -> 3x3; Linear on the flattened C*H*W = 8*9
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 9, 10), nn.ReLU(), nn.Linear(10, 3))
    return finalize(m), _x(B, 2, 6, 6)


class CNNGap(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.head(h.mean(dim=(2, 3)))


def cnn_gap():
    return finalize(CNNGap()), _x(B, 3, 6, 6)


def cnn_adaptive_pool():
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return finalize(m), _x(B, 3, 6, 6)


def cnn_batchnorm():
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return finalize(m), _x(B, 3, 6, 6)


def cnn_groupnorm():
    # GroupNorm(2, 8): channels are (2 groups) x (4 per group); the spec format shares one within-group permutation
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                      nn.Conv2d(8, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return finalize(m), _x(B, 3, 6, 6)


def cnn_instancenorm():
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
                      nn.ReLU(), nn.Conv2d(6, 8, 3), nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return finalize(m), _x(B, 3, 6, 6)


def conv1d_net():
    m = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 8, 3), nn.ReLU(),
                      nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(8, 3))
    return finalize(m), _x(B, 2, 10)


def conv3d_net():
    # 4^3 -> conv(pad 1) -> 4^3 -> conv(pad 1) -> 4^3 -> avgpool(2) -> 2^3; Linear on 6*8
    m = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, padding=1), nn.ReLU(),
                      nn.AvgPool3d(2), nn.Flatten(), nn.Linear(6 * 8, 3))
    return finalize(m), _x(B, 2, 4, 4, 4)


def depthwise_conv():
    # depthwise 3x3 (groups=C=8): the channel permutation passes through it unchanged
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                      nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return finalize(m), _x(B, 3, 5, 5)


def depthwise_multiplier_conv():
    # depthwise with channel multiplier 2 (groups=4, 4 -> 8): out channels are (4 groups) x (2 per group)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(),
                      nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return finalize(m), _x(B, 3, 5, 5)


def grouped_conv():
    # groups=2: in channels (2 groups) x (4 per group), out channels (2 groups) x (4 per group)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                      nn.Conv2d(8, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    return finalize(m), _x(B, 3, 5, 5)


def conv_transpose_net():
    m = nn.Sequential(nn.Conv2d(2, 6, 3, stride=2, padding=1), nn.ReLU(),
                      nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                      nn.ConvTranspose2d(8, 4, 3, padding=1, groups=2), nn.ReLU(),
                      nn.Conv2d(4, 1, 1))
    return finalize(m), _x(B, 2, 6, 6)


class CatConv(nn.Module):
    """Inception-like: two conv branches concatenated along channels, then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a, self.b = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 5, 3, padding=1)
        self.mix = nn.Conv2d(9, 7, 1)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = torch.cat((F.relu(self.a(h)), F.relu(self.b(h))), 1)
        h = F.relu(self.mix(h))
        return self.head(h.mean((-2, -1)))


def cat_conv():
    return finalize(CatConv()), _x(B, 3, 5, 5)


class SplitConv(nn.Module):
    """torch.split of channels into unequal parts feeding different convs whose outputs are summed."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(5, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        a, b = torch.split(h, [3, 5], dim=1)
        h = F.relu(self.a(a)) + torch.sigmoid(self.b(b))
        return self.head(h.mean((2, 3)))


def split_conv():
    return finalize(SplitConv()), _x(B, 3, 5, 5)


def assorted_layers():
    """Dropout, many activations, MaxPool2d, AvgPool2d, PReLU (per-channel)."""
    m = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(2), nn.Dropout2d(0.3),        # 8 -> 4
        nn.Conv2d(6, 8, 3, padding=1), nn.PReLU(8), nn.AvgPool2d(2), nn.Dropout(0.2),         # 4 -> 2
        nn.Flatten(), nn.Linear(8 * 4, 10), nn.ELU(), nn.Dropout(0.5),
        nn.Linear(10, 9), nn.Hardswish(), nn.Linear(9, 7), nn.Mish(), nn.Linear(7, 6), nn.Softplus(),
        nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3), nn.LogSoftmax(-1))
    return finalize(m), _x(B, 2, 8, 8)


# ------------------------------------------------------------------------------------------------------------------
# ResNets
# ------------------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, bottleneck=False):
        super().__init__()
        if bottleneck:
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layers = nn.Sequential(Bottleneck(16, 4, 16), Bottleneck(16, 6, 24, stride=2))
            width = 24
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 12, stride=2))
            width = 12
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet_basic():
    return finalize(ResNet(bottleneck=False)), _x(B, 3, 6, 6)


def resnet_bottleneck():
    return finalize(ResNet(bottleneck=True)), _x(B, 3, 6, 6)


# ------------------------------------------------------------------------------------------------------------------
# Language models with tied embeddings
# ------------------------------------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self, vocab=20, d=8, hidden=16, T=6, functional=False):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.empty(T, d))
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.ln_f = nn.LayerNorm(d)
        if not functional:
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        h = h + self.fc2(F.gelu(self.fc1(self.ln(h))))
        h = self.ln_f(h)
        return F.linear(h, self.emb.weight) if self.functional else self.head(h)


def lm_tied_head():
    return finalize(TiedLM(functional=False)), _ids(B, 6, vocab=20)


def lm_functional_head():
    return finalize(TiedLM(functional=True)), _ids(B, 6, vocab=20)


# ------------------------------------------------------------------------------------------------------------------
# Transformers
# ------------------------------------------------------------------------------------------------------------------
class HandAttention(nn.Module):
    def __init__(self, d, heads, sdpa=False):
        super().__init__()
        self.h, self.dh, self.sdpa = heads, d // heads, sdpa
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B_, T_, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(B_, T_, self.h, self.dh).transpose(1, 2)
        k = k.view(B_, T_, self.h, self.dh).transpose(1, 2)
        v = v.view(B_, T_, self.h, self.dh).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.dh))
            att = att.softmax(dim=-1)
            y = att @ v
        y = y.transpose(1, 2).reshape(B_, T_, C)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, d, heads, hidden, attn="mha", dropout=0.0):
        super().__init__()
        self.attn_kind = attn
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if attn == "mha":
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True, dropout=dropout)
        else:
            self.attn = HandAttention(d, heads, sdpa=(attn == "sdpa"))
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.Dropout(dropout))

    def forward(self, x):
        y = self.ln1(x)
        if self.attn_kind == "mha":
            y = self.attn(y, y, y, need_weights=False)[0]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, d_in=5, d=8, heads=2, hidden=16, T=6, n_blocks=2, attn="mha", pool="mean", dropout=0.0):
        super().__init__()
        self.pool = pool
        self.inp = nn.Linear(d_in, d)
        self.pos = nn.Parameter(torch.empty(1, T, d))
        if pool == "cls":
            self.cls = nn.Parameter(torch.empty(1, 1, d))
        self.blocks = nn.ModuleList([Block(d, heads, hidden, attn, dropout) for _ in range(n_blocks)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x) + self.pos
        if self.pool == "cls":
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
        for blk in self.blocks:
            h = blk(h)
        h = self.ln_f(h)
        return self.head(h.mean(1) if self.pool == "mean" else h[:, 0])


def transformer_mha():
    return finalize(Transformer(attn="mha", pool="mean", dropout=0.1)), _x(B, 6, 5)


def transformer_mha_cls():
    return finalize(Transformer(attn="mha", pool="cls")), _x(B, 6, 5)


def transformer_hand_attention():
    return finalize(Transformer(attn="hand", pool="mean")), _x(B, 6, 5)


def transformer_sdpa():
    return finalize(Transformer(attn="sdpa", pool="cls")), _x(B, 6, 5)


# ------------------------------------------------------------------------------------------------------------------
# Recurrent nets
# ------------------------------------------------------------------------------------------------------------------
class RecurrentNet(nn.Module):
    def __init__(self, kind, num_layers=1, bidirectional=False, hidden=8, d_in=4, dropout=0.0):
        super().__init__()
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(d_in, hidden, num_layers=num_layers, batch_first=True, bidirectional=bidirectional,
                       dropout=dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def rnn_net():
    return finalize(RecurrentNet("rnn")), _x(B, 5, 4)


def lstm_2layer():
    return finalize(RecurrentNet("lstm", num_layers=2, dropout=0.3)), _x(B, 5, 4)


def gru_net():
    return finalize(RecurrentNet("gru")), _x(B, 5, 4)


def bilstm():
    return finalize(RecurrentNet("lstm", bidirectional=True)), _x(B, 5, 4)


def bigru_2layer():
    return finalize(RecurrentNet("gru", num_layers=2, bidirectional=True, hidden=6)), _x(B, 5, 4)


# ------------------------------------------------------------------------------------------------------------------
# More standard architectures (beyond the required list)
# ------------------------------------------------------------------------------------------------------------------
class TimmAttention(nn.Module):
    """timm/ViT style: ``qkv(x).reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, d, heads):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1) * self.dh ** -0.5).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B_, N, C))


class TimmTransformer(Transformer):
    def __init__(self):
        super().__init__(attn="hand", pool="mean")
        for blk in self.blocks:
            blk.attn = TimmAttention(8, 2)


def transformer_timm_attention():
    return finalize(TimmTransformer()), _x(B, 6, 5)


class ViT(nn.Module):
    """Patch-embedding conv, CLS token, learned positions, nn.TransformerEncoderLayer (pre-LN) x2."""

    def __init__(self, d=8, heads=2, hidden=16):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 2, stride=2)              # 4x4 image -> 2x2 = 4 patches
        self.cls = nn.Parameter(torch.empty(1, 1, d))
        self.pos = nn.Parameter(torch.empty(1, 5, d))
        self.enc = nn.ModuleList([nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.1, batch_first=True,
                                                             norm_first=True) for _ in range(2)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for layer in self.enc:
            h = layer(h)
        return self.head(self.ln(h)[:, 0])


def vit():
    return finalize(ViT()), _x(B, 3, 4, 4)


def _rope(q, cos, sin):
    half = q.shape[-1] // 2
    return q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin


class Llama(nn.Module):
    """RMSNorm, fused qkv split, rotary embeddings (which destroy the q/k within-head symmetry), causal SDPA, fused
    SwiGLU MLP, last-token head."""

    def __init__(self, d=8, heads=2, hidden=12, T=6):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.inp = nn.Linear(5, d)
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, 3)
        inv = 1.0 / (100 ** (torch.arange(0, self.dh, 2, dtype=torch.float64) / self.dh))
        ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
        ang = torch.cat((ang, ang), -1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x):
        h = self.inp(x)
        B_, T_, C = h.shape
        q, k, v = self.qkv(self.n1(h)).split(C, dim=-1)
        q, k, v = (t.view(B_, T_, self.h, self.dh).transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, self.cos, self.sin), _rope(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B_, T_, C)
        h = h + self.o(y)
        g, u = self.gate_up(self.n2(h)).chunk(2, dim=-1)
        h = h + self.down(F.silu(g) * u)
        return self.head(h[:, -1])


def llama_rope():
    return finalize(Llama()), _x(B, 6, 5)


class MLPMixer(nn.Module):
    def __init__(self, T=6, d=8, tok_hidden=10, ch_hidden=12):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.tok1, self.tok2 = nn.Linear(T, tok_hidden), nn.Linear(tok_hidden, T)
        self.ch1, self.ch2 = nn.Linear(d, ch_hidden), nn.Linear(ch_hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.tok2(F.gelu(self.tok1(self.ln1(h).transpose(1, 2)))).transpose(1, 2)
        h = h + self.ch2(F.gelu(self.ch1(self.ln2(h))))
        return self.head(h.mean(dim=1))


def mlp_mixer():
    return finalize(MLPMixer()), _x(B, 6, 5)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.ln = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.empty(c))
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.stem(x)
        y = self.dw(h).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(F.gelu(self.pw1(self.ln(y))))
        h = h + y.permute(0, 3, 1, 2)
        return self.head(self.norm(h.mean([-2, -1])))


def convnext():
    return finalize(ConvNeXtBlock()), _x(B, 3, 6, 6)


class InvertedResidual(nn.Module):
    def __init__(self, c=8, expand=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2d(c, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU6(),
            nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False), nn.BatchNorm2d(expand), nn.ReLU6(),
            nn.Conv2d(expand, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def mobilenet_v2():
    return finalize(InvertedResidual()), _x(B, 3, 5, 5)


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv2d(2, 4, 3, padding=1)
        self.e2 = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.d1 = nn.Conv2d(8, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        s1 = F.relu(self.e1(x))
        h = F.relu(self.e2(F.max_pool2d(s1, 2)))
        h = torch.cat([F.relu(self.up(h)), s1], dim=1)
        return self.out(F.relu(self.d1(h)))


def unet():
    return finalize(UNet()), _x(B, 2, 4, 4)


class SEBlock(nn.Module):
    def __init__(self, c=8, r=2):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, r), nn.Linear(r, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        h = h * s.view(s.shape[0], -1, 1, 1)
        return self.head(h.mean((2, 3)))


def se_block():
    return finalize(SEBlock()), _x(B, 3, 4, 4)


class Maxout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 12), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.a(x).view(x.shape[0], 3, 4).max(dim=-1).values)


def maxout():
    return finalize(Maxout()), _x(B, 5)


class RecurrentFinalState(nn.Module):
    """Head on the final hidden state ``h_n`` (the other common way to read out an RNN)."""

    def __init__(self, num_layers=2, bidirectional=False):
        super().__init__()
        self.bi = bidirectional
        self.rnn = nn.LSTM(4, 8, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(16 if bidirectional else 8, 3)

    def forward(self, x):
        _, (h, _) = self.rnn(x)
        return self.head(torch.cat([h[-2], h[-1]], dim=-1) if self.bi else h[-1])


def lstm_2layer_final_state():
    return finalize(RecurrentFinalState(num_layers=2)), _x(B, 5, 4)


def bilstm_final_state():
    return finalize(RecurrentFinalState(num_layers=1, bidirectional=True)), _x(B, 5, 4)


def weight_norm_mlp():
    from torch.nn.utils.parametrizations import weight_norm
    m = nn.Sequential(weight_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3))
    return finalize(m), _x(B, 5)


# -- attention with extra inputs that must tie sequence axes --------------------------------------------------------
class MHAMemory(nn.Module):
    """Cross-attention from the tokens to a learned memory: separate key and value slot parameters. Permuting the
    memory slots is a symmetry only if keys and values are permuted *together*."""

    def __init__(self, d=8, slots=6):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.mem_k, self.mem_v = nn.Parameter(torch.empty(1, slots, d)), nn.Parameter(torch.empty(1, slots, d))
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        n = x.shape[0]
        y = self.attn(h, self.mem_k.expand(n, -1, -1), self.mem_v.expand(n, -1, -1), need_weights=False)[0]
        return self.head(h.mean(1) + y.mean(1))


def mha_memory():
    return finalize(MHAMemory()), _x(B, 6, 5)


class MHALearnedMask(nn.Module):
    """A learned additive attention bias (T x T) passed as ``attn_mask``: its axes are the (fixed) token positions."""

    def __init__(self, d=8, T=6):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.bias = nn.Parameter(torch.empty(T, T))
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, attn_mask=self.bias, need_weights=False)[0]
        return self.head(h.mean(1))


def mha_learned_mask():
    return finalize(MHALearnedMask()), _x(B, 6, 5)


class CausalLatentQueries(nn.Module):
    """Learned latent queries with ``is_causal=True``: the causal mask orders the query rows, so they are not free."""

    def __init__(self, d=8, L=4):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.latents = nn.Parameter(torch.empty(1, L, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        q = self.latents.expand(x.shape[0], -1, -1)
        return self.head(F.scaled_dot_product_attention(q, h, h, is_causal=True).mean(1))


def sdpa_causal_latents():
    return finalize(CausalLatentQueries()), _x(B, 4, 5)


# ------------------------------------------------------------------------------------------------------------------
ARCHITECTURES = {
    "mlp": mlp,
    "mlp_batchnorm": mlp_batchnorm,
    "mlp_layernorm": mlp_layernorm,
    "functional_mlp": functional_mlp,
    "functional_cnn": functional_cnn,
    "swiglu_two_linears": swiglu_two_linears,
    "swiglu_fused_chunk": swiglu_fused_chunk,
    "cat_branches": cat_branches,
    "chunk_mlp": chunk_mlp,
    "cnn_flatten": cnn_flatten,
    "cnn_gap": cnn_gap,
    "cnn_adaptive_pool": cnn_adaptive_pool,
    "cnn_batchnorm": cnn_batchnorm,
    "cnn_groupnorm": cnn_groupnorm,
    "cnn_instancenorm": cnn_instancenorm,
    "conv1d_net": conv1d_net,
    "conv3d_net": conv3d_net,
    "depthwise_conv": depthwise_conv,
    "depthwise_multiplier_conv": depthwise_multiplier_conv,
    "grouped_conv": grouped_conv,
    "conv_transpose_net": conv_transpose_net,
    "cat_conv": cat_conv,
    "split_conv": split_conv,
    "assorted_layers": assorted_layers,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "lm_tied_head": lm_tied_head,
    "lm_functional_head": lm_functional_head,
    "transformer_mha": transformer_mha,
    "transformer_mha_cls": transformer_mha_cls,
    "transformer_hand_attention": transformer_hand_attention,
    "transformer_sdpa": transformer_sdpa,
    "rnn": rnn_net,
    "lstm_2layer": lstm_2layer,
    "gru": gru_net,
    "bilstm": bilstm,
    "bigru_2layer": bigru_2layer,
    # beyond the required list
    "transformer_timm_attention": transformer_timm_attention,
    "vit": vit,
    "llama_rope": llama_rope,
    "mlp_mixer": mlp_mixer,
    "convnext": convnext,
    "mobilenet_v2": mobilenet_v2,
    "unet": unet,
    "se_block": se_block,
    "maxout": maxout,
    "lstm_2layer_final_state": lstm_2layer_final_state,
    "bilstm_final_state": bilstm_final_state,
    "weight_norm_mlp": weight_norm_mlp,
    "mha_memory": mha_memory,
    "mha_learned_mask": mha_learned_mask,
    "sdpa_causal_latents": sdpa_causal_latents,
}

# Transformer (d=8, 2 heads of 4, MLP hidden 16, 2 blocks): per block heads=2, qk=4, v=4, hidden=16; one stream of 8.
_TRANSFORMER = sorted([8] + 2 * [2, 4, 4, 16])

EXPECTED_GROUPS = {
    "mlp": [10, 12, 16],
    "mlp_batchnorm": [12, 16],
    "mlp_layernorm": [12, 16],
    "functional_mlp": [12, 16],
    "functional_cnn": [6, 8],
    "swiglu_two_linears": [8, 12],      # residual stream 8, gated hidden 12 (gate and up share it)
    "swiglu_fused_chunk": [8, 12],      # gate_up rows are [hidden | hidden], one group used twice
    "cat_branches": [4, 6],
    "chunk_mlp": [6, 6],                # the two halves of inp's output permute independently
    "cnn_flatten": [6, 8, 10],          # Linear in-axis after flatten is (c8 x 9)
    "cnn_gap": [6, 8],
    "cnn_adaptive_pool": [6, 8],
    "cnn_batchnorm": [6, 8],
    "cnn_groupnorm": [2, 4, 6],         # 8 channels = (2 GroupNorm groups) x (4 per group)
    "cnn_instancenorm": [6, 8],
    "conv1d_net": [6, 8],
    "conv3d_net": [4, 6],
    "depthwise_conv": [6, 8],           # the 8 channels keep one group through the depthwise conv
    "depthwise_multiplier_conv": [2, 4, 6],   # in 4 = groups; out 8 = (groups 4) x (multiplier 2)
    "grouped_conv": [2, 4, 4, 6],       # groups 2; in 4 per group; out 4 per group
    # conv 6; convT 8 = (groups 2) x (4 per group) in, out = (groups 2) x (2 per group)
    "conv_transpose_net": [2, 2, 4, 6],
    "cat_conv": [4, 5, 6, 7],
    "split_conv": [3, 4, 5],            # the stem's 8 channels split into independent 3 and 5
    "assorted_layers": [5, 6, 6, 7, 8, 9, 10],
    "resnet_basic": [8, 8, 12, 12],     # streams 8 and 12; block-internal 8 and 12
    "resnet_bottleneck": [4, 4, 6, 6, 16, 24],
    "lm_tied_head": [8, 16],
    "lm_functional_head": [8, 16],
    "transformer_mha": _TRANSFORMER,
    "transformer_mha_cls": _TRANSFORMER,
    "transformer_hand_attention": _TRANSFORMER,
    "transformer_sdpa": _TRANSFORMER,
    "rnn": [8],
    "lstm_2layer": [8, 8],
    "gru": [8],
    "bilstm": [8, 8],
    "bigru_2layer": [6, 6, 6, 6],
    "transformer_timm_attention": _TRANSFORMER,
    "vit": _TRANSFORMER,
    # RoPE rotates within-head pairs with distinct frequencies: no q/k within-head group; heads 2, v 4, hidden 12
    "llama_rope": [2, 4, 8, 12],
    "mlp_mixer": [8, 10, 12],           # stream 8, token-mixing hidden 10, channel-mixing hidden 12
    "convnext": [8, 32],                # stream 8 (through the depthwise conv), MLP hidden 32
    "mobilenet_v2": [8, 16],            # stream 8, expanded 16 (through the depthwise conv)
    "unet": [4, 4, 4, 8],               # e1 4 (also the skip), e2 8, up 4, d1 4
    "se_block": [2, 8],
    "maxout": [3, 4],                   # (units 3) x (pieces 4)
    "lstm_2layer_final_state": [8, 8],  # h_n[-1] is the last layer's state: only its group acts on it
    "bilstm_final_state": [8, 8],       # cat(h_n[-2], h_n[-1]) = [forward | backward]
    "weight_norm_mlp": [8],             # rows of g (8x1) and v (8x5) permute together
    "mha_memory": [2, 4, 4, 6, 8],      # stream 8, memory slots 6 (keys and values together), heads 2, qk 4, v 4
    "mha_learned_mask": [2, 4, 4, 8],   # the mask's axes are token positions: fixed
    "sdpa_causal_latents": [8],         # the causal mask fixes the order of the latent queries
}

assert set(EXPECTED_GROUPS) == set(ARCHITECTURES)


def require_plugins(name: str) -> None:
    """Skip architectures whose spec needs a plugin that is not installed (``vit``: unf-torch-transformer)."""
    import pytest

    from unf.spec import registry

    if name == "vit" and registry.module_rule(nn.TransformerEncoderLayer(8, 2)) is None:
        pytest.skip("needs the unf-torch-transformer plugin: pip install -e plugins/unf-torch-transformer")
