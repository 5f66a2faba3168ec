"""The same command on the same machine gives the same bytes: deterministic kernels wherever the work runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to reduce in a fixed order: set before its first use, so on import
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextmanager
def deterministic() -> Iterator[None]:
    """Run the body with PyTorch's deterministic kernels (e.g. sorted instead of atomic index_add_ on a GPU);
    kernels that have none still run, with a warning."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
