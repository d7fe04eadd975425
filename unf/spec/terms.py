"""Symbolic axis terms and their unification (union-find with bindings).

While a traced graph is walked, every axis of every tensor carries a *term*: a tuple of segments (concatenation), each
segment a tuple of factors (row-major product), each factor an ``int`` (a fixed block) or a :class:`Var` (a candidate
permutation group). Ops that need two axes to be permuted alike *unify* their terms. A var can be

* free: it becomes a group of the spec;
* merged with other vars (union-find);
* bound to a term: it is permuted as that structure (a product or a concatenation of smaller groups);
* fixed: bound to its size as a plain ``int``; this is always sound (it only forgets symmetry).

Whenever two terms cannot be matched exactly the vars involved are fixed, so the result is the largest symmetry that the
rules prove, never one they do not.
"""
from __future__ import annotations

import itertools
import math
import operator
from typing import Callable, Iterable, Optional, Union

Factor = Union[int, "Var"]
Segment = tuple
Term = tuple  # tuple[Segment, ...]

_ids = itertools.count()


class Var:
    __slots__ = ("id", "size", "hint", "parent", "binding")

    def __init__(self, size: int, hint: Optional[str] = None):
        self.id, self.size, self.hint = next(_ids), size, hint
        self.parent: Var = self
        self.binding: Optional[Term] = None

    def __repr__(self) -> str:
        return f"v{self.id}:{self.size}" + (f"({self.hint})" if self.hint else "")


class NotExpressible(Exception):
    """A term whose structure the spec format cannot express; ``var`` is the one to fix."""

    def __init__(self, var: Var):
        self.var = var


def find(v: Var) -> Var:
    while v.parent is not v:
        v.parent = v.parent.parent
        v = v.parent
    return v


def _sizes(seg: Segment) -> list[int]:
    return [factor_size(f) for f in seg]


def factor_size(f: Factor) -> int:
    return f if isinstance(f, int) else f.size


def segment_size(seg: Segment) -> int:
    return math.prod(factor_size(f) for f in seg)


def term_size(t: Term) -> int:
    return sum(segment_size(s) for s in t)


def fixed(n: int) -> Term:
    return ((n,),)


def fresh(n: int, hint: Optional[str] = None) -> Term:
    """A term with one new free var (or a fixed term for sizes <= 1, which carry no symmetry)."""
    return ((Var(n, hint),),) if n > 1 else fixed(n)


def _norm_segment(factors: Iterable[Factor]) -> Segment:
    out: list = []
    for f in factors:
        if factor_size(f) == 1:
            continue
        if isinstance(f, int) and out and isinstance(out[-1], int):
            out[-1] *= f
        else:
            out.append(f)
    return tuple(out) or (1,)


def _norm_term(segments: Iterable[Segment]) -> Term:
    out: list = []
    for seg in segments:
        if segment_size(seg) == 0:
            continue
        if all(isinstance(f, int) for f in seg) and out and all(isinstance(f, int) for f in out[-1]):
            out[-1] = (segment_size(out[-1]) + segment_size(seg),)
        else:
            out.append(seg)
    return tuple(out) or ((0,),)


def resolve(t: Term) -> Term:
    """Substitute bindings and merged vars; normal form (no size-1 factors, merged fixed blocks).

    Raises :class:`NotExpressible` for a concatenation nested inside a product after a permuted factor.
    """
    segments: list = []
    for seg in t:
        # expand each factor into a list of alternative segments (a concatenation), then distribute
        parts: list[list] = [[]]
        for f in seg:
            if isinstance(f, Var):
                r = find(f)
                sub = resolve(r.binding) if r.binding is not None else ((r,),)
            else:
                sub = ((f,),)
            if len(sub) > 1:
                outer_vars = [g for p in parts for g in p if isinstance(g, Var) and g.size > 1]
                if outer_vars:
                    raise NotExpressible(outer_vars[0])
                if len(parts) > 1:  # a fixed-size prefix repeats the concatenation
                    parts = [p + list(s) for p in parts for s in sub]
                else:
                    prefix = parts[0]
                    reps = math.prod(factor_size(g) for g in prefix)
                    parts = [list(s) for _ in range(reps) for s in sub]
            else:
                parts = [p + list(sub[0]) for p in parts]
        segments.extend(_norm_segment(p) for p in parts)
    return _norm_term(segments)


def term_vars(t: Term) -> list[Var]:
    """Distinct free vars (roots) in a term."""
    try:
        r = resolve(t)
    except NotExpressible:
        r = _raw_roots(t)
    return list(dict.fromkeys(f for seg in r for f in seg if isinstance(f, Var)))


def _raw_roots(t: Term) -> Term:
    out = []
    for seg in t:
        facs = []
        for f in seg:
            if isinstance(f, Var):
                r = find(f)
                if r.binding is not None:
                    facs.extend(g for s in _raw_roots(r.binding) for g in s)
                else:
                    facs.append(r)
            else:
                facs.append(f)
        out.append(tuple(facs))
    return tuple(out)


