"""`transmla export --format deepseek`: rewrite a converted checkpoint as a stock DeepSeek-V3 checkpoint."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from transmla.data.text import load_text
from transmla.defaults import MAX_SHARD_BYTES, default_of
from transmla.errors import TransMLAError
from transmla.io import SafetensorsSource, ShardedSafetensorsWriter, atomic_output_dir, check_free_disk
from transmla.io.converted import config_dtype, parse_dtype
from transmla.io.source import load_tokenizer, require_tokenizer

from .config import deepseek_config
from .latent_norm import STOCK_EPS, LatentNorm, calibrated_norm, exact_norm
from .layer import AttentionShape, export_attention
from .rotary import match_rotary, rope_rows

LATENT_NORMS = ("exact", "calibrated")
SKIP_FILES = {"config.json", "transmla.json", "model.safetensors.index.json"}


@dataclass
class ExportOptions:
    """Settings of one export."""

    latent_norm: str = "exact"  # exact: eps-dominated (no data); calibrated: per-channel scale fitted on text
    rope_interleave: bool = True  # DeepSeek's own layout; vLLM and SGLang assume it
    dtype: str = "auto"  # auto: the converted checkpoint's
    kv_lora_rank: int | None = None  # pad every latent with zero channels to this width (e.g. 512 for FlashMLA)
    calib_text: str | None = None  # UTF-8 text file for --latent-norm calibrated
    calib_windows: int = 8
    calib_seq_len: int = 512
    device: str = "cpu"  # where the calibration forward passes run
    max_shard_bytes: int = MAX_SHARD_BYTES
    overwrite: bool = False

    def check(self) -> None:
        """Raise TransMLAError naming the first setting that can not be exported with, and the fix."""
        if self.latent_norm not in LATENT_NORMS:
            raise TransMLAError(f"--latent-norm {self.latent_norm!r} is not one of {', '.join(LATENT_NORMS)}")
        if self.latent_norm == "calibrated":
            if self.calib_text is None:
                raise TransMLAError("--latent-norm calibrated needs calibration text: pass --calib-text FILE")
            load_text(text_file=self.calib_text)  # one clear error for a missing or non-UTF-8 file
        if self.calib_windows < 1:
            raise TransMLAError(f"--calib-windows {self.calib_windows} must be at least 1")
        if self.calib_seq_len < 2:
            raise TransMLAError(f"--calib-seq-len {self.calib_seq_len} is too short: use at least 2 tokens")
        if self.kv_lora_rank is not None and self.kv_lora_rank < 1:
            raise TransMLAError(f"--kv-lora-rank {self.kv_lora_rank} must be positive")
        parse_dtype(self.dtype)
        if self.max_shard_bytes <= 0:
            raise TransMLAError(f"--max-shard-size must be positive, got {self.max_shard_bytes / 2**30:g} GiB")


def default(name: str) -> Any:
    """The default of one ExportOptions field (for the command line, so that each default is written once)."""
    return default_of(ExportOptions, name)


@dataclass
class ExportReport:
    """What was written and what it cost."""

    out: Path
    kv_lora_rank: int
    rope_theta: float
    latent_norm: str
    latent_error: float  # exact: bound on any latent's relative error; calibrated: worst layer's rms scale error
    rope_max_rel_error: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise TransMLAError(f"{folder} has no config.json: point FOLDER at a checkpoint written by `transmla convert`")
    config = json.loads(path.read_text())
    if config.get("model_type") != "transmla":
        raise TransMLAError(f"{folder} is a {config.get('model_type')!r} checkpoint, not one written by `transmla convert`")
    return config


def inexpressible(config: dict[str, Any]) -> list[str]:
    """What of a converted config stock DeepSeek-V3 has no counterpart for (empty: nothing)."""
    found = []
    if config.get("qk_norm"):
        found.append("RMS-normalised queries and keys before the latent (qk_norm; DeepSeek-V3 has no per-head key norm "
                     "nor one over all heads)")
    if config.get("mlp_bias"):
        found.append("MLP biases")
    if config.get("attn_logit_softcapping") is not None:
        found.append(f"attention-score soft-capping (attn_logit_softcapping {config['attn_logit_softcapping']:g})")
    if config.get("final_logit_softcapping") is not None:
        found.append(f"logit soft-capping (final_logit_softcapping {config['final_logit_softcapping']:g})")
    if "sliding_attention" in (config.get("layer_types") or []):
        found.append(f"sliding-window layers (sliding_window {config.get('sliding_window')})")
    if config.get("rms_norm_offset", 0.0):
        found.append(f"RMSNorms scaled by {config['rms_norm_offset']:g} + w")
    if config.get("norm_placement", "pre") != "pre":
        found.append(f"norms after the attention and the MLP (norm_placement {config['norm_placement']!r})")
    if config.get("embedding_multiplier", 1.0) != 1.0:
        found.append(f"scaled token embeddings (embedding_multiplier {config['embedding_multiplier']:g})")
    return found


def refuse_inexpressible(config: dict[str, Any], architecture: str) -> None:
    """One line naming everything of a converted config that stock DeepSeek-V3 can not express, if anything."""
    found = inexpressible(config)
    if found:
        raise TransMLAError(f"stock DeepSeek-V3 can not express this model ({architecture}): {'; '.join(found)}; "
                            "serve it in the transmla format instead")


def check_exportable(config: dict[str, Any], tensors: SafetensorsSource) -> None:
    """Refuse, in one line, what DeepSeek-V3 can not express: q/k norms, MLP biases, soft-capping, sliding windows,
    norm variants and placements, embedding scale, attention biases."""
    refuse_inexpressible(config, config.get("source_architecture") or "its source")
    for layer in range(config["num_hidden_layers"]):
        for name in ("q_proj.bias", "kv_a_proj.bias", "o_proj.bias"):
            key = f"model.layers.{layer}.self_attn.{name}"
            if tensors.has(key) and bool(tensors.get(key).abs().max() > 0):
                if name == "o_proj.bias" and (config.get("conversion") or {}).get("output_bias"):
                    raise TransMLAError(
                        f"{key} is nonzero: the calibrated conversion moved the mean value error into o_proj's bias, "
                        "which DeepSeek-V3 serving has not; convert again with --format deepseek (or --no-output-bias), "
                        "which fits the values without it")
                arch = config.get("source_architecture") or "the source"
                raise TransMLAError(
                    f"{key} is nonzero ({arch} attention biases): DeepSeek-V3 attention has no biases in vLLM and "
                    "SGLang (transformers allows only kv_a_proj_with_mqa and o_proj biases, never a query bias), and "
                    "a query, rotary-key or output bias can not be folded into the other weights, so this model can "
                    "not be exported exactly; serve it in the transmla format instead"
                )


def output_dtype(options: ExportOptions, config: dict[str, Any]) -> torch.dtype:
    dtype = parse_dtype(options.dtype) or config_dtype(config)
    if dtype == torch.float16 and options.latent_norm == "exact":
        raise TransMLAError(
            "--latent-norm exact writes latent projections far below float16's normal range; export as bfloat16 or "
            "float32, or use --latent-norm calibrated"
        )
    return dtype


def collect_latents(folder: Path, options: ExportOptions) -> dict[int, torch.Tensor]:
    """Each layer's latents c (before any norm) on calibration text, from the converted model."""
    from transformers import AutoModelForCausalLM

    from transmla.data.text import calibration_windows

    text = load_text(text_file=options.calib_text)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    model = model.to(options.device).eval()
    tokenizer = require_tokenizer(load_tokenizer(folder, trust_remote_code=True), folder, "--latent-norm calibrated")
    windows = calibration_windows(tokenizer, text, options.calib_seq_len, options.calib_windows)
    latents: dict[int, list[torch.Tensor]] = {}

    def hook(layer: int, rank: int):
        def record(module, args, output):
            latents.setdefault(layer, []).append(output[..., :rank].detach().reshape(-1, rank).double().cpu())
        return record

    handles = [
        block.self_attn.kv_a_proj.register_forward_hook(hook(i, block.self_attn.kv_lora_rank))
        for i, block in enumerate(model.model.layers)
    ]
    try:
        with torch.inference_mode():
            for row in windows:
                model(input_ids=row[None].to(options.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(chunks) for layer, chunks in latents.items()}


def latent_norms(config: dict[str, Any], tensors: SafetensorsSource, rank_out: int, folder: Path,
                 options: ExportOptions) -> list[LatentNorm]:
    ranks = config["kv_lora_rank"]
    if options.latent_norm == "calibrated":
        latents = collect_latents(folder, options)
        return [calibrated_norm(latents[layer], rank_out) for layer in range(len(ranks))]
    norms = []
    for layer, rank in enumerate(ranks):
        kv_a = tensors.get(f"model.layers.{layer}.self_attn.kv_a_proj.weight", torch.float64)
        gain = tensors.get(f"model.layers.{layer}.input_layernorm.weight", torch.float64)
        norms.append(exact_norm(kv_a[:rank], gain, rank_out))
    return norms


def copy_side_files(folder: Path, out: Path) -> None:
    """Tokenizer, chat template and generation config; not the weights, config or remote code."""
    for path in folder.iterdir():
        if path.is_file() and path.name not in SKIP_FILES and path.suffix not in (".safetensors", ".py"):
            shutil.copyfile(path, out / path.name)


def export_deepseek(folder: Path | str, out: Path | str, options: ExportOptions | None = None,
                    progress: bool = True) -> ExportReport:
    """Write the converted checkpoint FOLDER as a DeepSeek-V3 checkpoint OUT (atomically)."""
    folder, out, options = Path(folder), Path(out), options or ExportOptions()
    options.check()
    config = read_config(folder)
    tensors = SafetensorsSource(folder)
    check_exportable(config, tensors)
    dtype = output_dtype(options, config)
    notes: list[str] = []
    if config.get("hidden_act", "silu") != "silu":
        notes.append(f"hidden_act {config['hidden_act']!r}: vLLM and SGLang serve DeepSeek MLPs with silu only")

    layers, ranks = config["num_hidden_layers"], list(config["kv_lora_rank"])
    rank_out = max(ranks)
    if options.kv_lora_rank is not None:
        if options.kv_lora_rank < rank_out:
            raise TransMLAError(f"--kv-lora-rank {options.kv_lora_rank} is below the checkpoint's widest latent ({rank_out}): it can only pad")
        rank_out = options.kv_lora_rank
    if min(ranks) != rank_out:
        notes.append(
            f"latent widths {min(ranks)}..{max(ranks)} padded with zero channels to DeepSeek's single kv_lora_rank "
            f"{rank_out} (exact; the cache grows to {rank_out} + {config['qk_rope_head_dim']} values per token and layer)"
        )
    shape = AttentionShape(config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
                           config["qk_rope_head_dim"], config["hidden_size"], config.get("attention_scale"))
    per_frequency = bool((config.get("conversion") or {}).get("rope_per_frequency"))
    match = match_rotary(config["rope_inv_freq"], shape.rope_dim, float(config.get("rope_theta", 10000.0)),
                         shape.head_dim, per_frequency)
    rope_gain = float(config.get("rope_attention_scaling", 1.0)) ** 2
    norms = latent_norms(config, tensors, rank_out, folder, options)
    eps = STOCK_EPS if options.latent_norm == "exact" else float(config.get("rms_norm_eps", 1e-6))
    if options.latent_norm == "exact" and abs(float(config.get("rms_norm_eps", STOCK_EPS)) - STOCK_EPS) > 1e-12:
        notes.append(
            f"rms_norm_eps {config['rms_norm_eps']:.3g} -> {STOCK_EPS:g} in every norm, so that kv_a_layernorm uses "
            "the eps the exact latent scaling assumes in transformers, vLLM and SGLang alike"
        )
    ds_config = deepseek_config(config, rank_out, match.theta, eps, options.rope_interleave,
                                str(dtype).removeprefix("torch."))

    size = sum(int(torch.Size(tensors.shape(k)).numel()) for k in tensors.keys()) * dtype.itemsize
    check_free_disk(out.parent if out.parent != Path("") else Path("."), size)
    with atomic_output_dir(out, overwrite=options.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=options.max_shard_bytes)

        def emit(name: str, tensor: torch.Tensor) -> None:
            writer.add(name, tensor.to(dtype).contiguous())

        emit("model.embed_tokens.weight", tensors.get("model.embed_tokens.weight"))
        for layer in tqdm(range(layers), desc="exporting layers", disable=not progress):
            prefix = f"model.layers.{layer}."
            attn = {name: tensors.get(prefix + "self_attn." + name)
                    for name in ("q_proj.weight", "kv_a_proj.weight", "kv_b_proj.weight", "o_proj.weight")}
            rows = rope_rows(match.slots[layer], shape.rope_dim, options.rope_interleave)
            for name, tensor in export_attention(attn, shape, rows, rope_gain, norms[layer], rank_out).items():
                emit(prefix + "self_attn." + name, tensor)
            for key in (k for k in tensors.keys() if k.startswith(prefix) and ".self_attn." not in k):
                emit(key, tensors.get(key))
        emit("model.norm.weight", tensors.get("model.norm.weight"))
        # Stock serving code does not tie lm_head to the embeddings: write the copy.
        head = "lm_head.weight" if tensors.has("lm_head.weight") else "model.embed_tokens.weight"
        emit("lm_head.weight", tensors.get(head))
        writer.finish()

        (tmp / "config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        copy_side_files(folder, tmp)
        report = ExportReport(out, rank_out, match.theta, options.latent_norm, max(n.error for n in norms),
                              match.max_rel_error, notes)
        record = {"source": str(folder), "options": asdict(options), "report": report.to_dict(),
                  "latent_error_per_layer": [n.error for n in norms]}
        (tmp / "transmla_export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return report
