"""Text windows, perplexity and KV-cache geometry on a tiny random Llama with an in-code byte tokenizer."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from transmla.data.text import calibration_windows, load_text, token_windows
from transmla.errors import TransMLAError
from transmla.evaluate import evaluate_models, format_table, perplexity, table_text
from transmla.kv_cache import describe, kv_bytes_per_token, kv_values_per_token

VOCAB = 256
TEXT = (
    "The quick brown fox jumps over the lazy dog. Multi-head latent attention caches a small latent per token.\n\n"
    * 12
)


def _byte_alphabet() -> list[str]:
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


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte, id == byte value; built offline."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def test_windows_tile_the_token_stream(tokenizer):
    stream = list(TEXT.encode("utf-8"))
    windows = token_windows(tokenizer, TEXT, seq_len=32)
    assert windows.dtype == torch.long
    assert windows.shape == (len(stream) // 32, 32)
    assert windows.flatten().tolist() == stream[: windows.numel()]
    assert token_windows(tokenizer, TEXT, seq_len=32, max_windows=3).tolist() == windows[:3].tolist()
    with pytest.raises(TransMLAError):
        token_windows(tokenizer, "short", seq_len=32)


def test_calibration_windows_are_seeded_windows_of_the_stream(tokenizer):
    stream = bytes(TEXT.encode("utf-8"))
    a = calibration_windows(tokenizer, TEXT, seq_len=16, num_samples=5, seed=1)
    assert a.shape == (5, 16)
    assert torch.equal(a, calibration_windows(tokenizer, TEXT, seq_len=16, num_samples=5, seed=1))
    assert all(bytes(w.tolist()) in stream for w in a)
    many = calibration_windows(tokenizer, TEXT[:100], seq_len=16, num_samples=20)  # more than the text holds
    assert many.shape == (20, 16) and all(bytes(w.tolist()) in stream for w in many)


def test_perplexity_matches_the_models_own_loss(model, tokenizer):
    windows = token_windows(tokenizer, TEXT, seq_len=24, max_windows=5)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.double().item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    one = perplexity(model, windows, batch_size=1, progress=False)
    three = perplexity(model, windows, batch_size=3, progress=False)
    assert (one.windows, one.tokens) == (5, 5 * 23)
    assert one.perplexity == pytest.approx(expected, rel=1e-5)
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert one.nll == pytest.approx(math.log(one.perplexity))


class _Uniform(torch.nn.Module):
    """Predicts all-zero logits: every token has probability 1 / VOCAB."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_uniform_model_has_perplexity_vocab_size(tokenizer):
    windows = token_windows(tokenizer, TEXT, seq_len=16, max_windows=4)
    assert perplexity(_Uniform(), windows, batch_size=2, progress=False).perplexity == pytest.approx(VOCAB, rel=1e-6)


def test_evaluate_models_rows(model, tokenizer):
    rows = evaluate_models({"base": (model, tokenizer), "again": (model, tokenizer)}, TEXT, 32, 2, 2, None, False)
    assert [r["name"] for r in rows] == ["base", "again"]
    assert rows[0]["kv_values_per_token"] == 2 * (2 * 2 * 16)
    assert rows[0]["kv_bytes_per_token"] == rows[0]["kv_values_per_token"] * 4
    assert rows[1]["perplexity_ratio"] == pytest.approx(1.0) and rows[1]["kv_compression"] == 1.0
    json.dumps(rows)
    assert format_table(rows).row_count == 2
    assert "again" in table_text(rows)


def test_geometry_of_a_gqa_llama_config():
    config = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    assert kv_values_per_token(config) == [2 * 2 * 32] * 3
    assert kv_bytes_per_token(config, 2) == 3 * 128 * 2
    layer = describe(config)[0]
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.kv_lora_rank) == (8, 2, 32, None)


def test_geometry_of_a_transmla_config_dict():
    config = {
        "model_type": "transmla",
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_hidden_layers": 3,
        "qk_rope_head_dim": 16,
        "kv_lora_rank": [48, 64, 96],
    }
    assert kv_values_per_token(config) == [64, 80, 112]
    assert kv_bytes_per_token(config, 2) == (64 + 80 + 112) * 2
    assert [(g.kv_lora_rank, g.qk_rope_head_dim) for g in describe(config)] == [(48, 16), (64, 16), (96, 16)]
    with pytest.raises(TransMLAError):
        kv_values_per_token({**config, "kv_lora_rank": [48, 64]})


def test_load_text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("héllo\n\nworld", encoding="utf-8")
    assert load_text(text_file=path) == "héllo\n\nworld"
    with pytest.raises(TransMLAError, match="exactly one"):
        load_text()
    with pytest.raises(TransMLAError, match="exactly one"):
        load_text(text_file=path, dataset="wikitext2")
    with pytest.raises(TransMLAError, match="missing.txt"):
        load_text(text_file=tmp_path / "missing.txt")
    with pytest.raises(TransMLAError, match="wikitext2"):
        load_text(dataset="penn-treebank")


def test_load_text_from_any_hub_dataset_with_a_text_column(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo, config=None, split=None, streaming=False):
        calls.append((repo, config, split))
        rows = {"owner/chat": [{"text": "hello"}, {"text": "there"}], "owner/pairs": [{"prompt": "a", "answer": "b"}]}
        return iter(rows[repo])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("transmla.data.text.hub_reachable", lambda endpoint: True)  # no network in tests
    assert load_text(dataset="owner/chat", split="validation") == "hello\n\nthere"
    assert load_text(dataset="owner/chat:default:train") == "hello\n\nthere"
    assert calls == [("owner/chat", None, "validation"), ("owner/chat", "default", "train")]
    with pytest.raises(TransMLAError, match="no 'text' column .*prompt, answer"):
        load_text(dataset="owner/pairs")
