"""Evaluation and calibration text: loading it and cutting it into token windows."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from transmla.errors import TransMLAError

from .mixture import SELF, TextSource

KNOWN_DATASETS = ("wikitext2", "c4")
C4_CHARS = 2_000_000  # characters of C4 to stream: a few hundred 2048-token windows
HUB_PROBE_SECONDS = 5.0  # how long the hub may take to answer before it counts as unreachable
CHUNK_CHARS = 1 << 20  # text tokenised at a time, cut at paragraph breaks
CHARS_PER_TOKEN = 8  # generous upper bound used to stop streaming a hub dataset


def load_text(text_file: Path | str | None = None, dataset: str | None = None, split: str = "test") -> str:
    """Text from a local UTF-8 file, or from a hub dataset: `wikitext2`, `c4`, or `owner/name[:config[:split]]`
    (its `text` column; the split named there replaces `split`)."""
    if (text_file is None) == (dataset is None):
        raise TransMLAError("give exactly one text source: a text file (--text-file) or a dataset name (--dataset)")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise TransMLAError(f"text file not found: {path}; pass the path of an existing UTF-8 text file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise TransMLAError(f"text file {path} is not UTF-8 ({err}); convert it to UTF-8") from err

    name = dataset.lower()
    if name not in KNOWN_DATASETS and "/" not in dataset:
        raise TransMLAError(f"unknown dataset {dataset!r}; known: {', '.join(KNOWN_DATASETS)} or owner/name[:config[:split]], "
                            "or use a local text file (--text-file, --calib-file)")
    require_hub(dataset)
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        if name == "c4":
            return _load_c4(load_dataset, split)
        return _load_hub_text(dataset, split)
    except TransMLAError:
        raise
    except Exception as err:  # network, hub or cache failures
        raise TransMLAError(
            f"could not load dataset {dataset!r} (split {split!r}): {type(err).__name__}: {err}; "
            "for offline use give a local text file instead (--text-file, --calib-file)"
        ) from err


@lru_cache(maxsize=None)
def hub_reachable(endpoint: str) -> bool:
    """Whether the hub at `endpoint` answers at all (any HTTP status), within HUB_PROBE_SECONDS."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)
    except Exception:  # the HTTP client's connection, DNS, proxy and timeout errors
        return False
    return True


def require_hub(dataset: str) -> None:
    """One line at once where the hub can not be reached, instead of the hub client's retries and then an error;
    in offline mode (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1) the datasets cache answers alone."""
    from datasets import config
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or config.HF_HUB_OFFLINE or hub_reachable(constants.ENDPOINT):
        return
    raise TransMLAError(
        f"dataset {dataset!r} needs the Hugging Face hub ({constants.ENDPOINT}), which can not be reached: for offline "
        "use give a local text file (--text-file, --calib-file or a file:PATH source), or set HF_HUB_OFFLINE=1 to "
        "read a copy already in the cache"
    )


def _load_hub_text(spec: str, split: str) -> str:
    """About C4_CHARS characters of the `text` column of a hub dataset `owner/name[:config[:split]]`."""
    texts = list(hub_documents(spec, split, C4_CHARS))
    if not texts:
        raise TransMLAError(f"dataset {spec!r} has no text in split {split!r}; name another as owner/name:config:split")
    return "\n\n".join(texts)


def hub_documents(spec: str, split: str, max_chars: int, column: str = "text") -> Iterator[str]:
    """Stream the non-empty `column` documents of a hub dataset `owner/name[:config[:split]]` (the split named
    there replaces `split`) until about `max_chars` characters."""
    from datasets import load_dataset

    require_hub(spec)
    repo, config, named_split = (spec.split(":") + ["", ""])[:3]
    seen = 0
    for row in load_dataset(repo, config or None, split=named_split or split, streaming=True):
        if column not in row:
            raise TransMLAError(f"dataset {repo!r} has no {column!r} column (it has: {', '.join(row)}); "
                                "write the text to a file and give that instead (--text-file, --calib-file)")
        text = row[column]
        if text and text.strip():
            yield text
            seen += len(text)
            if seen >= max_chars:
                return


def _load_c4(load_dataset: Any, split: str) -> str:
    """Stream the first C4 (en) documents of a split until about C4_CHARS characters."""
    c4_split = {"test": "validation", "validation": "validation", "train": "train"}.get(split)
    if c4_split is None:
        raise TransMLAError(f"c4 has no split {split!r}; use test (= validation), validation or train")
    texts, total = [], 0
    for row in load_dataset("allenai/c4", "en", split=c4_split, streaming=True):
        texts.append(row["text"])
        total += len(row["text"])
        if total >= C4_CHARS:
            break
    return "\n\n".join(texts)


