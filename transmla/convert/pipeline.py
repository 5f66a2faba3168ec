"""`transmla convert`: stream a source checkpoint layer by layer into the latent-attention format.

open the source -> resolve and check the options -> check the output and the source -> calibration tokens ->
sizes -> stream the layers into a temporary folder -> config, modeling code, tokenizer -> rename.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from transmla import __version__
from transmla.determinism import deterministic
from transmla.errors import TransMLAError
from transmla.io.checks import LAYER_KEY, check_output_location, check_source_tensors, model_tensors
from transmla.io.converted import config_dtype, copy_modeling_files, parse_dtype, write_record
from transmla.io.output_dir import atomic_output_dir, check_free_disk, cleanup_stale_temp_dirs
from transmla.io.reader import TensorSource
from transmla.io.source import Source, open_source
from transmla.io.writer import ShardedSafetensorsWriter

from .attention import attention_weights
from .budget import Sizes
from .calibration_data import calibration_ids, calibration_tokenizer
from .geometry import Geometry
from .model_config import build_config, shared_scaling
from .options import GPU_CALIB_SAMPLES, GPU_REFINE_STEPS, ConvertOptions
from .recipe import LayerSettings
from .stream import LayerStream


# Measured with benchmarks/generalize.py (SmolLM2-135M, half the cache, worst of four domains; README).
CPU_CALIBRATION_NOTE = ("note: on a CPU the calibration reads {samples} x {seq_len} tokens ({full} on a GPU) and skips the "
                        "refinement ({steps} steps per layer on a GPU), to finish in minutes; --calib-samples {full} "
                        "--refine {steps} do a GPU's work here, slowly (their effect on SmolLM2-135M: "
                        "benchmarks/results/generalize/generalize.md)")


def convert(spec: str, out: Path, options: ConvertOptions, progress: bool = True) -> Path:
    """Convert SRC into OUT (written to a temporary folder, renamed when complete); the same options on the same
    machine write the same bytes."""
    with deterministic():
        return _convert(spec, out, options, progress)


def _convert(spec: str, out: Path, options: ConvertOptions, progress: bool) -> Path:
    out = Path(out)
    source = open_source(spec)
    geo = Geometry.of(source.config)
    resolved = options.resolved(geo)
    dtype = parse_dtype(resolved.dtype) or config_dtype(source.config)
    check_before_work(source, out, dtype)
    check_output_bias(source, resolved)
    calibration_tokenizer(source, resolved)
    print_notes(source, spec, options, resolved)
    options = resolved
    ids = calibration_ids(source, options, progress) if needs_text(options, geo) else None
    stream = LayerStream(source, geo, options, ids, progress, scratch_dir=out.absolute().parent)
    sizes = stream.sizes()
    options = replace(options, rope_dim=sizes.rope_dim, extra={**options.extra, **stream.record(sizes)})
    with atomic_output_dir(out, overwrite=options.overwrite) as tmp, closing(stream.layers(sizes)) as layers:
        write_checkpoint(tmp, source, layers, sizes, options, dtype)
        write_record(tmp, {"source": spec, "options": asdict(options)})
    return out


def convert_in_memory(source: Source, options: ConvertOptions, settings: LayerSettings | None = None,
                      ids: torch.LongTensor | None = None, progress: bool = False) -> tuple[torch.nn.Module, Sizes]:
    """The converted model in float32, built straight from the layer stream (nothing written): for benchmarks
    that compare many settings. `settings` overrides the per-layer recipe; `ids` are calibration tokens (default:
    the options' own, for a calibrated method)."""
    from transmla.modeling.modeling_transmla import TransMLAForCausalLM

    geo = Geometry.of(source.config)
    options = options.resolved(geo)
    if ids is None and needs_text(options, geo):
        ids = calibration_ids(source, options)
    stream = LayerStream(source, geo, options, ids, progress, settings)
    sizes = stream.sizes()
    state: dict[str, torch.Tensor] = {}
    freqs = []
    for layer, converted, layer_freq in stream.layers(sizes):
        state |= {f"model.layers.{layer}.self_attn.{k}": v.float().cpu() for k, v in converted.items()}
        freqs.append(layer_freq)
    for key in source.tensors.keys():
        if ".self_attn." not in key and not key.endswith("rotary_emb.inv_freq"):
            state |= converted_tensors(source, key, source.tensors.get(key, torch.float32))
    config = build_config(source.config, sizes.ranks, freqs, stream.scaling, set(state),
                          source_name=source.name, dtype=torch.float32)
    model = TransMLAForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), sizes


def needs_text(options: ConvertOptions, geo: Geometry) -> bool:
    """Whether the conversion reads calibration text: a calibrated method at sizes that lose something."""
    return options.calibrated and not options.lossless(geo)


