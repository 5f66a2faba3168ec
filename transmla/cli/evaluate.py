"""`transmla eval` and `transmla inspect`: perplexity side by side, and the cache geometry before and after."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from transmla.errors import TransMLAError
from transmla.evaluate import EvalOptions, default

from .app import app, console, friendly_errors, resolve_device


@app.command()
@friendly_errors
def inspect(
    model: str = typer.Argument(..., help="Source model or converted folder."),
    kv_lora_rank: Optional[int] = typer.Option(None, "--kv-lora-rank", "-r", help="Latent width R of a planned conversion."),
    rope_dim: Optional[int] = typer.Option(None, "--rope-dim", "-d", help="Width D of the shared RoPE key of a planned conversion (default: 64, or all key dims if fewer)."),
    bytes_per_value: int = typer.Option(2, "--bytes-per-value", help="Cache element size (2 for bf16/fp16)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print the attention geometry and KV-cache size per token, before and after conversion."""
    from transmla.inspection import inspect_model

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
    seq_len: int = typer.Option(default("seq_len"), "--seq-len", help="Window length in tokens (non-overlapping windows)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Evaluate only the first N windows."),
    batch_size: int = typer.Option(default("batch_size"), "--batch-size", help="Windows per forward pass (more is faster, and needs more memory)."),
    dtype: str = typer.Option(default("dtype"), "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, auto."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
) -> None:
    """Perplexity over non-overlapping windows, KV bytes per token, and the change against --compare."""
    from transmla.data.text import load_text
    from transmla.evaluate import evaluate_models, format_table
    from transmla.io.converted import parse_dtype
    from transmla.io.source import load_model, resolve

    EvalOptions(seq_len, max_windows, batch_size, dtype).check()
    torch_dtype = parse_dtype(dtype, allow_auto=False)
    target = resolve_device(device)
    text = load_text(text_file=text_file, dataset=dataset)
    if not text.strip():
        raise TransMLAError(f"the evaluation text ({text_file or dataset}) is empty: give a text of at least --seq-len {seq_len} tokens")
    names = ([compare] if compare else []) + [model]
    for name in names:
        resolve(name)
    models = {name: load_model(name, dtype=torch_dtype, device=target) for name in names}
    rows = evaluate_models(models, text, seq_len, max_windows=max_windows, batch_size=batch_size, progress=sys.stderr.isatty())
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(format_table(rows))
