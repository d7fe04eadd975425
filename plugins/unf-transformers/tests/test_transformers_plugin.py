"""The unf-transformers plugin: Hugging Face models get sound, maximal specs from ``unf.spec_from_module`` alone.

Tiny configurations with random weights (nothing is downloaded), float64, eval mode. Soundness: weights permuted by
sampled permutations of the spec leave the model's own output (logits / last_hidden_state) unchanged. Maximality:
the number and sizes of the groups equal a count derived by hand for each family (see ``FAMILIES``).
"""
import copy
import warnings
from importlib.metadata import entry_points

import pytest
import torch

tr = pytest.importorskip("transformers")
import unf  # noqa: E402
from unf.spec import registry  # noqa: E402

L, D, HEADS, KV, FF = 2, 32, 4, 2, 64  # layers, width, query heads, key/value heads, MLP width
HD = D // HEADS
BASE = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=FF, vocab_size=100)


def _spec(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", unf.UnprovenSymmetryWarning)
        return unf.spec_from_module(model, x, strict=True)


def _output(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@torch.no_grad()
def _error(model, spec, x, n=3, perm=None):
    y = _output(model, x)
    worst = 0.0
    for s in range(n):
        p = perm if perm is not None else spec.sample_permutation(torch.Generator().manual_seed(s))
        other = copy.deepcopy(model)
        other.load_state_dict(spec.permute(model.state_dict(), p))
        worst = max(worst, ((_output(other, x) - y).abs().max() / y.abs().max()).item())
    return worst


def _ids():
    return torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0))