def fix(t: Term) -> bool:
    """Make every var in ``t`` fixed; returns whether any symmetry was given up."""
    vs = [v for v in term_vars(t) if v.size > 1]
    for v in vs:
        find(v).binding = fixed(v.size)
    return bool(vs)


#: Called with a reason whenever a structural mismatch fixes vars (set by the inference engine around each op).
loss_hook: Optional[Callable[[str], None]] = None


def _lose(t: Term, reason: str) -> None:
    """Fix ``t`` because its structure cannot be matched (no rule proves more); reports through :data:`loss_hook`."""
    if fix(t) and loss_hook is not None:
        loss_hook(reason)


def _bind(v: Var, t: Term) -> None:
    r = find(v)
    if r.binding is not None:
        unify(r.binding, t)
        return
    if r in term_vars(t):  # occurs check: v = (..v..) has no finite solution
        _lose(t, "an axis would have to be permuted as a part of itself")
        r.binding = fixed(r.size)
        return
    r.binding = t


def _union(a: Var, b: Var) -> None:
    ra, rb = find(a), find(b)
    if ra is rb:
        return
    if rb.id < ra.id:
        ra, rb = rb, ra
    rb.parent = ra
    if ra.hint is None:
        ra.hint = rb.hint
    ba, bb = ra.binding, rb.binding
    if ba is None:
        ra.binding = bb
    elif bb is not None:
        unify(ba, bb)


def _match_blocks(a: list[int], b: list[int], combine, unit: int) -> Optional[list[tuple[int, int, int, int]]]:
    """Split two size sequences with equal totals into minimal blocks whose partial totals meet.

    Returns ``(i0, i1, j0, j1)`` ranges, or None if the totals differ. ``combine``: ``+`` for concatenations, ``*``
    for products.
    """
    blocks, i, j, ta, tb, i0, j0 = [], 0, 0, unit, unit, 0, 0
    while i < len(a) or j < len(b):
        if (ta <= tb and i < len(a)) or j == len(b):
            if i == len(a):
                return None
            ta, i = combine(ta, a[i]), i + 1
        else:
            tb, j = combine(tb, b[j]), j + 1
        if ta == tb and i > i0 and j > j0:
            blocks.append((i0, i, j0, j))
            i0, j0 = i, j
    return blocks if ta == tb else None


def product_blocks(fa: list, fb: list) -> Optional[list[tuple[int, int, int, int]]]:
    """Blocks of two factor lists (ints or vars) whose cumulative products meet."""
    return _match_blocks([factor_size(f) for f in fa], [factor_size(f) for f in fb], operator.mul, 1)


def _unify_segments(sa: Segment, sb: Segment) -> None:
    fa, fb = list(sa), list(sb)
    blocks = product_blocks(fa, fb)
    if blocks is None:
        _lose((sa, sb), f"axes factored as {_sizes(sa)} and {_sizes(sb)} cannot be matched")
        return
    for i0, i1, j0, j1 in blocks:
        la, lb = fa[i0:i1], fb[j0:j1]
        if len(la) == 1 and len(lb) == 1:
            x, y = la[0], lb[0]
            if isinstance(x, Var) and isinstance(y, Var):
                _union(x, y)
            elif isinstance(x, Var):
                _bind(x, ((y,),))
            elif isinstance(y, Var):
                _bind(y, ((x,),))
        elif len(la) == 1 and isinstance(la[0], Var):
            _bind(la[0], (tuple(lb),))
        elif len(lb) == 1 and isinstance(lb[0], Var):
            _bind(lb[0], (tuple(la),))
        else:
            _lose((tuple(la), tuple(lb)), f"axes factored as {_sizes(la)} and {_sizes(lb)} cannot be matched")


def unify(a: Term, b: Term) -> None:
    """Require two axes to be permuted identically."""
    while True:
        try:
            ra, rb = resolve(a), resolve(b)
            break
        except NotExpressible as e:
            _lose(((e.var,),), "a concatenation inside a permuted product cannot be expressed")
    if ra == rb:
        return
    if term_size(ra) != term_size(rb):
        raise ValueError(f"internal: unifying axes of different sizes {term_size(ra)} and {term_size(rb)}")
    blocks = _match_blocks([segment_size(s) for s in ra], [segment_size(s) for s in rb], operator.add, 0)
    for i0, i1, j0, j1 in blocks:
        la, lb = ra[i0:i1], rb[j0:j1]
        if len(la) == 1 and len(lb) == 1:
            _unify_segments(la[0], lb[0])
        elif len(la) == 1 and len(la[0]) == 1 and isinstance(la[0][0], Var):
            _bind(la[0][0], lb)
        elif len(lb) == 1 and len(lb[0]) == 1 and isinstance(lb[0][0], Var):
            _bind(lb[0][0], la)
        else:
            _lose(la + lb, f"axes cut as {[segment_size(x) for x in la]} and {[segment_size(x) for x in lb]} "
                           "cannot be matched")