def check_before_work(source: Source, out: Path, dtype: torch.dtype) -> None:
    """The output location, the source's tensors and the free disk space, before anything heavy."""
    check_output_location(out, source.folder if source.gguf_file is None else source.folder / source.gguf_file)
    check_source_tensors(source.tensors, source.config, source.name, model_tensors(source.config))
    cleanup_stale_temp_dirs(out)  # a killed run's leftovers would otherwise count against the free space
    check_free_disk(out.parent if out.parent != Path("") else Path("."), estimate_output_bytes(source.tensors, dtype))


def print_notes(source: Source, spec: str, given: ConvertOptions, options: ConvertOptions) -> None:
    """What the user should know about this source and these options before a long run."""
    config = source.config
    if needs_text(options, Geometry.of(config)) and not str(options.device).startswith("cuda") \
            and (given.calib_samples is None or given.refine_steps is None):
        tqdm.write(CPU_CALIBRATION_NOTE.format(samples=options.calib_samples, full=GPU_CALIB_SAMPLES,
                                               seq_len=options.calib_seq_len, steps=GPU_REFINE_STEPS))
    if source.load_tokenizer() is None:
        tqdm.write(f"note: {spec} has no tokenizer files; the converted folder is written without them (copy them in to use it with AutoTokenizer)")


def check_output_bias(source: Source, options: ConvertOptions) -> None:
    """Without an output bias (DeepSeek-V3's form) a source's own attention biases have nowhere to go."""
    if options.output_bias:
        return
    weights = attention_weights(source.tensors, 0, source.family)
    biased = [f"{name}_proj.bias" for name in "qkvo" if getattr(weights, f"{name}_bias") is not None]
    if biased:
        raise TransMLAError(f"{source.name} has attention biases ({', '.join(biased)}), which the converted model keeps "
                            "in biases of its own that stock DeepSeek-V3 (--format deepseek, --no-output-bias) can not "
                            "express; convert to the transmla format instead")


def estimate_output_bytes(tensors: TensorSource, dtype: torch.dtype) -> int:
    """About the size of the source in the output dtype (the attention shrinks or stays about the same)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(int(torch.Size(tensors.shape(k)).numel()) * size for k in tensors.keys())


def write_checkpoint(folder: Path, source: Source, layers: Iterable[tuple[int, dict[str, torch.Tensor], list[float]]],
                     sizes: Sizes, options: ConvertOptions, dtype: torch.dtype) -> None:
    """Weights (embeddings, each converted layer as it comes, final norm and head), config, modeling code,
    tokenizer and generation config."""
    tensors = source.tensors
    writer = ShardedSafetensorsWriter(folder, max_shard_bytes=options.max_shard_bytes)
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
    last = ("model.norm", "lm_head")
    for key in [k for k in other_keys if not k.startswith(last)]:
        emit(key, tensors.get(key))  # the embeddings
    release(tensors)  # unmap the embeddings' pages before the layers
    inv_freqs = []
    for layer, converted, layer_freq in layers:
        for name, tensor in converted.items():
            emit(f"model.layers.{layer}.self_attn.{name}", tensor.cpu())
        for key in layer_keys.get(layer, []):
            if ".self_attn." not in key:
                for name, tensor in converted_tensors(source, key, tensors.get(key)).items():
                    emit(name, tensor)
        inv_freqs.append(layer_freq)
        release(tensors)  # only one layer's pages stay resident
    for key in [k for k in other_keys if k.startswith(last)]:
        emit(key, tensors.get(key))
    writer.finish()

    conversion = {"method": options.method, "rope_dim": options.rope_dim, "kv_lora_rank": sizes.ranks,
                  "rope_context": options.rope_context, "rope_per_frequency": options.rope_per_frequency,
                  "transmla_version": __version__, **options.extra}
    scaling = shared_scaling(source.family.rotary(source.config))
    config = build_config(source.config, sizes.ranks, inv_freqs, scaling, written, source_name=source.name,
                          conversion=conversion, dtype=dtype)
    config.save_pretrained(folder)
    copy_modeling_files(folder)
    tokenizer = source.load_tokenizer()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    source.load_generation_config().save_pretrained(folder)


def converted_tensors(source: Source, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A source tensor outside the attention under the converted checkpoint's names (its family splits fused
    projections)."""
    match = LAYER_KEY.match(key)
    if match is None:
        return {key: tensor}
    prefix = match.group(0)
    return {prefix + name: part for name, part in source.family.layer_tensor(key[len(prefix):], tensor).items()}


def release(tensors: TensorSource) -> None:
    """Drop the source's open file handles, where it has any (their pages are freed once unreferenced)."""
    if hasattr(tensors, "close"):
        tensors.close()
