"""Qwen3 (per-head RMSNorm on q and k before RoPE): converted on its pre-features. Full-rank exactness, decoding and
the cache are tested with the other families in test_convert.py; here, what is particular to the pre-features."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tiny import save_source
from transmla.convert import ConvertOptions, convert
from transmla.errors import TransMLAError
from transmla.export_deepseek import ExportOptions, export_deepseek

KINDS = ["qwen3", "qwen3-bias"]
SEQ = 72


def full_size(model) -> int:
    """G*d: the rotary key of every key head, and then the whole latent (2*G*d - D)."""
    return model.config.num_key_value_heads * model.config.head_dim


def full_rank_options(model, **kwargs) -> ConvertOptions:
    return ConvertOptions(method="svd", kv_lora_rank=full_size(model), rope_dim=full_size(model), dtype="float32", **kwargs)


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (3, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :30] = 0
    ids[mask == 0] = 0
    return ids, mask


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def max_logit_gap(source, model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    with torch.no_grad():
        diff = source(ids, attention_mask=mask).logits - model(ids, attention_mask=mask).logits
    return diff[mask.bool()].abs().max().item()


@pytest.fixture(scope="module", params=KINDS)
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    source = save_source(request.param, root / "src")
    out = convert(str(root / "src"), root / "mla", full_rank_options(source), progress=False)
    return source, load(out), out


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    """Words over every printable ASCII character: at layer 0 the inputs then span more dims than the G*d of v
    (a text of 40 distinct bytes would leave some value directions unseen by the calibration)."""
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(400)]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")
    return path


def calibrated(calib_file: Path, **kwargs) -> ConvertOptions:
    return ConvertOptions(dtype="float32", calib_sources=(f"file:{calib_file}",), calib_samples=6, calib_seq_len=48, **kwargs)


def test_checkpoint_holds_pre_features_and_narrow_projections(converted):
    source, _, out = converted
    cfg = source.config
    heads, groups, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope, rank = full_size(source), full_size(source)
    config = json.loads((out / "config.json").read_text())
    assert config["qk_norm"] is True and config["pre_proj_bias"] is cfg.attention_bias
    assert config["attention_bias"] is False and config["head_dim"] == d
    prefix = "model.layers.0.self_attn."
    with safe_open(out / "model.safetensors", "pt") as f:
        shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
    expected = {
        "pre_q_proj.weight": (heads * d, cfg.hidden_size), "pre_k_proj.weight": (groups * d, cfg.hidden_size),
        "pre_v_proj.weight": (groups * d, cfg.hidden_size), "q_norm.weight": (d,), "k_norm.weight": (d,),
        "q_proj.weight": (heads * (d + rope), heads * d), "kv_a_proj.weight": (rank + rope, 2 * groups * d),
        "kv_b_proj.weight": (groups * 2 * d, rank), "o_proj.weight": (cfg.hidden_size, heads * d),
    }
    if cfg.attention_bias:
        expected |= {"pre_q_proj.bias": (heads * d,), "pre_k_proj.bias": (groups * d,), "pre_v_proj.bias": (groups * d,),
                     "o_proj.bias": (cfg.hidden_size,)}
    assert shapes == expected


def test_lossy_conversion_loads_and_runs(tmp_path):
    save_source("qwen3", tmp_path / "src")
    model = load(convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(method="svd", kv_lora_rank=16, rope_dim=8, dtype="float32"), progress=False))
    assert model.config.kv_values_per_token() == [24, 24]  # of 48
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()
    assert model.generate(ids[:, :10], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (3, 14)


@pytest.mark.parametrize("kind", KINDS)
def test_calibrated_whiten_at_full_rank_is_exact(tmp_path, calib_file, kind):
    source = save_source(kind, tmp_path / "src")
    full = full_size(source)
    options = calibrated(calib_file, method="whiten", kv_lora_rank=full, rope_dim=full)
    model = load(convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False))
    assert max_logit_gap(source, model, *padded_batch()) <= 1e-5


@pytest.mark.parametrize("settings", [
    dict(method="whiten", kv_lora_rank=16, rope_dim=8),
    dict(method="pca", kv_budget=0.5, rank_allocation="energy", freqfold="auto"),
])
def test_lossy_calibrated_conversion_is_finite(tmp_path, calib_file, settings):
    save_source("qwen3", tmp_path / "src")
    model = load(convert(str(tmp_path / "src"), tmp_path / "mla", calibrated(calib_file, **settings), progress=False))
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


def test_deepseek_export_is_refused(tmp_path):
    save_source("qwen3", tmp_path / "src")
    options = ConvertOptions(method="svd", kv_lora_rank=16, rope_dim=8, rope_per_frequency=True, dtype="float32")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False)
    with pytest.raises(TransMLAError, match="no per-head key norm"):
        export_deepseek(ours, tmp_path / "ds", ExportOptions(), progress=False)
    assert not (tmp_path / "ds").exists()


def test_unknown_architecture_names_qwen3(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TransMLAError, match="architecture 'gpt2' is not supported.*qwen3"):
        convert(str(tmp_path / "gpt2"), tmp_path / "mla", ConvertOptions(method="svd"), progress=False)
