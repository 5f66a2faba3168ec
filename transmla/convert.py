"""`transmla convert`: stream a source checkpoint layer by layer into the latent-attention format."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .errors import TransMLAError
from .checks import check_output_location, check_source_tensors
from .factorize import max_latent_rank, svd_latent
from .layerwise import METHODS, LayerStream
from .io import ShardedSafetensorsWriter, TensorSource, atomic_output_dir, check_free_disk, cleanup_stale_temp_dirs
from .mla_layer import (PreProjection, SourceAttention, assemble_layer, on_pre_features, pre_feature_attention,
                        rotary_split)
from .modeling.configuration_transmla import TransMLAConfig
from .rope import pair_blocks, plan_rope, source_rope
from .source import QK_NORM_ARCHITECTURES, Source, open_source

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_transmla.py", "modeling_transmla.py", "mla_decode.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertOptions:
    """Settings of one conversion; every lossy choice is here."""

    kv_lora_rank: int | None = None  # None: half of the source's KV cache minus the rotary key
    rope_dim: int | None = None  # None: 64, or all key dims if the source has fewer
    method: str = "svd"
    dtype: str = "auto"
    device: str = "cpu"
    rope_context: int = 16  # weights-only: distances over which a dropped rotation is costed (measured: README)
    rope_per_frequency: bool = False  # one rotary component per frequency: exportable to stock DeepSeek code
    # Calibrated conversion (--method pca|whiten): text, rotary selection, budget; see transmla.layerwise.
    calib_file: str | None = None
    calib_dataset: str | None = None
    calib_samples: int = 64
    calib_seq_len: int = 512
    calib_seed: int = 0
    calib_offload: str = "auto"  # auto | never | always: calibration hidden states in a memory-mapped file
    rope_select: str = "rotate"  # rotate | norm | high-freq | uniform
    freqfold: int | str = 1  # or "auto": per layer, on the calibration loss
    rank_allocation: str = "uniform"  # uniform | energy
    kv_budget: float | None = None  # fraction of the source's KV cache; picks R (per layer) and D
    query_shrink: bool = True  # calibrated: dropped rotations replaced by their attention-weighted average
    score_weight: float = 30.0  # whiten: weight of score errors against output errors (measured: docs/calibration.md)
    refit_values: bool = True  # whiten: least-squares value up-projection under the converted attention
    max_shard_bytes: int = 5 * 2**30
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Geometry:
    """The source's attention shape."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    layers: int
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3): the layer is converted on its pre-features
    norm_eps: float = 1e-6

    @classmethod
    def of(cls, config: Any) -> "Geometry":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        groups = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        qk_norm = getattr(config, "model_type", None) in QK_NORM_ARCHITECTURES
        return cls(config.hidden_size, config.num_attention_heads, groups, head_dim, config.num_hidden_layers,
                   qk_norm, float(getattr(config, "rms_norm_eps", 1e-6)))

    @property
    def kv_values(self) -> int:
        return 2 * self.groups * self.head_dim

    @property
    def input_width(self) -> int:
        """Width of the input the converted matrices act on: the hidden size, or (H+2G)*d pre-features."""
        return (self.heads + 2 * self.groups) * self.head_dim if self.qk_norm else self.hidden

    def check(self, rank: int, rope_dim: int) -> None:
        """One clear error for an impossible (R, D)."""
        if rope_dim % 2 or not 2 <= rope_dim <= self.groups * self.head_dim:
            raise TransMLAError(f"--rope-dim {rope_dim} must be even and in 2..{self.groups * self.head_dim} (key heads x head_dim)")
        limit = max_latent_rank(self.input_width, self.groups * self.head_dim - rope_dim, self.groups * self.head_dim)
        if not 1 <= rank <= limit:
            raise TransMLAError(f"--kv-lora-rank {rank} is out of range: with --rope-dim {rope_dim} this model allows 1..{limit}")

    def default_rope_dim(self) -> int:
        """64 (DeepSeek's and FlashMLA's width), or all key dims when there are fewer."""
        return min(64, self.groups * self.head_dim)

    def default_rank(self, rope_dim: int) -> int:
        """Half of the source's per-token cache: R + D = G*d."""
        return max(1, self.groups * self.head_dim - rope_dim)


