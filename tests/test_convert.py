"""Conversion of every family's tiny random models: exact at full rank, loadable, cache really shrinks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import interrupt_second_layer, save_source
from transmla.convert import ConvertOptions, convert
from transmla.errors import TransMLAError

KINDS = ["llama-mha", "llama-gqa", "llama3", "qwen2", "qwen3", "qwen3-bias", "mistral", "phi3", "gemma2", "gemma3",
         "olmo2"]
SEQ = 72


def full_rank_options(model, **kwargs) -> ConvertOptions:
    """RoPE key of all key heads (G*d) and a full latent: the conversion must be exact."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope_dim = cfg.num_key_value_heads * head_dim
    rank = min(cfg.hidden_size, 2 * cfg.num_key_value_heads * head_dim - rope_dim)
    return ConvertOptions(method="svd", kv_lora_rank=rank, rope_dim=rope_dim, dtype="float32", **kwargs)


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.randint(3, 256, (3, SEQ))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :30] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module", params=KINDS)
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    source = save_source(request.param, root / "src")
    out = convert(str(root / "src"), root / "mla", full_rank_options(source), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    return source, model, out


def test_full_rank_logits_match_with_left_padding(converted):
    source, model, _ = converted
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = source(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (expected - got)[valid].abs().max().item() <= 1e-5  # 2.4e-7 (phi3) to 1.0e-6 (gemma3, olmo2) measured


def test_absorbed_and_expanded_forms_agree_during_decoding(converted):
    _, model, _ = converted
    ids, mask = padded_batch(2)
    results = {}
    for form in ("expanded", "absorbed"):
        model.set_attention_form(form)
        with torch.no_grad():
            out = model(ids[:, :-4], attention_mask=mask[:, :-4], use_cache=True)
            cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
            steps = [out.logits[:, -1]]
            for t in range(SEQ - 4, SEQ):
                step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
                steps.append(step.logits[:, -1])
        results[form] = torch.stack(steps, 1)
    model.set_attention_form("auto")
    assert (results["expanded"] - results["absorbed"]).abs().max().item() <= 1e-5


def test_greedy_generation_matches_original_and_cache_holds_only_latent(converted):
    source, model, _ = converted
    ids, mask = padded_batch(3)
    ids, mask = ids[:, :40], mask[:, :40]
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = source.generate(ids, **kwargs)
        got = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(expected, got.sequences)
    cache = got.cache if getattr(got, "cache", None) is not None else got.past_key_values
    cfg = model.config
    total = got.sequences.shape[1] - 1  # the last token is generated but never fed back
    for layer, rank in zip(cache.layers, cfg.kv_lora_rank):
        assert tuple(layer.keys.shape) == (3, 1, total, rank)
        assert tuple(layer.values.shape) == (3, 1, total, cfg.qk_rope_head_dim)


def stepwise_logits(model, ids: torch.Tensor, prefill: int = 1) -> torch.Tensor:
    """Logits of every position from `prefill` - 1 on: the first `prefill` tokens at once, then one token at a time
    through the model's latent cache."""
    cache, steps = None, []
    with torch.no_grad():
        for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]:
            result = model(ids[:, start:end], past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            steps.append(result.logits[:, -1])
    return torch.stack(steps, 1)


def test_cached_token_by_token_decoding_equals_the_full_forward(converted):
    """Past every sliding window (the tiny windows are 20-24 tokens), in the absorbed form (at most 3e-6 measured)."""
    _, model, _ = converted
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits[:, 11:]
    assert (stepwise_logits(model, ids, prefill=12) - full).abs().max().item() <= 1e-5


def test_output_folder_is_a_complete_checkpoint(converted):
    _, _, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "transmla"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_transmla.TransMLAForCausalLM"
    for name in ("modeling_transmla.py", "configuration_transmla.py", "cache_transmla.py", "mla_decode.py", "generation_config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tokenizer("abc")["input_ids"] == [97, 98, 99]
    assert not list(out.parent.glob(".mla.tmp-*"))


def test_reduced_cache_conversion_runs_and_is_smaller(tmp_path):
    source = save_source("llama-gqa", tmp_path / "src")
    out = convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(method="svd", kv_lora_rank=12, rope_dim=8, dtype="float32"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    assert model.config.kv_values_per_token() == [20, 20]
    with torch.no_grad():  # what generation really caches per layer: the latent (12) and the shared rotary key (8)
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    cfg = source.config
    source_values = 2 * cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads  # 64
    for layer in cache.layers:
        assert layer.keys.shape[1:] == (1, ids.shape[1], 12) and layer.values.shape[1:] == (1, ids.shape[1], 8)
        assert layer.keys.shape[-1] + layer.values.shape[-1] < source_values


def test_cached_token_by_token_decoding_equals_the_full_forward_with_a_narrow_rotary_key(tmp_path):
    """A lossy conversion (D = 8 < G*d = 32, so the key up-projection carries most of every key): decoding one
    token at a time from the latent cache, in the absorbed form, gives the full forward's logits; without the key
    up-projection it would not."""
    save_source("llama-gqa", tmp_path / "src")
    out = convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(kv_lora_rank=12, rope_dim=8, dtype="float32",
                                                                          calib_samples=4, calib_seq_len=48), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    forms = []
    for layer in model.model.layers:
        original = layer.self_attn._absorbed
        layer.self_attn._absorbed = lambda *a, _f=original: forms.append(1) or _f(*a)
    with torch.no_grad():
        full = model(ids).logits
        assert (stepwise_logits(model, ids) - full).abs().max().item() <= 1e-5  # about 1e-6 measured
        assert len(forms) == (ids.shape[1] - 1) * len(model.model.layers)  # every step after the first: absorbed
        for layer in model.model.layers:
            layer.self_attn.kv_b_proj.weight.view(2, 2, 16, -1)[:, 0] = 0
        assert (stepwise_logits(model, ids) - full).abs().max().item() > 1e-3  # 100x the tolerance (7.8e-3 measured)


def test_sharded_output_loads(tmp_path):
    source = save_source("qwen2", tmp_path / "src")
    options = full_rank_options(source, max_shard_bytes=60_000)
    out = convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (source(ids, attention_mask=mask).logits - model(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max().item() <= 1e-5


def test_sharded_source_is_read_lazily(tmp_path):
    source = save_source("llama-gqa", tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    out = convert(str(tmp_path / "src"), tmp_path / "mla", full_rank_options(source), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (source(ids, attention_mask=mask).logits - model(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max().item() <= 1e-5


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    source = save_source("llama-gqa", tmp_path / "src")
    interrupt_second_layer(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tmp_path / "src"), tmp_path / "mla", full_rank_options(source), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    "rank, rope_dim, message",
    [(10_000, 8, "--kv-lora-rank 10000 is out of range"), (12, 7, "--rope-dim 7 must be even"), (12, 66, "--rope-dim 66")],
)
def test_impossible_sizes_are_refused(tmp_path, rank, rope_dim, message):
    save_source("llama-gqa", tmp_path / "src")
    with pytest.raises(TransMLAError, match=message):
        convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(method="svd", kv_lora_rank=rank, rope_dim=rope_dim), progress=False)
    assert not (tmp_path / "mla").exists()


def test_unknown_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TransMLAError, match="architecture 'gpt2' is not supported.*llama"):
        convert(str(tmp_path / "gpt2"), tmp_path / "mla", ConvertOptions(method="svd"), progress=False)


def test_config_that_lies_about_shapes_is_refused(tmp_path):
    save_source("llama-gqa", tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    config["num_key_value_heads"] = 4
    path.write_text(json.dumps(config))
    with pytest.raises(TransMLAError, match="does not match the weights"):
        convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(method="svd", kv_lora_rank=8, rope_dim=8), progress=False)
    assert not (tmp_path / "mla").exists()
