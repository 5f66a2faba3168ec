"""Tiny random source models and an offline byte tokenizer, built in code for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, listed in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte, id == byte value; built offline."""
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, bos_token="\x01", eos_token="\x02", pad_token="\x00"
    )


COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


# Families whose every norm weight is drawn at random (the older kinds keep transformers' initial norms).
RANDOM_NORMS = ("phi3", "gemma2", "gemma3", "olmo2")
# Kinds whose scores are soft-capped, which SDPA can not do.
SOFTCAPPED = ("gemma2",)


def tiny_config(kind: str):
    """Configs of the supported families: llama-mha, llama-gqa, llama3 (RoPE scaling), qwen2, mistral, qwen3
    (per-head q/k norms, head_dim 12 != hidden / heads), qwen3-bias (the same with attention biases, MHA),
    phi3 (fused projections, a sliding window on every layer), gemma2 (soft-capping, a sliding layer then a global
    one, query_pre_attn_scalar != head_dim), gemma3 (per-head (1 + w) q/k norms, local and linearly scaled global
    RoPE) and olmo2 (q/k norms over all heads, norms after attention and MLP)."""
    if kind == "llama-mha":
        return LlamaConfig(**COMMON, num_key_value_heads=4)
    if kind == "llama-gqa":
        return LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=500.0)
    if kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
        return LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=rope)
    if kind == "qwen2":
        return Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "mistral":
        return MistralConfig(**COMMON, num_key_value_heads=1, sliding_window=None)
    if kind == "qwen3":
        return Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)
    if kind == "qwen3-bias":
        return Qwen3Config(**COMMON, num_key_value_heads=4, head_dim=8, attention_bias=True, rope_theta=500.0)
    if kind == "phi3":
        return Phi3Config(**COMMON, num_key_value_heads=2, sliding_window=24, original_max_position_embeddings=512)
    if kind == "gemma2":
        return Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=20,
                            attn_logit_softcapping=0.2, final_logit_softcapping=2.0)
    if kind == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
        return Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=16, sliding_window=20,
                                layer_types=["sliding_attention", "full_attention"], rope_parameters=rope)
    if kind == "olmo2":
        return Olmo2Config(**COMMON, num_key_value_heads=2)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    """A random model; attention biases (Qwen2) are made nonzero and q/k norm weights (and the newer families' other
    norm weights) non-trivial so that their handling is tested."""
    torch.manual_seed(seed)
    # transformers 5.0 runs Gemma 2 through SDPA by default, which has no soft-capping; eager attention computes it
    attention = "eager" if kind in SOFTCAPPED else None
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation=attention).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.2, 3.0)
            elif kind in RANDOM_NORMS and name.endswith("norm.weight"):
                param.uniform_(-0.4, 0.6) if kind.startswith("gemma") else param.uniform_(0.6, 1.6)
    return model


def save_source(kind: str, folder: Path, seed: int = 0, **save_kwargs):
    """Save a tiny model with its tokenizer as a Hugging Face folder; returns the model."""
    model = tiny_model(kind, seed)
    model.save_pretrained(folder, **save_kwargs)
    byte_tokenizer().save_pretrained(folder)
    return model


def interrupt_second_layer(monkeypatch) -> None:
    """Make the weights-only conversion raise KeyboardInterrupt on its second layer (as Ctrl-C would)."""
    import transmla.convert.stream as convert_module

    real = convert_module.convert_layer
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_layer", interrupted)
