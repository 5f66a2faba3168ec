"""A user cache for text sampled from a model, so that a second conversion or healing run of the same model
reuses it. Never inside an output folder: `$TRANSMLA_CACHE`, else `$XDG_CACHE_HOME/transmla`, else
`~/.cache/transmla`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

CACHE_VERSION = 2  # raised when the key or the stored format changes


def cache_dir() -> Path:
    """Where sampled text is kept."""
    if os.environ.get("TRANSMLA_CACHE"):
        return Path(os.environ["TRANSMLA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "transmla"


def cached_tokens(key: dict[str, Any], make: Callable[[], torch.LongTensor]) -> torch.LongTensor:
    """The token tensor stored under `key` (any JSON-able description of what was sampled and how), made and
    stored on a miss. A cache that can not be written only costs the reuse (one note)."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_dir() / "samples" / f"{digest[:32]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a truncated or foreign file: make it again
            path.unlink(missing_ok=True)
    tokens = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        torch.save(tokens, partial)
        partial.replace(path)
    except OSError as exc:
        tqdm.write(f"note: sampled text not cached ({exc.strerror or exc} at {path.parent}); set TRANSMLA_CACHE to a writable folder to reuse it")
    return tokens
