"""Perplexity over non-overlapping windows and a side-by-side comparison of models with their KV-cache size."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from .data.text import token_windows
from .defaults import default_of
from .errors import TransMLAError
from .io.converted import parse_dtype
from .kv_cache import kv_values_per_token

LOGIT_CHUNK_ELEMENTS = 1 << 26  # float32 logits converted at a time (256 MiB)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_device(model: Any) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _model_dtype(model: Any) -> torch.dtype:
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None else torch.float32


def _window_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of next-token predictions, log-softmax in float32 over position chunks, result float64."""
    batch, seq_len, vocab = logits.shape
    targets = input_ids[:, 1:].to(logits.device)
    step = max(1, LOGIT_CHUNK_ELEMENTS // (batch * vocab))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, seq_len - 1, step):
        end = min(start + step, seq_len - 1)
        chunk = logits[:, start:end].float().reshape(-1, vocab)
        total += F.cross_entropy(chunk, targets[:, start:end].reshape(-1), reduction="none").double().sum()
    return total


@dataclass
class EvalOptions:
    """Settings of one evaluation."""

    seq_len: int = 2048  # tokens per window (non-overlapping windows)
    max_windows: int | None = None  # None: every window of the text
    batch_size: int = 1  # windows per forward pass
    dtype: str = "float32"

    def check(self) -> None:
        """One clear error for a window length, window count, batch size or dtype that can not be evaluated."""
        if self.seq_len < 2:
            raise TransMLAError(f"--seq-len {self.seq_len} is too short: use at least 2 tokens")
        if self.max_windows is not None and self.max_windows < 1:
            raise TransMLAError(f"--max-windows {self.max_windows} must be at least 1 (or leave it out for all windows)")
        if self.batch_size < 1:
            raise TransMLAError(f"--batch-size {self.batch_size} must be at least 1")
        parse_dtype(self.dtype, allow_auto=False)


def default(name: str) -> Any:
    """The default of one EvalOptions field (for the command line, so that each default is written once)."""
    return default_of(EvalOptions, name)


def perplexity(
    model: Any,
    windows: torch.LongTensor,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) of a causal LM over token windows [N, seq_len], every window scored independently.

    `device` is where the input ids go (default: the device of the model's first parameter); the model is not moved.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise TransMLAError(
            f"windows must be a [N, seq_len] tensor with N >= 1 and seq_len >= 2, got {tuple(windows.shape)}"
        )
    EvalOptions(windows.shape[1], None, batch_size).check()
    device = torch.device(device) if device is not None else _model_device(model)
    count, seq_len = windows.shape
    was_training = getattr(model, "training", False)
    model.eval()
    nll_sum = 0.0
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch", disable=not progress):
                batch = windows[i : i + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                nll_sum += _window_nll_sum(logits, batch).item()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    tokens = count * (seq_len - 1)
    nll = nll_sum / tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=tokens, windows=count, seconds=seconds)


def evaluate_models(
    models: dict[str, tuple[Any, Any]],
    text: str,
    seq_len: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity and KV-cache size of each (model, tokenizer), compared with the first entry (the baseline).

    Rows are plain dicts (JSON-ready): `perplexity_ratio` = perplexity / baseline perplexity, `kv_compression` =
    baseline KV bytes per token / this model's.
    """
    if not models:
        raise TransMLAError("no models to evaluate; pass at least one model")
    EvalOptions(seq_len, max_windows, batch_size).check()
    rows: list[dict[str, Any]] = []
    windows_by_tokenizer: dict[int, torch.LongTensor] = {}
    for name, (model, tokenizer) in models.items():
        if id(tokenizer) not in windows_by_tokenizer:
            windows_by_tokenizer[id(tokenizer)] = token_windows(tokenizer, text, seq_len, max_windows)
        result = perplexity(model, windows_by_tokenizer[id(tokenizer)], batch_size, device, progress)
        dtype = _model_dtype(model)
        values = sum(kv_values_per_token(model.config))
        rows.append(
            {
                "name": name,
                **result.to_dict(),
                "dtype": str(dtype).removeprefix("torch."),
                "kv_values_per_token": values,
                "kv_bytes_per_token": values * dtype.itemsize,
            }
        )
    base = rows[0]
    for row in rows:
        row["perplexity_ratio"] = row["perplexity"] / base["perplexity"]
        row["kv_compression"] = base["kv_bytes_per_token"] / row["kv_bytes_per_token"]
    return rows


def format_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    """A rich table of `evaluate_models` rows."""
    table = Table(title=title)
    headers = ("model", "perplexity", "vs base", "KV values/token", "KV bytes/token", "KV compression", "windows", "seconds")
    for header in headers:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['perplexity']:.4f}",
            f"{row['perplexity_ratio']:.4f}x",
            f"{row['kv_values_per_token']:,}",
            f"{row['kv_bytes_per_token']:,} ({row['dtype']})",
            f"{row['kv_compression']:.2f}x",
            str(row["windows"]),
            f"{row['seconds']:.1f}",
        )
    return table


def table_text(rows: list[dict[str, Any]], title: str | None = None, width: int = 120) -> str:
    """The table of `format_table` as plain text."""
    console = Console(width=width, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(format_table(rows, title))
    return capture.get()
