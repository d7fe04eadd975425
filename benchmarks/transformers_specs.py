"""Specs of Hugging Face transformers models: groups against a hand count, fully fixed tensors, warnings,
soundness, time, and whether UNFLinear runs on the spec; one row per model.

    python benchmarks/transformers_specs.py [--models llama,gpt2]

Tiny configurations (2 layers, width 32, 4 heads, 2 key/value heads where the family has them, MLP 64) with random
weights from each model class (nothing is downloaded), float64, eval mode, input ids 2x8 (images 2x3x16x16, Swin
32x32). ``sound``: the worst relative change of the model's first output (logits or last_hidden_state) over three
sampled permutations. ``hand``: the group count derived by hand (see plugins/unf-transformers/README.md and its
tests; ``-`` where the spec language cannot express the whole symmetry, named in the notes). Needs
``plugins/unf-transformers`` (``make install``).
"""
from __future__ import annotations

import argparse
import sys
import copy
from pathlib import Path

import torch
import transformers as tr

from unf.spec.registry import load_plugins

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import timed_spec, unf_linear_runs as unf_runs  # noqa: E402

H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
KV = dict(H, num_key_value_heads=2)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
           patch_size=4)

# name: (constructor, input kind, hand count, note)
MODELS = {
    "bert-mlm": (lambda: tr.BertForMaskedLM(tr.BertConfig(**H)), "ids", 9, ""),
    "bert-cls": (lambda: tr.BertForSequenceClassification(tr.BertConfig(**H)), "ids", 10, "+ pooler"),
    "bert-base": (lambda: tr.BertModel(tr.BertConfig(**H), add_pooling_layer=False), "ids", 8,
                  "stream is the output"),
    "roberta-mlm": (lambda: tr.RobertaForMaskedLM(tr.RobertaConfig(**H, pad_token_id=1)), "ids", 9, ""),
    "xlm-roberta-mlm": (lambda: tr.XLMRobertaForMaskedLM(tr.XLMRobertaConfig(**H, pad_token_id=1)), "ids", 9, ""),
    "distilbert-mlm": (lambda: tr.DistilBertForMaskedLM(tr.DistilBertConfig(dim=32, n_layers=2, n_heads=4,
                                                                           hidden_dim=64, vocab_size=100)),
                       "ids", 9, ""),
    "albert-mlm": (lambda: tr.AlbertForMaskedLM(tr.AlbertConfig(**H, embedding_size=16)), "ids", 6,
                   "shared layer"),
    "electra-cls": (lambda: tr.ElectraForSequenceClassification(tr.ElectraConfig(**H, embedding_size=16)), "ids",
                    11, "embedding 16 + head"),
    "deberta-v2-mlm": (lambda: tr.DebertaV2ForMaskedLM(tr.DebertaV2Config(**H)), "ids", 9, ""),
    "mpnet-mlm": (lambda: tr.MPNetForMaskedLM(tr.MPNetConfig(**H)), "ids", 8, "relative bias: heads shared"),
    "gpt2-lm": (lambda: tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                          n_positions=32, bos_token_id=0, eos_token_id=0)),
                "ids", 9, ""),
    "opt-lm": (lambda: tr.OPTForCausalLM(tr.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       ffn_dim=64, vocab_size=100, word_embed_proj_dim=32)),
               "ids", 9, ""),
    "llama-lm": (lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**KV)), "ids", 9, "float32 RMSNorm"),
    "mistral-lm": (lambda: tr.MistralForCausalLM(tr.MistralConfig(**KV)), "ids", 9, "float32 RMSNorm"),
    "qwen2-lm": (lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**KV)), "ids", 9, "float32 RMSNorm"),
    "qwen3-lm": (lambda: tr.Qwen3ForCausalLM(tr.Qwen3Config(**KV, head_dim=8)), "ids", 9, "float32 RMSNorm"),
    "phi3-lm": (lambda: tr.Phi3ForCausalLM(tr.Phi3Config(**KV, pad_token_id=0)), "ids", 9, "float32 RMSNorm"),
    "gemma-lm": (lambda: tr.GemmaForCausalLM(tr.GemmaConfig(**KV, head_dim=8)), "ids", 9, "float32 RMSNorm"),
    "gemma2-lm": (lambda: tr.Gemma2ForCausalLM(tr.Gemma2Config(**KV, head_dim=8)), "ids", 9, "float32 RMSNorm"),
    "olmo-lm": (lambda: tr.OlmoForCausalLM(tr.OlmoConfig(**KV, pad_token_id=0)), "ids", 9, "float32 LayerNorm"),
    "starcoder2-lm": (lambda: tr.Starcoder2ForCausalLM(tr.Starcoder2Config(**KV)), "ids", 9, ""),
    "gpt-neox-lm": (lambda: tr.GPTNeoXForCausalLM(tr.GPTNeoXConfig(**H, rotary_pct=0.5)), "ids", None,
                    "partial rotary"),
    "phi-lm": (lambda: tr.PhiForCausalLM(tr.PhiConfig(**H, partial_rotary_factor=0.5)), "ids", None,
               "partial rotary"),
    "gptj-lm": (lambda: tr.GPTJForCausalLM(tr.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                          rotary_dim=4, n_positions=64)), "ids", None,
                "partial rotary"),
    "falcon-lm": (lambda: tr.FalconForCausalLM(tr.FalconConfig(hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, vocab_size=100,
                                                                new_decoder_architecture=True, num_kv_heads=2)),
                  "ids", None, "QKV fused per KV group"),
    "bloom-lm": (lambda: tr.BloomForCausalLM(tr.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100)),
                 "ids", 7, "ALiBi fixes heads"),
    "t5-encoder": (lambda: tr.T5EncoderModel(tr.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                          vocab_size=100)), "ids", 7, "heads shared"),
    "t5-seq2seq": (lambda: tr.T5ForConditionalGeneration(tr.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                                      num_heads=4, vocab_size=100)),
                   "seq2seq", 20, "encoder output fixes stream"),
    "bart-seq2seq": (lambda: tr.BartForConditionalGeneration(tr.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100)), "seq2seq", 22, "encoder output fixes stream"),
    "clip-text-proj": (lambda: tr.CLIPTextModelWithProjection(tr.CLIPTextConfig(**H, projection_dim=16)), "ids", 8,
                       "stream is an output"),
    "vit-cls": (lambda: tr.ViTForImageClassification(tr.ViTConfig(**VIT, num_labels=3)), "image", 9, ""),
    "deit-cls": (lambda: tr.DeiTForImageClassification(tr.DeiTConfig(**VIT, num_labels=3)), "image", 9, ""),
    "dinov2": (lambda: tr.Dinov2Model(tr.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      mlp_ratio=2, image_size=16, patch_size=4)), "image", 8,
               "stream is the output"),
    "swin-cls": (lambda: tr.SwinForImageClassification(tr.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                                                      image_size=32, patch_size=4, window_size=4,
                                                                      num_labels=3)), "image32", 10, "2 stages"),
    "resnet-cls": (lambda: tr.ResNetForImageClassification(tr.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)), "image32", 4,
        "BatchNorm"),
    "convnext-cls": (lambda: tr.ConvNextForImageClassification(tr.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)), "image32", 4, "2 stages"),
}


