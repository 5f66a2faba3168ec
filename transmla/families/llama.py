"""Llama 2/3 and SmolLM: the layout every other family is described against (see `base.Family`)."""

from __future__ import annotations

from .base import Family


class Llama(Family):
    model_type = "llama"
    summary = "Llama 2/3 (MHA and GQA, llama3 RoPE scaling), SmolLM"
