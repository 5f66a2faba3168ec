"""The calibration tokens of a calibrated conversion: a mixture of text files, hub datasets and text sampled from
the source model itself (the default: it follows the model's own distribution and needs no data)."""

from __future__ import annotations

import torch

from transmla.data.cache import cached_tokens
from transmla.data.mixture import TextSource, describe, shares
from transmla.data.sampling import TOP_P, sample_windows
from transmla.data.text import calibration_windows, load_text
from transmla.io.source import Source

from .options import ConvertOptions


def calibration_ids(source: Source, options: ConvertOptions, progress: bool = False) -> torch.LongTensor:
    """[calib_samples, calib_seq_len] token windows: each source's share of the samples, in the mixture's order."""
    mixture = options.sources()
    parts = []
    for text_source, count in zip(mixture, shares(mixture, options.calib_samples)):
        if count:
            make = sampled_ids if text_source.kind == "self" else text_ids
            parts.append(make(source, text_source, count, options, progress))
    if progress and len(mixture) > 1:
        print(f"calibration: {options.calib_samples} x {options.calib_seq_len} tokens of {describe(mixture)}")
    return torch.cat(parts)


def check_calibration_text(source: Source, options: ConvertOptions) -> None:
    """Before any work: text sources need the source's tokenizer (sampling from the model needs none)."""
    if options.calibrated and any(s.kind != "self" for s in options.sources()):
        source.require_tokenizer("calibration text")


def text_ids(source: Source, text_source: TextSource, count: int, options: ConvertOptions,
             progress: bool = False) -> torch.LongTensor:
    """`count` windows of a text file or of a hub dataset's validation split."""
    tokenizer = source.require_tokenizer("calibration text")
    if text_source.kind == "file":
        text = load_text(text_file=text_source.value)
    else:
        text = load_text(dataset=text_source.value, split="validation")
    return calibration_windows(tokenizer, text, options.calib_seq_len, count, seed=options.calib_seed)


def sampled_ids(source: Source, text_source: TextSource, count: int, options: ConvertOptions,
                progress: bool = False) -> torch.LongTensor:
    """`count` windows sampled from the source model on `options.device` (cached in the user cache)."""
    key = {"kind": "calibration", "model": source.fingerprint(), "count": count, "seq_len": options.calib_seq_len,
           "seed": options.calib_seed, "temperature": options.calib_temperature, "top_p": TOP_P,
           "dtype": "bfloat16"}

    def make() -> torch.LongTensor:
        on_gpu = str(options.device).startswith("cuda")
        # bfloat16: sampling needs the model's distribution, not float32 logits (1.5x faster on a CPU too)
        model = source.load_model(torch.bfloat16, options.device)
        try:
            return sample_windows(model, count, options.calib_seq_len, 64 if on_gpu else 16, options.calib_seed,
                                  options.calib_temperature, TOP_P, progress=progress,
                                  desc="sampling calibration text")
        finally:
            del model
            if on_gpu:
                torch.cuda.empty_cache()

    return cached_tokens(key, make)
