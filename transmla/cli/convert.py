"""`transmla convert`: its flags (defaults from ConvertOptions), recipes, and the convert-then-heal/export forms."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from transmla.convert.methods import METHODS
from transmla.convert.options import CPU_CALIB_SAMPLES, DEFAULT_KV_BUDGET, GPU_CALIB_SAMPLES, GPU_REFINE_STEPS, ConvertOptions, default
from transmla.data.mixture import source_specs
from transmla.errors import TransMLAError

from .app import app, console, friendly_errors, resolve_device

EXPORT_FORMATS = ("ours", "deepseek")
METHOD_HELP = "; ".join(f"{m.name} ({m.summary})" for m in METHODS.values())


@app.command()
@friendly_errors
def convert(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Source: hub id, local folder (safetensors), .gguf file, or smollm2-135m."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML file of convert options (recipes/); flags given here override it."),
    kv_lora_rank: Optional[int] = typer.Option(None, "--kv-lora-rank", "-r", help="Latent width R cached per token and layer (default: the --kv-budget's cache minus the RoPE key)."),
    rope_dim: Optional[int] = typer.Option(None, "--rope-dim", "-d", help="Width D of the decoupled RoPE key shared by all heads (even; default: measured under the --kv-budget for pca/whiten, else 64 or all key dims if fewer)."),
    method: str = typer.Option(default("method"), "--method", help=f"Factorisation: {METHOD_HELP}."),
    rope_context: int = typer.Option(default("rope_context"), "--rope-context", help="Weights-only methods: the attention distances (0..N) over which dropping a rotation is costed; calibrated methods measure them."),
    dtype: str = typer.Option(default("dtype"), "--dtype", help="Output dtype: auto (the source's), float32, bfloat16, float16."),
    device: str = typer.Option("auto", "--device", help="Where the math runs: cpu, cuda, auto."),
    max_shard_size: float = typer.Option(default("max_shard_bytes") / 2**30, "--max-shard-size", help="Largest output shard, in GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
    heal_tokens: Optional[str] = typer.Option(None, "--heal-tokens", help="Then heal with this many training tokens (e.g. 2M); see `transmla heal`."),
    heal_data: list[str] = typer.Option([], "--heal-data", help="Healing text, repeatable: self (sampled from the original: the default), a text file, a dataset name (wikitext2, c4, owner/name), or a spec as in `heal --data`."),
    rope_per_frequency: bool = typer.Option(default("rope_per_frequency"), "--rope-per-frequency", help="Keep one rotary component of each of the D/2 fastest frequencies, so that `transmla export --format deepseek` can express the checkpoint (implied by --format deepseek)."),
    calib_source: list[str] = typer.Option([], "--calib-source", help="Calibration text for pca/whiten, repeatable: self (sampled from the model: the default, no data needed), file:PATH or dataset:NAME, each optionally @WEIGHT (e.g. --calib-source self@3 --calib-source file:chat.txt)."),
    calib_file: list[Path] = typer.Option([], "--calib-file", help="Calibration text file (UTF-8); repeatable; the same as --calib-source file:PATH."),
    calib_dataset: list[str] = typer.Option([], "--calib-dataset", help="Calibration text from a hub dataset: wikitext2, c4 or owner/name[:config[:split]] (text column; validation split unless named); repeatable."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help=f"Calibration sequences (default: {GPU_CALIB_SAMPLES} on a GPU, {CPU_CALIB_SAMPLES} on a CPU)."),
    calib_temperature: float = typer.Option(default("calib_temperature"), "--calib-temperature", help="Sampling temperature of the self source."),
    calib_seq_len: int = typer.Option(default("calib_seq_len"), "--calib-seq-len", help="Tokens per calibration sequence."),
    calib_seed: int = typer.Option(default("calib_seed"), "--calib-seed", help="Seed of the self source's sampling (and of the windows drawn from text files)."),
    calib_offload: str = typer.Option(default("calib_offload"), "--calib-offload", help="Calibration hidden states: auto (to a memory-mapped file beside --out when they do not fit in memory), never, always."),
    rope_select: str = typer.Option(default("rope_select"), "--rope-select", help="Rotary key: rotate (per-frequency head mixing), norm (MHA2MLA 2-norm), high-freq, uniform."),
    freqfold: str = typer.Option(str(default("freqfold")), "--freqfold", help="Fold N adjacent frequencies into one mixing (rotate), or auto (per layer, on the calibration loss)."),
    score_weight: float = typer.Option(default("score_weight"), "--score-weight", help="whiten: weight of the attention-score error against the attention-output error."),
    rank_allocation: str = typer.Option(default("rank_allocation"), "--rank-allocation", help="uniform; loss: the same total latent width spread over layers by water-filling on the whitened loss each rank removes (CARE); energy: the same on losses relative to each layer's residual stream."),
    kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help=f"Fraction of the source's KV cache to keep (default {DEFAULT_KV_BUDGET} when neither -r nor -d is given): D (unless --rope-dim) chosen by the held-out attention error it causes, measured on calibration text; R per layer with --rank-allocation loss or energy."),
    refine: Optional[int] = typer.Option(None, "--refine", metavar="STEPS", help=f"pca/whiten: gradient steps per layer on its attention-output error against the source layer, after the closed-form fit (default: {GPU_REFINE_STEPS} on a GPU, 0 on a CPU)."),
    refine_lr: float = typer.Option(default("refine_lr"), "--refine-lr", help="Learning rate of --refine, relative to each tensor's RMS."),
    refine_target: str = typer.Option(default("refine_target"), "--refine-target", help="What --refine fits each layer to: residual (the source model's residual stream after the layer's attention, so that a layer also undoes the drift of the layers before it) or local (the source layer's output on the converted inputs)."),
    refine_output: bool = typer.Option(default("refine_output"), "--refine-o-proj/--no-refine-o-proj", help="Whether --refine also trains o_proj's weight."),
    output_bias: bool = typer.Option(default("output_bias"), "--output-bias/--no-output-bias", help="whiten: move the mean value error into an o_proj bias (--no-output-bias: fit it in the latent instead, as stock DeepSeek-V3 serving needs; implied by --format deepseek)."),
    export_format: str = typer.Option("ours", "--format", help="ours (the transmla format) or deepseek (stock DeepSeek-V3 for vLLM, SGLang and transformers; one rotary component per frequency; see docs/serving.md)."),
) -> None:
    """Convert MODEL to latent attention and write a checkpoint that transformers loads."""
    values = dict(ctx.params)
    if recipe is not None:
        from .recipes import apply_recipe

        values = apply_recipe(ctx, recipe, values)
    from .heal import heal_options_for_convert, print_heal_result  # after this module, so `convert` is listed first

    options = convert_options(values)
    heal = heal_options_for_convert(values["heal_tokens"], values["heal_data"], values["overwrite"])
    if values["export_format"] not in EXPORT_FORMATS:
        raise TransMLAError(f"--format {values['export_format']!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if values["export_format"] == "deepseek":
        from transmla.export_deepseek import ExportOptions
        from transmla.workflows import convert_deepseek

        from .export import print_export_report

        export = ExportOptions(max_shard_bytes=options.max_shard_bytes, overwrite=values["overwrite"])
        report = convert_deepseek(values["model"], values["out"], options, export, heal_options=heal)
        if report is not None:
            print_export_report(report)
        return
    if heal is not None:
        from transmla.workflows import convert_and_heal

        print_heal_result(convert_and_heal(values["model"], values["out"], options, heal))
        return
    from transmla.convert import convert as run_convert

    console.print(f"wrote {run_convert(values['model'], values['out'], options)}")


def convert_options(values: dict[str, Any]) -> ConvertOptions:
    """ConvertOptions from the command's (or the recipe's) values."""
    fold = str(values["freqfold"])
    if fold != "auto" and not fold.isdigit():
        raise TransMLAError(f"--freqfold {fold!r} must be a positive integer or auto")
    return ConvertOptions(
        kv_lora_rank=values["kv_lora_rank"], rope_dim=values["rope_dim"], method=values["method"],
        dtype=values["dtype"], device=resolve_device(values["device"]), rope_context=values["rope_context"],
        rope_per_frequency=values["rope_per_frequency"], max_shard_bytes=int(values["max_shard_size"] * 2**30),
        overwrite=values["overwrite"], calib_sources=source_specs(values["calib_source"], values["calib_file"], values["calib_dataset"]), calib_samples=values["calib_samples"],
        calib_temperature=values["calib_temperature"],
        calib_seq_len=values["calib_seq_len"], calib_seed=values["calib_seed"], calib_offload=values["calib_offload"],
        score_weight=float(values["score_weight"]), rope_select=values["rope_select"],
        freqfold=fold if fold == "auto" else int(fold), rank_allocation=values["rank_allocation"],
        kv_budget=values["kv_budget"], refine_steps=values["refine"], refine_lr=values["refine_lr"],
        refine_target=values["refine_target"], refine_output=values["refine_output"],
        output_bias=values["output_bias"],
    )
