"""Defaults of the options dataclasses, read by the command line so that each default is written once."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

MAX_SHARD_BYTES = 5 * 2**30  # largest safetensors shard written by convert, export and heal


def default_of(options: type, name: str) -> Any:
    """The default of field `name` of the options dataclass `options`."""
    field = next(f for f in fields(options) if f.name == name)
    return field.default_factory() if field.default is MISSING else field.default
