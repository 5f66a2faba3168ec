"""Write tensors as safetensors shards with a transformers-style index, streaming each tensor to disk as it comes."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from transmla.defaults import MAX_SHARD_BYTES
from transmla.io.reader import INDEX_NAME

SINGLE_FILE_NAME = "model.safetensors"
# Room kept for a shard's JSON header before its data; the header is padded with spaces (allowed by the
# safetensors format) and the file is rewritten once in the rare case that the header outgrows it.
HEADER_RESERVE = 64 * 2**10
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _write_tensor(handle: BinaryIO, tensor: torch.Tensor) -> None:
    """Append the raw little-endian bytes of a contiguous CPU tensor."""
    if tensor.numel():
        handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


class _Shard:
    """One shard file being written: reserved header room, then tensor data appended in order."""

    def __init__(self, path: Path, metadata: dict[str, str], reserve: int) -> None:
        self.path, self.metadata, self.reserve = path, metadata, reserve
        self.entries: dict[str, dict] = {}
        self.nbytes = 0
        self.handle: BinaryIO = path.open("wb")
        self.handle.write(b"\0" * (8 + reserve))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors can not store")
        nbytes = tensor.numel() * tensor.element_size()
        _write_tensor(self.handle, tensor)
        self.entries[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [self.nbytes, self.nbytes + nbytes]}
        self.nbytes += nbytes

    def close(self) -> list[str]:
        """Write the header (rewriting the file if it outgrew its room); return the tensor names."""
        header = {"__metadata__": self.metadata, **self.entries} if self.metadata else dict(self.entries)
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) <= self.reserve:
            self.handle.seek(0)
            self.handle.write(struct.pack("<Q", self.reserve) + text.ljust(self.reserve, b" "))
            self.handle.close()
            return list(self.entries)
        self.handle.close()
        size = _round8(len(text))
        moved = self.path.with_name(self.path.name + ".grow")
        with self.path.open("rb") as old, moved.open("wb") as new:
            new.write(struct.pack("<Q", size) + text.ljust(size, b" "))
            old.seek(8 + self.reserve)
            shutil.copyfileobj(old, new, 16 * 2**20)
        moved.replace(self.path)
        return list(self.entries)


class ShardedSafetensorsWriter:
    """Write tensors to `out_dir` in shards of at most `max_shard_bytes`, each tensor as soon as it is added.

    Memory stays at one tensor whatever the shard size. A tensor larger than `max_shard_bytes` gets a shard
    of its own. The same tensors added in the same order give byte-identical files.
    """

    def __init__(
        self,
        out_dir: Path | str,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        header_reserve: int = HEADER_RESERVE,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt"}
        self.header_reserve = _round8(max(header_reserve, 8))
        self.total_size = 0
        self._open: _Shard | None = None
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names) per written shard
        self._names: set[str] = set()
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` under `name` to the current shard, starting a new one if it would overflow."""
        if self._finished:
            raise RuntimeError("ShardedSafetensorsWriter.add() called after finish()")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._open is not None and self._open.entries and self._open.nbytes + nbytes > self.max_shard_bytes:
            self._close()
        if self._open is None:
            path = self.out_dir / f"_shard-{len(self._shards) + 1:05d}.safetensors.partial"
            self._open = _Shard(path, self.metadata, self.header_reserve)
        self._open.add(name, tensor)
        self._names.add(name)
        self.total_size += nbytes

    def _close(self) -> None:
        if self._open is not None:
            self._shards.append((self._open.path, self._open.close()))
            self._open = None

    def finish(self) -> list[Path]:
        """Close the last shard, sync and give the shards their final names (and the index if several)."""
        if self._finished:
            raise RuntimeError("ShardedSafetensorsWriter.finish() called twice")
        self._close()
        self._finished = True
        if not self._shards:
            raise ValueError("no tensors were added to the ShardedSafetensorsWriter")
        for path, _ in self._shards:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if len(self._shards) == 1:
            final = self.out_dir / SINGLE_FILE_NAME
            self._shards[0][0].replace(final)
            return [final]
        count = len(self._shards)
        paths: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = self.out_dir / f"model-{i:05d}-of-{count:05d}.safetensors"
            tmp.replace(final)
            paths.append(final)
            weight_map.update((name, final.name) for name in names)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return paths