def concat(terms: list[Term]) -> Term:
    """Term of the concatenation of several axes."""
    return _norm_term(seg for t in terms for seg in resolve(t))


def product(terms: list[Term]) -> Term:
    """Term of the row-major flattening of several axes (outermost first)."""
    out: Term = ((),)
    for t in terms:
        t = resolve(t)
        if len(t) == 1:
            out = tuple(s + t[0] for s in out)
        elif all(isinstance(f, int) for s in out for f in s):
            reps = term_size(out) if out != ((),) else 1
            out = tuple(s for _ in range(reps) for s in t)
        else:  # a concatenation inside a permuted outer axis cannot be expressed: give up the outer symmetry
            _lose(out, "a concatenation inside a permuted product cannot be expressed")
            reps = term_size(out)
            out = tuple(s for _ in range(reps) for s in t)
    return _norm_term(_norm_segment(s) for s in out)


def split_product(t: Term, sizes: list[int]) -> list[Term]:
    """Terms of the axes obtained by reshaping one axis ``t`` into ``sizes`` (row-major).

    A concatenation reshaped into ``(k, ...)`` is cut into ``k`` equal blocks that share one permutation (the first
    output axis stays fixed).
    """
    t = resolve(t)
    if len(sizes) == 1:
        return [t]
    if len(t) > 1:
        # k equal blocks of a concatenation side by side (a channel shuffle's view): one shared permutation
        pieces = split_concat(t, [term_size(t) // sizes[0]] * sizes[0])
        for p in pieces[1:]:
            unify(pieces[0], p)
        return [fixed(sizes[0])] + split_product(pieces[0], sizes[1:])
    facs = [f for f in t[0]]
    out: list[Term] = []
    k = 0
    for n in sizes:
        seg: list = []
        need = n
        while need > 1:
            if k >= len(facs):
                _lose(t, f"an axis factored as {_sizes(t[0])} reshaped into {sizes}")
                return [fixed(m) for m in sizes]
            f = facs[k]
            s = factor_size(f)
            if s <= need and need % s == 0:
                seg.append(f)
                need //= s
                k += 1
            elif s % need == 0:  # the output axis ends inside this factor: split it
                if isinstance(f, Var):
                    a, b = Var(need), Var(s // need)
                    _bind(f, ((a, b),))
                    seg.append(a)
                    facs[k] = b
                else:
                    seg.append(need)
                    facs[k] = s // need
                need = 1
            else:
                _lose(t, f"an axis factored as {_sizes(t[0])} reshaped into {sizes}")
                return [fixed(m) for m in sizes]
        out.append(_norm_term([_norm_segment(seg)]))
    return out


def _cut(seg: Segment, cuts: list[int]) -> list[Segment]:
    """The segments that make up ``seg`` with a boundary at each local position in ``cuts``.

    A cut var becomes a concatenation of new vars; a product's outer factor is cut into runs of whole blocks (a
    permuted one into a concatenation of smaller groups), and a block that a cut falls inside stands alone and is cut
    within.
    """
    if not cuts:
        return [seg]
    n = segment_size(seg)
    if len(seg) == 1:
        edges = [0] + cuts + [n]
        widths = [e1 - e0 for e0, e1 in zip(edges, edges[1:])]
        if isinstance(seg[0], Var):
            parts = tuple((Var(w),) if w > 1 else (w,) for w in widths)
            _bind(seg[0], parts)
            return list(parts)
        return [(w,) for w in widths]
    outer, rest = factor_size(seg[0]), seg[1:]
    inner = n // outer
    marks = sorted({c // inner for c in cuts} | {c // inner + 1 for c in cuts if c % inner} | {0, outer})
    runs = list(zip(marks, marks[1:]))
    heads = tuple((Var(b - a),) if b - a > 1 else (b - a,) for a, b in runs) if isinstance(seg[0], Var) else \
        tuple((b - a,) for a, b in runs)
    if isinstance(seg[0], Var):
        _bind(seg[0], heads)
    out: list = []
    for (a, b), head in zip(runs, heads):
        inside = [c - a * inner for c in cuts if a * inner < c < b * inner]
        out += _cut(_norm_segment(rest), inside) if inside else [_norm_segment(head + rest)]
    return out


def split_concat(t: Term, sizes: list[int]) -> list[Term]:
    """Terms of the pieces obtained by cutting axis ``t`` into consecutive blocks of ``sizes`` (see :func:`_cut`)."""
    bounds = set(itertools.accumulate(sizes))
    segs: list = []
    offset = 0
    for seg in resolve(t):
        n = segment_size(seg)
        segs += _cut(seg, sorted(b - offset for b in bounds if offset < b < offset + n))
        offset += n
    # group the segments into pieces
    out, i = [], 0
    for n in sizes:
        piece, acc = [], 0
        while acc < n:
            piece.append(segs[i])
            acc += segment_size(segs[i])
            i += 1
        out.append(_norm_term(piece))
    return out
