"""Training text for healing: loading it, packing it into fixed-length windows with a held-out validation split,
and sampling text from the teacher when there is none."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transmla.data.text import load_text
from transmla.errors import TransMLAError

CHUNK_CHARS = 1 << 20  # text tokenised at a time, cut at paragraph breaks
CHARS_PER_TOKEN = 8  # generous upper bound used to stop streaming a hub dataset


@dataclass
class Windows:
    """Packed token windows [N, seq_len] for training and a held-out tail for validation."""

    train: torch.LongTensor
    validation: torch.LongTensor
    source: str

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def parse_tokens(value: str | int) -> int:
    """A token count such as `500000`, `500k`, `2M` or `1.5B`."""
    if isinstance(value, int):
        count = value
    else:
        text = value.strip().lower().replace("_", "").replace(",", "")
        scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(text[-1:], 1)
        try:
            count = int(float(text[:-1] if scale > 1 else text) * scale)
        except ValueError:
            raise TransMLAError(f"token count {value!r} is not a number; write e.g. 500000, 500k or 2M") from None
    if count < 1:
        raise TransMLAError(f"token count must be positive, got {value!r}")
    return count


def _paragraph_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Pieces of about `size` characters, cut just after a blank line where there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        yield text[start:end]
        start = end


def tokenize_documents(
    tokenizer: Any, documents: Iterable[str], max_tokens: int | None, separator: int | None = None
) -> torch.LongTensor:
    """One token stream from documents (joined by `separator` where given), stopping after `max_tokens`."""
    pieces: list[torch.Tensor] = []
    total = 0
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        if separator is not None and pieces:
            ids = [separator, *ids]
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def _hub_documents(name: str, max_chars: int, column: str = "text") -> Iterator[str]:
    """Stream the train split of a hub dataset (`owner/name` or `owner/name:config`), about `max_chars` of it."""
    try:
        from datasets import load_dataset

        repo, _, config = name.partition(":")
        rows = load_dataset(repo, config or None, split="train", streaming=True)
        seen = 0
        for row in rows:
            if column not in row:
                raise TransMLAError(f"dataset {name!r} has no {column!r} column (columns: {', '.join(row)})")
            text = row[column]
            if text and text.strip():
                yield text
                seen += len(text)
                if seen >= max_chars:
                    return
    except TransMLAError:
        raise
    except Exception as err:  # network, hub or cache failures
        raise TransMLAError(
            f"could not stream dataset {name!r}: {type(err).__name__}: {err}; for offline use pass --text-file"
        ) from err


def text_stream(tokenizer: Any, text_file: str | Path | None, dataset: str | None, max_tokens: int) -> tuple[torch.LongTensor, str]:
    """Token stream of a text file or a hub dataset, at most `max_tokens` long, and a description of it."""
    if (text_file is None) == (dataset is None):
        raise TransMLAError("give exactly one source of training text: --text-file, --dataset or --self-distill")
    if text_file is not None:
        text = load_text(text_file=text_file)
        return tokenize_documents(tokenizer, _paragraph_chunks(text), max_tokens), f"file {text_file}"
    name = dataset.lower()
    if name == "wikitext2":
        text = load_text(dataset="wikitext2", split="train")
        return tokenize_documents(tokenizer, _paragraph_chunks(text), max_tokens), "wikitext2 (train)"
    repo = {"c4": "allenai/c4:en"}.get(name, dataset)
    if "/" not in repo:
        raise TransMLAError(f"unknown dataset {dataset!r}; use wikitext2, c4, a hub id such as owner/name[:config], or --text-file")
    docs = _hub_documents(repo, max_tokens * CHARS_PER_TOKEN)
    return tokenize_documents(tokenizer, docs, max_tokens, separator=tokenizer.eos_token_id), f"dataset {repo} (train)"


def split_windows(stream: torch.LongTensor, seq_len: int, val_fraction: float, max_val_windows: int, source: str) -> Windows:
    """Pack a token stream into windows; the last windows (a `val_fraction` share, 1..max_val_windows) are held out."""
    if seq_len < 2:
        raise TransMLAError(f"--seq-len {seq_len} is too short; use at least 2 tokens")
    count = stream.numel() // seq_len
    if count < 2:
        raise TransMLAError(
            f"the training text ({source}) has {stream.numel()} tokens: at least two windows of {seq_len} are needed "
            "(one to train on, one to validate); give more text or a shorter --seq-len"
        )
    val = min(max_val_windows, max(1, round(count * val_fraction)), count - 1)
    windows = stream[: count * seq_len].view(count, seq_len)
    return Windows(windows[: count - val].clone(), windows[count - val :].clone(), source)


def val_window_count(train_tokens: int, seq_len: int, val_fraction: float, max_val_windows: int) -> int:
    """How many validation windows to hold out beside enough windows for `train_tokens`."""
    train = math.ceil(train_tokens / seq_len)
    return min(max_val_windows, max(1, math.ceil(train * val_fraction)))


class WindowStream:
    """Deterministic micro-batches: epoch e visits the windows in a permutation seeded by (seed, e).

    Global micro-batch b (counted over all processes) holds samples b*micro .. (b+1)*micro-1 of that endless
    shuffled sequence; process `rank` of `world` takes micro-batches rank, rank+world, ... Any step can be resumed
    from its index alone.
    """

    def __init__(self, windows: torch.LongTensor, micro_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.windows = windows
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # a batch may straddle two epochs
            self._perms[epoch] = torch.randperm(len(self.windows), generator=generator)
        return self._perms[epoch]

    def batch(self, micro_step: int) -> torch.LongTensor:
        """This process's micro-batch number `micro_step` (0-based)."""
        first = (micro_step * self.world + self.rank) * self.micro_batch
        n = len(self.windows)
        rows = [self._perm(g // n)[g % n] for g in range(first, first + self.micro_batch)]
        return self.windows[torch.stack(rows)]

    def epochs(self, micro_steps: int) -> float:
        """Passes over the training windows that `micro_steps` micro-batches per process make."""
        return micro_steps * self.world * self.micro_batch / len(self.windows)
