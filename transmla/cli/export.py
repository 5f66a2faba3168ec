"""`transmla export`: a converted checkpoint in another model format (see docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from transmla.errors import TransMLAError
from transmla.export_deepseek.export import ExportOptions, default

from .app import app, console, friendly_errors, resolve_device


EXPORT_TARGETS = ("deepseek",)


def check_export_format(name: str) -> None:
    """Export writes other formats only: the transmla one (`--format ours`) is what `transmla convert` writes."""
    if name not in EXPORT_TARGETS:
        raise TransMLAError(f"export writes --format {' or '.join(EXPORT_TARGETS)} only, not {name!r}: the transmla "
                            "format (ours) is what `transmla convert` writes, so a converted folder needs no export to it")


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
    latent_norm: str = typer.Option(default("latent_norm"), "--latent-norm", help="DeepSeek's latent RMSNorm: exact (made a fixed scale, no data) or calibrated (fitted on --calib-text, ordinary weight sizes)."),
    calib_text: Optional[Path] = typer.Option(None, "--calib-text", help="UTF-8 text for --latent-norm calibrated."),
    calib_windows: int = typer.Option(default("calib_windows"), "--calib-windows", help="Calibration windows."),
    calib_seq_len: int = typer.Option(default("calib_seq_len"), "--calib-seq-len", help="Tokens per calibration window."),
    device: str = typer.Option("auto", "--device", help="Where calibration runs: cpu, cuda, auto."),
    rope_interleave: bool = typer.Option(default("rope_interleave"), "--rope-interleave/--no-rope-interleave", help="Interleaved rotary pairs, as DeepSeek's checkpoints, vLLM and SGLang expect."),
    kv_lora_rank: Optional[int] = typer.Option(None, "--kv-lora-rank", "-r", help="Pad the latent with zero channels to this width (exact; e.g. 512, which the fastest MLA kernels need)."),
    dtype: str = typer.Option(default("dtype"), "--dtype", help="Output dtype: auto (the folder's), float32, bfloat16, float16."),
    max_shard_size: float = typer.Option(default("max_shard_bytes") / 2**30, "--max-shard-size", help="Largest output shard, in GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out folder."),
) -> None:
    """Write a converted checkpoint in another model format (see docs/serving.md)."""
    from transmla.export_deepseek import export_deepseek
    from transmla.io.output_dir import check_output_dir
    from transmla.io.source import check_converted

    check_export_format(export_format)
    options = ExportOptions(
        latent_norm=latent_norm, rope_interleave=rope_interleave, dtype=dtype, kv_lora_rank=kv_lora_rank,
        calib_text=str(calib_text) if calib_text else None, calib_windows=calib_windows, calib_seq_len=calib_seq_len,
        device=resolve_device(device), max_shard_bytes=int(max_shard_size * 2**30), overwrite=overwrite,
    )
    options.check()
    check_converted(folder)
    check_output_dir(out, overwrite)
    print_export_report(export_deepseek(folder, out, options))
