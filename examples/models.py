"""Example architectures for ``unf spec`` and the benchmarks (plain PyTorch, no torchvision needed).

Each factory takes keyword sizes and returns an ``nn.Module``::

    unf spec examples/models.py:resnet18 --input-shape 1,3,32,32
    unf spec examples/models.py:vit --input-shape 1,3,32,32
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(in_features: int = 64, hidden: tuple = (128, 128), num_classes: int = 10) -> nn.Module:
    """MLP for 8x8 digits (input ``[B, 64]``)."""
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def small_cnn(in_channels: int = 1, width: int = 16, num_classes: int = 10) -> nn.Module:
    """Small CNN Zoo style: 3 conv layers, global average pooling, linear head (input ``[B, 1, 8, 8]``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != width:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, layers: tuple, widths: tuple = (64, 128, 256, 512), in_channels: int = 3,
                 num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18(num_classes: int = 10, width: int = 64) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), tuple(width * k for k in (1, 2, 4, 8)), num_classes=num_classes)


def resnet20(num_classes: int = 10, width: int = 16) -> nn.Module:
    """CIFAR ResNet-20 (3 stages of 3 basic blocks); ``width=16`` is x1, ``64`` is x4."""
    return ResNet(BasicBlock, (3, 3, 3), (width, 2 * width, 4 * width), num_classes=num_classes)


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 sized (25.6M parameters with 1000 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), num_classes=num_classes)


class Attention(nn.Module):
    """Multi-head self-attention written by hand (fused QKV projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = att.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, torch_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.torch_attention = torch_attention
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if torch_attention else Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.torch_attention else self.attn(h))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image_size: int = 32, patch: int = 4, dim: int = 192, depth: int = 6, heads: int = 3,
                 in_channels: int = 3, num_classes: int = 10, torch_attention: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, torch_attention=torch_attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(image_size: int = 32, **kw) -> nn.Module:
    return ViT(image_size=image_size, **kw)


def vit_base(image_size: int = 224, torch_attention: bool = False) -> nn.Module:
    """ViT-B/16 sized: 12 blocks, width 768, 12 heads (86M parameters)."""
    return ViT(image_size, 16, 768, 12, 12, num_classes=1000, torch_attention=torch_attention)


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 32, hidden: int = 64, layers: int = 2, num_classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids):
        out, _ = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


def lstm(**kw) -> nn.Module:
    """Input: token ids ``[B, T]`` (use ``--input-dtype long``)."""
    return LSTMClassifier(**kw)
