"""``Permutation``: one permutation per symmetry group of a spec."""
from __future__ import annotations

from typing import Iterator, Mapping

import torch


class Permutation(Mapping[str, torch.Tensor]):
    """Group name -> index tensor ``p`` of shape ``[size]``; permuting a vector ``x`` gives ``x[p]``.

    ``a.compose(b)`` (also ``a @ b``) is "``b`` first, then ``a``": permuting by it equals permuting by ``b`` and then
    by ``a``.
    """

    def __init__(self, perms: Mapping[str, torch.Tensor]):
        self._perms = {g: torch.as_tensor(p, dtype=torch.long) for g, p in perms.items()}
        for g, p in self._perms.items():
            if p.dim() != 1 or not torch.equal(p.sort().values, torch.arange(p.numel(), device=p.device)):
                raise ValueError(f"permutation for group {g!r} is not a permutation of 0..{p.numel() - 1}")

    def __getitem__(self, group: str) -> torch.Tensor:
        return self._perms[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._perms)

    def __len__(self) -> int:
        return len(self._perms)

    def inverse(self) -> "Permutation":
        return Permutation({g: torch.argsort(p) for g, p in self._perms.items()})

    def compose(self, other: "Permutation") -> "Permutation":
        if set(self) != set(other):
            raise ValueError(f"cannot compose permutations over different groups: {sorted(self)} vs {sorted(other)}")
        # x -> x[b] -> x[b][a] = x[b[a]]
        return Permutation({g: other[g][p] for g, p in self._perms.items()})

    __matmul__ = compose

    def to(self, device) -> "Permutation":
        return Permutation({g: p.to(device) for g, p in self._perms.items()})

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping) or set(self) != set(other):
            return False
        return all(torch.equal(self[g].cpu(), torch.as_tensor(other[g]).cpu()) for g in self)

    def __repr__(self) -> str:
        inner = ", ".join(f"{g}: {p.tolist() if p.numel() <= 8 else f'<{p.numel()}>'}" for g, p in self._perms.items())
        return f"Permutation({{{inner}}})"
