"""Small training and evaluation loops for classifiers on tensor datasets (the embedded data)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10, batch_size: int = 64,
                     lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0) -> nn.Module:
    """Adam on cross-entropy, shuffled mini-batches from a seeded generator; returns the model (trained in place)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (eval mode)."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was)
    return loss / len(x), correct / len(x)