def read_attention(tensors: TensorSource, layer: int, geo: Geometry) -> tuple[SourceAttention, torch.Tensor | None]:
    """The layer's q/k/v/o weights and biases, and o_proj's own bias if any. With per-head q/k norms, the
    attention on the pre-features (see `mla_layer`)."""
    prefix = f"model.layers.{layer}.self_attn."

    def get(name: str) -> torch.Tensor | None:
        key = prefix + name
        return tensors.get(key, torch.float64) if tensors.has(key) else None

    src = SourceAttention(
        q=get("q_proj.weight"), k=get("k_proj.weight"), v=get("v_proj.weight"), o=get("o_proj.weight"),
        q_bias=get("q_proj.bias"), k_bias=get("k_proj.bias"), v_bias=get("v_proj.bias"),
        heads=geo.heads, groups=geo.groups, head_dim=geo.head_dim,
    )
    expected = {"q": (geo.heads * geo.head_dim, geo.hidden), "k": (geo.groups * geo.head_dim, geo.hidden),
                "v": (geo.groups * geo.head_dim, geo.hidden), "o": (geo.hidden, geo.heads * geo.head_dim)}
    for name, shape in expected.items():
        tensor = getattr(src, name)
        if tensor is None:
            raise TransMLAError(f"tensor {prefix}{name}_proj.weight is missing from the checkpoint")
        if tuple(tensor.shape) != shape:
            raise TransMLAError(f"{prefix}{name}_proj.weight has shape {tuple(tensor.shape)} but the config implies {shape}: the config does not match the weights")
    if geo.qk_norm:
        src = pre_feature_attention(read_pre_projection(src, get, prefix, geo), src.o, geo.heads, geo.groups)
    return src, get("o_proj.bias")


def read_pre_projection(src: SourceAttention, get: Any, prefix: str, geo: Geometry) -> PreProjection:
    """The q/k/v projections and the per-head q/k norms that make the layer's pre-features."""
    norms = {}
    for name in ("q_norm", "k_norm"):
        weight = get(f"{name}.weight")
        if weight is None:
            raise TransMLAError(f"tensor {prefix}{name}.weight is missing from the checkpoint")
        if tuple(weight.shape) != (geo.head_dim,):
            raise TransMLAError(f"{prefix}{name}.weight has shape {tuple(weight.shape)} but the config implies ({geo.head_dim},): the config does not match the weights")
        norms[name] = weight
    return PreProjection(src.q, src.k, src.v, norms["q_norm"], norms["k_norm"], geo.norm_eps,
                         src.q_bias, src.k_bias, src.v_bias)


