"""Export a converted checkpoint to the DeepSeek-V3 format that vLLM, SGLang and stock transformers serve."""

from .export import ExportOptions, ExportReport, export_deepseek
from .latent_norm import EXACT_DELTA, STOCK_EPS
from .rotary import match_rotary

__all__ = ["EXACT_DELTA", "STOCK_EPS", "ExportOptions", "ExportReport", "export_deepseek", "match_rotary"]