# Hand counts. Per attention layer: heads, a Q/K within-head group and a V/O within-head group (Q and K share one
# permutation of their head dimensions, V and the output projection's inputs another); per MLP its hidden width; one
# residual stream unless the model outputs it (a base model's last_hidden_state is the stream, which is then fixed).
# Rotary embeddings rotate dims (i, i + d/2) together by an angle with its own frequency, and every frequency differs:
# no permutation of head dimensions commutes with them (swapping i and i + d/2 reverses the rotation), so Q/K keep no
# within-head group. Grouped-query attention: key/value heads permute as blocks, and query heads within their
# key/value group (one permutation shared by the groups): 2 groups in place of "heads".
ENC = [HEADS, HD, HD, FF]               # heads, Q/K, V/O, MLP
ROPE_GQA = [KV, HEADS // KV, HD, FF]    # key/value heads, query heads per key/value head, V/O, gated MLP


def _sizes(*groups):
    return sorted(groups)


FAMILIES = {
    # encoder, learned position embeddings, post-norm LayerNorm; the MLM head is tied to the word embeddings, and
    # its transform's output feeds the tied decoder, so it stays on the stream
    "bert-mlm": (lambda: tr.BertForMaskedLM(tr.BertConfig(**BASE)), _ids, _sizes(D, *ENC * L)),
    # + the pooler's hidden width (tanh, then the classifier)
    "bert-cls": (lambda: tr.BertForSequenceClassification(tr.BertConfig(**BASE)), _ids, _sizes(D, D, *ENC * L)),
    # the base model outputs the stream: fixed; the pooler's width stays free
    "bert-base": (lambda: tr.BertModel(tr.BertConfig(**BASE), add_pooling_layer=False), _ids, _sizes(*ENC * L)),
    "roberta": (lambda: tr.RobertaForMaskedLM(tr.RobertaConfig(**BASE, pad_token_id=1)), _ids, _sizes(D, *ENC * L)),
    "distilbert": (lambda: tr.DistilBertForMaskedLM(tr.DistilBertConfig(dim=D, n_layers=L, n_heads=HEADS,
                                                                        hidden_dim=FF, vocab_size=100)),
                   _ids, _sizes(D, *ENC * L)),
    # Conv1D layers (weight [in, out]), fused QKV split in three, tied lm_head, learned positions; MLP 4 * D
    "gpt2": (lambda: tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=D, n_layer=L, n_head=HEADS, vocab_size=100,
                                                       n_positions=32, bos_token_id=0, eos_token_id=0)),
             _ids, _sizes(D, *[HEADS, HD, HD, 4 * D] * L)),
    # RMSNorm, rotary, grouped-query attention, gated MLP (gate and up share the hidden group)
    "llama": (lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**BASE, num_key_value_heads=KV)), _ids,
              _sizes(D, *ROPE_GQA * L)),
    # eager attention: grouped-query attention as repeat_kv (expand + reshape) and matmul/softmax, not SDPA
    "llama-eager": (lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**BASE, num_key_value_heads=KV,
                                                               attn_implementation="eager")), _ids,
                    _sizes(D, *ROPE_GQA * L)),
    "gpt2-eager": (lambda: tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=D, n_layer=L, n_head=HEADS, vocab_size=100,
                                                             n_positions=32, bos_token_id=0, eos_token_id=0,
                                                             attn_implementation="eager")),
                   _ids, _sizes(D, *[HEADS, HD, HD, 4 * D] * L)),
    "mistral": (lambda: tr.MistralForCausalLM(tr.MistralConfig(**BASE, num_key_value_heads=KV)), _ids,
                _sizes(D, *ROPE_GQA * L)),
    # + Q/K/V biases
    "qwen2": (lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**BASE, num_key_value_heads=KV)), _ids,
              _sizes(D, *ROPE_GQA * L)),
    # + per-head Q/K RMSNorm (its weight indexes head dimensions, fixed by the rotary embedding anyway)
    "qwen3": (lambda: tr.Qwen3ForCausalLM(tr.Qwen3Config(**BASE, num_key_value_heads=KV, head_dim=HD)), _ids,
              _sizes(D, *ROPE_GQA * L)),
    # one relative-position bias (weight [buckets, heads]) computed in layer 0 and added in every layer: the heads
    # of all layers permute together (1 group); the stream is the output (fixed); RMSNorm, ReLU MLP
    "t5-encoder": (lambda: tr.T5EncoderModel(tr.T5Config(d_model=D, d_kv=HD, d_ff=FF, num_layers=L, num_heads=HEADS,
                                                          vocab_size=100)),
                   _ids, _sizes(HEADS, *[HD, HD, FF] * L)),
    # fused projections: qkv_proj split in three, gate_up_proj chunked in two (gate and up halves share a group)
    "phi3": (lambda: tr.Phi3ForCausalLM(tr.Phi3Config(**BASE, num_key_value_heads=KV, pad_token_id=0)), _ids,
             _sizes(D, *ROPE_GQA * L)),
    # one layer's weights shared by all layers: its groups once; factorised embedding (E = 16) tied to the MLM head
    "albert": (lambda: tr.AlbertForMaskedLM(tr.AlbertConfig(**BASE, embedding_size=16)), _ids,
               _sizes(16, D, *ENC)),
    # two stages (widths 16, 32; heads 2, 4; head dim 8; MLP 4x): per stage its stream and per block heads, Q/K, V,
    # MLP; window partitions, the relative-position table read through an index buffer, patch merging (pad, 2x2
    # neighbours concatenated) and the pooled classifier keep them
    "swin": (lambda: tr.SwinForImageClassification(tr.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                                                  image_size=32, patch_size=4, window_size=4,
                                                                  num_labels=3)),
             lambda: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
             _sizes(16, 2, 8, 8, 64, 32, 4, 8, 8, 128)),
    # convolutions with BatchNorm (running statistics are buffers in the state_dict): stem stream, per basic block its
    # inner width, a new stream where the width changes (projection shortcut)
    "resnet": (lambda: tr.ResNetForImageClassification(tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                      depths=[1, 1], layer_type="basic",
                                                                      num_labels=3)),
               lambda: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
               _sizes(8, 8, 16, 16)),
    # patch embedding conv -> stream, CLS token and position embeddings on the stream
    "vit": (lambda: tr.ViTForImageClassification(tr.ViTConfig(hidden_size=D, num_hidden_layers=L,
                                                               num_attention_heads=HEADS, intermediate_size=FF,
                                                               image_size=16, patch_size=4, num_labels=3)),
            lambda: torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
            _sizes(D, *ENC * L)),
}

# RMSNorm in these families computes in float32 whatever the model's dtype (``hidden_states.to(torch.float32)``),
# so a permuted copy differs by float32 rounding (about 1e-7); the check runs with that cast made a no-op as well.
_FLOAT32_NORMS = {"llama": "llama.modeling_llama.LlamaRMSNorm", "llama-eager": "llama.modeling_llama.LlamaRMSNorm",
                  "mistral": "mistral.modeling_mistral.MistralRMSNorm",
                  "qwen2": "qwen2.modeling_qwen2.Qwen2RMSNorm", "qwen3": "qwen3.modeling_qwen3.Qwen3RMSNorm",
                  "phi3": "phi3.modeling_phi3.Phi3RMSNorm"}


