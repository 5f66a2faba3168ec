"""`transmla heal`: its flags (defaults from HealOptions) and the healing options of `convert --heal-tokens`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from transmla.data.mixture import loose_spec, source_specs
from transmla.heal.data import parse_tokens
from transmla.heal.options import HealOptions, HealResult, default

from .app import app, console, friendly_errors


@app.command()
@friendly_errors
def heal(
    folder: Path = typer.Argument(..., help="Converted folder (from `transmla convert`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the healed model (written atomically)."),
    tokens: str = typer.Option(..., "--tokens", "-n", help="Training tokens, e.g. 2M or 500k."),
    data: list[str] = typer.Option([], "--data", help="Training text, repeatable: self (sampled from the teacher: the default, no data needed), file:PATH or dataset:NAME, each optionally @WEIGHT (e.g. --data self@3 --data file:chat.txt)."),
    text_file: list[Path] = typer.Option([], "--text-file", help="Train on this UTF-8 text file; repeatable; the same as --data file:PATH."),
    dataset: list[str] = typer.Option([], "--dataset", help="Train on a hub dataset: wikitext2, c4 or owner/name[:config[:split]] (text column); repeatable."),
    self_distill: bool = typer.Option(False, "--self-distill", help="Add text sampled from the teacher to the mixture (the default when no text is given)."),
    sample_len: int = typer.Option(default("sample_len"), "--sample-len", help="Tokens per teacher sample (packed into training windows)."),
    sampled_tokens: str = typer.Option(str(default("sampled_tokens")), "--sampled-tokens", help="Unique teacher tokens at most, e.g. 1M; a longer run repeats them."),
    sample_temperature: float = typer.Option(default("sample_temperature"), "--sample-temperature", help="Sampling temperature of the teacher's text."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Original model (default: the folder's source_model)."),
    train: str = typer.Option(default("train"), "--train", help="What trains: attention, latent (kv_a_proj, kv_b_proj) or all."),
    seq_len: int = typer.Option(default("seq_len"), "--seq-len", help="Tokens per packed training window."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per micro-batch and process (default: 8 on a GPU, 4 on a CPU)."),
    grad_accum: int = typer.Option(default("grad_accum"), "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(default("lr"), "--lr", help="Peak learning rate (AdamW, cosine schedule)."),
    warmup: float = typer.Option(default("warmup"), "--warmup", help="Warm-up share of the steps."),
    temperature: float = typer.Option(default("temperature"), "--temperature", help="Distillation temperature."),
    kl_weight: float = typer.Option(default("kl_weight"), "--kl-weight", help="Weight of the KL divergence to the teacher."),
    ce_weight: float = typer.Option(default("ce_weight"), "--ce-weight", help="Weight of the cross-entropy on the text, added to the KL."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in the backward pass (default: on a GPU only where the activations would not fit in half its free memory; always on a CPU)."),
    mixed_precision: str = typer.Option(default("mixed_precision"), "--mixed-precision", help="auto (bf16 on a GPU), bf16, fp16, no."),
    eval_every: int = typer.Option(default("eval_every"), "--eval-every", help="Steps between validation perplexities (0: before and after only)."),
    checkpoint_every: int = typer.Option(default("checkpoint_every"), "--checkpoint-every", help="Steps between checkpoints (0: none)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Checkpoint folder (default: OUT.heal-work beside OUT)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its newest checkpoint."),
    seed: int = typer.Option(default("seed"), "--seed"),
    dtype: str = typer.Option(default("dtype"), "--dtype", help="Output dtype: auto (the folder's), float32, bfloat16, float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out and start a fresh work folder."),
) -> None:
    """Recover quality with a short distillation from the original model (runs under `accelerate launch` too)."""
    from transmla.data.text import require_hub
    from transmla.heal import heal as run_heal
    from transmla.io.output_dir import check_output_dir
    from transmla.io.source import check_converted

    options = HealOptions(
        tokens=parse_tokens(tokens), data=source_specs(data, text_file, dataset, self_distill),
        sample_len=sample_len, sampled_tokens=parse_tokens(sampled_tokens), sample_temperature=sample_temperature,
        teacher=teacher, train=train, seq_len=seq_len, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, warmup=warmup, temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, eval_every=eval_every,
        checkpoint_every=checkpoint_every, work_dir=str(work_dir) if work_dir else None, resume=resume, seed=seed,
        dtype=dtype, overwrite=overwrite,
    )
    check_converted(folder)
    check_output_dir(out, overwrite)
    for source in options.sources():
        if source.kind == "dataset":
            require_hub(source.value)
    print_heal_result(run_heal(folder, out, options))


def print_heal_result(result: HealResult) -> None:
    """One summary line per healing run (main process only)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        console.print(
            f"wrote {result.out}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s; validation "
            f"perplexity {result.before_perplexity:.3f} -> {result.after_perplexity:.3f} (teacher {result.teacher_perplexity:.3f})"
        )


def heal_options_for_convert(tokens: str | None, data: list[str], overwrite: bool = False) -> HealOptions | None:
    """HealOptions for `convert --heal-tokens N [--heal-data X ...]` (None without --heal-tokens): each X is a
    source spec (self, file:PATH, dataset:NAME, @WEIGHT), a text file, a dataset name or `self-distill`."""
    if tokens is None:
        return None
    return HealOptions(tokens=parse_tokens(tokens), data=tuple(map(loose_spec, data)), overwrite=overwrite)
