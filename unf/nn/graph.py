"""Graph metanetworks over the *neural graph* of a network (Kofinas et al., ICLR 2024, "Graph Neural Networks for
Learning Equivariant Representations of Neural Networks"; reference code: mkofinas/neural-graphs).

The neural graph of an MLP or a plain CNN has one node per neuron (input features / input channels, hidden units /
channels, outputs) and one edge per weight, pointing from the neuron a weight reads to the neuron it writes:

* a Linear weight ``W[o, i]`` is the 1-d feature of the edge ``i -> o``;
* a conv kernel ``W[o, i, kh, kw]`` is the ``kh * kw`` feature of the edge ``i -> o`` (kernels of different sizes
  are zero-padded, centred, to the largest one before flattening);
* a Linear after ``Flatten`` whose in-axis is the product ``("c", k)`` (channel-major, as
  :func:`unf.spec_from_module` writes it) connects channel neuron ``c`` to each output with the ``k``-dim edge
  feature ``W[o, c*k : (c+1)*k]``;
* every 1-d tensor on a neuron set is one node-feature slot of those neurons: the bias of the layer that writes
  them, and -- the documented choice for normalisation layers -- the affine parameters and running statistics of a
  BatchNorm/LayerNorm acting on them, as further slots. Nothing is folded (so no ``eps`` has to be guessed); the
  metanetwork sees the raw per-neuron parameters.

Every feature is taken per weight-space channel, so ``channels > 1`` just widens the features.

All edges of all graphs are feature vectors padded to one common size, so one graph structure (``edge_index``,
node and edge types) is built **once** from the spec (:func:`neural_graph`); converting a :class:`~unf.WeightSpace`
batch into a PyG :class:`~torch_geometric.data.Batch` (:func:`graph_batch`, :meth:`NeuralGraph.batch`) is a handful of
reshapes and one concatenation, with no per-member Python loop.

Because a permutation of any hidden group of the spec only relabels nodes of the graph (and the features move with
them), a message-passing network with node-permutation-invariant readout is invariant to the spec's symmetries.
:class:`GraphMetanetwork` is such a model. Node types make it aware of the layer structure: every hidden neuron set
has one learned embedding (neurons in a layer are exchangeable); input and output neurons, which the spec keeps fixed,
each get their own (positional) embedding, as in the paper, so the model is not needlessly invariant to permuting
the network's inputs or outputs (``positional_io=False`` turns that off).

Supported layouts (what :func:`neural_graph` accepts): MLPs and plain CNNs -- stacks of Linear / Conv1d-3d layers with
any activations, pooling, global average pooling or flatten heads, optionally BatchNorm/LayerNorm on the neurons. In
spec terms, every float tensor must be

* 1-d, its axis a group or fixed (a fixed axis must be the output axis of the same layer: by ``fixed_ids`` or by the
  name ``<module>.weight``);
* 2-d (Linear) ``(out, in)``: ``out`` a group or fixed, ``in`` a group, fixed, or a product of one group and fixed
  sizes (a flatten);
* n-d, n >= 3 (convolution): ``(out, in, fixed, ...)`` with ``out``/``in`` groups or fixed;

and every group must be written (be the out-axis) of exactly one weight. Anything else -- concatenations (fused QKV,
gates), groups shared by several layers (residual streams of ResNets / transformers), multi-group products (attention
heads), 0-d or 3-d parameters (``cls`` tokens, positional embeddings), recurrent weights -- raises
:class:`NotImplementedError` naming the tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn import MessagePassing, global_add_pool, global_max_pool, global_mean_pool
except ImportError as e:  # pragma: no cover - exercised only without PyG
    raise ImportError("unf.nn.graph needs PyTorch Geometric: `pip install torch_geometric` (its pure-PyTorch code "
                      "paths are enough; torch_scatter/torch_sparse are not needed)") from e

from ..spec import WeightSpaceSpec
from ..spec.axes import entry_groups, format_entry
from ..weights import WeightSpace

__all__ = ["NodeSet", "NeuralGraph", "neural_graph", "graph_batch", "NeuralGraphConv", "GraphMetanetwork"]


@dataclass(frozen=True)
class NodeSet:
    """A set of neurons of the neural graph: nodes ``offset .. offset + size - 1``.

    ``group``: the spec group permuting them (hidden neurons), or ``None`` for neurons the spec keeps fixed (network
    inputs and outputs). ``layer``: depth in the graph (longest path from an input set; inputs are layer 0).
    ``key``: the group name, or a label of the fixed axis (its ``fixed_id`` or ``"<tensor>:in"``/``"<tensor>:out"``).
    """
    key: str
    size: int
    offset: int
    group: Optional[str]
    layer: int


@dataclass(frozen=True)
class _EdgeTensor:
    name: str
    out_set: int
    in_set: int
    n_out: int
    n_in: int
    in_factors: tuple  # in-axis split into factors (flatten heads); () when the in-axis is one group / fixed axis
    group_pos: int  # position of the group among in_factors
    kernel: tuple  # trailing kernel shape (convolutions), () for Linear
    start: int  # first edge index


class NeuralGraph:
    """The neural graph of a spec: structure only; features come from :meth:`node_features`/:meth:`edge_features`.

    Attributes (per graph, i.e. per network):

    * ``node_sets``: list of :class:`NodeSet`, in layer order; ``num_nodes``, ``num_edges``;
    * ``edge_index`` ``[2, num_edges]``: row 0 the source neuron (the one read), row 1 the target (the one written);
    * ``edge_type`` ``[num_edges]``: index of the weight tensor the edge comes from (``edge_tensors`` order);
    * ``node_layer`` ``[num_nodes]``: index of the node's set in ``node_sets``;
    * ``node_type`` ``[num_nodes]``: embedding index: the set index for hidden neurons; with ``positional_io``, one
      index per fixed (input/output) neuron; ``num_node_types`` of them;
    * ``node_dim``, ``edge_dim``: feature slots per weight-space channel (``node_tensors``: tensor -> (set, slot)).
    """

    def __init__(self, spec: WeightSpaceSpec, positional_io: bool = True):
        self.spec = spec
        self.positional_io = positional_io
        self._build()

    # -- structure ----------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        spec = self.spec
        sets: dict[str, dict] = {}  # key -> {size, group, first}

        def node_set(key: str, size: int, group: Optional[str], name: str, axis: int) -> str:
            s = sets.setdefault(key, {"size": size, "group": group, "first": len(sets)})
            if s["size"] != size:
                raise NotImplementedError(f"tensor {name!r} axis {axis}: neuron set {key!r} is used with sizes "
                                          f"{s['size']} and {size}")
            return key

        def unsupported(name: str, why: str) -> NotImplementedError:
            axes = ", ".join(format_entry(e) for e in spec[name].axes)
            return NotImplementedError(
                f"neural graph: tensor {name!r} (shape {tuple(spec[name].shape)}, axes [{axes}]) {why}. Only MLPs "
                "and plain CNNs are supported (Linear/Conv weights, biases, BatchNorm/LayerNorm vectors); see "
                "unf.nn.graph for the supported layouts")

        def fixed_key(name: str, axis: int, default: str) -> str:
            ids = spec[name].fixed_ids
            return ids[axis] if ids is not None and ids[axis] is not None else default

        edges, vectors = [], []
        producer: dict[str, str] = {}
        out_key_of: dict[str, str] = {}  # weight name -> key of the set it writes
        for name in spec.float_names:
            t = spec[name]
            if any(isinstance(e, list) for e in t.axes):
                raise unsupported(name, "has a concatenated axis (fused projections such as QKV or gates)")
            if len(t.shape) == 0:
                raise unsupported(name, "is a scalar")
            if len(t.shape) == 1:
                vectors.append(name)
                continue
            if len(t.shape) >= 3 and any(e is not None for e in t.axes[2:]):
                raise unsupported(name, "is neither a Linear weight (2-d) nor a convolution kernel (out, in, "
                                        "fixed kernel axes)")
            out_e, in_e = t.axes[0], t.axes[1]
            n_out, n_in_total = t.shape[0], t.shape[1]
            if isinstance(out_e, tuple):
                raise unsupported(name, "has a product on its output axis (heads / grouped outputs)")
            if out_e is None:
                out_key = node_set(fixed_key(name, 0, f"{name}:out"), n_out, None, name, 0)
            else:
                out_key = node_set(out_e, n_out, out_e, name, 0)
                if out_e in producer:
                    raise unsupported(name, f"writes group {out_e!r}, which {producer[out_e]!r} writes too (a "
                                            "residual stream, a depthwise/elementwise layer or other shared "
                                            "neurons)")
                producer[out_e] = name
            in_factors, group_pos = (), 0
            if isinstance(in_e, tuple):
                gs = entry_groups(in_e)
                if len(gs) != 1 or len(t.shape) != 2:
                    raise unsupported(name, "has an input-axis product that is not one group times fixed sizes "
                                            "(a flatten)")
                group_pos = in_e.index(gs[0])
                in_factors = tuple(spec.groups[f] if isinstance(f, str) else f for f in in_e)
                in_key = node_set(gs[0], spec.groups[gs[0]], gs[0], name, 1)
                n_in = spec.groups[gs[0]]
            elif in_e is None:
                in_key = node_set(fixed_key(name, 1, f"{name}:in"), n_in_total, None, name, 1)
                n_in = n_in_total
            else:
                in_key = node_set(in_e, n_in_total, in_e, name, 1)
                n_in = n_in_total
            if in_key == out_key:
                raise unsupported(name, "maps a neuron set to itself (a recurrent or residual weight)")
            out_key_of[name] = out_key
            edges.append((name, out_key, in_key, n_out, n_in, in_factors, group_pos, tuple(t.shape[2:])))

        # every permuted group must be written by some weight, else it is not a layer of neurons
        for name in spec.float_names:
            for g in spec[name].groups:
                if g not in producer:
                    raise unsupported(name, f"uses group {g!r}, which no Linear/Conv weight writes (an embedding, "
                                            "token or other non-neuron axis)")

        # 1-d tensors: node-feature slots of a set
        slots: dict[str, list[str]] = {}
        for name in vectors:
            e = spec[name].axes[0]
            if isinstance(e, tuple):
                raise unsupported(name, "is a 1-d tensor over a product axis")
            if e is not None:
                key = e
            else:
                ids = spec[name].fixed_ids
                key = ids[0] if ids is not None and ids[0] is not None else None
                if key is None or key not in sets:
                    w = name.rpartition(".")[0] + ".weight" if "." in name else None
                    if w in out_key_of and spec[w].axes[0] is None and spec[w].shape[0] == spec[name].shape[0]:
                        key = out_key_of[w]
                    else:
                        raise unsupported(name, "is a fixed 1-d tensor that belongs to no layer's output neurons")
            if sets[key]["size"] != spec[name].shape[0]:
                raise unsupported(name, f"has size {spec[name].shape[0]} but neuron set {key!r} has "
                                        f"{sets[key]['size']}")
            slots.setdefault(key, []).append(name)

        # layers: longest path from the sources
        preds: dict[str, dict] = {k: {} for k in sets}  # set -> {set it reads: weight name}
        for (name, out_key, in_key, *_rest) in edges:
            preds[out_key].setdefault(in_key, name)
        depth: dict[str, int] = {}

        def visit(k: str, stack: tuple) -> int:
            if k in depth:
                return depth[k]
            d = 0
            for p, name in preds[k].items():
                if p in stack or p == k:
                    raise unsupported(name, f"closes a cycle of layers through neuron set {p!r} (recurrent or "
                                            "tied weights)")
                d = max(d, visit(p, stack + (k,)) + 1)
            depth[k] = d
            return d

        for k in sets:
            visit(k, ())
        order = sorted(sets, key=lambda k: (depth[k], sets[k]["first"]))
        self.node_sets: list[NodeSet] = []
        index: dict[str, int] = {}
        offset = 0
        for k in order:
            s = sets[k]
            index[k] = len(self.node_sets)
            self.node_sets.append(NodeSet(k, s["size"], offset, s["group"], depth[k]))
            offset += s["size"]
        self.num_nodes = offset

        # node features
        self.node_dim = max([len(v) for v in slots.values()] + [1])
        self.node_tensors: dict[str, tuple[int, int]] = {n: (index[k], j) for k, v in slots.items()
                                                         for j, n in enumerate(v)}
        self._slots = [slots.get(s.key, []) for s in self.node_sets]

        # edges: conv kernels padded (centred) to the largest kernel of their dimensionality, then flattened
        kmax: dict[int, list[int]] = {}
        for e in edges:
            if e[7]:
                cur = kmax.setdefault(len(e[7]), list(e[7]))
                kmax[len(e[7])] = [max(a, b) for a, b in zip(cur, e[7])]
        self._kernel_pad = {d: tuple(v) for d, v in kmax.items()}
        sizes = [1] + [math.prod(v) for v in kmax.values()]
        sizes += [math.prod(e[5]) // e[4] for e in edges if e[5]]
        self.edge_dim = max(sizes)

        self.edge_tensors: list[_EdgeTensor] = []
        src, dst, etype = [], [], []
        start = 0
        for t_idx, (name, out_key, in_key, n_out, n_in, in_factors, group_pos, kernel) in enumerate(edges):
            o_set, i_set = self.node_sets[index[out_key]], self.node_sets[index[in_key]]
            self.edge_tensors.append(_EdgeTensor(name, index[out_key], index[in_key], n_out, n_in, in_factors,
                                                 group_pos, kernel, start))
            o = torch.arange(n_out).repeat_interleave(n_in)  # edge (o, i), o-major like the weight
            i = torch.arange(n_in).repeat(n_out)
            src.append(i + i_set.offset)
            dst.append(o + o_set.offset)
            etype.append(torch.full((n_out * n_in,), t_idx, dtype=torch.long))
            start += n_out * n_in
        self.num_edges = start
        if not edges:
            raise NotImplementedError("neural graph: the spec has no Linear/Conv weight, so there are no edges")
        self.edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
        self.edge_type = torch.cat(etype)
        self.num_edge_types = len(edges)

        self.node_layer = torch.cat([torch.full((s.size,), j, dtype=torch.long) for j, s in enumerate(self.node_sets)])
        types, n_types = [], len(self.node_sets)
        for j, s in enumerate(self.node_sets):
            if s.group is None and self.positional_io:
                types.append(torch.arange(n_types, n_types + s.size))
                n_types += s.size
            else:
                types.append(torch.full((s.size,), j, dtype=torch.long))
        self.node_type = torch.cat(types)
        self.num_node_types = n_types

    # -- features -----------------------------------------------------------------------------------------------------
    def node_features(self, ws: WeightSpace) -> torch.Tensor:
        """``[B, num_nodes, channels * node_dim]`` (channel-major): slot ``j`` of a neuron is its set's ``j``-th 1-d
        tensor (the bias first, then normalisation vectors, in spec order); missing slots are zero."""
        B, C = ws.batch_size, ws.channels
        parts = []
        for s, names in zip(self.node_sets, self._slots):
            cols = [ws[n].transpose(1, 2) for n in names]  # [B, size, C]
            cols += [ws[self.spec.float_names[0]].new_zeros(B, s.size, C)] * (self.node_dim - len(cols))
            parts.append(torch.stack(cols, dim=3).reshape(B, s.size, C * self.node_dim))
        return torch.cat(parts, dim=1)

    def edge_features(self, ws: WeightSpace) -> torch.Tensor:
        """``[B, num_edges, channels * edge_dim]`` (channel-major): the weight (Linear), the flattened, centred-padded
        kernel (conv) or the ``k`` entries of a flattened channel (flatten head) on each edge, zero-padded."""
        B, C = ws.batch_size, ws.channels
        parts = []
        for et in self.edge_tensors:
            w = ws[et.name]  # [B, C, out, in, *kernel]
            if et.in_factors:  # [B, C, out, f0, f1, ...] with the group factor moved first
                w = w.reshape(B, C, et.n_out, *et.in_factors).movedim(3 + et.group_pos, 3)
                w = w.reshape(B, C, et.n_out, et.n_in, -1)
            elif et.kernel:
                target = self._kernel_pad[len(et.kernel)]
                pad = []
                for k, m in zip(reversed(et.kernel), reversed(target)):
                    pad += [(m - k) // 2, m - k - (m - k) // 2]
                if any(pad):
                    w = F.pad(w, pad)
                w = w.reshape(B, C, et.n_out, et.n_in, -1)
            else:
                w = w.unsqueeze(-1)
            k = w.shape[-1]
            if k < self.edge_dim:
                w = F.pad(w, [0, self.edge_dim - k])
            parts.append(w.permute(0, 2, 3, 1, 4).reshape(B, et.n_out * et.n_in, C * self.edge_dim))
        return torch.cat(parts, dim=1)

    # -- PyG ----------------------------------------------------------------------------------------------------------
    def batch(self, ws: WeightSpace) -> Batch:
        """A PyG ``Batch`` of ``ws.batch_size`` graphs: ``x``, ``edge_index``, ``edge_attr``, ``edge_type``,
        ``node_type``, ``node_layer``, ``batch``, ``ptr`` (``to_data_list()`` works)."""
        if ws.spec is not self.spec and ws.spec != self.spec:
            raise ValueError("the weight space's spec is not the spec this neural graph was built from")
        B, N, E, dev = ws.batch_size, self.num_nodes, self.num_edges, ws.device
        x = self.node_features(ws).reshape(B * N, -1)
        edge_attr = self.edge_features(ws).reshape(B * E, -1)
        shift = torch.arange(B, device=dev) * N
        edge_index = (self.edge_index.to(dev)[:, None, :] + shift[None, :, None]).reshape(2, B * E)
        out = Batch(_base_cls=Data)
        out.x, out.edge_index, out.edge_attr = x, edge_index, edge_attr
        out.edge_type = self.edge_type.to(dev).repeat(B)
        out.node_type = self.node_type.to(dev).repeat(B)
        out.node_layer = self.node_layer.to(dev).repeat(B)
        out.batch = torch.arange(B, device=dev).repeat_interleave(N)
        out.ptr = torch.arange(B + 1, device=dev) * N
        node_slices, edge_slices = torch.arange(B + 1) * N, torch.arange(B + 1) * E
        zeros = torch.zeros(B, dtype=torch.long)
        out._num_graphs = B
        out._slice_dict = {"x": node_slices, "edge_index": edge_slices, "edge_attr": edge_slices,
                           "edge_type": edge_slices, "node_type": node_slices, "node_layer": node_slices}
        out._inc_dict = {"x": zeros, "edge_index": torch.arange(B) * N, "edge_attr": zeros, "edge_type": zeros,
                         "node_type": zeros, "node_layer": zeros}
        return out

    def data(self, ws: WeightSpace, index: int = 0) -> Data:
        """One graph (batch member ``index``) as a PyG ``Data``."""
        x = self.node_features(ws)[index]
        e = self.edge_features(ws)[index]
        dev = x.device
        return Data(x=x, edge_index=self.edge_index.to(dev), edge_attr=e, edge_type=self.edge_type.to(dev),
                    node_type=self.node_type.to(dev), node_layer=self.node_layer.to(dev))

    def __repr__(self) -> str:
        sets = ", ".join(f"{s.key}:{s.size}" for s in self.node_sets)
        return (f"NeuralGraph(nodes={self.num_nodes}, edges={self.num_edges}, node_dim={self.node_dim}, "
                f"edge_dim={self.edge_dim}, sets=[{sets}])")


def neural_graph(spec: WeightSpaceSpec, positional_io: bool = True) -> NeuralGraph:
    """The neural graph of an MLP / plain-CNN spec (see the module docstring for the layouts accepted).

    Raises :class:`NotImplementedError` naming the first tensor that does not fit (attention, residual streams, ...).
    ``positional_io``: give each fixed (input / output) neuron its own node type.
    """
    return NeuralGraph(spec, positional_io)


def graph_batch(ws: WeightSpace, graph: Optional[NeuralGraph] = None) -> Batch:
    """A ``WeightSpace`` batch as a PyG ``Batch`` of neural graphs. Pass a prebuilt ``graph`` (from
    :func:`neural_graph`) to avoid rebuilding the structure on every call."""
    return (graph if graph is not None else neural_graph(ws.spec)).batch(ws)


# ----------------------------------------------------------------------------------------------------------------------
# the metanetwork
# ----------------------------------------------------------------------------------------------------------------------
def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.SiLU(), nn.Linear(hidden, cout))


class NeuralGraphConv(MessagePassing):
    """Edge-conditioned message passing with edge updates.

    ``m_ij = MLP([h_i, h_j, e_ij])`` on every edge ``j -> i``; nodes: ``h_i <- LN(h_i + MLP([h_i, agg_j m_ij]))``
    with ``aggr`` (default mean and max, concatenated); edges (if ``update_edges``): ``e_ij <- LN(e_ij + m_ij)``.
    """

    def __init__(self, hidden: int, aggr: Sequence[str] = ("mean", "max"), update_edges: bool = True):
        aggr = list(aggr)
        super().__init__(aggr=aggr if len(aggr) > 1 else aggr[0])
        self.update_edges = update_edges
        # the message MLP's first layer on [h_i, h_j, e_ij], split so the node terms are computed once per node
        self.msg_dst = nn.Linear(hidden, hidden)
        self.msg_src = nn.Linear(hidden, hidden, bias=False)
        self.msg_edge = nn.Linear(hidden, hidden, bias=False)
        self.msg_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))
        self.upd = _mlp((1 + len(aggr)) * hidden, hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.edge_norm = nn.LayerNorm(hidden) if update_edges else None

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor):
        src, dst = edge_index
        m = self.msg_out(self.msg_dst(h).index_select(0, dst) + self.msg_src(h).index_select(0, src)
                         + self.msg_edge(e))
        agg = self.propagate(edge_index, m=m, size=(h.shape[0], h.shape[0]))
        h = self.norm(h + self.upd(torch.cat([h, agg], dim=1)))
        if self.update_edges:
            e = self.edge_norm(e + m)
        return h, e

    def message(self, m: torch.Tensor) -> torch.Tensor:
        return m


_READOUTS = {"mean": (global_mean_pool,), "sum": (global_add_pool,), "max": (global_max_pool,),
             "mean_max": (global_mean_pool, global_max_pool)}


class GraphMetanetwork(nn.Module):
    """Graph metanetwork (GMN) predictor: ``WeightSpace [B, in_channels] -> [B, out_features]``.

    Neural graph of ``spec`` (:func:`neural_graph`, built once) -> node encoder (features + node-type embedding:
    one per hidden layer, one per input/output neuron) and edge encoder (features + weight-tensor embedding, plus a
    direction embedding when ``bidirectional``) -> ``layers`` x :class:`NeuralGraphConv` -> ``readout`` over nodes
    (``"mean"``, ``"sum"``, ``"max"`` or ``"mean_max"``) -> MLP head. Invariant to every permutation in the spec's
    group (hidden neurons only relabel nodes).

    ``bidirectional``: messages also flow from a layer's outputs back to its inputs (reverse edges with their own
    type embeddings), so every neuron hears both neighbouring layers.
    """

    def __init__(self, spec: WeightSpaceSpec, hidden: int = 64, layers: int = 3, out_features: int = 1,
                 in_channels: int = 1, aggr: Sequence[str] = ("mean", "max"), readout: str = "mean",
                 bidirectional: bool = True, positional_io: bool = True):
        super().__init__()
        if readout not in _READOUTS:
            raise ValueError(f"readout {readout!r}: expected one of {sorted(_READOUTS)}")
        if layers < 1:
            raise ValueError("layers must be >= 1")
        self.graph = neural_graph(spec, positional_io)
        g = self.graph
        self.in_channels, self.bidirectional, self.readout = in_channels, bidirectional, readout
        self.node_in = nn.Linear(in_channels * g.node_dim, hidden)
        self.node_emb = nn.Embedding(g.num_node_types, hidden)
        self.edge_in = nn.Linear(in_channels * g.edge_dim, hidden)
        self.edge_emb = nn.Embedding(g.num_edge_types * (2 if bidirectional else 1), hidden)
        self.convs = nn.ModuleList([NeuralGraphConv(hidden, aggr, update_edges=(i < layers - 1))
                                    for i in range(layers)])
        n = len(_READOUTS[readout]) * hidden
        self.head = nn.Sequential(nn.Linear(n, hidden), nn.SiLU(), nn.Linear(hidden, out_features))

    def encode(self, ws: WeightSpace) -> torch.Tensor:
        """``[B, hidden * len(readout)]``: the pooled node embeddings before the head."""
        if ws.channels != self.in_channels:
            raise ValueError(f"GraphMetanetwork was built for {self.in_channels} channel(s); the weight space has "
                             f"{ws.channels}")
        b = self.graph.batch(ws)
        h = self.node_in(b.x) + self.node_emb(b.node_type)
        e = self.edge_in(b.edge_attr)
        edge_index = b.edge_index
        if self.bidirectional:
            t = self.graph.num_edge_types
            e = torch.cat([e + self.edge_emb(b.edge_type), e + self.edge_emb(b.edge_type + t)])
            edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        else:
            e = e + self.edge_emb(b.edge_type)
        for conv in self.convs:
            h, e = conv(h, edge_index, e)
        return torch.cat([pool(h, b.batch, size=b.num_graphs) for pool in _READOUTS[self.readout]], dim=1)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        return self.head(self.encode(ws))
