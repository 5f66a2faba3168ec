"""What is particular to each family beyond the full-rank tests of test_convert.py: a calibrated lossy conversion
(text sampled from the model itself) and a short heal of each newer family, the adapters' refusals, and the
checkpoint names of fused projections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tiny import save_source, tiny_config
from transmla.convert import ConvertOptions, convert
from transmla.errors import TransMLAError
from transmla.families import FAMILIES, family_of
from transmla.export_deepseek import ExportOptions, export_deepseek
from transmla.heal import HealOptions, heal
from transmla.heal.loss import distillation_loss

NEWER = ["phi3", "gemma2", "gemma3", "olmo2"]
SEQ = 48


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind, sizes", [("phi3", {"kv_lora_rank": 24, "rope_dim": 8}), ("gemma2", {}), ("olmo2", {"kv_lora_rank": 24, "rope_dim": 8}),
                                         ("gemma3", {"kv_lora_rank": 16, "rope_dim": 8})])
@pytest.mark.usefixtures("fresh_accelerate")
def test_calibrated_conversion_then_heal(tmp_path, text_file, kind, sizes):
    """A calibrated conversion on text the model samples itself to half the cache (the default, its split
    measured, or given sizes), then a few healing steps that bring it closer to its source."""
    source = save_source(kind, tmp_path / "src")
    options = ConvertOptions(dtype="float32", calib_samples=4, calib_seq_len=SEQ, **sizes)
    model = load(convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False))
    cfg = source.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert model.config.kv_values_per_token() == [cfg.num_key_value_heads * head_dim] * cfg.num_hidden_layers
    ids = torch.randint(3, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kl = torch.nn.functional.kl_div(model(ids).logits.log_softmax(-1), source(ids).logits.log_softmax(-1),
                                        log_target=True, reduction="batchmean").item()
    # Lossy, and calibrated on the few tokens a tiny random model samples, so only roughly its source on uniformly
    # random tokens (0.28 / 0.84 / 1.08 / 0.99 measured for phi3 / gemma2 / gemma3 / olmo2; a wrong norm, scale or
    # window gives several nats)
    assert 0 < kl < 1.6
    assert ("kv_budget_split" in model.config.conversion) == (not sizes)

    heal_options = HealOptions(tokens=4 * 32 * 2, data=(f"file:{text_file}",), seq_len=32, batch_size=2, lr=3e-3,
                               warmup=0.0, checkpoint_every=0, max_val_windows=2)
    result = heal(tmp_path / "mla", tmp_path / "healed", heal_options, progress=False)
    assert result.steps == 4 and math.isfinite(result.after_perplexity)
    healed = load(tmp_path / "healed")
    text = torch.tensor(list(text_file.read_bytes()[:4 * 32])).view(4, 32)  # the windows it trained on
    with torch.no_grad():
        target = source(text).logits
        assert distillation_loss(healed(text).logits, target, text)[0] < distillation_loss(model(text).logits, target, text)[0]
    assert healed.generate(ids[:, :10], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0).shape == (2, 14)


def test_fused_projections_are_split_in_the_checkpoint(tmp_path):
    source = save_source("phi3", tmp_path / "src")
    out = convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(method="svd", kv_lora_rank=8, rope_dim=8,
                                                                          dtype="float32"), progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = {k.removeprefix("model.layers.0.") for k in f.keys() if k.startswith("model.layers.0.mlp.")}
        gate = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
    assert names == {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    fused = source.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate, fused[: fused.shape[0] // 2])
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention"] * 2 and config["sliding_window"] == 24


def test_every_family_has_a_tiny_model_and_an_adapter():
    kinds = ["llama-gqa", "qwen2", "qwen3", "mistral", *NEWER]
    assert {tiny_config(kind).model_type for kind in kinds} == set(FAMILIES)
    for kind in kinds:
        config = tiny_config(kind)
        assert family_of(config).model_type == config.model_type


@pytest.mark.parametrize("kind, change, message", [
    ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ("gemma3", {"use_bidirectional_attention": True}, "attends both ways"),
    ("llama-gqa", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE type 'dynamic'"),
])
def test_variants_that_can_not_be_expressed_are_refused(tmp_path, kind, change, message):
    save_source(kind, tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    config = json.loads(path.read_text())
    if "partial_rotary_factor" in change:
        config.setdefault("rope_parameters", {})["partial_rotary_factor"] = change["partial_rotary_factor"]
    else:
        config.update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(TransMLAError, match=message):
        convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(method="svd", kv_lora_rank=8, rope_dim=8),
                progress=False)
    assert not (tmp_path / "mla").exists()


@pytest.mark.parametrize("kind, named", [
    ("phi3", ["sliding-window layers (sliding_window 24)"]),
    ("gemma2", ["attention-score soft-capping", "logit soft-capping", "sliding-window layers", "RMSNorms scaled by 1 + w",
                "norm_placement 'pre_and_post'", "scaled token embeddings"]),
    ("gemma3", ["qk_norm", "sliding-window layers", "RMSNorms scaled by 1 + w", "scaled token embeddings"]),
    ("olmo2", ["qk_norm", "norm_placement 'post'"]),
])
def test_deepseek_export_refuses_what_it_can_not_express_in_one_line(tmp_path, kind, named):
    save_source(kind, tmp_path / "src")
    options = ConvertOptions(method="svd", kv_lora_rank=8, rope_dim=8, rope_per_frequency=True, dtype="float32")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False)
    with pytest.raises(TransMLAError) as refused:
        export_deepseek(ours, tmp_path / "ds", ExportOptions(), progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("stock DeepSeek-V3 can not express this model")
    assert all(item in message for item in named), message
    assert not (tmp_path / "ds").exists()


def test_deepseek_export_folds_a_softmax_scale_of_its_own_into_the_queries(tmp_path):
    save_source("llama-gqa", tmp_path / "src")
    options = ConvertOptions(method="svd", rope_dim=16, rope_per_frequency=True, dtype="float32")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False)
    path = ours / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "attention_scale": 0.7}))
    export_deepseek(ours, tmp_path / "ds", ExportOptions(), progress=False)
    ids = torch.randint(3, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    a, b = load(ours), AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(ours, trust_remote_code=True, dtype=torch.float32,
                                                     attention_scale=None)(ids).logits
        ours_logits, exported = a(ids).logits, b(ids).logits
    assert (ours_logits - plain).abs().max() > 1e-2  # the scale matters
    assert (ours_logits - exported).abs().max() <= 1e-5 * max(ours_logits.abs().max().item(), 1.0)


def test_convert_to_deepseek_refuses_such_a_source_before_converting(tmp_path):
    from transmla.workflows import convert_deepseek

    save_source("gemma2", tmp_path / "src")
    with pytest.raises(TransMLAError, match="can not express this model \\(gemma2\\): .*attention-score soft-capping"):
        convert_deepseek(str(tmp_path / "src"), tmp_path / "ds", ConvertOptions(method="svd"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "qwen3", "mistral", *NEWER])
def test_the_same_options_write_the_same_bytes(tmp_path, monkeypatch, kind):
    """A calibrated conversion on text the model samples itself, twice from an empty sample cache: the same bytes."""
    save_source(kind, tmp_path / "src")
    written = []
    for run in ("a", "b"):
        monkeypatch.setenv("TRANSMLA_CACHE", str(tmp_path / f"cache-{run}"))
        options = ConvertOptions(kv_lora_rank=12, rope_dim=8, dtype="float32", calib_samples=2, calib_seq_len=32)
        out = convert(str(tmp_path / "src"), tmp_path / run, options, progress=False)
        written.append((out / "model.safetensors").read_bytes())
    assert written[0] == written[1]
