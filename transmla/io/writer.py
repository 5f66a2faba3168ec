"""Write tensors as safetensors shards with a transformers-style index, a bounded buffer at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from transmla.io.reader import INDEX_NAME

SINGLE_FILE_NAME = "model.safetensors"


class ShardedSafetensorsWriter:
    """Buffer tensors and write them to `out_dir` in shards of at most `max_shard_bytes`.

    A tensor larger than `max_shard_bytes` gets a shard of its own. Tensors must not be modified after `add`.
    The same tensors added in the same order give byte-identical files.
    """

    def __init__(
        self,
        out_dir: Path | str,
        max_shard_bytes: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt"}
        self.total_size = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names) per written shard
        self._names: set[str] = set()
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` under `name`; writes the current shard first if `tensor` would overflow it."""
        if self._finished:
            raise RuntimeError("ShardedSafetensorsWriter.add() called after finish()")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        tensor = self._own(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._buffer[name] = tensor
        self._buffer_bytes += nbytes
        if nbytes:
            self._buffer_storages.add(tensor.untyped_storage().data_ptr())
        self.total_size += nbytes

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor whose storage is exactly its data and is shared with no other buffered tensor."""
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            return tensor.to("cpu").contiguous()
        if not tensor.is_contiguous():
            return tensor.contiguous()  # copies
        storage = tensor.untyped_storage()
        is_view = tensor.storage_offset() != 0 or storage.nbytes() != tensor.numel() * tensor.element_size()
        if is_view or storage.data_ptr() in self._buffer_storages:
            return tensor.clone()
        return tensor

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.out_dir / f"_shard-{len(self._shards) + 1:05d}.safetensors.partial"
        save_file(self._buffer, str(path), metadata=self.metadata)
        os.chmod(path, 0o644)  # safetensors creates files readable by the owner only
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages = set()

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names (and the index if several); return the paths."""
        if self._finished:
            raise RuntimeError("ShardedSafetensorsWriter.finish() called twice")
        self._flush()
        self._finished = True
        if not self._shards:
            raise ValueError("no tensors were added to the ShardedSafetensorsWriter")
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