def weight_statistics(src: SourceAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Key energy per frequency [d/2, G, G] and query energy per frequency and key head [d/2, G], from the
    weights alone (inputs taken as isotropic)."""
    k_blocks = pair_blocks(src.k, src.groups, src.head_dim)  # [d/2, 2, G, h]
    key_cov = torch.einsum("imgh,imkh->igk", k_blocks, k_blocks)
    q_blocks = pair_blocks(src.q, src.heads, src.head_dim)  # [d/2, 2, H, h]
    per_head = q_blocks.pow(2).sum(dim=(1, 3))  # [d/2, H]
    query = torch.zeros(per_head.shape[0], src.groups, dtype=per_head.dtype, device=per_head.device)
    query.index_add_(1, src.group_of_head.to(per_head.device), per_head)
    return key_cov, query


def convert_attention(
    src: SourceAttention, inv_freq: torch.Tensor, scaling: float, rank: int, options: ConvertOptions
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One layer's latent-attention tensors and its rotary key's inverse frequencies."""
    key_cov, query = weight_statistics(src)
    plan = plan_rope(key_cov, query, inv_freq, options.rope_dim, options.rope_context, options.rope_per_frequency)
    split = rotary_split(src, plan)
    latent = svd_latent(split.key_nope, src.v, rank)
    out = assemble_layer(src, split, latent, scaling)
    return (out if src.pre is None else on_pre_features(out, src.pre)), plan.kept_inv_freq


def output_dtype(options: ConvertOptions, config: Any) -> torch.dtype:
    if options.dtype == "auto":
        source = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(source, str):
            source = DTYPES.get(source)
        return source if source in DTYPES.values() else torch.float32
    if options.dtype not in DTYPES:
        raise TransMLAError(f"--dtype {options.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[options.dtype]


def build_config(source: Source, geo: Geometry, ranks: list[int], inv_freqs: list[list[float]],
                 scaling: float, tensors: set[str], options: ConvertOptions, dtype: torch.dtype) -> TransMLAConfig:
    src = source.config
    rope = getattr(src, "rope_parameters", None) or {}
    text = src.get_text_config() if hasattr(src, "get_text_config") else src
    return TransMLAConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=geo.layers, num_attention_heads=geo.heads, num_key_value_heads=geo.groups,
        head_dim=geo.head_dim, kv_lora_rank=ranks, qk_rope_head_dim=options.rope_dim, rope_inv_freq=inv_freqs,
        rope_attention_scaling=scaling, hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps, pad_token_id=src.pad_token_id, bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id, tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors or "model.layers.0.self_attn.kv_a_proj.bias" in tensors,
        attention_out_bias="model.layers.0.self_attn.o_proj.bias" in tensors,
        qk_norm=geo.qk_norm, pre_proj_bias="model.layers.0.self_attn.pre_q_proj.bias" in tensors,
        mlp_bias=bool(getattr(src, "mlp_bias", False)),
        rope_theta=float(rope.get("rope_theta", getattr(src, "rope_theta", 10000.0))),
        source_model=source.name, source_architecture=src.model_type,
        conversion={"method": options.method, "rope_dim": options.rope_dim, "kv_lora_rank": ranks,
                    "rope_context": options.rope_context,
                    "rope_per_frequency": options.rope_per_frequency, "transmla_version": __version__, **options.extra},
        auto_map={"AutoConfig": "configuration_transmla.TransMLAConfig",
                  "AutoModelForCausalLM": "modeling_transmla.TransMLAForCausalLM"},
        dtype=str(dtype).removeprefix("torch."),
    )


def estimate_output_bytes(tensors: TensorSource, dtype: torch.dtype) -> int:
    """About the size of the source in the output dtype (the attention shrinks or stays about the same)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(int(torch.Size(tensors.shape(k)).numel()) * size for k in tensors.keys())


def convert(spec: str, out: Path, options: ConvertOptions, progress: bool = True) -> Path:
    """Convert SRC into OUT (written to a temporary folder, renamed when complete)."""
    out = Path(out)
    source = open_source(spec)
    geo = Geometry.of(source.config)
    fixed_rope_dim = options.rope_dim
    if options.rope_dim is None:
        default = geo.default_rope_dim()
        options = replace(options, rope_dim=min(default, geo.head_dim) if options.rope_per_frequency else default)
    if options.rope_per_frequency and options.rope_dim > geo.head_dim:
        raise TransMLAError(f"--rope-dim {options.rope_dim} is too wide for one component per frequency: use at most {geo.head_dim} (the head width)")
    rank = options.kv_lora_rank or geo.default_rank(options.rope_dim)
    geo.check(rank, options.rope_dim)
    if options.method not in METHODS:
        raise TransMLAError(f"--method {options.method!r} is not one of {', '.join(METHODS)}")
    if options.kv_budget is not None and options.kv_lora_rank is not None:
        raise TransMLAError("--kv-budget chooses the latent width itself: leave out --kv-lora-rank (or --kv-budget)")
    stream = None
    if options.method != "svd" or options.kv_budget is not None or options.rank_allocation != "uniform" \
            or options.rope_select != "rotate" or str(options.freqfold) != "1":
        stream = LayerStream(source, geo, options, *source_rope(source.config), read_attention, progress,
                             scratch_dir=out.absolute().parent)
    if getattr(source.config, "sliding_window", None) and getattr(source.config, "use_sliding_window", True):
        tqdm.write(f"note: the source uses a sliding window of {source.config.sliding_window}; the converted model attends to the whole context")
    dtype = output_dtype(options, source.config)
    inv_freq, scaling = source_rope(source.config)
    tokenizer = source.load_tokenizer()
    if tokenizer is None:
        tqdm.write(f"note: {spec} has no tokenizer files; the converted folder is written without them (copy them in to use it with AutoTokenizer)")
    generation_config = source.load_generation_config()

    tensors = source.tensors
    check_output_location(out, source.folder if source.gguf_file is None else source.folder / source.gguf_file)
    check_source_tensors(tensors, source.config, source.name)
    cleanup_stale_temp_dirs(out)  # a killed run's leftovers would otherwise count against the free space
    check_free_disk(out.parent if out.parent != Path("") else Path("."), estimate_output_bytes(tensors, dtype))
    if stream is not None:
        sizes = stream.sizes(fixed_rope_dim if options.kv_budget is not None else options.rope_dim,
                             None if options.kv_budget is not None else rank)
        options = replace(options, rope_dim=sizes.rope_dim, extra={**options.extra, **stream.record(sizes)})
    with atomic_output_dir(out, overwrite=options.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=options.max_shard_bytes)
        written: set[str] = set()

        def emit(name: str, tensor: torch.Tensor) -> None:
            writer.add(name, tensor.to(dtype).contiguous())
            written.add(name)

        tied = bool(getattr(source.config.get_text_config(), "tie_word_embeddings", False))
        layer_keys: dict[int, list[str]] = {}
        other_keys: list[str] = []
        for key in tensors.keys():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue
            if key.startswith("model.layers."):
                layer_keys.setdefault(int(key.split(".")[2]), []).append(key)
            else:
                other_keys.append(key)

        for key in [k for k in other_keys if not k.startswith(("model.norm", "lm_head"))]:
            emit(key, tensors.get(key))
        if hasattr(tensors, "close"):
            tensors.close()  # unmap the embeddings' pages before the layers
        ranks, inv_freqs = [], []
        layers = stream.layers(sizes) if stream is not None else range(geo.layers)
        for item in (layers if stream is not None else tqdm(layers, desc="converting layers", disable=not progress)):
            if stream is not None:
                layer, converted, layer_freq = item
                rank, o_bias = sizes.ranks[layer], read_attention(tensors, layer, geo)[1]
            else:
                layer = item
                src, o_bias = read_attention(tensors, layer, geo)
                converted, layer_freq = convert_attention(
                    src.to(options.device), inv_freq.to(options.device), scaling, rank, options,
                )
            if o_bias is not None:
                converted["o_proj.bias"] = converted.get("o_proj.bias", 0) + o_bias.to(options.device)
            prefix = f"model.layers.{layer}.self_attn."
            for name, tensor in converted.items():
                emit(prefix + name, tensor.cpu())
            for key in layer_keys.get(layer, []):
                if ".self_attn." not in key:
                    emit(key, tensors.get(key))
            ranks.append(rank)
            inv_freqs.append(layer_freq)
            if hasattr(tensors, "close"):
                tensors.close()  # unmap the source shards: only one layer's pages stay resident
        for key in [k for k in other_keys if k.startswith(("model.norm", "lm_head"))]:
            emit(key, tensors.get(key))
        writer.finish()

        config = build_config(source, geo, ranks, inv_freqs, scaling, written, options, dtype)
        config.save_pretrained(tmp)
        for name in MODELING_FILES:
            shutil.copyfile(MODELING_DIR / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation_config.save_pretrained(tmp)
        (tmp / "transmla.json").write_text(json.dumps({"source": spec, "options": asdict(options)}, indent=2, default=str) + "\n")
    return out