def _float64_rms_norm(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_plugin_is_registered_by_entry_point():
    names = [ep.name for ep in entry_points(group=registry.ENTRY_POINT_GROUP)]
    assert "transformers" in names, "install the plugin: pip install -e plugins/unf-transformers"
    assert registry.frontend(tr.BertModel(tr.BertConfig(**BASE))) is not None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_sound_and_maximal(family, monkeypatch):
    build, inputs, groups = FAMILIES[family]
    torch.manual_seed(0)
    model = build().double().eval()
    x = inputs()
    spec = _spec(model, x)
    assert sorted(spec.groups.values()) == groups, spec
    if family in _FLOAT32_NORMS:
        assert _error(model, spec, x) <= 1e-6
        module, _, cls = _FLOAT32_NORMS[family].rpartition(".")
        monkeypatch.setattr(getattr(__import__(f"transformers.models.{module}", fromlist=[cls]), cls), "forward",
                            _float64_rms_norm)
    assert _error(model, spec, x) <= 1e-10


def test_llama_axes_rotary_and_grouped_query_attention():
    """Query heads are (key/value head, head within its group); rotary fixes Q/K head dimensions; V keeps them."""
    model = FAMILIES["llama"][0]().double().eval()
    spec = _spec(model, _ids())
    q = spec["model.layers.0.self_attn.q_proj.weight"].axes[0]
    k = spec["model.layers.0.self_attn.k_proj.weight"].axes[0]
    v = spec["model.layers.0.self_attn.v_proj.weight"].axes[0]
    o = spec["model.layers.0.self_attn.o_proj.weight"].axes[1]
    kv, per_kv, qk_dim = q
    assert (spec.groups[kv], spec.groups[per_kv], qk_dim) == (KV, HEADS // KV, HD)
    assert (kv, per_kv) == ("model.layers.0.self_attn.kv_heads", "model.layers.0.self_attn.heads_per_kv")
    assert k == (kv, HD) and v[0] == kv and spec.groups[v[1]] == HD and o == (kv, per_kv, v[1])
    gate = spec["model.layers.0.mlp.gate_proj.weight"].axes[0]
    assert spec["model.layers.0.mlp.up_proj.weight"].axes[0] == gate
    assert spec["model.layers.0.mlp.down_proj.weight"].axes[1] == gate


def test_rotary_forbids_permuting_head_dimensions():
    """Fixing Q/K head dimensions is needed: swapping two of them (in Q and K alike, which would be a symmetry without
    rotary) changes the output, while the same swap of V dimensions (with O's inputs), which the spec allows, does
    not."""
    model = FAMILIES["llama"][0]().double().eval()
    x = _ids()
    spec = _spec(model, x)
    assert spec["model.layers.0.self_attn.q_proj.weight"].axes[0][-1] == HD  # a fixed factor
    y = _output(model, x)

    def swapped(names, axis):
        sd = model.state_dict()
        for name in names:
            key = f"model.layers.0.self_attn.{name}.weight"
            idx = torch.arange(sd[key].shape[axis])
            idx[[0, 1]] = idx[[1, 0]]  # head 0 (key/value head 0), dims 0 and 1
            sd[key] = sd[key].index_select(axis, idx)
        other = copy.deepcopy(model)
        other.load_state_dict(sd)
        with torch.no_grad():
            return ((_output(other, x) - y).abs().max() / y.abs().max()).item()

    assert swapped(["q_proj", "k_proj"], 0) > 1e-4
    assert swapped(["v_proj"], 0) > 1e-4  # V alone, without O's inputs: the check can see a change
    sd = model.state_dict()
    v, o = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    idx_v = torch.arange(sd[v].shape[0])
    idx_v[[0, 1]] = idx_v[[1, 0]]
    idx_o = torch.arange(sd[o].shape[1])  # query head 0 and 1 read key/value head 0: swap their dims 0, 1 too
    for h in range(HEADS // KV):
        idx_o[[h * HD, h * HD + 1]] = idx_o[[h * HD + 1, h * HD]]
    sd[v], sd[o] = sd[v][idx_v], sd[o][:, idx_o]
    other = copy.deepcopy(model)
    other.load_state_dict(sd)
    with torch.no_grad():
        assert ((_output(other, x) - y).abs().max() / y.abs().max()).item() <= 1e-6  # float32 RMSNorm rounding


def test_gpt2_ties_lm_head_to_the_embedding():
    model = FAMILIES["gpt2"][0]().double().eval()
    spec = _spec(model, _ids())
    wte = spec["transformer.wte.weight"].axes
    assert wte[0] is None and spec.groups[wte[1]] == D
    assert spec["lm_head.weight"].axes == wte
    assert spec["transformer.wpe.weight"].axes == (None, wte[1])  # learned positions: rows fixed
    qkv = spec["transformer.h.0.attn.c_attn.weight"].axes  # Conv1D: [in, out]
    assert qkv[0] == wte[1] and isinstance(qkv[1], list) and len(qkv[1]) == 3


def test_keyword_inputs_with_padding_mask():
    """A dict of inputs (input_ids and a padding attention_mask) works; the mask is weight-independent."""
    model = FAMILIES["bert-cls"][0]().double().eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    spec = _spec(model, x)
    assert sorted(spec.groups.values()) == FAMILIES["bert-cls"][2]
    assert _error(model, spec, x) <= 1e-10


def test_model_is_left_as_it_was():
    model = FAMILIES["gpt2"][0]().train()
    use_cache = model.config.use_cache
    _spec(model, _ids())
    assert model.training and model.config.use_cache == use_cache
    assert torch.compiler.is_compiling() is False
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_an_op_without_a_rule_warns_naming_its_module(monkeypatch):
    """Sound, and never silent: an ATen op without a rule keeps what it touches fixed and names the module it ran in;
    strict=True raises."""
    monkeypatch.delitem(registry._function_rules, torch.ops.aten.gelu.default)
    model = FAMILIES["bert-mlm"][0]().double().eval()
    x = _ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = unf.spec_from_module(model, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, unf.UnprovenSymmetryWarning)]
    assert any("aten.gelu.default in module 'bert.encoder.layer.0.intermediate" in m for m in messages), messages
    assert len(spec.groups) < len(FAMILIES["bert-mlm"][2]) and _error(model, spec, x) <= 1e-10
    with pytest.raises(unf.SpecInferenceError, match="gelu"):
        unf.spec_from_module(model, x, strict=True)


def test_untraceable_input_names_the_model():
    model = FAMILIES["bert-mlm"][0]().eval()
    with pytest.raises(unf.SpecInferenceError, match="BertForMaskedLM"):
        unf.spec_from_module(model, torch.randn(2, 3, 16, 16))
    assert torch.compiler.is_compiling() is False  # restored on failure too
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_fused_qkv_viewed_as_three_keeps_separate_qk_and_v_groups(monkeypatch):
    """``qkv(h).view(B, T, 3, H, d).permute(...).unbind(0)`` through the ATen front end gives the spec the core's
    torch.fx path gives (Q/K and V get separate within-head groups)."""
    from unf_transformers.frontend import trace_aten

    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.qkv = torch.nn.Linear(5, 16), torch.nn.Linear(16, 48)
            self.o, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)

        def forward(self, x):
            h = self.emb(x)
            b, t, c = h.shape
            q, k, v = self.qkv(h).view(b, t, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.head(h + self.o(a.transpose(1, 2).reshape(b, t, c).contiguous()))

    model, x = Fused().double(), torch.randn(2, 6, 5, dtype=torch.float64)
    fx_spec = _spec(model, x)
    monkeypatch.setitem(registry._frontends, Fused, trace_aten)
    spec = _spec(model, x)
    assert sorted(spec.groups.values()) == sorted(fx_spec.groups.values()) == [4, 4, 4, 16]
    assert unf.spec.symmetry_error(model, spec, x) <= 1e-10


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert-mlm", "vit", "resnet", "swin"])
def test_specs_work_downstream_alignment_and_unf_layers(family):
    """weight_matching recovers a permuted copy exactly; UNFLinear builds on the spec and is equivariant on it."""
    from unf.align import weight_matching
    from unf.nn import UNFLinear

    build, inputs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    x = inputs()
    spec = _spec(model, x.float() if x.is_floating_point() else x)  # images: the model's float32
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    permuted = spec.permute(sd, spec.sample_permutation(torch.Generator().manual_seed(1)))
    back = spec.permute(permuted, weight_matching(spec, sd, permuted))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    layer, ws = UNFLinear(spec, 1, 1), unf.WeightSpace.from_module(spec, [model])
    p = spec.sample_permutation(torch.Generator().manual_seed(2))
    a, b = layer(ws.permute(p)), layer(ws).permute(p)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_loading_the_plugin_does_not_import_transformers():
    """The front end is registered by class name: a user of unf without a Hugging Face model does not pay for
    importing transformers (seconds) on the first inference."""
    import subprocess
    import sys
    script = ("import sys, torch, unf; from unf.spec import registry; "
              "unf.spec_from_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2)); "
              "assert registry._frontends, 'plugin not loaded'; "
              "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", script], check=True)
