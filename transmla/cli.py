"""The `transmla` command line: convert, inspect and evaluate."""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import TransMLAError

app = typer.Typer(
    help="Convert multi-head / grouped-query attention checkpoints to Multi-head Latent Attention (MLA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Tables are wide; keep them readable when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)


def friendly_errors(command: Callable) -> Callable:
    """Turn TransMLAError and disk failures into one line on stderr and exit code 1; Ctrl-C, SIGTERM and
    SIGHUP clean up and exit with 128 + the signal's number."""
    from .failures import disk_error_line, exit_code, terminate_as_interrupt

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with terminate_as_interrupt():
                return command(*args, **kwargs)
        except TransMLAError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            if (line := disk_error_line(exc)) is None:
                raise
            err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            err_console.print("interrupted: nothing was written")
            raise typer.Exit(exit_code(exc)) from None

    return wrapper


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TransMLAError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise TransMLAError(f"--device {device!r} is not one of cpu, cuda, auto")
    return device


@app.command()
@friendly_errors
def convert(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Source: hub id, local folder (safetensors), .gguf file, or smollm2-135m."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML file of convert options (recipes/); flags given here override it."),
    kv_lora_rank: Optional[int] = typer.Option(None, "--kv-lora-rank", "-r", help="Latent width R cached per token and layer [default: half the source's KV cache minus the RoPE key]."),
    rope_dim: Optional[int] = typer.Option(None, "--rope-dim", "-d", help="Width D of the decoupled RoPE key shared by all heads (even) [default: 64, or all key dims if fewer]."),
    method: str = typer.Option("svd", "--method", help="Factorisation: svd (weights only, no data); pca (TransMLA's balanced-KV PCA of calibration activations); whiten (covariance-aware: score and output errors on calibration data)."),
    rope_context: int = typer.Option(16, "--rope-context", help="Weights-only methods: the attention distances (0..N) over which dropping a rotation is costed; calibrated methods measure them."),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (the source's), float32, bfloat16, float16."),
    device: str = typer.Option("auto", "--device", help="Where the math runs: cpu, cuda, auto."),
    max_shard_size: float = typer.Option(5.0, "--max-shard-size", help="Largest output shard, in GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
    heal_tokens: Optional[str] = typer.Option(None, "--heal-tokens", help="Then heal with this many training tokens (e.g. 2M); see `transmla heal`."),
    heal_data: Optional[str] = typer.Option(None, "--heal-data", help="Healing text: a text file, a dataset name (wikitext2, c4, owner/name), or self-distill."),
    rope_per_frequency: bool = typer.Option(False, "--rope-per-frequency", help="Keep one rotary component of each of the D/2 fastest frequencies, so that `transmla export --format deepseek` can express the checkpoint (implied by --format deepseek)."),
    calib_file: Optional[Path] = typer.Option(None, "--calib-file", help="Calibration text (UTF-8) for --method pca/whiten."),
    calib_dataset: Optional[str] = typer.Option(None, "--calib-dataset", help="Calibration text from a dataset (wikitext2, c4; validation split)."),
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration sequences."),
    calib_seq_len: int = typer.Option(512, "--calib-seq-len", help="Tokens per calibration sequence."),
    calib_offload: str = typer.Option("auto", "--calib-offload", help="Calibration hidden states: auto (to a memory-mapped file beside --out when they do not fit in memory), never, always."),
    rope_select: str = typer.Option("rotate", "--rope-select", help="Rotary key: rotate (per-frequency head mixing), norm (MHA2MLA 2-norm), high-freq, uniform."),
    freqfold: str = typer.Option("1", "--freqfold", help="Fold N adjacent frequencies into one mixing (rotate), or auto (per layer, on the calibration loss)."),
    score_weight: float = typer.Option(30.0, "--score-weight", help="whiten: weight of the attention-score error against the attention-output error."),
    rank_allocation: str = typer.Option("uniform", "--rank-allocation", help="uniform, or energy: the same total latent width spread over layers by water-filling."),
    kv_budget: Optional[float] = typer.Option(None, "--kv-budget", help="Fraction of the source's KV cache to keep (e.g. 0.5): picks D (unless --rope-dim) and R on a calibration loss proxy; R per layer with --rank-allocation energy."),
    export_format: str = typer.Option("ours", "--format", help="ours (the transmla format) or deepseek (stock DeepSeek-V3 for vLLM, SGLang and transformers; one rotary component per frequency; see docs/serving.md)."),
) -> None:
    """Convert MODEL to latent attention and write a checkpoint that transformers loads."""
    from .convert import ConvertOptions, convert as run_convert

    if recipe is not None:
        from .recipes import apply_recipe

        given = {k: v for k, v in locals().items() if k not in ("ctx", "recipe", "ConvertOptions", "run_convert")}
        merged = apply_recipe(ctx, recipe, given)
        # Rebind every option from the merged values.
        (kv_lora_rank, rope_dim, method, rope_context, dtype, device, max_shard_size, overwrite) = (
            merged[k] for k in ("kv_lora_rank", "rope_dim", "method", "rope_context", "dtype", "device", "max_shard_size", "overwrite")
        )
    options = ConvertOptions(
        kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, method=method, dtype=dtype, device=resolve_device(device),
        rope_context=rope_context, max_shard_bytes=int(max_shard_size * 2**30), overwrite=overwrite,
        rope_per_frequency=rope_per_frequency if recipe is None else merged["rope_per_frequency"],
        **calibration_options(locals() if recipe is None else merged),
    )
    if recipe is not None:
        export_format = merged["export_format"]
    if export_format != "ours":
        convert_to_deepseek(model, out, options, export_format, heal_tokens, heal_data, overwrite)
        return
    if heal_tokens is not None:
        from .heal import convert_and_heal, heal_data_options

        print_heal_result(convert_and_heal(model, out, options, heal_data_options(heal_tokens, heal_data, overwrite)))
        return
    path = run_convert(model, out, options)
    console.print(f"wrote {path}")


def calibration_options(values: dict) -> dict:
    """The calibrated-conversion fields of ConvertOptions from the command's (or the recipe's) values."""
    fold = str(values["freqfold"])
    if fold != "auto" and not fold.isdigit():
        raise TransMLAError(f"--freqfold {fold!r} must be a positive integer or auto")
    calib_file = values["calib_file"]
    return {
        "calib_file": None if calib_file is None else str(calib_file), "calib_dataset": values["calib_dataset"],
        "calib_samples": values["calib_samples"], "calib_seq_len": values["calib_seq_len"],
        "calib_offload": values.get("calib_offload", "auto"), "score_weight": float(values.get("score_weight", 30.0)),
        "rope_select": values["rope_select"], "freqfold": fold if fold == "auto" else int(fold),
        "rank_allocation": values["rank_allocation"], "kv_budget": values["kv_budget"],
    }


def check_export_format(name: str) -> None:
    if name != "deepseek":
        raise TransMLAError(f"--format {name!r} is not one of ours, deepseek")


def convert_to_deepseek(model: str, out: Path, options, export_format: str, heal_tokens: Optional[str],
                        heal_data: Optional[str], overwrite: bool) -> None:
    """`convert --format deepseek`: convert (and heal) into a work folder, then export."""
    from .export_deepseek import ExportOptions, convert_deepseek

    check_export_format(export_format)
    heal_options = None
    if heal_tokens is not None:
        from .heal import heal_data_options

        heal_options = heal_data_options(heal_tokens, heal_data, overwrite)
    export = ExportOptions(max_shard_bytes=options.max_shard_bytes, overwrite=overwrite)
    report = convert_deepseek(model, out, options, export, heal_options=heal_options)
    if report is not None:
        print_export_report(report)


def print_export_report(report) -> None:
    console.print(
        f"wrote {report.out}: DeepSeek-V3, kv_lora_rank {report.kv_lora_rank}, rope_theta {report.rope_theta:g}, "
        f"latent norm {report.latent_norm} (latent error {report.latent_error:.2g})"
    )
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


@app.command()
@friendly_errors
def export(
    folder: Path = typer.Argument(..., help="Converted folder (from `transmla convert` or `transmla heal`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    export_format: str = typer.Option("deepseek", "--format", help="Target format: deepseek (DeepSeek-V3 for vLLM, SGLang and stock transformers)."),
    latent_norm: str = typer.Option("exact", "--latent-norm", help="DeepSeek's latent RMSNorm: exact (made a fixed scale, no data) or calibrated (fitted on --calib-text, ordinary weight sizes)."),
    calib_text: Optional[Path] = typer.Option(None, "--calib-text", help="UTF-8 text for --latent-norm calibrated."),
    calib_windows: int = typer.Option(8, "--calib-windows", help="Calibration windows."),
    calib_seq_len: int = typer.Option(512, "--calib-seq-len", help="Tokens per calibration window."),
    device: str = typer.Option("auto", "--device", help="Where calibration runs: cpu, cuda, auto."),
    rope_interleave: bool = typer.Option(True, "--rope-interleave/--no-rope-interleave", help="Interleaved rotary pairs, as DeepSeek's checkpoints, vLLM and SGLang expect."),
    kv_lora_rank: Optional[int] = typer.Option(None, "--kv-lora-rank", "-r", help="Pad the latent with zero channels to this width (exact; e.g. 512, which the fastest MLA kernels need)."),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (the folder's), float32, bfloat16, float16."),
    max_shard_size: float = typer.Option(5.0, "--max-shard-size", help="Largest output shard, in GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
) -> None:
    """Write a converted checkpoint in another model format (see docs/serving.md)."""
    from .export_deepseek import ExportOptions, export_deepseek

    check_export_format(export_format)
    options = ExportOptions(
        latent_norm=latent_norm, rope_interleave=rope_interleave, dtype=dtype, kv_lora_rank=kv_lora_rank,
        calib_text=str(calib_text) if calib_text else None, calib_windows=calib_windows, calib_seq_len=calib_seq_len,
        device=resolve_device(device),
        max_shard_bytes=int(max_shard_size * 2**30), overwrite=overwrite,
    )
    print_export_report(export_deepseek(folder, out, options))


@app.command()
@friendly_errors
def inspect(
    model: str = typer.Argument(..., help="Source model or converted folder."),
    kv_lora_rank: Optional[int] = typer.Option(None, "--kv-lora-rank", "-r", help="Latent width R of a planned conversion."),
    rope_dim: Optional[int] = typer.Option(None, "--rope-dim", "-d", help="Width D of the shared RoPE key of a planned conversion [default: 64, or all key dims if fewer]."),
    bytes_per_value: int = typer.Option(2, "--bytes-per-value", help="Cache element size (2 for bf16/fp16)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print the attention geometry and KV-cache size per token, before and after conversion."""
    from .inspection import inspect_model

    report = inspect_model(model, kv_lora_rank, rope_dim, bytes_per_value)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{model}: KV cache per token")
    for column in ("layer", "heads", "kv heads", "head dim", "values before", "R", "D", "values after"):
        table.add_column(column, justify="right")
    for row in report["layers"]:
        table.add_row(*(str(row[k]) for k in ("layer", "heads", "kv_heads", "head_dim", "values_before", "R", "D", "values_after")))
    console.print(table)
    console.print(
        f"bytes per token (all layers, {bytes_per_value} B/value): before {report['bytes_before']:,}, "
        f"after {report['bytes_after']:,}; compression {report['compression']:.2f}x"
    )


@app.command(name="eval")
@friendly_errors
def evaluate(
    model: str = typer.Argument(..., help="Converted folder or any source model."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Baseline model to evaluate side by side (e.g. the original)."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Evaluate on this UTF-8 text file (offline)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Evaluate on a hub dataset: wikitext2 or c4."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Window length in tokens (non-overlapping windows)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Evaluate only the first N windows."),
    batch_size: int = typer.Option(1, "--batch-size"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, auto."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
) -> None:
    """Perplexity over non-overlapping windows, KV bytes per token, and the change against --compare."""
    import torch

    from .data import load_text
    from .evaluate import evaluate_models, format_table
    from .source import load_model

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise TransMLAError(f"--dtype {dtype!r} is not one of {', '.join(dtypes)}")
    text = load_text(text_file=text_file, dataset=dataset)
    target = resolve_device(device)
    models = {}
    for name in ([compare] if compare else []) + [model]:
        models[name] = load_model(name, dtype=dtypes[dtype], device=target)
    rows = evaluate_models(models, text, seq_len, max_windows=max_windows, batch_size=batch_size, progress=sys.stderr.isatty())
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(format_table(rows))


@app.command()
@friendly_errors
def heal(
    folder: Path = typer.Argument(..., help="Converted folder (from `transmla convert`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the healed model (written atomically)."),
    tokens: str = typer.Option(..., "--tokens", "-n", help="Training tokens, e.g. 2M or 500k."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Train on this UTF-8 text file."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Train on a hub dataset: wikitext2, c4 or owner/name[:config] (text column)."),
    self_distill: bool = typer.Option(False, "--self-distill", help="Train on text sampled from the teacher (no data needed)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Original model (default: the folder's source_model)."),
    train: str = typer.Option("attention", "--train", help="What trains: attention, latent (kv_a_proj, kv_b_proj) or all."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per packed training window."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per micro-batch and process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate (AdamW, cosine schedule)."),
    warmup: float = typer.Option(0.05, "--warmup", help="Warm-up share of the steps."),
    temperature: float = typer.Option(1.0, "--temperature", help="Distillation temperature."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="Weight of the KL divergence to the teacher."),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="Weight of the cross-entropy on the text, added to the KL."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in the backward pass."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto (bf16 on a GPU), bf16, fp16, no."),
    eval_every: int = typer.Option(0, "--eval-every", help="Steps between validation perplexities (0: before and after only)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints (0: none)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Checkpoint folder (default: OUT.heal-work beside OUT)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its newest checkpoint."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (the folder's), float32, bfloat16, float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out and start a fresh work folder."),
) -> None:
    """Recover quality with a short distillation from the original model (runs under `accelerate launch` too)."""
    from .heal import HealOptions, heal as run_heal
    from .heal_data import parse_tokens

    options = HealOptions(
        tokens=parse_tokens(tokens), text_file=str(text_file) if text_file else None, dataset=dataset,
        self_distill=self_distill, teacher=teacher, train=train, seq_len=seq_len, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, warmup=warmup, temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, eval_every=eval_every,
        checkpoint_every=checkpoint_every, work_dir=str(work_dir) if work_dir else None, resume=resume, seed=seed,
        dtype=dtype, overwrite=overwrite,
    )
    print_heal_result(run_heal(folder, out, options))


def print_heal_result(result) -> None:
    """One summary line per healing run (main process only)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        console.print(
            f"wrote {result.out}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s; validation "
            f"perplexity {result.before_perplexity:.3f} -> {result.after_perplexity:.3f} (teacher {result.teacher_perplexity:.3f})"
        )


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
