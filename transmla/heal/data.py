"""Training text for healing: a mixture of text sampled from the teacher (the default: no data needed, and no
narrowing to one corpus), text files and hub datasets, packed into fixed-length windows with a held-out
validation share from every source."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transmla.data.text import hub_documents, load_text
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


def _hub_documents(name: str, max_chars: int) -> Iterator[str]:
    """Stream the train split (unless `name` names one) of a hub dataset, about `max_chars` of it."""
    try:
        yield from hub_documents(name, "train", max_chars)
    except TransMLAError:
        raise
    except Exception as err:  # network, hub or cache failures
        raise TransMLAError(
            f"could not stream dataset {name!r}: {type(err).__name__}: {err}; for offline use pass --text-file"
        ) from err


def text_stream(tokenizer: Any, text_file: str | Path | None, dataset: str | None, max_tokens: int) -> tuple[torch.LongTensor, str]:
    """Token stream of a text file or a hub dataset (exactly one), at most `max_tokens` long, and a description."""
    if text_file is not None:
        text = load_text(text_file=text_file)
        return tokenize_documents(tokenizer, _paragraph_chunks(text), max_tokens), f"file {text_file}"
    name = dataset.lower()
    if name == "wikitext2":
        text = load_text(dataset="wikitext2", split="train")
        return tokenize_documents(tokenizer, _paragraph_chunks(text), max_tokens), "wikitext2 (train)"
    repo = {"c4": "allenai/c4:en"}.get(name, dataset)
    if "/" not in repo:
        raise TransMLAError(f"unknown dataset {dataset!r}; use wikitext2, c4, a hub id such as owner/name[:config[:split]], or --text-file")
    docs = _hub_documents(repo, max_tokens * CHARS_PER_TOKEN)
    return tokenize_documents(tokenizer, docs, max_tokens, separator=tokenizer.eos_token_id), f"dataset {repo} (train)"


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


def build_windows(options: Any, tokenizer: Any, teacher: Any, teacher_id: dict[str, Any], accelerator: Any,
                  progress: bool) -> Windows:
    """Training and validation windows of the options' mixture: each source gives its weight's share of the
    windows (teacher samples repeated to fill their share when `sampled_tokens` is smaller) and of the held-out
    validation windows (always unique)."""
    from transmla.data.mixture import describe, shares

    mixture = options.sources()
    n_val = val_window_count(options.tokens, options.seq_len, options.val_fraction, options.max_val_windows)
    counts = shares(mixture, math.ceil(options.tokens / options.seq_len) + n_val)
    train, validation = [], []
    for source, count, held_out in zip(mixture, counts, shares(mixture, n_val)):
        if source.kind == "self":
            wanted = min(count, math.ceil(options.sampled_tokens / options.seq_len) + held_out)
            unique = teacher_windows(options, teacher, teacher_id, accelerator, wanted, progress)
        else:
            stream, _ = text_stream(tokenizer, source.value if source.kind == "file" else None,
                                    source.value if source.kind == "dataset" else None, count * options.seq_len)
            unique = pack(stream, options.seq_len)
        if len(unique) <= held_out:
            raise TransMLAError(f"the training text ({source.label}) gives {len(unique)} windows of {options.seq_len} tokens, "
                                f"too few to hold {held_out} out for validation; give more text or a shorter --seq-len")
        keep = len(unique) - held_out
        train.append(unique[torch.arange(count - held_out) % keep])  # repeated to fill the source's share
        validation.append(unique[keep:])
    return Windows(torch.cat(train), torch.cat(validation), describe(mixture))


def teacher_windows(options: Any, teacher: Any, teacher_id: dict[str, Any], accelerator: Any, windows: int,
                    progress: bool) -> torch.LongTensor:
    """`windows` training windows packed from teacher samples of `sample_len` tokens (each from the start token),
    sampled across processes and cached in the user cache."""
    from transmla.data.sampling import Draw, cached_samples

    docs = math.ceil(windows * options.seq_len / options.sample_len)
    share = math.ceil(docs / accelerator.num_processes)
    draw = Draw(options.sample_len, options.seed + 1000 * accelerator.process_index, options.sample_temperature)
    dtype = next(teacher.parameters()).dtype
    mine, _ = cached_samples("heal", teacher_id, teacher.config, lambda: teacher, accelerator.device, dtype, share, draw,
                             progress and accelerator.is_local_main_process, "sampling text from the teacher")
    return pack(accelerator.gather(mine.to(accelerator.device)).cpu()[:docs].reshape(-1), options.seq_len)


def pack(stream: torch.LongTensor, seq_len: int) -> torch.LongTensor:
    """Consecutive windows [N, seq_len] of a token stream (the tail dropped)."""
    count = stream.numel() // seq_len
    return stream[: count * seq_len].view(count, seq_len).clone()
