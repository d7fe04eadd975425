"""The architecture ``unf demo`` trains (kept in a file so that ``unf align`` can build it by reference)."""
import torch.nn as nn


def mlp(width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