def tokenize(tokenizer: Any, text: str) -> torch.LongTensor:
    """Token ids of the whole text, without special tokens, as one 1-D tensor.

    The text is tokenised in one call (so the stream matches the usual perplexity harness exactly, with no
    artefacts at chunk boundaries); `verbose=False` silences the tokenizer's max-length warning.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None) -> torch.LongTensor:
    """Consecutive non-overlapping windows [N, seq_len] of the token stream (tail dropped), the first `max_windows`."""
    return _split(tokenize(tokenizer, text), seq_len, max_windows)


def pack(stream: torch.LongTensor, seq_len: int, max_windows: int | None = None) -> torch.LongTensor:
    """Consecutive non-overlapping windows [N, seq_len] of a token stream (the tail dropped; none if it is shorter
    than a window), the first `max_windows`."""
    count = stream.numel() // seq_len if max_windows is None else min(stream.numel() // seq_len, max_windows)
    return stream[: count * seq_len].view(count, seq_len).clone()


def _split(ids: torch.LongTensor, seq_len: int, max_windows: int | None = None) -> torch.LongTensor:
    """`pack`, with one clear error for settings or text that give no window."""
    if seq_len < 2:
        raise TransMLAError(f"sequence length {seq_len} is too short; use at least 2 tokens")
    if ids.numel() < seq_len:
        raise TransMLAError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a longer text or a shorter sequence length"
        )
    if max_windows is not None and max_windows < 1:
        raise TransMLAError(f"max windows must be at least 1, got {max_windows}")
    return pack(ids, seq_len, max_windows)


def calibration_windows(
    tokenizer: Any, text: str, seq_len: int, num_samples: int, seed: int = 0
) -> torch.LongTensor:
    """`num_samples` windows [num_samples, seq_len] drawn with a seeded generator.

    Distinct non-overlapping windows when the text holds enough of them, random (possibly overlapping) starts otherwise.
    """
    if num_samples < 1:
        raise TransMLAError(f"number of calibration samples must be at least 1, got {num_samples}")
    ids = tokenize(tokenizer, text)
    grid = _split(ids, seq_len)
    generator = torch.Generator().manual_seed(seed)
    if num_samples <= grid.shape[0]:
        return grid[torch.randperm(grid.shape[0], generator=generator)[:num_samples]].clone()
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def paragraph_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
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
        ids = tokenize(tokenizer, doc)
        if separator is not None and pieces:
            ids = torch.cat([torch.tensor([separator]), ids])
        pieces.append(ids)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def streamed_documents(name: str, split: str, max_chars: int) -> Iterator[str]:
    """Stream `split` (unless `name` names one) of a hub dataset, about `max_chars` of it."""
    try:
        yield from hub_documents(name, split, max_chars)
    except TransMLAError:
        raise
    except Exception as err:  # network, hub or cache failures
        raise TransMLAError(
            f"could not stream dataset {name!r}: {type(err).__name__}: {err}; for offline use pass --text-file"
        ) from err


def text_stream(tokenizer: Any, source: TextSource, max_tokens: int, split: str = "train") -> torch.LongTensor:
    """Token stream of a text file or of a hub dataset's `split`, at most `max_tokens` long: hub datasets other than
    WikiText-2 are streamed only as far as needed, their documents joined by EOS."""
    if source.kind == "file":
        return tokenize_documents(tokenizer, paragraph_chunks(load_text(text_file=source.value)), max_tokens)
    name = source.value.lower()
    if name == "wikitext2":
        text = load_text(dataset="wikitext2", split=split)
        return tokenize_documents(tokenizer, paragraph_chunks(text), max_tokens)
    repo = {"c4": "allenai/c4:en"}.get(name, source.value)
    if "/" not in repo:
        raise TransMLAError(f"unknown dataset {source.value!r}; use wikitext2, c4, a hub id such as owner/name[:config[:split]], or --text-file")
    docs = streamed_documents(repo, split, max_tokens * CHARS_PER_TOKEN)
    return tokenize_documents(tokenizer, docs, max_tokens, separator=tokenizer.eos_token_id)


def source_windows(source: TextSource, count: int, seq_len: int, tokenizer: Any, split: str,
                   sampled: Callable[[int], torch.LongTensor], seed: int | None = None) -> torch.LongTensor:
    """Up to `count` windows of `seq_len` tokens from one source of a mixture: `sampled(count)` for text sampled
    from the model, else the file's or the hub dataset's `split`, as consecutive windows from its start (`seed`
    None: only as much text as they need is read) or as windows drawn with `seed` (`calibration_windows`)."""
    if source.kind == SELF:
        return sampled(count)
    if seed is None:
        return pack(text_stream(tokenizer, source, count * seq_len, split), seq_len)
    text = load_text(text_file=source.value) if source.kind == "file" else load_text(dataset=source.value, split=split)
    return calibration_windows(tokenizer, text, seq_len, count, seed=seed)