def _inputs(kind):
    g = torch.Generator().manual_seed(0)
    if kind.startswith("image"):
        n = 32 if kind == "image32" else 16
        return torch.randn(2, 3, n, n, generator=g, dtype=torch.float64)
    ids = torch.randint(2, 100, (2, 8), generator=g)
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, 100, (2, 5), generator=g)}
    return ids


@torch.no_grad()
def soundness(model, spec, x, n=3) -> float:
    def out(m):
        return (m(**x) if isinstance(x, dict) else m(x))[0]

    y, worst = out(model), 0.0
    for s in range(n):
        other = copy.deepcopy(model)
        other.load_state_dict(spec.permute(model.state_dict(), spec.sample_permutation(
            torch.Generator().manual_seed(s))))
        worst = max(worst, ((out(other) - y).abs().max() / y.abs().max()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    plugins = load_plugins()
    print(f"torch {torch.__version__}, transformers {tr.__version__}, plugins {plugins or 'none'}, float64, eval")
    print("| model | hand | groups | fully fixed tensors | warnings | sound | spec time s | UNFLinear | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        build, kind, hand, note = MODELS[name]
        torch.manual_seed(0)
        model = build().double().eval()
        x = _inputs(kind)
        spec, elapsed, n_warn, fixed = timed_spec(model, x)
        print(f"| {name} | {hand if hand is not None else '-'} | {len(spec.groups)} | {fixed} of {len(spec)} | "
              f"{n_warn} | {soundness(model, spec, x):.1e} | {elapsed:.2f} | {unf_runs(model, spec)} | {note} |",
              flush=True)


if __name__ == "__main__":
    main()
