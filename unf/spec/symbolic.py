"""Symbolic tensors used during spec inference: a shape and one axis term per axis (see :mod:`unf.spec.terms`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import terms as T


@dataclass
class SlotState:
    """A free axis just reshaped into ``(k, *rest)``: each of the ``k`` slots gets its own vars for ``rest``.

    If a slot is picked out (``unbind``, ``x[i]``) the slots stay independent, so that e.g. Q, K and V split off one
    fused projection keep separate within-head groups. Any other use collapses the slots into the plain product
    ``(a, *rest)`` with a new var ``a`` -- exactly what a reshape gives without slots.
    """
    var: T.Var
    k: int
    block_terms: list  # per slot: the terms of the axes split off that slot
    handed_out: bool = False
    slot_term: Optional[tuple] = None  # the slot axis's term once collapsed


@dataclass
class Slots:
    state: SlotState
    axis: int  # position of the slot axis in this tensor
    parts: list  # per slot: this tensor's axis terms without the slot axis


@dataclass
class Sym:
    """A symbolic tensor during inference: its shape and one axis term per axis."""
    shape: tuple[int, ...]
    axes: list
    pending: Optional[list] = None  # terms to fix as soon as the tensor is used (see RuleContext.deferred)
    stack: Optional[list] = None  # per index along axis 0, the term of the last axis (stacked RNN states)
    slots: Optional[Slots] = None  # see SlotState

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _fixed_sym(shape) -> Sym:
    return Sym(tuple(shape), [T.fixed(n) for n in shape])


def _consume(sym: Sym, slots: bool = True) -> None:
    """Apply deferred fixes of a tensor that is used; with ``slots``, also collapse its slots."""
    if sym.pending:
        for t in sym.pending:
            T.fix(t)
        sym.pending = None
    if slots and sym.slots is not None:
        st, sl = sym.slots.state, sym.slots
        if st.slot_term is None:
            for terms in st.block_terms[1:]:
                for a, b in zip(st.block_terms[0], terms):
                    T.unify(a, b)
            if st.handed_out:  # slots are used one by one: the slot axis itself stays fixed
                st.slot_term = T.fixed(st.k)
            else:  # nobody saw the slots: re-bind the split var as the product (a, *rest)
                st.slot_term = T.fresh(st.k)
                T.find(st.var).binding = T.product([st.slot_term] + st.block_terms[0])
        sym.axes = list(sl.parts[0][:sl.axis]) + [st.slot_term] + list(sl.parts[0][sl.axis:])
        sym.slots = None
