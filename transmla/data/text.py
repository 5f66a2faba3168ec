"""Evaluation and calibration text: loading it and cutting it into token windows."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from transmla.errors import TransMLAError

KNOWN_DATASETS = ("wikitext2", "c4")
C4_CHARS = 2_000_000  # characters of C4 to stream: a few hundred 2048-token windows
HUB_PROBE_SECONDS = 5.0  # how long the hub may take to answer before it counts as unreachable


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


def _split(ids: torch.LongTensor, seq_len: int, max_windows: int | None = None) -> torch.LongTensor:
    if seq_len < 2:
        raise TransMLAError(f"sequence length {seq_len} is too short; use at least 2 tokens")
    count = ids.numel() // seq_len
    if count == 0:
        raise TransMLAError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a longer text or a shorter sequence length"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise TransMLAError(f"max windows must be at least 1, got {max_windows}")
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len).clone()


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
