"""One pipeline for every method: the weights-only conversion is the general per-layer recipe fed identity
statistics, and a full latent beside a narrow rotary key is exact (the key up-projection, its absorption into the
query and the dropped key bias are all exercised)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tiny import byte_tokenizer, tiny_model
from transmla.convert import ConvertOptions, convert
from transmla.convert.attention import read_attention
from transmla.convert.geometry import Geometry
from transmla.convert.recipe import LayerSettings, convert_layer
from transmla.convert.statistics import LayerStats
from transmla.io.source import open_source

SEQ = 48


def save(kind: str, folder, rope_theta: float | None = None) -> torch.nn.Module:
    model = tiny_model(kind)
    if rope_theta is not None:
        model.config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "qwen3"])
@pytest.mark.parametrize("rank, rope_dim", [(12, 8), (20, 4)])
def test_weights_only_is_the_general_recipe_with_identity_statistics(tmp_path, kind, rank, rope_dim):
    save(kind, tmp_path / "src")
    out = convert(str(tmp_path / "src"), tmp_path / "mla",
                  ConvertOptions(method="svd", kv_lora_rank=rank, rope_dim=rope_dim, dtype="float32"), progress=False)
    written = load_file(out / "model.safetensors")
    source = open_source(str(tmp_path / "src"))
    geo = Geometry.of(source.config)
    settings = LayerSettings(method="svd", rope_select="rotate", freqfold=1, shrink=False, score_weight=1.0,
                             rope_context=16, per_frequency=False)
    for layer in range(geo.layers):
        src, _ = read_attention(source.tensors, layer, geo, source.family)
        inv_freq, scaling = source.family.rotary(source.config)[layer]
        stats = LayerStats.identity(geo.input_width, geo.heads, geo.head_dim)
        tensors, _ = convert_layer(src, stats, inv_freq, scaling, rank, rope_dim, settings)
        for name, tensor in tensors.items():
            assert torch.equal(written[f"model.layers.{layer}.self_attn.{name}"], tensor.float()), name


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_full_latent_beside_a_narrow_rotary_key_is_exact(tmp_path, kind, method):
    """With RoPE theta so large that only the fastest frequency turns (the others have inverse frequency 0 in
    float32), a rotary key of that frequency's 2G dims loses nothing; the other key dims go through the latent."""
    source = save(kind, tmp_path / "src", rope_theta=1e120)
    cfg = source.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope_dim = 2 * cfg.num_key_value_heads
    rank = min(cfg.hidden_size, 2 * cfg.num_key_value_heads * head_dim - rope_dim)
    assert rope_dim < cfg.num_key_value_heads * head_dim
    # whiten calibrates on text sampled from the source itself: the default, no data given
    options = ConvertOptions(kv_lora_rank=rank, rope_dim=rope_dim, dtype="float32", method=method,
                             calib_samples=4, calib_seq_len=SEQ)
    out = convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        expected = source(ids, attention_mask=mask).logits
        for form in ("expanded", "absorbed"):
            model.set_attention_form(form)
            got = model(ids, attention_mask=mask).logits
            assert (got - expected)[mask.bool()].abs().max().item() <= 1e-5, form
        # the key up-projection carries the position-free keys: without it the logits move 100x the tolerance (5.7e-3
        # measured for qwen2, the least)
        for layer in model.model.layers:
            layer.self_attn.kv_b_proj.weight.view(cfg.num_key_value_heads, 2, head_dim, -1)[:, 0] = 0
        assert (model(ids, attention_mask=mask).logits - expected)[mask.bool()].abs().max().item() > 1e-3
