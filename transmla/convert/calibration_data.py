"""The calibration tokens of a calibrated conversion, from the text the options name."""

from __future__ import annotations

import torch

from transmla.data.text import calibration_windows, load_text
from transmla.io.source import Source

from .options import ConvertOptions


def calibration_ids(source: Source, options: ConvertOptions) -> torch.LongTensor:
    """[calib_samples, calib_seq_len] token windows of the calibration file or dataset (validation split)."""
    tokenizer = source.require_tokenizer("calibration text")
    text = load_text(text_file=options.calib_file, dataset=options.calib_dataset,
                     split="validation" if options.calib_dataset else "test")
    return calibration_windows(tokenizer, text, options.calib_seq_len, options.calib_samples, seed=options.calib_seed)
